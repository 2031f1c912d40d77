"""systemd integration: sd_notify (READY, STATUS, WATCHDOG, RELOADING, STOPPING)
and SIGHUP reload.

The notify protocol is one datagram on the socket named by $NOTIFY_SOCKET
(a leading '@' means the abstract namespace).  The ``sdnotify`` package
does exactly these lines and was last released in 2017, so they live here.
Watchdog pings come from the trio loop itself, so a wedged loop stops them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Callable

import trio

from cmad.memparse import human

log = logging.getLogger("cmad")


def notify(**fields: object) -> bool:
    """Send ``KEY=value`` lines to systemd; False when not run under it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message, addr)
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", addr, e.strerror)
        return False
    return True


def status(cma) -> str:
    """The one-line STATUS= summary: regions, chunks, free bytes."""
    free = sum(r.free for r in cma.regions)
    size = sum(r.size for r in cma.regions)
    return (f"{len(cma.regions)} regions, {len(cma.chunks)} chunks, "
            f"{human(free)} of {human(size)} free")


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC in seconds, if the watchdog is for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def heartbeat(cma, interval: float | None) -> None:
    """WATCHDOG=1 (when asked for) and a fresh STATUS= line, forever; on each beat
    the journal retries what a full state disk kept it from recording."""
    while True:
        cma.catch_up()
        fields = {"STATUS": status(cma)}
        if interval is not None:
            fields["WATCHDOG"] = 1
        notify(**fields)
        await trio.sleep(min(interval or 5.0, 5.0))


async def reload_on_sighup(reload: Callable[[], None]) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
            try:
                reload()
            except Exception:
                log.exception("reload failed; the running configuration stays")
            finally:
                notify(READY=1)
