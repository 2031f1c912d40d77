"""Regions shared with a group (SPEC 4d): a file of its own per shared region.

A region written ``gpu=8M:bf(group=render)`` keeps its memory in a file of
its own, owned ``root:render``, mode 0660, so that members of ``render`` can
map its chunks and hand them to a device; every other region stays in the
root-only arena file.  The file is mapped over the region's place in the
arena's mapping (`Arena.overlay`), so the daemon's own view of the arena
stays one range of bus addresses, and a chunk's offset in the file is
``start - region start``.

Where the files are (root's daemon)::

    /run/cmad-shared/                  root:root 0711  traversable, not listable
    /run/cmad-shared/<G>/              root:G    0750  G only
    /run/cmad-shared/<G>/hugepages/    root:G    0750  a hugetlbfs of G's, mounted by cmad
    /run/cmad-shared/<G>/shm/          root:G    0750  shared memory files (a tmpfs of
                                                       G's where /run is not one)

``/run/cmad`` stays 0700: the group reaches its files through the group's
own directory, outside it, and nobody else gets past that directory.  A
file is named ``<arena name>.<region>`` (the arena name is unique per
mountpoint and state directory).  A daemon run by another user than root
keeps them in its own runtime directory (reachable by it alone: a warning
says so).
"""

from __future__ import annotations

import ctypes
import errno
import grp
import logging
import os
import stat
from dataclasses import dataclass

from cmad.errors import CmaError
from cmad.memory.kernelpool import page_size, pool_lock, pool_unlock
from cmad.memory.ledger import unlink_arena
from cmad.memory.mounts import fs_type
from cmad.memory.rundir import user_dir

log = logging.getLogger(__name__)

SHARED_DIR = "/run/cmad-shared"
HUGEPAGES = "hugepages"
SHM = "shm"
FOLDERS = {"hugetlb": (HUGEPAGES, "hugetlbfs"), "shm": (SHM, "tmpfs")}


@dataclass
class SharedFile:
    """One shared region's file: where it goes in the arena and on disk."""

    region: str
    group: str
    gid: int  # 0 where the group does not exist: root only
    offset: int  # in the arena
    size: int
    path: str = ""
    fd: int = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def group_gid(group: str, region: str) -> int:
    """The gid of ``group``; 0 (root only) with a warning if there is no such group."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("region %s: group %r does not exist: its file is root-only", region, group)
        return 0


def _dir(path: str, mode: int, gid: int) -> str:
    """A directory of root's (uid 0, group ``gid``, ``mode``), made or checked; no
    symlink, and nobody else may write it."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except OSError as e:
        raise OSError(e.errno, f"cannot create {path}: {e.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise CmaError(errno.EPERM, f"{path} is not a directory of root's (uid {st.st_uid}): "
                                    "refusing to keep shared region files there; remove it")
    if (st.st_gid, stat.S_IMODE(st.st_mode)) != (gid, mode):
        os.chown(path, 0, gid, follow_symlinks=False)
        os.chmod(path, mode, follow_symlinks=False)
    return path


def _mount(fs: str, target: str, gid: int) -> None:
    """A hugetlbfs or tmpfs of the group's (root:gid 0750) on ``target``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    options = f"mode=0750,uid=0,gid={gid}" + (
        f",pagesize={page_size()}" if fs == "hugetlbfs" else "")
    if libc.mount(f"cmad-{fs}".encode(), target.encode(), fs.encode(), 2 | 4 | 8,
                  options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fs} on {target}: {os.strerror(err)}")
    log.info("mounted a %s for group %d on %s", fs, gid, target)


def directory(group: str, gid: int, kind: str) -> str:
    """Where the group's files of ``kind`` (``hugetlb`` or ``shm``) go, made ready.
    OSError where it cannot be had (the caller falls back, or fails)."""
    if os.geteuid() != 0:
        if kind == "hugetlb":
            raise OSError(errno.EPERM, "not root: no hugetlbfs a group can reach for "
                                       "shared regions")
        path = os.path.join(user_dir(), "shared")
        os.makedirs(path, 0o700, exist_ok=True)
        return path
    _dir(SHARED_DIR, 0o711, 0)
    name, fs = FOLDERS[kind]
    path = _dir(os.path.join(_dir(os.path.join(SHARED_DIR, group), 0o750, gid), name),
                0o750, gid)
    if fs_type(path) != fs:
        _mount(fs, path, gid)
    return path


def create(shared: SharedFile, arena_name: str, kind: str) -> SharedFile:
    """Make the region's file (empty, ``size`` long), owned root:G, mode 0660."""
    pool_lock()  # release_mounts never removes a directory between its making and the file
    try:
        folder = directory(shared.group, shared.gid, kind)
        shared.path = os.path.join(folder, f"{arena_name}.{shared.region}")
        remove(shared.path)  # a dead daemon's (no journal keeps it: the caller knows)
        fd = os.open(shared.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    finally:
        pool_unlock()
    try:
        if os.geteuid() == 0:
            os.fchown(fd, 0, shared.gid)
        else:
            log.warning("region %s: not root: its file %s is reachable by uid %d only",
                        shared.region, shared.path, os.geteuid())
        os.fchmod(fd, 0o660 if os.geteuid() == 0 else 0o600)
        os.ftruncate(fd, shared.size)
    except OSError:
        os.close(fd)
        remove(shared.path)
        raise
    shared.fd = fd
    return shared


def adopt(shared: SharedFile, path: str) -> SharedFile:
    """Open the surviving file of a shared region (after kill -9): it must be the
    daemon's own (regular, ours, one link) and as long as the region."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise CmaError(errno.EINVAL, f"region {shared.region}: its file {path} is gone or "
                                     f"unusable ({e.strerror}), and journalled chunks had "
                                     "their bytes there; refusing to start (run 'cmad "
                                     "reset' to forget them)") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1 \
            or st.st_size < shared.size:
        os.close(fd)
        raise CmaError(errno.EPERM, f"region {shared.region}: {path} is not its file (a "
                                    f"regular file of uid {os.geteuid()}, one link, at least "
                                    f"{shared.size} bytes): refusing to use it")
    mode = 0o660 if os.geteuid() == 0 else 0o600
    if os.geteuid() == 0 and (st.st_gid, stat.S_IMODE(st.st_mode)) != (shared.gid, mode):
        os.fchown(fd, 0, shared.gid)
        os.fchmod(fd, mode)
        log.info("region %s: %s is root:%d, mode %o again", shared.region, path,
                 shared.gid, mode)
    shared.path, shared.fd = path, fd
    return shared


def remove(path: str) -> bool:
    """Delete a shared region file of the daemon's (regular, ours, one link); True if
    there was one.  Anything else at that name is left and refused (EPERM)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        raise CmaError(errno.EPERM, f"{path} is not a shared region file of the daemon's: "
                                    "refusing to delete it")
    unlink_arena(path)  # the ledger no longer names it as holding pages
    return True


def files_of(arena_name: str) -> list[str]:
    """Every shared region file of the arena ``arena_name`` (a dead daemon's too)."""
    prefix = arena_name + "."
    folders = [os.path.join(user_dir(), "shared")]
    if os.geteuid() == 0 and os.path.isdir(SHARED_DIR):
        for group in sorted(os.listdir(SHARED_DIR)):
            folders += [os.path.join(SHARED_DIR, group, name) for name in (HUGEPAGES, SHM)]
    found = []
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found += [os.path.join(folder, n) for n in sorted(names) if n.startswith(prefix)
                  and os.path.isfile(os.path.join(folder, n))]
    return found


def release_mounts() -> None:
    """Unmount the groups' hugetlbfs and tmpfs once no file is left in them, and drop
    empty group directories: a machine where no daemon shares a region shows
    nothing extra."""
    if os.geteuid() != 0 or not os.path.isdir(SHARED_DIR):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pool_lock()
    try:
        for group in os.listdir(SHARED_DIR):
            folder = os.path.join(SHARED_DIR, group)
            for name, fs in FOLDERS.values():
                path = os.path.join(folder, name)
                try:
                    if os.path.ismount(path) and not os.listdir(path):
                        if libc.umount2(path.encode(), 0) == 0:
                            log.info("unmounted the %s of group %s (no file left)", fs, group)
                    if os.path.isdir(path) and not os.path.ismount(path) \
                            and not os.listdir(path):
                        os.rmdir(path)
                except OSError:
                    continue
            try:
                if not os.listdir(folder):
                    os.rmdir(folder)
            except OSError:
                continue
        if not os.listdir(SHARED_DIR):
            os.rmdir(SHARED_DIR)
    except OSError:
        pass
    finally:
        pool_unlock()
