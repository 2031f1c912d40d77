"""Compaction: moving movable chunks to open holes, as the review proposed.

Two entry points, both called under the Cma lock:

- ``make_room(cma, region, size, alignment)``: an allocation failed although the
  region has the free bytes.  Among the windows the request could occupy that
  hold no pinned chunk, take the one whose movable chunks weigh least, move
  those chunks elsewhere in the region and allocate there; if no window can
  be emptied that way, slide all movable chunks down (``compact``) and retry.
- ``compact(cma, region)``: slide every movable chunk to the lowest free place
  below it (the ``compact`` file).

A chunk never moves onto its own bytes, so a crash between the copy and the
journal's commit leaves the old copy intact where the journal still points.
Pinned chunks (the default) never move.  Linear in the region's chunks: this
is the slow path, taken only when the hot path has already failed.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import TYPE_CHECKING

from .regions import Region, align_up

if TYPE_CHECKING:
    from .cma import Cma
    from .chunks import Chunk


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


def _windows(cma: Cma, region: Region, size: int, alignment: int):
    """(cost, start, movable chunks inside) for the candidate windows, cheapest first."""
    found = []
    for lo, hi, movable in _stretches(cma, region):
        starts = [c.start for c in movable]
        ends = [c.end for c in movable]
        weights = [0, *accumulate(c.size for c in movable)]
        for w in {align_up(lo, alignment), *(align_up(e, alignment) for e in ends)}:
            if w < lo or w + size > hi:
                continue
            i, j = bisect_right(ends, w), bisect_left(starts, w + size)
            found.append((weights[j] - weights[i], w, movable[i:j]))
    found.sort(key=lambda f: (f[0], f[1]))
    return found


def make_room(cma: Cma, region: Region, size: int, alignment: int,
              attempts: int = 8) -> tuple[int, int] | None:
    """Serve (size, alignment) from ``region`` by moving movable chunks: first by
    emptying the cheapest window, then, failing that, by sliding every movable
    chunk down and trying again.  Returns the allocator's answer, or None.

    A slide that could not serve is not repeated until something is freed:
    allocations alone never make room, and sliding is the expensive part."""
    window, window_alignment = region.allocator.footprint(size, alignment)
    if region.free < window or walled(cma, region, window, window_alignment):
        return None  # pinned chunks wall every stretch off: moving cannot help

    def by_windows() -> tuple[int, int] | None:
        for cost, w, victims in _windows(cma, region, window, window_alignment)[:attempts]:
            if cost and _evict(cma, region, w, w + window, victims):
                region.compactions += 1
                got = region.allocator.alloc(size, alignment)
                if got is not None:
                    return got
        return None

    got = by_windows()
    if got is not None or region.futile_at == region.freed:
        return got
    if compact(cma, region):
        got = region.allocator.alloc(size, alignment) or by_windows()
    if got is None:
        region.futile_at = region.freed
    return got


def _evict(cma: Cma, region: Region, lo: int, hi: int, victims: list[Chunk]) -> bool:
    """Move ``victims`` out of [lo, hi); False (and nothing changed) if they do not fit."""
    allocator = region.allocator
    gaps, at = [], lo
    for c in victims:  # fill the window's free parts so nothing moves into it
        if c.start > at:
            gaps.append((at, c.start - at))
        at = max(at, c.end)
    if hi > at:
        gaps.append((at, hi - at))
    held = []
    for g in gaps:
        if not allocator.reserve(*g):
            for h in held:
                allocator.free(*h)
            return False
        held.append(g)
    placed = []
    for c in sorted(victims, key=lambda c: -c.size):
        got = allocator.alloc(c.size, c.alignment)
        if got is None or got[1] != c.size:
            for (new, n) in ([got] if got else []) + [(p, c2.size) for c2, p in placed]:
                allocator.free(new, n)
            for h in held:
                allocator.free(*h)
            return False
        placed.append((c, got[0]))
    try:
        for i, (c, new) in enumerate(placed):
            cma._move_to(c, new)
    except BaseException:  # a failed move undid itself; give back what the rest held
        for c, new in placed[i + 1:]:
            allocator.free(new, c.size)
        raise
    finally:
        for h in held:
            allocator.free(*h)
    return True


def compact(cma: Cma, region: Region) -> int:
    """Slide movable chunks down, each to the lowest free place below it (first
    fit over the gaps left behind, one pass in address order); returns moves."""
    allocator = region.allocator
    gaps: list[list[int]] = []  # [start, end) free, below the scan, address order
    at, moved = region.start, 0
    for chunk in list(cma.chunks_of(region)):
        old, end = chunk.start, chunk.end
        if old > at:
            _add_gap(gaps, at, old)
        at = max(at, end)
        if not chunk.movable:
            continue
        size, alignment = allocator.footprint(chunk.size, chunk.alignment)
        for i, (lo, hi) in enumerate(gaps):
            w = align_up(lo, alignment)
            if w + size <= hi and allocator.reserve(w, chunk.size):
                cma._move_to(chunk, w)
                moved += 1
                gaps[i:i + 1] = [g for g in ([lo, w], [w + chunk.size, hi]) if g[1] > g[0]]
                _add_gap(gaps, old, end)
                break
    region.compactions += 1
    return moved


def _add_gap(gaps: list[list[int]], lo: int, hi: int) -> None:
    """Append [lo, hi) to the address-ordered gaps, merging with the last one."""
    if gaps and gaps[-1][1] == lo:
        gaps[-1][1] = hi
    else:
        gaps.append([lo, hi])
