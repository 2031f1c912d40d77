"""Compaction: moving movable chunks to open holes, as the review proposed.

Each entry point takes the chunk index, a region and a mover (an object
with ``move(chunk, new)``, ``cmad.core.mover.Mover``), and asks the region's
allocator only through the allocator interface (``windows``, ``isolate``,
``release``, ``misplaced``): it never sees the facade, and never asks which
allocator it has.  All are called under the Cma lock:

- ``make_room(index, region, mover, size, alignment, movable)``: an
  allocation failed although the region has the free bytes.  The allocator
  names the windows worth emptying, cheapest first (between pinned chunks;
  with pageblocks, SPEC 4b, runs of movable and free blocks for a pinned
  request); the chunks of one are moved elsewhere (``evacuate``, the
  kernel's ``alloc_contig_range``) and the request served there.
- ``compact_steps(index, region, mover)``: the ``compact`` file, as a
  generator of bounded steps: from the top of the region down, each movable
  chunk moves to a place its allocator finds lower down (and, with
  pageblocks, a movable chunk sitting in a pinned block moves to a movable
  one).

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

from typing import TYPE_CHECKING, Iterator, Protocol

if TYPE_CHECKING:
    from cmad.core.chunks import Chunk, ChunkIndex
    from cmad.core.regions import Region

MOVE_RATIO = 1     # an allocation moves at most this many times its own bytes
ATTEMPTS = 8       # windows tried per allocation (each checked before anything moves)
SCAN_PER_STEP = 64  # chunks a compact step looks at when none of them moves


class Mover(Protocol):
    def move(self, chunk: Chunk, new: int) -> None:
        """Move ``chunk`` to ``new`` (claimed already); undone and raised on error."""


def make_room(index: ChunkIndex, region: Region, mover: Mover, size: int, alignment: int,
              movable: bool = False) -> tuple[int, int] | None:
    """Serve (size, alignment) from ``region`` by emptying the cheapest window that
    costs at most MOVE_RATIO x size in moved bytes; the allocator's answer or None."""
    allocator = region.allocator
    budget = MOVE_RATIO * size
    chunks = ((c.start, c.end, c.movable) for c in index.in_range(region.start, region.end))
    windows = allocator.windows(size, alignment, movable, budget, chunks)
    for _, lo, hi in windows[:ATTEMPTS]:
        victims = _victims(index, lo, hi)
        cost = sum(c.size for c in victims)  # whole chunks move, not their parts in the window
        if not victims or cost > budget:
            continue
        if evacuate(region, mover, lo, hi, victims):
            budget -= cost
            region.compactions += 1
            got = (allocator.alloc_for(size, alignment, movable)
                   or allocator.alloc_anywhere(size, alignment, movable))
            if got is not None:
                return got
    return None


def _victims(index: ChunkIndex, lo: int, hi: int) -> list[Chunk]:
    """The chunks with bytes in [lo, hi), in address order."""
    first = index.holding(lo)
    inside = list(index.in_range(lo, hi))
    return [first, *inside] if first is not None and first.start < lo else inside


def evacuate(region: Region, mover: Mover, lo: int, hi: int, victims: list[Chunk]) -> bool:
    """Move ``victims``, every chunk with bytes in [lo, hi), out of it; False (and
    nothing changed) if one is pinned or they do not all fit elsewhere."""
    allocator = region.allocator
    if not all(c.movable for c in victims):
        return False
    holds = allocator.isolate(lo, hi, [(c.start, c.size) for c in victims])
    if holds is None:
        return False
    try:
        placed = _places(allocator, victims)
        if placed is None:
            return False
        i = 0
        try:
            for i, (c, new) in enumerate(placed):
                mover.move(c, new)
        except BaseException:  # a failed move undid itself; give back what the rest held
            for c, new in placed[i + 1:]:
                allocator.free_for(new, c.size, True)
            raise
    finally:
        allocator.release(holds)
    return True


def _places(allocator, victims: list[Chunk]) -> list[tuple[Chunk, int]] | None:
    """A new place for each victim, largest first, all claimed; None (and nothing
    claimed) if one does not fit."""
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
            return None
        placed.append((c, got[0]))
    return placed


def compact_steps(index: ChunkIndex, region: Region, mover: Mover) -> Iterator[int]:
    """The ``compact`` file: from the top of the region down, move each movable
    chunk to a lower place its allocator finds; yields the moves so far after
    every move or SCAN_PER_STEP chunks looked at.  A cursor walks the chunks
    once; other clients may allocate and free between steps."""
    cursor, moved, looked = region.end, 0, 0
    region.compactions += 1
    region.last_compact = 0
    while True:
        chunk = index.last_before(cursor)
        if chunk is None or chunk.start < region.start:
            break
        cursor = chunk.start
        looked += 1
        if chunk.movable and _move_down(region, mover, chunk):
            moved += 1
            region.last_compact = moved
            looked = 0
            yield moved
        elif looked >= SCAN_PER_STEP:
            looked = 0
            yield moved


def _move_down(region: Region, mover: Mover, chunk: Chunk) -> bool:
    """Move one movable chunk lower down (or, with pageblocks, out of a pinned
    block into a movable one); False if its allocator has no such place."""
    allocator = region.allocator
    misplaced = allocator.misplaced(chunk.start)
    got = allocator.alloc_for(chunk.size, chunk.alignment, True, claim=misplaced)
    if got is None:
        return False
    new, size = got
    if size == chunk.size and (new + size <= chunk.start or
                               (misplaced and not allocator.misplaced(new))):
        mover.move(chunk, new)
        return True
    allocator.free_for(new, size, True)
    return False
