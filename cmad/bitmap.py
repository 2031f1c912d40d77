"""Bitmap first fit, like bootmem and mainline mm/cma.c.

One bit per block of 2^order_per_bit pages; a chunk holds whole blocks, so
its size is the request rounded up to the block size.  Allocation is first
fit with alignment, as ``bitmap_find_next_zero_area_off``: the lowest
aligned run of enough free blocks.  Alignment is of bus addresses; the
region start is block-aligned, so block i is aligned to ``align`` blocks
when ``(start_block + i) % align == 0``.

The "bitmap" is a bytearray with one byte per block (0 free, 1 used) so the
search runs in C: ``bytearray.find`` of a run of zero bytes, retried from
the next aligned index when the run it finds starts misaligned.

A scan from block 0 would make every allocation cost O(used blocks), which
is what makes mainline CMA slow when the region is busy.  Hints let the
scan start later without changing its result:

- ``_lowest``: every block below it is used.
- ``_hints``: per recent request shape ``(count, align)``, a pair
  ``[above, windows]``: every block where such a request fits and that is
  below ``above`` lies in one of the ``windows`` (a heap of
  ``(first, last)`` block ranges).  An allocation searches the windows in
  order, each a short scan, then from ``above``, and raises ``above`` past
  what it took (to the end on failure: a repeated failing request costs
  O(1)).  A free adds to each shape the window where a run it made
  possible could start.  Without windows a free would have to lower
  ``above``, and the next search would rescan everything above that.
  The table keeps the ``MAX_HINTS`` most recently added shapes.

Costs, N blocks, H shapes, W windows: alloc O(N) worst case in C, usually
O(count + log W) plus the distance from ``above`` to the next fit, which
only moves up; free O(size + H log W); reserve O(size); holes and
largest_free O(N).
"""

from __future__ import annotations

import errno
import re
from heapq import heappop, heappush, heapreplace
from typing import Iterator

from .allocator import PAGE_SHIFT, Allocator, register
from .errors import CmaError

MAX_ORDER_PER_BIT = 20
MAX_HINTS = 32  # request shapes tracked
MAX_WINDOWS = 256  # pending freed windows per shape

_FREE = 0
_USED = 1
_FREE_RUN = re.compile(rb"\x00+")


def _order(value: object) -> int:
    """Parse and check order_per_bit: an int in 0..MAX_ORDER_PER_BIT."""
    order = value
    if isinstance(order, str):
        try:
            order = int(order, 0)
        except ValueError:
            pass
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER_PER_BIT:
        raise CmaError(
            errno.EINVAL, f"bitmap: order_per_bit must be an integer 0..{MAX_ORDER_PER_BIT}, not {value!r}"
        )
    return order


def _aligned_up(first: int, at: int, mask: int) -> int:
    """The lowest block index >= at whose bus block number is aligned by mask."""
    return ((first + at + mask) & ~mask) - first


@register
class Bitmap(Allocator):
    name = "bitmap"
    params = ("order_per_bit",)

    def __init__(self, start: int, size: int, **params: int):
        super().__init__(start, size, **params)
        self.order_per_bit = _order(params.get("order_per_bit", 0))
        self._shift = shift = PAGE_SHIFT + self.order_per_bit
        self.block = block = 1 << shift
        if start % block or size % block:
            raise CmaError(
                errno.EINVAL,
                f"bitmap: region start {start:#x} and size {size:#x} must be multiples "
                f"of the block size {block:#x} (order_per_bit={self.order_per_bit})",
            )
        self._first = start >> shift  # bus block number of block 0
        self._map = bytearray(size >> shift)
        self._lowest = 0
        self._hints: dict[tuple[int, int], int] = {}
        self._widest = 0  # the largest count in _hints, ever: bounds free's scans

    def _search(self, count: int, align: int, at: int, stop: int) -> int:
        """First block >= at where an aligned run of count free blocks fits before stop, or -1."""
        bmap = self._map
        want = bytes(count)
        if align == 1:
            return bmap.find(want, at, stop)
        mask = align - 1
        first = self._first
        at = _aligned_up(first, at, mask)
        while True:
            found = bmap.find(want, at, stop)
            if found <= at:  # aligned, or -1
                return found
            at = _aligned_up(first, found, mask)
            if at == found:
                return found

    def alloc(self, size: int, alignment: int) -> tuple[int, int] | None:
        """Lowest aligned run of free blocks.  Amortised O(count + hints), O(N) worst case."""
        shift = self._shift
        count = (size + (1 << shift) - 1) >> shift
        align = alignment >> shift or 1
        key = (count, align)
        hint = self._hints.get(key)
        if hint is None:
            hint = self._new_hint(key)
        lowest = self._lowest
        search = self._search
        windows = hint[1]
        at = -1
        while windows:
            bound, last = windows[0]
            at = search(count, align, bound if bound > lowest else lowest, last + count)
            if 0 <= at < hint[0]:
                if at + count <= last:
                    heapreplace(windows, (at + count, last))
                else:
                    heappop(windows)
                break
            heappop(windows)
            at = -1
        if at < 0:
            above = hint[0]
            at = search(count, align, above if above > lowest else lowest, len(self._map))
            if at < 0:
                hint[0] = len(self._map)
                return None
            hint[0] = at + count
        end = at + count
        bmap = self._map
        bmap[at:end] = b"\x01" * count
        if at == lowest:
            lowest = bmap.find(_FREE, end)
            self._lowest = lowest if lowest >= 0 else len(bmap)
        size = count << shift
        self.free_bytes -= size
        return self.start + (at << shift), size

    def _new_hint(self, key: tuple[int, int]) -> list:
        """Start tracking a request shape: nothing known yet above _lowest."""
        hints = self._hints
        if len(hints) >= MAX_HINTS:
            del hints[next(iter(hints))]
        if key[0] > self._widest:
            self._widest = key[0]
        hint = hints[key] = [self._lowest, []]
        return hint

    def free(self, start: int, size: int) -> None:
        """Clear the chunk's blocks.  O(size / block + hints * log windows).

        The core only frees what alloc or reserve gave; only the bounds and
        the granule are checked here, and _check catches a double free.
        """
        offset = start - self.start
        if offset < 0 or offset + size > self.size or size <= 0 or (offset | size) & (self.block - 1):
            raise CmaError(
                errno.EINVAL, f"bitmap: free of {start:#x}+{size:#x} outside the region or not whole blocks"
            )
        shift = self._shift
        at = offset >> shift
        count = size >> shift
        end = at + count
        self._map[at:end] = bytes(count)
        if at < self._lowest:
            self._lowest = at
        self.free_bytes += size
        if self._hints:
            self._add_windows(at, end)

    def _add_windows(self, at: int, end: int) -> None:
        """Blocks [at, end) became free: tell each hint where new runs may start.

        A run of c blocks that was not free before overlaps [at, end), so it
        starts in [max(left, at - c + 1), end - 1], where left is the start
        of the free run now holding [at, end); and it needs c free blocks
        before right, that run's end.  Both scans look at most _widest
        blocks away: no hinted run reaches further.
        """
        widest = self._widest
        bmap = self._map
        edge = at - 1 if at > 1 else 0
        left = bmap.rfind(_USED, edge, at) + 1 or edge
        right = bmap.find(_USED, end, end + widest)
        if right < 0:
            right = len(bmap) + widest  # far enough for any hinted run
        last = end - 1
        for (count, _), hint in self._hints.items():
            bound = at - count + 1
            if bound < left:
                bound = left
            if bound < hint[0] and right - bound >= count:
                windows = hint[1]
                if len(windows) < MAX_WINDOWS:
                    heappush(windows, (bound, last))
                else:  # too many: rescan from the lowest instead
                    hint[0] = min(bound, windows[0][0])
                    windows.clear()

    def reserve(self, start: int, size: int) -> bool:
        """Claim exactly [start, start + size) if whole blocks, all free.  O(size)."""
        offset = start - self.start
        if size <= 0 or offset < 0 or offset % self.block or size % self.block or offset + size > self.size:
            return False
        shift = self._shift
        at = offset >> shift
        end = at + (size >> shift)
        bmap = self._map
        if bmap.find(_USED, at, end) >= 0:
            return False
        bmap[at:end] = b"\x01" * (end - at)
        if at <= self._lowest < end:
            lowest = bmap.find(_FREE, end)
            self._lowest = lowest if lowest >= 0 else len(bmap)
        self.free_bytes -= size
        return True

    def holes(self) -> Iterator[tuple[int, int]]:
        """Runs of free blocks in address order.  O(N)."""
        start, shift = self.start, self._shift
        for run in _FREE_RUN.finditer(self._map, self._lowest):
            yield start + (run.start() << shift), (run.end() - run.start()) << shift

    def largest_free(self) -> int:
        """Longest run of free blocks: any request up to it fits.  O(N)."""
        return max((size for _, size in self.holes()), default=0)

    def _check(self) -> None:
        bmap = self._map
        shift = self._shift
        assert self.start % self.block == 0 and len(bmap) << shift == self.size
        used = bmap.count(_USED)
        assert used + bmap.count(_FREE) == len(bmap), "bytes other than 0 and 1 in the map"
        assert (len(bmap) - used) << shift == self.free_bytes, (used, self.free_bytes)
        assert 0 <= self._lowest <= len(bmap)
        assert bmap.find(_FREE, 0, self._lowest) < 0, f"free block below _lowest {self._lowest}"
        assert len(self._hints) <= MAX_HINTS
        runs = [(m.start(), m.end()) for m in _FREE_RUN.finditer(bmap)]
        for (count, align), (above, windows) in self._hints.items():
            assert 0 < count <= self._widest and align >= 1 and align & (align - 1) == 0
            assert 0 <= above <= len(bmap) and len(windows) <= MAX_WINDOWS
            # Every fit below `above` must start inside a window.
            covered = bytearray(len(bmap))
            for bound, last in windows:
                assert 0 <= bound <= last < len(bmap), (bound, last)
                covered[bound : last + 1] = b"\x01" * (last + 1 - bound)
            for a, b in runs:
                at = _aligned_up(self._first, a, align - 1)
                stop = min(b - count, above - 1)
                if at > stop:
                    continue
                assert _FREE not in covered[at : stop + 1 : align], (
                    f"{(count, align)}: a fit in [{at}, {stop}] is below {above} and in no window"
                )
