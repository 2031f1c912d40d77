"""Physically contiguous regions: the arena file laid out so that regions get runs.

DPDK's legacy memory mode builds IOVA-contiguous segments this way: map the
pages, read their frames from /proc/self/pagemap, sort, and use runs of
physically adjacent pages.  Here:

1. gather (`cmad.memory.gather`): a scratch hugetlb memfd takes G >= N pages
   (N the arena's); their frames are read and sorted into runs;
2. assign (`cmad.memory.layout`): every region (with the regions sharing a
   hugepage with it) gets a run of its own, best fit, largest first; the
   other arena pages take what is left.  Short runs: gather more (up to
   GATHER_MAX times N) and assign again;
3. create (here): the scratch pages are given back one by one, the unwanted
   first and the wanted in reverse arena order, then the arena file is
   allocated in one fallocate.  The kernel's hugepage free list is last-in
   first-out, so the arena file's page k is the page chosen for arena page
   k: file offsets stay bus offsets (``mmap`` attributes and clients need no
   translation).  The frames are read back and every region's contiguity is
   decided on what the file really holds, never on the plan (`decide`);
4. the pages gathered and not kept go back to the pool at once.

The physical start of every physical region is recorded (journal meta) and
checked at the next start (`verify`).
"""

from __future__ import annotations

import errno
import logging
import os
import time

from cmad.memory.gather import Gather, find_runs, longest_run
from cmad.memory.layout import (ADVICE, Group, Layout, Span, assign, decide, groups_of,
                                parse_record, record, refusal, verify)
from cmad.memory.pagemap import read_frames
from cmad.memory.pool import Pool

__all__ = [
    "ADVICE", "CONTIGUOUS", "GATHER_FLOOR", "GATHER_MAX", "Gather", "Group", "Layout", "Span",
    "allocate", "assign", "build_file", "decide", "empty", "find_runs", "groups_of",
    "longest_run", "parse_record", "read_frames", "record", "refusal", "verify",
]

log = logging.getLogger(__name__)

CONTIGUOUS = ("auto", "physical", "virtual")
GATHER_MAX = 4  # gather up to this many times the arena's pages ...
GATHER_FLOOR = 2048  # ... or this many more, whichever is more (within MAX_SHARE)


def allocate(fd: int, size: int, pieces: list[tuple[int, int, int]]) -> None:
    """Allocate the arena's pages in arena order: [0, size) of ``fd``, except each
    piece (arena offset, length, descriptor), whose pages go to its own file (a
    shared region's, SPEC 4d) and leave a hole in the arena file.  In one pass
    from low to high, so the LIFO pool hands every file the pages laid out for it."""
    pos = 0
    for offset, length, piece in sorted(pieces):
        if offset > pos:
            os.posix_fallocate(fd, pos, offset - pos)
        os.posix_fallocate(piece, 0, length)
        pos = offset + length
    if size > pos:
        os.posix_fallocate(fd, pos, size - pos)


def empty(pieces: list[tuple[int, int, int]]) -> None:
    """Give back the pages of the pieces' files (a failed or repeated layout)."""
    for _, length, piece in pieces:
        os.ftruncate(piece, 0)
        os.ftruncate(piece, length)


def build_file(path: str | None, size: int, spans: list[Span], pool: Pool, *, strict: bool,
               pieces: list[tuple[int, int, int]] = ()) -> tuple[int, Layout]:
    """Create the hugetlbfs arena file ``path`` (None: a hugetlb memfd) of ``size`` bytes
    laid out for ``spans``; returns its open descriptor and the layout.  ``pieces``:
    (arena offset, length, descriptor) of the shared regions' files (`allocate`).

    ``strict`` (contiguous=physical): CmaError, with the pool as it was and no
    file, when a region that wants a run gets none.  OSError when the pool
    cannot hold the arena at all (the caller falls back to shared memory).
    """
    t0 = time.monotonic()
    page = pool.page
    pages = size // page
    groups = groups_of(spans, page)
    added_before = pool.added
    gather = Gather(page)  # before the lock: a memfd that cannot be made leaves it free
    try:
        pool.lock()
    except BaseException:
        gather.close()
        raise
    try:
        cap = _gather_arena(gather, pool, spans, pages, strict)
        runs, order, placed, stopped = _search(gather, pool, groups, pages, cap)
        longest = longest_run(runs, page)
        _check_plan(spans, groups, placed, strict, longest, gather.count, stopped)
        gather.hand_over(order)
        fd = _create(path, size, list(pieces))
        gathered = gather.count
        gather.close()
        pool.give_back(gathered - pages)  # the pages gathered and not kept, at once
        planned = {n for gi in placed for n in groups[gi].names}
        return fd, Layout(gathered=gathered, kept=pages, longest=longest,
                          seconds=time.monotonic() - t0, planned=planned, stopped=stopped)
    except BaseException:
        gather.close()
        pool.give_back(pool.added - added_before)
        raise
    finally:
        pool.unlock()


def _gather_arena(gather: Gather, pool: Pool, spans: list[Span], pages: int,
                  strict: bool) -> int:
    """Gather the arena's ``pages`` (hugepages=free: every free page, up to the cap);
    returns the cap on gathering.  Short of the arena's pages: the refusal
    (``strict``), else OSError ENOMEM."""
    page = gather.page
    free, why = pool.ensure(pages)
    if free < pages:
        if strict and free:
            gather.grow(free)
        _refuse_all(spans, strict, longest_run(find_runs(gather.frames, page), page),
                    gather.count, why)
        raise OSError(errno.ENOMEM, why)
    cap = max(GATHER_MAX * pages, pages + GATHER_FLOOR)
    gather.grow(min(free, cap) if pool.mode == "free" else pages)
    return cap


def _search(gather: Gather, pool: Pool, groups: list[Group], pages: int, cap: int
            ) -> tuple[list[list[int]], list[int], set[int], str]:
    """Assign runs, gathering more (doubling, up to ``cap``) while a group has none.

    Returns the runs, arena page -> gathered page, the groups given a run, and
    the cap that ended the search where it did and a group is still without
    a run ('' otherwise)."""
    stopped = ""
    while True:
        runs = find_runs(gather.frames, gather.page)
        order, placed = assign(groups, runs, pages)
        if len(placed) == len(groups) or pool.mode == "free" or gather.count >= cap:
            break
        want = min(2 * gather.count, cap)
        avail, _ = pool.ensure(want - gather.count, partial=True)
        if pool.capped:
            stopped = pool.cap_text()
        want = min(want, gather.count + avail)
        if want <= gather.count:
            break
        try:
            gather.grow(want)
        except OSError as e:  # someone took the pages first: lay out what we have
            log.info("arena: gathering %d hugepages: %s", want, e.strerror)
            break
    if len(placed) == len(groups):
        stopped = ""  # the cap was reached, but the runs were found
    return runs, order, placed, stopped


def _check_plan(spans: list[Span], groups: list[Group], placed: set[int], strict: bool,
                longest: int, gathered: int, stopped: str) -> None:
    """``strict``: the refusal for the first group without a run; a search the cap
    cut short is logged."""
    if strict:
        for gi, g in enumerate(groups):
            if gi not in placed:
                span = next(s for s in spans if s.name in g.names)
                raise refusal(span, longest, gathered, stopped=stopped)
    if stopped:
        log.warning("arena: %s", Layout(gathered=gathered, longest=longest,
                                        stopped=stopped).cut_short())


def _create(path: str | None, size: int, pieces: list[tuple[int, int, int]]) -> int:
    """Open the arena file (None: a hugetlb memfd) and allocate its pages in arena
    order; on failure nothing of it is left (no file, the pieces emptied)."""
    fd = (os.memfd_create("cmad-arena", os.MFD_HUGETLB | os.MFD_CLOEXEC) if path is None
          else os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o600))
    try:
        os.ftruncate(fd, size)
        allocate(fd, size, pieces)
    except OSError:
        os.close(fd)
        empty(pieces)
        if path is not None:
            os.unlink(path)
        raise
    return fd


def _refuse_all(spans: list[Span], strict: bool, longest: int, gathered: int, why: str) -> None:
    if strict:
        for span in spans:
            if span.wants:
                raise refusal(span, longest, gathered, why)
