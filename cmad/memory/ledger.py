"""The ledger: every hugepage any cmad added to the pool, in one file per pool.

/run/cmad/hugepages, root's, 0600, changed only under the pool lock:

    boot <boot id>          the boot the entries belong to (a reboot rebuilt the pool)
    total <n>               vm.nr_hugepages after the last change a daemon made
    <key> <added> <pid>:<start time> <arena file or ->

One entry per arena name (mountpoint and state directory), so the next
daemon on that mountpoint and state directory, and 'cmad reset', find it
whatever path named the mountpoint.  Read back, it is reconciled with the
pool: an entry of another boot is dropped; a pool lowered below ``total``
by someone else (which frees only free pages, and turns pages in use into
surplus that goes when it is freed) cuts the entries by as much, dead
daemons' first, so no daemon ever gives back a page it did not add.
"""

from __future__ import annotations

import logging
import os

from cmad.memory import kernelpool
from cmad.memory.rundir import RUN_DIR, escaped_name

log = logging.getLogger(__name__)

LEDGER = os.path.join(RUN_DIR, "hugepages")
MEMFD = "memfd"  # an entry's pages are in its daemon's memfd arena


def owner_alive(owner: str) -> bool:
    pid, _, start = owner.partition(":")
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (OSError, ValueError):
        return False
    return fields[0] != "Z" and (not start.isdigit() or int(fields[19]) == int(start))


def in_arena(entry: list) -> bool:
    """Whether an entry's pages are in an arena: a file that exists, or the memfd
    of a daemon that runs."""
    arena = entry[2]
    if arena == MEMFD:
        return owner_alive(entry[1])
    return arena != "-" and os.path.exists(arena)


def me() -> str:
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
        if head.get("boot") != kernelpool.boot_id():
            if lines:
                log.info("hugepages: the record of added pages is from another boot: dropped")
            return {}
        entries = {}
        for line in lines[2:]:
            fields = line.split(" ", 3)
            if len(fields) == 4 and fields[1].isdigit() and int(fields[1]) > 0:
                entries[fields[0]] = [int(fields[1]), fields[2], fields[3]]
        try:
            total, now = int(head.get("total", "0")), kernelpool.read_nr()
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
        free = [k for k in entries if not in_arena(entries[k])]
        held = [k for k in entries if in_arena(entries[k])]
        budget = [min(lost, sum(entries[k][0] for k in free))]
        budget.append(min(lost - budget[0], kernelpool.meminfo().get("HugePages_Surp", 0)))
        for keys, room in ((free, budget[0]), (held, budget[1])):
            for key in sorted(keys, key=lambda k: owner_alive(entries[k][1])):
                cut = min(room, entries[key][0])
                if cut:
                    entries[key][0] -= cut
                    room -= cut
                    log.warning("hugepages: the pool was lowered to %d by another process: "
                                "%d pages of %s are no longer counted as added by cmad", now,
                                cut, key)

    def save(self, entries: dict[str, list]) -> None:
        try:
            total = kernelpool.read_nr()
        except OSError:
            total = 0
        live = {k: e for k, e in entries.items() if e[0] > 0}
        if not live:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        text = f"boot {kernelpool.boot_id()}\ntotal {total}\n" + "".join(
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
        entry = entries.setdefault(key, [0, me(), "-"])
        entry[0] = max(entry[0] + pages, 0)
        if arena is not None:
            entry[1], entry[2] = me(), arena
        self.save(entries)
        return entry[0]


def unlink_arena(path: str, *, ledger: str | None = None) -> None:
    """Delete the arena file ``path``; its ledger entry's pages are in no file any
    more (free now, or, where the pool was lowered under them, surplus that went
    with the file: the reconciliation has cut those already)."""
    kernelpool.pool_lock()
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
        kernelpool.pool_unlock()


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
    if added and written >= kernelpool.boot_time() and os.geteuid() == 0:
        kernelpool.pool_lock()
        try:
            book = Ledger(ledger or LEDGER)
            entries = book.load()
            entry = entries.setdefault(key, [0, "0:0", arena or "-"])
            entry[0] += added
            book.save(entries)
        finally:
            kernelpool.pool_unlock()
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
