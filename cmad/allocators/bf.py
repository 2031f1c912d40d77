"""Best fit, as in the CMA patch RFCv4 (mm/cma-best-fit.c).

A request takes the smallest hole that can hold it at the requested
alignment (lowest address among equal sizes), from the hole's first aligned
address; what is left of the hole on either side stays free.  A freed range
merges with both neighbouring holes.

The patch keeps holes in two rb-trees, by size and by start.  Here:

- ``_by_size`` is a SortedList of int keys ``(size << 64) | start``: ints
  compare faster than tuples, and key order is size then address, so the
  first key >= ``size << 64`` is the best fit when alignment is the page
  size.  With a larger alignment we walk forward only past holes that are
  big enough but misaligned.
- ``_by_start`` (start -> size) and ``_by_end`` (end -> start) are boundary
  tags: merging on free is two dict lookups, not a tree search.
- ``_starts`` is a SortedList of hole starts, needed only by ``reserve`` to
  find the hole containing an address.  Keeping it on the hot path would
  cost two more tree updates per alloc and free, so it is built on demand by
  ``reserve`` and then kept up to date by alloc and free, until
  ``max(IDLE, 4 n)`` of them came without a reserve: a rebuild (O(n log n))
  is paid for by at least 4n operations that did not need the index, so
  reserve stays O(log n) amortised however reserves and the hot path mix
  (recovery reserves every chunk in a row; compaction and pageblocks
  reserve now and then).
- ``carve(hole, size, start, size)``: claim a range inside a hole the
  caller knows (``free`` returns the merged hole), O(log n) with no index.

Costs, n holes: alloc O(log n) at page alignment (plus one step per
misaligned candidate otherwise), free O(log n), reserve O(log n) amortised,
holes O(n log n), largest_free O(log n).
"""

from __future__ import annotations

import errno
from bisect import bisect_left
from typing import Iterator

from sortedcontainers import SortedList

from cmad.allocators.interface import PAGE_SIZE, Allocator, register
from cmad.errors import CmaError

_SHIFT = 64
_LOW = (1 << _SHIFT) - 1
IDLE = 4096  # alloc/free calls without a reserve before the start index is dropped


def ceiling(keys: SortedList, key: int) -> int | None:
    """The first of ``keys`` >= ``key``, or None: ``next(keys.irange(key), None)``
    without the iterator chain irange builds per call (a tenth of an alloc+free
    pair).  A SortedList is sorted sublists ``_lists`` with their last keys
    ``_maxes`` (sortedcontainers' documented implementation, the same since
    2.0): the first sublist whose last key is >= ``key`` holds the answer."""
    maxes = keys._maxes
    i = bisect_left(maxes, key)
    if i == len(maxes):
        return None
    sub = keys._lists[i]
    return sub[bisect_left(sub, key)]


@register
class BestFit(Allocator):
    name = "bf"
    groupable = True
    params = ()

    def __init__(self, start: int, size: int, **params: int):
        super().__init__(start, size, **params)
        if start < 0 or start + size > _LOW:
            raise CmaError(errno.EINVAL, f"bf: region {start:#x}+{size:#x} is not within 64-bit bus addresses")
        self._by_size = SortedList()
        self._by_start: dict[int, int] = {}
        self._by_end: dict[int, int] = {}
        self._starts: SortedList | None = None
        self._idle = 0
        if size:
            self._insert(start, size)

    # -- helpers -------------------------------------------------------

    def _insert(self, start: int, size: int) -> None:
        """Index the hole [start, start + size)."""
        self._by_size.add((size << _SHIFT) | start)
        self._by_start[start] = size
        self._by_end[start + size] = start
        if self._starts is not None:
            self._starts.add(start)

    def _remove(self, start: int, size: int) -> None:
        """Drop the hole [start, start + size) from the indexes."""
        self._by_size.remove((size << _SHIFT) | start)
        del self._by_start[start]
        del self._by_end[start + size]
        if self._starts is not None:
            self._starts.remove(start)

    def _touched(self) -> SortedList | None:
        """An alloc or free: the start index to keep up to date, if it is still worth it."""
        starts = self._starts
        if starts is not None:
            self._idle += 1
            if self._idle > IDLE and self._idle > 4 * len(starts):
                self._starts = starts = None
        return starts

    # -- the interface -------------------------------------------------

    def alloc(self, size: int, alignment: int, movable: bool = False,
              claim: bool = True) -> tuple[int, int] | None:
        """Best fit.  O(log n), plus one step per big-enough misaligned hole.
        Also ``alloc_for`` (bf ignores mobility): one call less on the hot path."""
        by_size = self._by_size
        # Two bisects, no positional index to keep (ceiling); irange past it.
        key = ceiling(by_size, size << _SHIFT)
        if key is None:
            return None
        hole_size = key >> _SHIFT
        hole = key & _LOW
        at = hole
        if alignment > PAGE_SIZE:
            mask = alignment - 1
            at = (hole + mask) & ~mask
            if at + size > hole + hole_size:
                for key in by_size.irange(key, inclusive=(False, True)):
                    hole_size = key >> _SHIFT
                    hole = key & _LOW
                    at = (hole + mask) & ~mask
                    if at + size <= hole + hole_size:
                        break
                else:
                    return None
        starts = self._starts
        if starts is not None:  # the start index is kept only while reserves come
            starts = self._touched()
        # Carve [at, at + size) out of the hole; keep the head and the tail.
        by_size.remove(key)
        by_start = self._by_start
        by_end = self._by_end
        end = hole + hole_size
        if at > hole:
            head = at - hole
            by_size.add((head << _SHIFT) | hole)
            by_start[hole] = head
            by_end[at] = hole
        else:
            del by_start[hole]
            if starts is not None:
                starts.remove(hole)
        tail = at + size
        if tail < end:
            rest = end - tail
            by_size.add((rest << _SHIFT) | tail)
            by_start[tail] = rest
            by_end[end] = tail
            if starts is not None:
                starts.add(tail)
        else:
            del by_end[end]
        self.free_bytes -= size
        return at, size

    def free(self, start: int, size: int, movable: bool = False) -> tuple[int, int]:
        """Give back [start, start + size), merged with both neighbours; returns
        the merged hole.  O(log n).  Also ``free_for``.

        The core only frees what alloc or reserve gave; only the bounds are
        checked here, and _check catches a double free.
        """
        if start < self.start or start + size > self.start + self.size or size <= 0:
            raise CmaError(errno.EINVAL, f"bf: free of {start:#x}+{size:#x} outside the region")
        starts = self._starts
        if starts is not None:  # the start index is kept only while reserves come
            starts = self._touched()
        by_size = self._by_size
        by_start = self._by_start
        by_end = self._by_end
        self.free_bytes += size
        end = start + size
        left = by_end.pop(start, None)
        if left is not None:
            left_size = by_start.pop(left)
            by_size.remove((left_size << _SHIFT) | left)
            start = left
            size += left_size
        elif starts is not None:
            starts.add(start)
        right_size = by_start.pop(end, None)
        if right_size is not None:
            del by_end[end + right_size]
            by_size.remove((right_size << _SHIFT) | end)
            if starts is not None:
                starts.remove(end)
            size += right_size
        by_size.add((size << _SHIFT) | start)
        by_start[start] = size
        by_end[start + size] = start
        return start, size

    alloc_for = alloc  # the interface's alloc_for and free_for, without a call between
    free_for = free

    def reserve(self, start: int, size: int) -> bool:
        """Claim [start, start + size) if all free.  O(log n) between reserves."""
        if size <= 0 or start < self.start or start + size > self.start + self.size:
            return False
        starts = self._starts
        if starts is None:
            starts = self._starts = SortedList(self._by_start)
        self._idle = 0
        i = starts.bisect_right(start)
        if not i:
            return False
        hole = starts[i - 1]
        return self.carve(hole, self._by_start[hole], start, size)

    def carve(self, hole: int, hole_size: int, start: int, size: int) -> bool:
        """Claim [start, start + size) inside the hole [hole, hole + hole_size) (as
        ``free`` returned it; False if that is no longer a hole).  O(log n)."""
        end = hole + hole_size
        if self._by_start.get(hole) != hole_size or start < hole or start + size > end:
            return False
        self._remove(hole, hole_size)
        if start > hole:
            self._insert(hole, start - hole)
        if start + size < end:
            self._insert(start + size, end - start - size)
        self.free_bytes -= size
        return True

    def reserve_many(self, ranges: list[tuple[int, int, bool]]) -> list[bool]:
        """All of recovery's reserves (sorted by start) in one walk over the holes
        in address order, then the indexes rebuilt once: O(n + h log h), not n
        tree updates.  The same result as a loop of ``reserve`` (bf ignores
        mobility)."""
        holes = iter(sorted(self._by_start.items()))
        kept: list[tuple[int, int]] = []
        done: list[bool] = []
        hole = hole_end = None
        taken = 0
        for start, size, _ in ranges:
            end = start + size
            while hole is None or hole_end <= start:
                if hole is not None:
                    kept.append((hole, hole_end - hole))
                hole, hole_size = next(holes, (None, 0))
                if hole is None:
                    break
                hole_end = hole + hole_size
            ok = size > 0 and hole is not None and hole <= start and end <= hole_end
            done.append(ok)
            if not ok:
                continue
            taken += size
            if start > hole:
                kept.append((hole, start - hole))
            hole = end if end < hole_end else None
        if hole is not None:
            kept.append((hole, hole_end - hole))
        kept.extend(holes)
        self._by_start = dict(kept)
        self._by_end = {start + size: start for start, size in kept}
        self._by_size = SortedList([(size << _SHIFT) | start for start, size in kept])
        self._starts = None
        self.free_bytes -= taken
        return done

    def holes(self) -> Iterator[tuple[int, int]]:
        """Free ranges in address order (adjacent holes never exist).  O(n log n)."""
        return iter(sorted(self._by_start.items()))

    def largest_free(self) -> int:
        """Size of the largest hole: page alignment never needs more.  O(log n)."""
        by_size = self._by_size
        return by_size[-1] >> _SHIFT if by_size else 0

    def _check(self) -> None:
        self._by_size._check()
        by_start = self._by_start
        by_end = self._by_end
        assert len(self._by_size) == len(by_start) == len(by_end)
        for key in self._by_size:
            hole, hole_size = key & _LOW, key >> _SHIFT
            assert by_start.get(hole) == hole_size, (hex(hole), hole_size)
            assert by_end.get(hole + hole_size) == hole, hex(hole)
        total = 0
        last_end = None
        limit = self.start + self.size
        for hole, hole_size in sorted(by_start.items()):
            assert hole_size > 0 and hole_size % PAGE_SIZE == 0, (hex(hole), hole_size)
            assert (hole - self.start) % PAGE_SIZE == 0, hex(hole)
            assert self.start <= hole and hole + hole_size <= limit, (hex(hole), hole_size)
            assert last_end is None or last_end < hole, f"holes overlap or touch at {hex(hole)}"
            last_end = hole + hole_size
            total += hole_size
        assert total == self.free_bytes, (total, self.free_bytes)
        if self._starts is not None:
            self._starts._check()
            assert list(self._starts) == sorted(by_start)
