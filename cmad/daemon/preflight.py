"""Checks made before anything is mounted: the state directory, the region
layout, and the lock that keeps two daemons off one mountpoint."""

from __future__ import annotations

import errno
import fcntl
import os
import time

from cmad.allocators import registry
from cmad.core.cma import plan_regions
from cmad.daemon.config import Config
from cmad.errors import CmaError
from cmad.memory.hugepages import RUN_DIR, escaped_name, private_dir, user_dir


def layout(config: Config) -> list[tuple]:
    """What a configuration makes of the regions (EINVAL etc. if it is bad), without
    building allocators (a typo like 1P:bitmap must not allocate a huge bitmap)."""
    specs, starts = plan_regions(config.regions, config.base, config.arena_size, registry())
    return sorted((starts[s.name], s.name, s.size, s.alloc) for s in specs)


def state_dir_problem(state_dir: str | None) -> str | None:
    """Why *state_dir* cannot hold a journal, found before anything is mounted."""
    if state_dir is None or not os.path.lexists(state_dir):
        return None
    if not os.path.isdir(state_dir):
        return f"state_dir {state_dir} exists and is not a directory"
    from cmad.daemon.offline import holders
    running = holders(state_dir)
    if running:
        return (f"state_dir {state_dir} is in use by another daemon: {', '.join(running)} "
                "holds its journal; one state directory serves one daemon")
    return None


def layout_problem(config: Config) -> str | None:
    """Why the regions cannot be laid out, found before anything is mounted."""
    try:
        layout(config)
    except CmaError as e:
        return e.why
    return None


def mount_lock(mountpoint: str) -> tuple[int, str]:
    """Take the lock of *mountpoint* (resolved), held from the check of the
    mountpoint until the mount stands (`start`): of two daemons started at once
    on one mountpoint, the second fails naming the first, instead of both
    mounting.  A flock on a file in the root-only /run/cmad (the user's own
    directory for a daemon run by another user) that names its holder's pid;
    the kernel drops it with its holder, kill -9 included, and its holder
    deletes it.  Returns (fd, path) for `mount_unlock`."""
    directory = RUN_DIR if os.geteuid() == 0 else user_dir()
    path = os.path.join(private_dir(directory), escaped_name(mountpoint) + ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            os.close(fd)
            raise OSError(errno.EBUSY, f"{mountpoint}: another cmad (pid {holder}) is "
                                       "starting on this mountpoint; not touching it") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else its holder deleted it meanwhile: lock the new one
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, path


def lock_holder(fd: int) -> str:
    """The pid in a lock file someone holds; it writes it just after taking the
    lock, so wait a moment for it."""
    for _ in range(50):
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if holder:
            return holder
        time.sleep(0.01)
    return "?"


def mount_unlock(lock: tuple[int, str]) -> None:
    """The mount stands (or start-up failed): the next daemon sees the mount itself."""
    fd, path = lock
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)
