"""A bare best fit: the floor under the core's bf (bench/core_compare.py).

Holes in a SortedList of int keys ``(size << 64) | start`` (smallest fit,
lowest address among equals) plus boundary dicts for merging on free.  Page
alignment only; no region, chunk, quota, listener or check.  The same
placement as ``cmad.allocators.bf`` with grouping off, and the same lookup
of the best fit (``ceiling``: two bisects on the SortedList's sublists, not
``next(irange(key))``), so that this stays the floor under bf.
"""

from __future__ import annotations

from bisect import bisect_left

from sortedcontainers import SortedList

SHIFT = 64
LOW = (1 << SHIFT) - 1


def ceiling(keys: SortedList, key: int) -> int | None:
    """The first key >= key (as cmad.allocators.bf.ceiling)."""
    i = bisect_left(keys._maxes, key)
    if i == len(keys._maxes):
        return None
    sub = keys._lists[i]
    return sub[bisect_left(sub, key)]


class BareBestFit:
    def __init__(self, start: int, size: int):
        self.by_size = SortedList([(size << SHIFT) | start])
        self.by_start = {start: size}   # hole start -> size
        self.by_end = {start + size: start}  # hole end -> start

    def alloc(self, size: int) -> int | None:
        key = ceiling(self.by_size, size << SHIFT)
        if key is None:
            return None
        hole, hole_size = key & LOW, key >> SHIFT
        self.by_size.remove(key)
        del self.by_start[hole]
        if hole_size > size:  # the tail stays free, ending where the hole did
            tail, rest = hole + size, hole_size - size
            self.by_size.add((rest << SHIFT) | tail)
            self.by_start[tail] = rest
            self.by_end[tail + rest] = tail
        else:
            del self.by_end[hole + hole_size]
        return hole

    def free(self, start: int, size: int) -> None:
        left = self.by_end.pop(start, None)
        if left is not None:  # merge with the hole below
            left_size = self.by_start.pop(left)
            self.by_size.remove((left_size << SHIFT) | left)
            start, size = left, size + left_size
        right_size = self.by_start.pop(start + size, None)
        if right_size is not None:  # and with the hole above
            del self.by_end[start + size + right_size]
            self.by_size.remove((right_size << SHIFT) | (start + size))
            size += right_size
        self.by_size.add((size << SHIFT) | start)
        self.by_start[start] = size
        self.by_end[start + size] = start
