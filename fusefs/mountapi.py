"""Mounting with the kernel's mount API: a FUSE mount put in place of a stale one
with no moment in between.

libfuse mounts with mount(2), so replacing a stale mount means detaching it
first: for the milliseconds until the new mount exists, a client's
``echo L > mnt/free`` meets the bare directory.  The new API closes that
gap: fsopen/fsconfig/fsmount build the new mount detached, move_mount with
MOVE_MOUNT_BENEATH (Linux 6.5) slides it under the stale one, and
detaching the stale one then reveals it in one step.  libfuse is handed the
/dev/fuse descriptor as ``/dev/fd/N`` (it then mounts nothing itself), so
the unmount is ours too (`detach`).

Raw syscalls through ctypes (x86-64 and arm64 share these numbers); any
failure raises OSError and the caller falls back to libfuse's mount.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Iterable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC = 1, 1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x2, 0x4
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_BENEATH = 0x4, 0x200
AT_FDCWD = -100
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8

# The mount options `serve` uses that are FUSE filesystem flags.
FLAGS = frozenset({"allow_other", "default_permissions"})


def _syscall(number: int, *args) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syscall {number}: {os.strerror(code)}")
    return result


def supported(options: Iterable[str]) -> bool:
    """Whether *options* translate to the new API (else: libfuse mounts)."""
    return all(o in FLAGS or o.startswith("fsname=") for o in options)


def mount_fuse(path: str, options: Iterable[str], *, beneath: bool,
               dir_fd: int = AT_FDCWD) -> int:
    """Mount a new FUSE connection on *path* (relative to *dir_fd*; a final
    symlink is never followed), beneath its top mount if *beneath*, and return
    its /dev/fuse descriptor for libfuse."""
    fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        context = _syscall(SYS_FSOPEN, b"fuse", FSOPEN_CLOEXEC)
        try:
            _configure(context, fuse, options)
            mount = _syscall(SYS_FSMOUNT, ctypes.c_int(context), FSMOUNT_CLOEXEC,
                             MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        finally:
            os.close(context)
        try:
            flags = MOVE_MOUNT_F_EMPTY_PATH | (MOVE_MOUNT_BENEATH if beneath else 0)
            _syscall(SYS_MOVE_MOUNT, ctypes.c_int(mount), b"", ctypes.c_int(dir_fd),
                     os.fsencode(path), flags)
        finally:
            os.close(mount)
    except BaseException:
        os.close(fuse)
        raise
    return fuse


def _configure(context: int, fuse: int, options: Iterable[str]) -> None:
    def string(key: str, value: str) -> None:
        _syscall(SYS_FSCONFIG, ctypes.c_int(context), FSCONFIG_SET_STRING, key.encode(),
                 value.encode(), 0)

    string("fd", str(fuse))
    string("rootmode", "40000")
    string("user_id", str(os.geteuid()))
    string("group_id", str(os.getegid()))
    for option in options:
        if option.startswith("fsname="):
            string("source", option.removeprefix("fsname="))
        elif option in FLAGS:
            _syscall(SYS_FSCONFIG, ctypes.c_int(context), FSCONFIG_SET_FLAG, option.encode(),
                     None, 0)
        else:
            raise OSError(errno.EINVAL, f"mount option {option!r} has no fsconfig key")
    _syscall(SYS_FSCONFIG, ctypes.c_int(context), FSCONFIG_CMD_CREATE, None, None, 0)


def detach(path: str) -> None:
    """umount2(MNT_DETACH) of the top mount on *path*."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"umount {path}: {os.strerror(code)}", path)
