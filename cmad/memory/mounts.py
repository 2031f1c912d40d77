"""Private mounts for arena files: a hugetlbfs, and a tmpfs for the shared-memory fallback.

``/run/cmad/hugetlbfs`` is a private hugetlbfs mount and, where /run is not a
tmpfs, ``/run/cmad/tmpfs`` a private tmpfs (never a world-writable directory
such as /dev/shm).  Each is unmounted once no arena file is left in it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

from cmad.errors import CmaError
from cmad.memory import kernelpool
from cmad.memory.rundir import RUN_DIR, private_dir, user_dir

log = logging.getLogger(__name__)


def fs_type(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (longest prefix in /proc/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


def _mount(kind: str, target: str, options: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    ms_nosuid, ms_nodev, ms_noexec = 2, 4, 8
    if libc.mount(f"cmad-{kind}".encode(), target.encode(), kind.encode(),
                  ms_nosuid | ms_nodev | ms_noexec, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {kind} on {target}: {os.strerror(err)}")


def private_mount(kind: str) -> str:
    """``/run/cmad/<kind>``: a private hugetlbfs or tmpfs, mounted by us if it is not."""
    private_dir(RUN_DIR)
    target = private_dir(os.path.join(RUN_DIR, kind))
    if fs_type(target) != kind:
        _mount(kind, target, "mode=0700,uid=0,gid=0" + (
            f",pagesize={kernelpool.page_size()}" if kind == "hugetlbfs" else ""))
        log.info("mounted a private %s on %s for arena files", kind, target)
    return target


def shm_dir() -> str:
    """Where a shared-memory arena file goes: a tmpfs directory only we can write."""
    if os.geteuid() != 0:
        return private_dir(user_dir())
    private_dir(RUN_DIR)
    if fs_type(RUN_DIR) == "tmpfs":
        return RUN_DIR
    try:
        return private_mount("tmpfs")
    except OSError as e:  # never a world-writable directory: anyone could plant files there
        raise CmaError(e.errno or errno.EIO, f"{e.strerror}: no root-only shared memory "
                                             f"for the arena file (/run is no tmpfs)") from None


def release_mount(kind: str = "hugetlbfs") -> None:
    """Unmount our private mount once no arena file is left in it: a machine where no
    daemon keeps an arena shows no extra mount."""
    target = os.path.join(RUN_DIR, kind)
    kernelpool.pool_lock()
    try:
        if fs_type(target) != kind or os.listdir(target):
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(target.encode(), 0) == 0:
            log.info("unmounted the private %s on %s (no arena file left)", kind, target)
    except OSError:
        pass
    finally:
        kernelpool.pool_unlock()
