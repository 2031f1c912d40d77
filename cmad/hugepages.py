"""The kernel's hugepage pool, the pages this daemon added to it, and its private mounts.

The daemon raises ``vm.nr_hugepages`` itself when the free pool is short and
gives back exactly what it added when it deletes its arena.  What it added is
recorded in a small file (the state directory's ``hugepages``, or
``/run/cmad/<name>.hugepages`` without one), so a restarted daemon gives the
pages back too.  Two daemons never undo each other's pages: each subtracts
only its own additions, never more than the pool has free and unreserved,
and every read-modify-write of the pool happens under one lock
(``/run/cmad/pool.lock``) that is held until the pages are in an arena file.

Arena files live where only root can write: ``/run/cmad/`` (root, 0700) with
a private hugetlbfs mount ``/run/cmad/hugetlbfs`` and, where /run is not a
tmpfs, a private tmpfs ``/run/cmad/shm`` for the shared-memory fallback.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import stat

from .errors import CmaError
from .memparse import human

log = logging.getLogger(__name__)

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
RUN_DIR = "/run/cmad"
MODES = ("reserve", "free")
# Never take more than this share of MemAvailable for the pool: the rest of the machine lives.
MAX_SHARE = 0.5


def meminfo() -> dict[str, int]:
    """/proc/meminfo as numbers (kB for sizes, counts for HugePages_*)."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def page_size() -> int:
    return meminfo().get("Hugepagesize", 2048) * 1024


def unreserved_free() -> int:
    """Free hugepages nobody has a reservation on."""
    info = meminfo()
    return max(info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0), 0)


def _read_nr() -> int:
    with open(NR_HUGEPAGES) as f:
        return int(f.read())


def _write_nr(value: int) -> int:
    with open(NR_HUGEPAGES, "w") as f:
        f.write(str(value))
    return _read_nr()


def escaped_name(mountpoint: str, state_dir: str | None = None) -> str:
    """A file name no two mountpoints (and no two state directories) share: a
    readable escape plus a hash of the path and of the state directory's.

    ``/tmp/a-b`` and ``/tmp/a/b`` escape alike (``tmp-a-b``) but hash apart; two
    state directories on one mountpoint get two arena files, so neither daemon
    ever removes the other's.
    """
    path = os.path.abspath(mountpoint)
    readable = "".join(c if c.isalnum() or c in "._" else "-" for c in path.strip("/"))[:80]
    key = path if not state_dir else f"{path}\0{os.path.realpath(state_dir)}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"cmad-{readable or 'root'}-{digest}"


def private_dir(path: str) -> str:
    """Create (or check) a directory of ours with mode 0700; EPERM if someone else's."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CmaError(e.errno, f"cannot create {path}: {e.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise CmaError(errno.EPERM, f"{path} is not a directory of uid {os.geteuid()} with "
                                    f"mode 0700 (uid {st.st_uid}, mode "
                                    f"{stat.S_IMODE(st.st_mode):o}): refusing to keep arena "
                                    "files there; remove it")
    return path


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
            f",pagesize={page_size()}" if kind == "hugetlbfs" else ""))
        log.info("mounted a private %s on %s for arena files", kind, target)
    return target


def shm_dir() -> str:
    """Where a shared-memory arena file goes: a tmpfs directory only we can write."""
    if os.geteuid() != 0:
        return private_dir(f"/dev/shm/cmad-{os.geteuid()}")
    private_dir(RUN_DIR)
    if fs_type(RUN_DIR) == "tmpfs":
        return RUN_DIR
    try:
        return private_mount("tmpfs")
    except OSError as e:  # never a world-writable directory: anyone could plant files there
        raise CmaError(e.errno or errno.EIO, f"{e.strerror}: no root-only shared memory "
                                             f"for the arena file (/run is no tmpfs)") from None


_lock = {"fd": -1, "depth": 0}


def pool_lock() -> None:
    """Take the machine-wide pool lock (re-entrant within the daemon; root only)."""
    if _lock["depth"] == 0 and os.geteuid() == 0:
        try:
            private_dir(RUN_DIR)
            fd = os.open(os.path.join(RUN_DIR, "pool.lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _lock["fd"] = fd
        except (OSError, CmaError) as e:
            log.warning("hugepages: no pool lock (%s)", getattr(e, "why", e))
    _lock["depth"] += 1


def pool_unlock() -> None:
    _lock["depth"] -= 1
    if _lock["depth"] == 0 and _lock["fd"] >= 0:
        os.close(_lock["fd"])
        _lock["fd"] = -1


def release_mount(kind: str = "hugetlbfs") -> None:
    """Unmount our private mount once no arena file is left in it: a machine where no
    daemon keeps an arena shows no extra mount."""
    target = os.path.join(RUN_DIR, kind)
    pool_lock()
    try:
        if fs_type(target) != kind or os.listdir(target):
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(target.encode(), 0) == 0:
            log.info("unmounted the private %s on %s (no arena file left)", kind, target)
    except OSError:
        pass
    finally:
        pool_unlock()


class Pool:
    """The hugepage pool as one daemon sees it: what is free, and what it added."""

    def __init__(self, record: str | None, mode: str = "reserve"):
        if mode not in MODES:
            raise CmaError(errno.EINVAL, f"hugepages {mode!r}: expected one of {MODES}")
        self.record = record
        self.mode = mode
        self.page = page_size()
        self.added = read_record(record)

    # -- the lock: one read-modify-write of the pool at a time ------------

    def lock(self) -> None:
        pool_lock()

    def unlock(self) -> None:
        pool_unlock()

    # -- growing and shrinking ------------------------------------------------

    def ensure(self, pages: int) -> tuple[int, str]:
        """Make ``pages`` free hugepages available; returns (free now, why not if short).

        In ``reserve`` mode as root the pool is raised by what is missing,
        within MAX_SHARE of MemAvailable, and the addition recorded.
        """
        free = unreserved_free()
        if free >= pages:
            return free, ""
        short = pages - free
        if self.mode == "free":
            return free, f"hugepages=free and only {free} of {pages} are free"
        if os.geteuid() != 0:
            return free, f"not root: cannot raise {NR_HUGEPAGES}"
        room = int(meminfo().get("MemAvailable", 0) * 1024 * MAX_SHARE) // self.page
        if short > room:
            return free, (f"{short} more hugepages ({human(short * self.page)}) would take "
                          f"more than {int(MAX_SHARE * 100)}% of the available memory")
        try:
            before = _read_nr()
            after = _write_nr(before + short)
        except OSError as e:
            return free, f"{NR_HUGEPAGES}: {e.strerror}"
        got = max(after - before, 0)
        if got:
            self.add(got)
            log.info("hugepages: added %d pages of %s to the pool (%d -> %d)", got,
                     human(self.page), before, after)
        free = unreserved_free()
        if free >= pages:
            return free, ""
        if got < short:
            return free, f"the kernel gave {got} of {short} hugepages (memory too fragmented)"
        return free, f"only {free} of {pages} hugepages are free: other processes took them"

    def add(self, pages: int) -> None:
        self.added += pages
        write_record(self.record, self.added)

    def give_back(self, pages: int | None = None) -> int:
        """Lower the pool by up to ``pages`` (default: all we added), never below what
        others hold: only free, unreserved pages go.  Returns how many went."""
        want = self.added if pages is None else min(pages, self.added)
        if want <= 0 or os.geteuid() != 0:
            return 0
        self.lock()
        try:
            n = min(want, unreserved_free())
            if n <= 0:
                return 0
            before = _read_nr()
            after = _write_nr(max(before - n, 0))
            gone = max(before - after, 0)
            self.added -= min(gone, self.added)
            write_record(self.record, self.added)
            log.info("hugepages: gave %d pages back to the pool (%d -> %d)", gone, before, after)
            return gone
        except OSError as e:
            log.warning("hugepages: cannot give %d pages back: %s", n, e.strerror)
            return 0
        finally:
            self.unlock()


def read_record(path: str | None) -> int:
    """Hugepages a daemon recorded as added by it (0 without a record)."""
    if path is None:
        return 0
    try:
        with open(path) as f:
            return max(int(f.read().split()[1]), 0)
    except (OSError, ValueError, IndexError):
        return 0


def write_record(path: str | None, added: int) -> None:
    if path is None:
        return
    if added <= 0:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"added {added}\n")
    os.replace(tmp, path)


def record_path(state_dir: str | None, mountpoint: str) -> str | None:
    """Where a daemon records the hugepages it added (None where it cannot add any)."""
    if state_dir:
        return os.path.join(state_dir, "hugepages")
    if os.geteuid() != 0:
        return None
    return os.path.join(RUN_DIR, escaped_name(mountpoint) + ".hugepages")


def give_back_record(path: str | None) -> int:
    """Give back what the record at ``path`` says was added (a dead daemon's pages)."""
    if path is None or not os.path.exists(path):
        return 0
    return Pool(path).give_back()
