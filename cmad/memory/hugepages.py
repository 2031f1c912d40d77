"""The kernel's hugepage pool, the pages this daemon added to it, and its private mounts.

The daemon raises ``vm.nr_hugepages`` itself when the free pool is short and
gives back exactly what it added when it deletes its arena.  What it added is
recorded in the ledger ``/run/cmad/hugepages`` (`Ledger`, one per pool), so
a restarted daemon, any later start and ``cmad reset`` give the pages back
too.  Two daemons never undo each other's pages: each subtracts
only its own additions, never more than the pool has free and unreserved,
and every read-modify-write of the pool happens under one lock
(``/run/cmad/pool.lock``) that is held until the pages are in an arena file.

Arena files live where only root can write: ``/run/cmad/`` (root, 0700) with
a private hugetlbfs mount ``/run/cmad/hugetlbfs`` and, where /run is not a
tmpfs, a private tmpfs ``/run/cmad/tmpfs`` for the shared-memory fallback
(never a world-writable directory such as /dev/shm).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import stat

from cmad.errors import CmaError
from cmad.memparse import human

log = logging.getLogger(__name__)

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
RUN_DIR = "/run/cmad"
MODES = ("reserve", "free")
# Never take more than this share of MemAvailable for the pool: the rest of the machine lives.
MAX_SHARE = 0.5
#: The configuration key ``gather_limit``'s default: the pool is raised (for the
#: arena and while gathering pages for physical runs) by at most this much of
#: MemAvailable; a size ("48G") is an absolute cap instead.
GATHER_LIMIT = "50%"


def parse_gather_limit(text: str) -> tuple[float | None, int | None]:
    """``N%`` (of MemAvailable) -> (share, None); a size -> (None, bytes).
    CmaError EINVAL for anything else."""
    from cmad.memparse import memparse
    text = str(text).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise CmaError(errno.EINVAL, f"gather_limit {text!r}: a share of MemAvailable "
                                         "is more than 0% and at most 100%")
        return share, None
    return None, memparse(text, "gather_limit")


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


def user_dir() -> str:
    """A daemon run by another user than root keeps its files here: its own
    ``$XDG_RUNTIME_DIR/cmad`` (a tmpfs only that user can write) where there is
    one, else ``/dev/shm/cmad-<uid>`` (where another user could squat the name:
    then start fails saying so, and XDG_RUNTIME_DIR is the remedy)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    try:
        st = os.stat(runtime) if runtime.startswith("/") else None
    except OSError:
        st = None
    if st is not None and st.st_uid == os.geteuid() and not st.st_mode & 0o022:
        return os.path.join(runtime, "cmad")
    return f"/dev/shm/cmad-{os.geteuid()}"


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
    """The hugepage pool as one daemon sees it: what is free, and what it added.

    What it added is its entry in the ledger (`Ledger`), under ``key`` (the
    arena's name: mountpoint and state directory); None records nothing (not
    root: it cannot add pages)."""

    def __init__(self, key: str | None, mode: str = "reserve", *, ledger: str | None = None,
                 gather_limit: str = GATHER_LIMIT):
        if mode not in MODES:
            raise CmaError(errno.EINVAL, f"hugepages {mode!r}: expected one of {MODES}")
        self.key = key
        self.gather_limit = gather_limit
        self.share, self.cap_bytes = parse_gather_limit(gather_limit)
        self.capped = False  # the last ensure was cut short by gather_limit
        self.ledger = Ledger(ledger or LEDGER)
        self.mode = mode
        self.page = page_size()
        self.arena = "-"  # the arena file holding the pages, once there is one
        self.added = read_record(key, ledger=self.ledger.path)

    # -- the lock: one read-modify-write of the pool at a time ------------

    def lock(self) -> None:
        pool_lock()

    def unlock(self) -> None:
        pool_unlock()

    # -- growing and shrinking ------------------------------------------------

    def cap_text(self) -> str:
        """The cap gather_limit sets, in words: "half of MemAvailable (3.1 GiB)"."""
        if self.share is None:
            return f"gather_limit={self.gather_limit}"
        words = "half" if self.share == 0.5 else f"{self.share * 100:g}%"
        return (f"{words} of MemAvailable ({human(self.room() * self.page)}, "
                f"gather_limit={self.gather_limit})")

    def room(self) -> int:
        """How many pages gather_limit lets the pool be raised by now: a share of
        MemAvailable, or an absolute cap less what this daemon added already."""
        if self.share is not None:
            return int(meminfo().get("MemAvailable", 0) * 1024 * self.share) // self.page
        return max(self.cap_bytes // self.page - self.added, 0)

    def ensure(self, pages: int, *, partial: bool = False) -> tuple[int, str]:
        """Make ``pages`` free hugepages available; returns (free now, why not if short).

        In ``reserve`` mode as root the pool is raised by what is missing,
        within gather_limit, and the addition recorded.  Past the limit
        nothing is added, or with ``partial`` what the limit allows; either
        way ``capped`` says the limit, not the machine, cut it short.
        """
        self.capped = False
        free = unreserved_free()
        if free >= pages:
            return free, ""
        short = pages - free
        if self.mode == "free":
            return free, f"hugepages=free and only {free} of {pages} are free"
        if os.geteuid() != 0:
            return free, f"not root: cannot raise {NR_HUGEPAGES}"
        room = self.room()
        if short > room:
            self.capped = True
            if not partial or room <= 0:
                return free, (f"{short} more hugepages ({human(short * self.page)}) would go "
                              f"past the cap of {self.cap_text()}")
            short = room
        self.lock()
        try:
            entries = self.ledger.load()  # reconciled with the pool before we change it
            before = _read_nr()
            after = _write_nr(before + short)
            got = max(after - before, 0)
            if got:
                self.added = (self.added + got if self.key is None else
                              self.ledger.change(self.key, got, self.arena, entries))
                log.info("hugepages: added %d pages of %s to the pool (%d -> %d)", got,
                         human(self.page), before, after)
        except OSError as e:
            return free, f"{NR_HUGEPAGES}: {e.strerror}"
        finally:
            self.unlock()
        free = unreserved_free()
        if free >= pages:
            return free, ""
        if self.capped:
            return free, f"the pool may be raised by {short} more pages: the cap of {self.cap_text()}"
        if got < short:
            return free, f"the kernel gave {got} of {short} hugepages (memory too fragmented)"
        return free, f"only {free} of {pages} hugepages are free: other processes took them"

    def held_in(self, path: str) -> None:
        """The pages are in the arena file ``path`` now: a restart or ``cmad reset``
        finds them there; in a memfd (`MEMFD`) they go with the daemon."""
        self.arena = path
        if self.key is not None and self.added:
            self.lock()
            try:
                self.added = self.ledger.change(self.key, 0, path)
            finally:
                self.unlock()

    def give_back(self, pages: int | None = None) -> int:
        """Lower the pool by up to ``pages`` (default: all we added), never below what
        others hold: only free, unreserved pages go, and never more than the ledger,
        reconciled with the pool, says are ours.  Returns how many went."""
        if os.geteuid() != 0:
            return 0
        self.lock()
        try:
            entries = self.ledger.load()  # reconciled with the pool before we change it
            if self.key is not None:  # None: counted in this process only (bench/arena.py)
                self.added = entries.get(self.key, [0])[0]
            want = self.added if pages is None else min(pages, self.added)
            n = min(want, unreserved_free())
            if n <= 0:
                self.ledger.save(entries)
                return 0
            before = _read_nr()
            after = _write_nr(max(before - n, 0))
            gone = max(before - after, 0)
            taken = min(gone, self.added)
            self.added = (self.added - taken if self.key is None else
                          self.ledger.change(self.key, -taken, None, entries))
            log.info("hugepages: gave %d pages back to the pool (%d -> %d)", gone, before, after)
            return gone
        except OSError as e:
            log.warning("hugepages: cannot give pages back: %s", e.strerror)
            return 0
        finally:
            self.unlock()


# -- the ledger: every page any cmad added, in one file per pool -------------------
#
# /run/cmad/hugepages, root's, 0600, changed only under the pool lock:
#
#     boot <boot id>          the boot the entries belong to (a reboot rebuilt the pool)
#     total <n>               vm.nr_hugepages after the last change a daemon made
#     <key> <added> <pid>:<start time> <arena file or ->
#
# One entry per arena name (mountpoint and state directory), so the next
# daemon on that mountpoint and state directory, and 'cmad reset', find it
# whatever path named the mountpoint.  Read back, it is reconciled with the
# pool: an entry of another boot is dropped; a pool lowered below ``total``
# by someone else (which frees only free pages, and turns pages in use into
# surplus that goes when it is freed) cuts the entries by as much, dead
# daemons' first, so no daemon ever gives back a page it did not add.

LEDGER = os.path.join(RUN_DIR, "hugepages")
MEMFD = "memfd"  # an entry's pages are in its daemon's memfd arena


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _owner_alive(owner: str) -> bool:
    pid, _, start = owner.partition(":")
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (OSError, ValueError):
        return False
    return fields[0] != "Z" and (not start.isdigit() or int(fields[19]) == int(start))


def _held(entry: list) -> bool:
    """Whether an entry's pages are in an arena: a file that exists, or the memfd
    of a daemon that runs."""
    arena = entry[2]
    if arena == MEMFD:
        return _owner_alive(entry[1])
    return arena != "-" and os.path.exists(arena)


def _me() -> str:
    with open("/proc/self/stat") as f:
        return f"{os.getpid()}:{f.read().rpartition(')')[2].split()[19]}"


class Ledger:
    """The ledger file at ``path`` (see above); every method runs under the pool lock."""

    def __init__(self, path: str):
        self.path = path

    def load(self) -> dict[str, list]:
        """key -> [added, owner, arena], reconciled with the pool."""
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
        except OSError:
            return {}
        head = dict(line.split(" ", 1) for line in lines[:2] if " " in line)
        if head.get("boot") != boot_id():
            if lines:
                log.info("hugepages: the record of added pages is from another boot: dropped")
            return {}
        entries = {}
        for line in lines[2:]:
            fields = line.split(" ", 3)
            if len(fields) == 4 and fields[1].isdigit() and int(fields[1]) > 0:
                entries[fields[0]] = [int(fields[1]), fields[2], fields[3]]
        try:
            total, now = int(head.get("total", "0")), _read_nr()
        except (OSError, ValueError):
            return entries
        if total > now and entries:
            self._lowered(entries, total - now, now)
        return {k: e for k, e in entries.items() if e[0] > 0}

    @staticmethod
    def _lowered(entries: dict[str, list], lost: int, now: int) -> None:
        """The pool is ``lost`` pages below what cmad last saw.  Only free pages go
        when a pool is lowered: so it took pages of entries that no arena holds
        (dead daemons' first), and pages in an arena only as far as they became
        surplus (HugePages_Surp), which vanish with the arena.  Anything beyond
        is pages another process added and took back itself: not cmad's."""
        free = [k for k in entries if not _held(entries[k])]
        held = [k for k in entries if _held(entries[k])]
        budget = [min(lost, sum(entries[k][0] for k in free))]
        budget.append(min(lost - budget[0], meminfo().get("HugePages_Surp", 0)))
        for keys, room in ((free, budget[0]), (held, budget[1])):
            for key in sorted(keys, key=lambda k: _owner_alive(entries[k][1])):
                cut = min(room, entries[key][0])
                if cut:
                    entries[key][0] -= cut
                    room -= cut
                    log.warning("hugepages: the pool was lowered to %d by another process: "
                                "%d pages of %s are no longer counted as added by cmad", now,
                                cut, key)

    def save(self, entries: dict[str, list]) -> None:
        try:
            total = _read_nr()
        except OSError:
            total = 0
        live = {k: e for k, e in entries.items() if e[0] > 0}
        if not live:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        text = f"boot {boot_id()}\ntotal {total}\n" + "".join(
            f"{k} {e[0]} {e[1]} {e[2]}\n" for k, e in sorted(live.items()))
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)

    def change(self, key: str | None, pages: int, arena: str | None = None,
               entries: dict[str, list] | None = None) -> int:
        """Add ``pages`` (negative: take) to ``key``'s entry; with ``arena`` the entry
        is this process's from now on, its pages held in that file ("-": none).
        ``entries``: as loaded before this process changed the pool (else the
        change would read as someone else's).  Returns the entry's pages."""
        if key is None:
            return 0
        entries = self.load() if entries is None else entries
        entry = entries.setdefault(key, [0, _me(), "-"])
        entry[0] = max(entry[0] + pages, 0)
        if arena is not None:
            entry[1], entry[2] = _me(), arena
        self.save(entries)
        return entry[0]


def unlink_arena(path: str, *, ledger: str | None = None) -> None:
    """Delete the arena file ``path``; its ledger entry's pages are in no file any
    more (free now, or, where the pool was lowered under them, surplus that went
    with the file: the reconciliation has cut those already)."""
    pool_lock()
    try:
        if os.geteuid() != 0:
            os.unlink(path)
            return
        book = Ledger(ledger or LEDGER)
        entries = book.load()  # reconciled while the file still holds its pages
        os.unlink(path)
        for entry in entries.values():
            if entry[2] == path:
                entry[2] = "-"
        book.save(entries)
    finally:
        pool_unlock()


def boot_time() -> float:
    """When this boot began (``btime`` of /proc/stat), in seconds since the epoch."""
    try:
        with open("/proc/stat") as f:
            return float(next(line.split()[1] for line in f if line.startswith("btime ")))
    except (OSError, StopIteration, ValueError, IndexError):
        return float("inf")  # unknown: nothing counts as this boot's


def adopt_old_record(path: str, key: str, arena: str | None, *,
                     ledger: str | None = None) -> int:
    """An older cmad's record of its pages (``<state_dir>/hugepages``, or
    ``/run/cmad/<name>.hugepages`` without a state directory) joins the ledger
    under ``key``, as a dead daemon's, if it was written during this boot (else
    the pool was rebuilt since: dropped); the file goes.  Returns the pages."""
    try:
        with open(path) as f:
            added = max(int(f.read().split()[1]), 0)
        written = os.stat(path).st_mtime
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, IndexError):
        added, written = 0, 0.0
    if added and written >= boot_time() and os.geteuid() == 0:
        pool_lock()
        try:
            book = Ledger(ledger or LEDGER)
            entries = book.load()
            entry = entries.setdefault(key, [0, "0:0", arena or "-"])
            entry[0] += added
            book.save(entries)
        finally:
            pool_unlock()
        log.info("hugepages: %d pages recorded by an older cmad in %s are in the ledger now",
                 added, path)
    else:
        added = 0
    os.unlink(path)
    return added


def read_record(key: str | None, *, ledger: str | None = None) -> int:
    """Hugepages recorded as added under ``key`` (0 without an entry)."""
    if key is None:
        return 0
    entry = Ledger(ledger or LEDGER).load().get(key)
    return entry[0] if entry else 0


def record_key(state_dir: str | None, mountpoint: str) -> str | None:
    """The ledger entry of a daemon's pages (None where it cannot add any)."""
    if os.geteuid() != 0:
        return None
    return escaped_name(mountpoint, state_dir)


def give_back_record(key: str | None, *, ledger: str | None = None) -> int:
    """Give back what ``key``'s entry says was added (a dead daemon's pages)."""
    if key is None or not read_record(key, ledger=ledger):
        return 0
    return Pool(key, ledger=ledger).give_back()


def sweep(prefix: str = "", *, ledger: str | None = None) -> int:
    """Give back the pages of every dead daemon whose pages are in no arena file
    any more (killed while gathering, memfd arenas, a removed arena), as far as
    they are free; returns how many went.  Run at every start and by reset."""
    if os.geteuid() != 0:
        return 0
    pool_lock()
    try:
        book = Ledger(ledger or LEDGER)
        entries = book.load()
        book.save(entries)  # reconciled with the pool as it is now
        orphans = [k for k, entry in entries.items()
                   if k.startswith(prefix) and not _owner_alive(entry[1]) and not _held(entry)]
        return sum(give_back_record(k, ledger=ledger) for k in orphans)
    finally:
        pool_unlock()
