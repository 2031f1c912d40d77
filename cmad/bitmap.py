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
is what makes mainline CMA slow when the region is busy.  Two kinds of
lower bound let the scan start later without changing its result:

- ``_lowest``: every block below it is used.
- ``_hints``: for a recent request shape ``(count, align)``, no aligned run
  of ``count`` free blocks starts below the hint.  An allocation of that
  shape raises it past the chunk it took (or to the end on failure: a
  repeated failing request costs O(1)); a free lowers it to the first
  block where a run made possible by the free could start.  The table
  keeps the ``MAX_HINTS`` most recently added shapes.

Costs, N blocks, H hints: alloc O(N) worst case in C, O(distance to the
first fit past the hint) usually; free O(size + H); reserve O(size);
holes and largest_free O(N).
"""

from __future__ import annotations

import errno
import re
from typing import Iterator

from .allocator import PAGE_SHIFT, Allocator, register
from .errors import CmaError

MAX_ORDER_PER_BIT = 20
MAX_HINTS = 64

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

    def alloc(self, size: int, alignment: int) -> tuple[int, int] | None:
        """Lowest aligned run of free blocks.  O(N) worst case, in C."""
        shift = self._shift
        count = (size + (1 << shift) - 1) >> shift
        align = alignment >> shift or 1
        key = (count, align)
        bmap = self._map
        lowest = self._lowest
        at = self._hints.get(key, lowest)
        if at < lowest:
            at = lowest
        want = bytes(count)
        if align == 1:
            at = bmap.find(want, at)
        else:
            mask = align - 1
            first = self._first
            at = _aligned_up(first, at, mask)
            while True:
                found = bmap.find(want, at)
                if found <= at:  # aligned, or -1
                    at = found
                    break
                at = _aligned_up(first, found, mask)
                if at == found:
                    break
        if at < 0:
            self._remember(key, len(bmap))
            return None
        end = at + count
        bmap[at:end] = b"\x01" * count
        self._remember(key, end)
        if at == lowest:
            lowest = bmap.find(_FREE, end)
            self._lowest = lowest if lowest >= 0 else len(bmap)
        size = count << shift
        self.free_bytes -= size
        return self.start + (at << shift), size

    def _remember(self, key: tuple[int, int], hint: int) -> None:
        """No run of shape key starts below hint (the search proved it)."""
        hints = self._hints
        if key not in hints:
            if len(hints) >= MAX_HINTS:
                del hints[next(iter(hints))]
            if key[0] > self._widest:
                self._widest = key[0]
        hints[key] = hint

    def free(self, start: int, size: int) -> None:
        """Clear the chunk's blocks.  O(size / block + hints)."""
        shift = self._shift
        at = (start - self.start) >> shift
        count = size >> shift
        end = at + count
        self._map[at:end] = bytes(count)
        if at < self._lowest:
            self._lowest = at
        self.free_bytes += size
        self._lower_hints(at, end)

    def _lower_hints(self, at: int, end: int) -> None:
        """Blocks [at, end) became free: lower the hints a new run may beat.

        A run of c blocks that was not free before overlaps [at, end), so it
        starts at or after max(left, at - c + 1), where left is the start of
        the free run now holding [at, end), and it needs c free blocks up to
        right, the run's end.  Both scans look at most _widest blocks away:
        beyond that no hinted run can reach.
        """
        widest = self._widest
        if not widest:
            return
        bmap = self._map
        edge = at - widest if at > widest else 0
        left = bmap.rfind(_USED, edge, at) + 1 or edge
        right = bmap.find(_USED, end, end + widest)
        if right < 0:
            right = len(bmap) + widest  # far enough for any hinted run
        hints = self._hints
        for key, hint in hints.items():
            count = key[0]
            bound = at - count + 1
            if bound < left:
                bound = left
            if hint > bound and right - bound >= count:
                hints[key] = bound  # same keys: safe while iterating

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
        for (count, align), hint in self._hints.items():
            assert 0 < count <= self._widest and align >= 1 and align & (align - 1) == 0
            for a, b in runs:
                at = _aligned_up(self._first, a, align - 1)
                if at >= hint:
                    break
                assert at + count > b, f"hint {hint} for {(count, align)} skips a fit at block {at}"
