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
import sys
from typing import Awaitable, Callable, Iterable, Optional

import pyfuse3
import trio

from . import guard
from .guard import abort_connection, alive
from .notify import invalidator
from .ops import Filesystem

__all__ = ["serve", "check_mountpoint", "mount_options", "mount_entry", "abort_connection"]

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
    # The pid in the source lets the next daemon tell a stale mount from a
    # live one by the mount table alone (see check_mountpoint).
    opts.update(("allow_other", "default_permissions", f"fsname={fsname}:{os.getpid()}"))
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
    watchman = _start_guard(mountpoint)
    try:
        trio.run(_run, fs, on_ready, tasks)
    finally:
        if watchman is not None:
            watchman.kill()
            watchman.wait()
        if not invalidator.stop():
            # The invalidation thread waits on a directory lock that a lookup
            # holds while it waits for the loop we just stopped: abort the
            # connection, or the process could never exit.
            mount = mount_entry(os.path.abspath(mountpoint))
            if mount is not None and abort_connection(mount[2]):
                log.warning("aborted the FUSE connection to free a blocked invalidation")
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


def _start_guard(mountpoint: str) -> Optional[subprocess.Popen]:
    """The guard process (guard.py): aborts our connection if we die stuck."""
    mount = mount_entry(os.path.abspath(mountpoint))
    if mount is None:
        return None
    return subprocess.Popen([sys.executable, "-S", guard.__file__, str(os.getpid()),
                             str(mount[2])], stdin=subprocess.DEVNULL, close_fds=True)


def check_mountpoint(path: str) -> None:
    """Make *path* usable as a mountpoint, or refuse.

    The mount table says what is there without touching the filesystem (a
    call into a FUSE mount whose daemon died while the kernel waited on it
    can block forever; even statvfs):
    - a FUSE mount whose source names a pid (``serve`` mounts as
      ``<fsname>:<pid>``) that is dead or a zombie is stale: its connection
      is aborted through fusectl (which frees every process blocked on it,
      including a dying daemon stuck in an entry invalidation) and it is
      lazily unmounted, with a log line;
    - any other FUSE mount is probed with statvfs: ENOTCONN means stale;
    - a live mount of anything raises OSError(EBUSY) naming it: another
      daemon's mount is never touched;
    - a missing directory is created.
    """
    path = os.path.abspath(os.fspath(path))
    mount = mount_entry(path)
    if mount is not None:
        source, fstype, minor = mount
        pid = _source_pid(source)
        if fstype.startswith("fuse") and pid is not None:
            stale = not alive(pid)
        elif fstype.startswith("fuse"):
            try:
                os.statvfs(path)
                stale = False
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise
                stale = True
        else:
            stale = False
        if not stale:
            raise OSError(errno.EBUSY, f"{path} is already a live mount point ({source} "
                          f"type {fstype}); not touching it", path)
        log.warning("%s: stale FUSE mount (%s, its daemon is gone), clearing it", path, source)
        abort_connection(minor)
        _lazy_unmount(path)
    os.makedirs(path, exist_ok=True)


def mount_entry(path: str) -> tuple[str, str, int] | None:
    """(source, fstype, device minor) of the topmost mount on *path*, or None."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) >= 5 and len(tail) >= 2 and _unescape(fields[4]) == path:
                    found = (_unescape(tail[1]), tail[0], int(fields[2].split(":")[1]))
    except OSError:
        pass
    return found


def _source_pid(source: str) -> int | None:
    name, colon, pid = source.rpartition(":")
    return int(pid) if colon and name and pid.isdigit() else None


def _lazy_unmount(path: str) -> None:
    tool = shutil.which("fusermount3")
    argv = [tool, "-u", "-z", path] if tool else ["umount", "-l", path]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(errno.EBUSY, f"cannot clear the stale mount on {path}: "
                      f"{' '.join(argv)}: {done.stderr.strip()}", path)


def _unescape(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
