"""Mounting and serving a Filesystem: the start-up and shut-down path.

pyfuse3 keeps one session per process, so `serve` runs one mount and
returns once it is unmounted again: after SIGTERM/SIGINT (which call
`pyfuse3.terminate`), after an external `fusermount3 -u`, or after an
error, always through `pyfuse3.close(unmount=True)`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import subprocess
from typing import Awaitable, Callable, Iterable, Optional

import pyfuse3
import trio

from .notify import invalidator
from .ops import Filesystem

__all__ = ["serve", "check_mountpoint", "mount_options"]

log = logging.getLogger("fusefs")


def mount_options(fsname: str = "fusefs", options: Iterable[str] = ()) -> set[str]:
    """The option set `serve` mounts with.

    allow_other + default_permissions: every user sees the tree and the
    kernel enforces the mode bits (root excepted, see Filesystem.open).
    Nothing is needed for big transfers: libfuse 3.14 negotiates
    max_write = max_pages = 1 MiB with this kernel by default, and with
    direct_io a read of 1 MiB is one request (max_read is unlimited).
    """
    opts = set(pyfuse3.default_options)
    opts.update(("allow_other", "default_permissions", f"fsname={fsname}"))
    opts.update(options)
    return opts


def serve(fs: Filesystem, mountpoint: str, *, options: Iterable[str] = (),
          fsname: str = "fusefs", on_ready: Optional[Callable[[], None]] = None,
          tasks: Iterable[Callable[[], Awaitable[None]]] = ()) -> None:
    """Mount *fs* on *mountpoint* and serve it until it is unmounted.

    *on_ready()* is called once, when the kernel has completed the FUSE
    handshake (the mount is live). *tasks* are async callables run in the
    same nursery as the FUSE loop and cancelled when it ends. SIGTERM and
    SIGINT end the loop; the filesystem is unmounted before returning.
    """
    mountpoint = os.fspath(mountpoint)
    opts = mount_options(fsname, options)
    tasks = list(tasks)
    log.debug("mounting %s on %s with %s", fsname, mountpoint, ",".join(sorted(opts)))
    try:
        pyfuse3.init(fs, mountpoint, opts)
    except RuntimeError as e:
        # libfuse has printed its reason (bad mount point...) on stderr.
        raise OSError(errno.EIO, f"cannot mount on {mountpoint}: {e}", mountpoint) from e
    try:
        trio.run(_run, fs, on_ready, tasks)
    finally:
        invalidator.stop()
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


async def _run(fs: Filesystem, on_ready, tasks) -> None:
    ready = trio.Event()
    fs.init_hooks.append(ready.set)
    invalidator.start(trio.lowlevel.current_trio_token())
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
        async for signum in signals:
            name = signal.Signals(signum).name
            if terminated:
                log.info("%s received, already unmounting", name)
                continue
            log.info("%s received, unmounting", name)
            terminated = True
            pyfuse3.terminate()


def check_mountpoint(path: str) -> None:
    """Make *path* usable as a mountpoint, or refuse.

    - A stale FUSE mount (its daemon died: statvfs fails with ENOTCONN; a
      plain stat may still be answered from the kernel's cache) is cleared
      with ``fusermount3 -u -z`` and logged.
    - A live mount of anything raises OSError(EBUSY) naming it: another
      daemon's mount is never touched.
    - A missing directory is created.
    """
    path = os.path.abspath(os.fspath(path))
    try:
        os.statvfs(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("%s: stale FUSE mount (its daemon is gone), clearing it", path)
        _lazy_unmount(path)
    else:
        if os.path.ismount(path):
            raise OSError(errno.EBUSY,
                          f"{path} is already a live mount point ({_mount_source(path)}); "
                          "not touching it", path)
    os.makedirs(path, exist_ok=True)


def _lazy_unmount(path: str) -> None:
    tool = shutil.which("fusermount3")
    argv = [tool, "-u", "-z", path] if tool else ["umount", "-l", path]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(errno.EBUSY, f"cannot clear the stale mount on {path}: "
                      f"{' '.join(argv)}: {done.stderr.strip()}", path)


def _mount_source(path: str) -> str:
    """'<source> type <fstype>' of the mount on *path*, from /proc/self/mounts."""
    try:
        with open("/proc/self/mounts") as f:
            found = None
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and _unescape(fields[1]) == path:
                    found = f"{_unescape(fields[0])} type {fields[2]}"
            return found or "unknown"
    except OSError:
        return "unknown"


def _unescape(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
