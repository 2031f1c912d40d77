"""Sealing the bare mountpoint: an immutable directory while no daemon serves.

Without a mount on it, ``echo L > mnt/free`` would create a plain file in the
bare directory and exit 0; an immutable directory refuses that, to root too.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os

from .paths import open_parent

__all__ = ["seal_mountpoint", "unseal_mountpoint"]

log = logging.getLogger("fusefs")

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602  # <linux/fs.h>, 64-bit
FS_IMMUTABLE_FL = 0x00000010


def seal_mountpoint(path: str) -> bool:
    """Make the bare directory under the mount immutable (FS_IOC_SETFLAGS).

    Without a mount on it, ``echo L > mnt/free`` would create a plain file
    there and exit 0: an immutable directory refuses that, to root too, with
    EPERM, and can still be mounted on.  The flag stays after the daemon
    stops (``chattr -i`` removes it).  Where the filesystem or the missing
    CAP_LINUX_IMMUTABLE does not allow it, a warning says so.
    """
    try:
        fd = _open_checked(path)
    except OSError as e:
        log.warning("%s: cannot open the mountpoint to seal it: %s", path,
                    getattr(e, "why", None) or e.strerror)
        return False
    leftovers = sorted(os.listdir(fd))
    if leftovers:
        log.warning("%s holds %s: while no daemon serves it, writes to these files succeed "
                    "silently; remove them", path, ", ".join(leftovers[:8]) +
                    (", ..." if len(leftovers) > 8 else ""))
    try:
        _set_immutable(fd, True)
        return True
    except OSError as e:
        log.warning("%s: cannot make the mountpoint immutable (%s): while no daemon serves "
                    "it, a write to alloc or free creates a plain file there and succeeds",
                    path, e.strerror)
        return False
    finally:
        os.close(fd)


def unseal_mountpoint(path: str) -> None:
    """Clear the immutable flag `seal_mountpoint` set (so the directory can go)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _set_immutable(fd, False)
    finally:
        os.close(fd)


def _open_checked(path: str) -> int:
    """The mountpoint directory itself, opened through its checked parent with no
    symlink followed (`open_parent`)."""
    parent, name = open_parent(path)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=parent)
    finally:
        os.close(parent)


def _set_immutable(fd: int, on: bool) -> None:
    """Set or clear FS_IMMUTABLE_FL on the open directory *fd*, if it differs."""
    flags = array.array("i", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
    if bool(flags[0] & FS_IMMUTABLE_FL) != on:
        flags[0] ^= FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)
