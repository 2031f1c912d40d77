"""Mountpoint paths: resolved without looking into a mount, and trusted.

A mountpoint path is refused (EPERM) when another user could change where it
leads, the way fusermount3 and systemd's mount units refuse user-controlled
paths; whatever acts on it then acts through a descriptor on the directory
that was checked (`open_parent`).
"""

from __future__ import annotations

import errno
import os
import stat

from .mountinfo import mount_points

__all__ = ["resolve", "trusted_uids", "check_trusted", "open_parent"]


def resolve(path: str, *, trusted: bool = False) -> str:
    """*path* absolute with every symlink resolved, like os.path.realpath, but
    never looking into a mount point (a mount point is never a symlink, and a
    dead daemon's mount can block whoever touches it).

    With *trusted*, every symlink followed must be one only we (root, or the
    caller's uid) could have put there (`check_trusted`): else EPERM, the way
    fusermount3 and systemd's mount units refuse user-controlled paths.
    """
    mounts = mount_points()
    pending = [p for p in os.path.join(os.getcwd(), os.fspath(path)).split("/") if p]
    done, links = "/", 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            done = os.path.dirname(done)
            continue
        candidate = os.path.join(done, part)
        target = None if candidate in mounts else _readlink(candidate)
        if target is None:
            done = candidate
            continue
        links += 1
        if links > 40:
            raise OSError(errno.ELOOP, f"{path}: too many levels of symbolic links", path)
        if trusted:
            check_trusted(candidate, os.lstat(candidate), f"{path}: symlink {candidate}")
            check_trusted(done, os.stat(done), f"{path}: {done}, holding symlink {candidate},",
                          lookup=True)
        if target.startswith("/"):
            done = "/"
        pending[:0] = [p for p in target.split("/") if p]
    return done


def trusted_uids() -> set[int]:
    """Who may own what a mountpoint path goes through: root, and the caller."""
    return {0, os.geteuid()}


def check_trusted(path: str, st: os.stat_result, what: str, *, lookup: bool = False) -> None:
    """EPERM unless *st* (of *path*) belongs to a trusted uid and, as a directory a
    name is looked up in (*lookup*), only its owner can change its entries (not
    writable by group or others, or sticky: then each entry is its owner's)."""
    if st.st_uid not in trusted_uids():
        raise _refusal(path, f"{what} belongs to uid {st.st_uid}, not root: a mountpoint "
                             "is refused when another user could change where it leads "
                             "(choose a path only root controls)")
    if lookup and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise _refusal(path, f"{what} is writable by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):o}), not only by root: a mountpoint "
                             "is refused when another user could change where it leads")


def _refusal(path: str, why: str) -> OSError:
    e = OSError(errno.EPERM, why, path)
    e.why = why
    return e


def open_parent(path: str, *, create: bool = False) -> tuple[int, str]:
    """An O_PATH descriptor on the directory holding the resolved *path*, and the
    last component's name, found component by component with no symlink
    followed, every component checked (`check_trusted`); with *create*, missing
    components are made (mode 0755) on the way.  Whatever acts on the
    mountpoint then acts through this descriptor: what was checked is what is
    mounted on, however the path changes meanwhile."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise OSError(errno.EINVAL, "/ cannot be the mountpoint", path)
    mounts = mount_points()
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    done = "/"
    try:
        check_trusted(done, os.fstat(fd), "/", lookup=True)
        for i, part in enumerate(parts):
            here = os.path.join(done, part)
            last = i == len(parts) - 1
            if last and here in mounts:  # never touched: its daemon may be dead
                return fd, part
            try:
                child = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refusal(path, f"{path}: {here} is not a directory (a symlink "
                                         "changed since it was resolved?)") from None
                raise
            try:
                check_trusted(here, os.fstat(child), f"{path}: {here}", lookup=not last)
            except OSError:
                os.close(child)
                raise
            if last:
                os.close(child)
                return fd, part
            os.close(fd)
            fd, done = child, here
    except BaseException:
        os.close(fd)
        raise
    raise AssertionError("unreachable")


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # not a link, or not there (created later, as a directory)
        return None
