"""The event loop serving a mounted Filesystem: the FUSE loop, the caller's
tasks and the stop signals in one trio nursery."""

from __future__ import annotations

import logging
import signal
from typing import Awaitable, Callable, Iterable, Optional

import pyfuse3
import trio

from .ops import Filesystem
from .pipe import end_waits

__all__ = ["run"]

log = logging.getLogger("fusefs")


def run(fs: Filesystem, on_ready: Optional[Callable[[], None]],
        tasks: Iterable[Callable[[], Awaitable[None]]]) -> None:
    """Answer requests until the filesystem is unmounted or SIGTERM/SIGINT ends
    the loop (see `Mount.serve`)."""
    trio.run(_run, fs, on_ready, list(tasks))


async def _run(fs: Filesystem, on_ready, tasks) -> None:
    ready = trio.Event()
    fs.init_hooks.append(ready.set)
    fs.invalidator.start(trio.lowlevel.current_trio_token())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_on_signals)
            for task in tasks:
                nursery.start_soon(task)
            if on_ready is not None:
                nursery.start_soon(_call_when_ready, ready, on_ready)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        fs.init_hooks.remove(ready.set)


async def _call_when_ready(ready: trio.Event, on_ready: Callable[[], None]) -> None:
    await ready.wait()
    on_ready()


async def _terminate_on_signals() -> None:
    # Keeps receiving until the loop ends (this task is then cancelled), so
    # a second signal during shutdown cannot kill us before the unmount.
    terminated = False
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # A daemon may block them while it starts: ours from now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
        async for signum in signals:
            name = signal.Signals(signum).name
            if terminated:
                log.info("%s received, already unmounting", name)
                continue
            log.info("%s received, unmounting", name)
            terminated = True
            end_waits()             # a trace_pipe reader must not hold the stop up
            pyfuse3.terminate()
