"""One daemon's view of the hugepage pool: what is free, and what it added.

The daemon raises ``vm.nr_hugepages`` itself when the free pool is short and
gives back exactly what it added when it deletes its arena.  What it added is
recorded in the ledger (`cmad.memory.ledger`), so a restarted daemon, any
later start and ``cmad reset`` give the pages back too.  Two daemons never
undo each other's pages: each subtracts only its own additions, never more
than the pool has free and unreserved, and under the pool lock
(`cmad.memory.kernelpool`).
"""

from __future__ import annotations

import errno
import logging
import os

from cmad.errors import CmaError
from cmad.memory import kernelpool
from cmad.memory.kernelpool import NR_HUGEPAGES
from cmad.memory.ledger import LEDGER, Ledger, in_arena, owner_alive, read_record
from cmad.memparse import human, memparse

log = logging.getLogger(__name__)

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
        self.page = kernelpool.page_size()
        self.arena = "-"  # the arena file holding the pages, once there is one
        self.added = read_record(key, ledger=self.ledger.path)

    # -- the lock: one read-modify-write of the pool at a time ------------

    def lock(self) -> None:
        kernelpool.pool_lock()

    def unlock(self) -> None:
        kernelpool.pool_unlock()

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
            available = kernelpool.meminfo().get("MemAvailable", 0) * 1024
            return int(available * self.share) // self.page
        return max(self.cap_bytes // self.page - self.added, 0)

    def ensure(self, pages: int, *, partial: bool = False) -> tuple[int, str]:
        """Make ``pages`` free hugepages available; returns (free now, why not if short).

        In ``reserve`` mode as root the pool is raised by what is missing,
        within gather_limit, and the addition recorded.  Past the limit
        nothing is added, or with ``partial`` what the limit allows; either
        way ``capped`` says the limit, not the machine, cut it short.
        """
        self.capped = False
        free = kernelpool.unreserved_free()
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
            before = kernelpool.read_nr()
            after = kernelpool.write_nr(before + short)
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
        free = kernelpool.unreserved_free()
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
            n = min(want, kernelpool.unreserved_free())
            if n <= 0:
                self.ledger.save(entries)
                return 0
            before = kernelpool.read_nr()
            after = kernelpool.write_nr(max(before - n, 0))
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
    kernelpool.pool_lock()
    try:
        book = Ledger(ledger or LEDGER)
        entries = book.load()
        book.save(entries)  # reconciled with the pool as it is now
        orphans = [k for k, entry in entries.items() if k.startswith(prefix)
                   and not owner_alive(entry[1]) and not in_arena(entry)]
        return sum(give_back_record(k, ledger=ledger) for k in orphans)
    finally:
        kernelpool.pool_unlock()
