"""Bitmap first fit, like bootmem and mainline mm/cma.c.

One bit per block of 2^order_per_bit pages; a chunk holds whole blocks, so
its size is the request rounded up to the block size.  Allocation is first
fit with alignment, as ``bitmap_find_next_zero_area_off``: the lowest
aligned run of enough free blocks.

The "bitmap" is a bytearray with one byte per block (0 free, 1 used) so the
search runs in C: ``bytearray.find`` of a run of zero bytes, retried from
the next aligned index when the run it finds starts misaligned.  ``_hint``
is the lowest block that may be free, so a packed prefix is not rescanned.
Alignment is of bus addresses; the region start is block-aligned, so block
index i is aligned when ``(start_block + i) % align_blocks == 0``.

Costs, N blocks: alloc O(N) in the worst case (a C scan from the hint),
free and reserve O(size), holes and largest_free O(N).
"""

from __future__ import annotations

import errno
import re
from typing import Iterator

from .allocator import PAGE_SHIFT, Allocator, register
from .errors import CmaError

MAX_ORDER_PER_BIT = 20

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
        self._first = start >> shift  # bus address of block 0, in blocks
        self._map = bytearray(size >> shift)
        self._hint = 0

    def alloc(self, size: int, alignment: int) -> tuple[int, int] | None:
        """Lowest aligned run of free blocks.  O(N) worst case, in C."""
        shift = self._shift
        count = (size + (1 << shift) - 1) >> shift
        bmap = self._map
        hint = self._hint
        want = bytes(count)
        align = alignment >> shift
        if align <= 1:
            at = bmap.find(want, hint)
            if at < 0:
                return None
        else:
            mask = align - 1
            first = self._first
            at = ((first + hint + mask) & ~mask) - first
            while True:
                found = bmap.find(want, at)
                if found < 0:
                    return None
                if found == at:
                    break
                at = ((first + found + mask) & ~mask) - first
                if found == at:
                    break
        end = at + count
        bmap[at:end] = b"\x01" * count
        if at == hint:
            hint = bmap.find(_FREE, end)
            self._hint = hint if hint >= 0 else len(bmap)
        size = count << shift
        self.free_bytes -= size
        return self.start + (at << shift), size

    def free(self, start: int, size: int) -> None:
        """Clear the chunk's blocks.  O(size / block)."""
        shift = self._shift
        at = (start - self.start) >> shift
        count = size >> shift
        self._map[at : at + count] = bytes(count)
        if at < self._hint:
            self._hint = at
        self.free_bytes += size

    def reserve(self, start: int, size: int) -> bool:
        """Claim exactly [start, start + size) if whole blocks, all free."""
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
        if at <= self._hint < end:
            hint = bmap.find(_FREE, end)
            self._hint = hint if hint >= 0 else len(bmap)
        self.free_bytes -= size
        return True

    def holes(self) -> Iterator[tuple[int, int]]:
        """Runs of free blocks in address order.  O(N)."""
        start, shift = self.start, self._shift
        for run in _FREE_RUN.finditer(self._map, self._hint):
            yield start + (run.start() << shift), (run.end() - run.start()) << shift

    def largest_free(self) -> int:
        """Longest run of free blocks: any request up to it fits.  O(N)."""
        return max((size for _, size in self.holes()), default=0)

    def _check(self) -> None:
        bmap = self._map
        assert len(bmap) << self._shift == self.size
        assert self.start % self.block == 0
        used = bmap.count(_USED)
        assert used + bmap.count(_FREE) == len(bmap), "bytes other than 0 and 1 in the map"
        assert (len(bmap) - used) << self._shift == self.free_bytes, (used, self.free_bytes)
        assert 0 <= self._hint <= len(bmap)
        assert bmap.find(_FREE, 0, self._hint) < 0, f"free block below the hint {self._hint}"
