"""Compaction: moving movable chunks to open holes, as the review proposed.

Entry points, all called under the Cma lock:

- ``make_room(cma, region, size, alignment, movable)``: an allocation failed
  although the region has the free bytes.  With pageblocks (SPEC 4b), a
  pinned request of at least one block empties the cheapest window of
  movable and free blocks, moving its chunks into other movable or free
  blocks (``evacuate``, the kernel's ``alloc_contig_range``).  Without
  pageblocks, among the windows between pinned chunks the cheapest is
  emptied the same way (``_by_windows``).
- ``compact_steps(cma, region)``: the ``compact`` file, as a generator of
  bounded steps: from the top of the region down, each movable chunk moves
  to a place its allocator finds lower down (and, with pageblocks, a
  movable chunk sitting in a pinned block moves to a movable one).

Bounds, so compaction never thrashes or stalls:

- no allocation moves more than MOVE_RATIO times the bytes it asks for:
  only windows that cheap are considered, and the budget is spent once;
- an attempt that cannot succeed is not started: a window is tried only if
  the movable and free space outside it can take what it holds, and a
  window's destinations are all found before anything moves;
- the work per moved chunk is logarithmic: one allocator search, one free,
  one chunk-index update; ``compact`` walks the chunks once with a cursor
  (a chunk only ever moves down, so none is visited twice) and never keeps
  a list of gaps.

A chunk never moves onto its own bytes, so a crash between the copy and the
journal's commit leaves the old copy intact where the journal still points.
Pinned chunks (the default) never move.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import TYPE_CHECKING, Iterator

from cmad.allocators.pageblocks import LARGE, MOVABLE, Grouped
from cmad.core.regions import Region, align_up

if TYPE_CHECKING:
    from cmad.core.chunks import Chunk
    from cmad.core.cma import Cma

MOVE_RATIO = 1     # an allocation moves at most this many times its own bytes
ATTEMPTS = 8       # windows tried per allocation (each checked before anything moves)
SCAN_PER_STEP = 64  # chunks a compact step looks at when none of them moves


def _stretches(cma: Cma, region: Region) -> list[tuple[int, int, list[Chunk]]]:
    """The ranges between pinned chunks, each with the movable chunks inside it."""
    out, start, movable = [], region.start, []
    for chunk in cma.chunks_of(region):
        if chunk.movable:
            movable.append(chunk)
        else:
            out.append((start, chunk.start, movable))
            start, movable = chunk.end, []
    out.append((start, region.end, movable))
    return out


def walled(cma: Cma, region: Region, size: int, alignment: int) -> bool:
    """True if no stretch between pinned chunks can hold an aligned window of ``size``."""
    return not any(align_up(lo, alignment) + size <= hi
                   for lo, hi, _ in _stretches(cma, region))


def _windows(cma: Cma, region: Region, size: int, alignment: int,
             budget: int) -> list[tuple[int, int, int]]:
    """(cost, lo, hi) of the windows between pinned chunks that moving at most
    ``budget`` bytes would empty, cheapest first."""
    found = []
    for lo, hi, movable in _stretches(cma, region):
        starts = [c.start for c in movable]
        ends = [c.end for c in movable]
        weights = [0, *accumulate(c.size for c in movable)]
        for w in {align_up(lo, alignment), *(align_up(e, alignment) for e in ends)}:
            if w < lo or w + size > hi:
                continue
            i, j = bisect_right(ends, w), bisect_left(starts, w + size)
            cost = weights[j] - weights[i]
            if 0 < cost <= budget:
                found.append((cost, w, w + size))
    found.sort()
    return found


def make_room(cma: Cma, region: Region, size: int, alignment: int,
              movable: bool = False) -> tuple[int, int] | None:
    """Serve (size, alignment) from ``region`` by emptying the cheapest window that
    costs at most MOVE_RATIO x size in moved bytes; the allocator's answer or None."""
    allocator = region.allocator
    budget = MOVE_RATIO * size
    if isinstance(allocator, Grouped):
        if movable:
            return None  # movable requests take free blocks or fall back, never move others
        span, align = allocator.claim_shape(size, alignment, LARGE)
        windows = allocator.windows(span, align, budget)
    else:
        window, window_alignment = allocator.shape(size, alignment)
        if region.free < window:
            return None
        windows = _windows(cma, region, window, window_alignment, budget)
    for _, lo, hi in windows[:ATTEMPTS]:
        victims = _victims(cma, lo, hi)
        cost = sum(c.size for c in victims)  # whole chunks move, not their parts in the window
        if not victims or cost > budget:
            continue
        if evacuate(cma, region, lo, hi, victims):
            budget -= cost
            region.compactions += 1
            got = (allocator.alloc_for(size, alignment, movable)
                   or allocator.alloc_anywhere(size, alignment, movable))
            if got is not None:
                return got
    return None


def _victims(cma: Cma, lo: int, hi: int) -> list[Chunk]:
    """The chunks with bytes in [lo, hi), in address order."""
    first = cma.chunks.holding(lo)
    inside = list(cma.chunks.in_range(lo, hi))
    return [first, *inside] if first is not None and first.start < lo else inside


def evacuate(cma: Cma, region: Region, lo: int, hi: int,
             victims: list[Chunk] | None = None) -> bool:
    """Move every chunk (``victims``, if the caller has them) out of [lo, hi);
    False (and nothing changed) if one is pinned or they do not all fit elsewhere."""
    allocator = region.allocator
    if victims is None:
        victims = _victims(cma, lo, hi)
    if not victims or not all(c.movable for c in victims):
        return False
    holds = _isolate(allocator, lo, hi, victims)
    if holds is None:
        return False
    try:
        placed = []
        for c in sorted(victims, key=lambda c: -c.size):
            # Movable or free blocks first; then the holes of pinned blocks,
            # which no large request could use anyway (the block turns mixed).
            got = (allocator.alloc_for(c.size, c.alignment, True)
                   or allocator.fallback(c.size, c.alignment, True)
                   or allocator.alloc_anywhere(c.size, c.alignment, True))
            if got is None or got[1] != c.size:
                if got is not None:
                    allocator.free_for(got[0], got[1], True)
                for c2, new in placed:
                    allocator.free_for(new, c2.size, True)
                return False
            placed.append((c, got[0]))
        i = 0
        try:
            for i, (c, new) in enumerate(placed):
                cma._move_to(c, new)
        except BaseException:  # a failed move undid itself; give back what the rest held
            for c, new in placed[i + 1:]:
                allocator.free_for(new, c.size, True)
            raise
    finally:
        _release(allocator, holds)
    return True


def _isolate(allocator, lo: int, hi: int, victims: list[Chunk]):
    """Hold the free parts of [lo, hi) so that no victim moves into them."""
    used = [(c.start, c.size) for c in victims]
    if isinstance(allocator, Grouped):
        return allocator.isolate(lo, hi, used)
    held, at = [], lo
    gaps = []
    for s, n in used:
        if s > at:
            gaps.append((at, s - at))
        at = max(at, s + n)
    if hi > at:
        gaps.append((at, hi - at))
    for g in gaps:
        if not allocator.reserve(*g):
            for h in held:
                allocator.free(*h)
            return None
        held.append(g)
    return held


def _release(allocator, holds) -> None:
    if isinstance(allocator, Grouped):
        allocator.release(holds)
    else:
        for h in holds:
            allocator.free(*h)


def compact_steps(cma: Cma, region: Region) -> Iterator[int]:
    """The ``compact`` file: from the top of the region down, move each movable
    chunk to a lower place its allocator finds; yields the moves so far after
    every move or SCAN_PER_STEP chunks looked at.  A cursor walks the chunks
    once; other clients may allocate and free between steps."""
    cursor, moved, looked = region.end, 0, 0
    region.compactions += 1
    region.last_compact = 0
    while True:
        chunk = cma.chunks.last_before(cursor)
        if chunk is None or chunk.start < region.start:
            break
        cursor = chunk.start
        looked += 1
        if chunk.movable and _move_down(cma, region, chunk):
            moved += 1
            region.last_compact = moved
            looked = 0
            yield moved
        elif looked >= SCAN_PER_STEP:
            looked = 0
            yield moved


def _move_down(cma: Cma, region: Region, chunk: Chunk) -> bool:
    """Move one movable chunk lower down (or, with pageblocks, out of a pinned
    block into a movable one); False if its allocator has no such place."""
    allocator = region.allocator
    mixed = isinstance(allocator, Grouped) and allocator.owner_of(chunk.start) != MOVABLE
    got = allocator.alloc_for(chunk.size, chunk.alignment, True, claim=mixed)
    if got is None:
        return False
    new, size = got
    if size == chunk.size and (new + size <= chunk.start or
                               (mixed and allocator.owner_of(new) == MOVABLE)):
        cma._move_to(chunk, new)
        return True
    allocator.free_for(new, size, True)
    return False
