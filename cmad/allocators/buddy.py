"""The ``buddy`` allocator: power-of-two blocks of pages, split and coalesce.

Design (the page allocator's, as the design review asked):

- Free space is a set of *blocks*.  A block of order k is 2^k pages starting
  at a page frame number (pfn = bus address >> PAGE_SHIFT) that is a multiple
  of 2^k: blocks are naturally aligned in bus addresses, so any chunk carved
  from the start of a block of order k is aligned to 2^k pages for free.
- ``alloc`` is ``__rmqueue_smallest``: take a block from the smallest
  non-empty order >= the request's order, split it, give the upper halves
  back (``expand``).  The request's order is
  ``max(ceil_log2(pages), log2(alignment pages))``.  Then, like
  ``alloc_pages_exact``, the unused tail of the block is given back at once,
  so a chunk costs exactly its size (5 MiB costs 5 MiB, not 8).
- ``free`` is ``__free_one_page``: the range is cut into maximal naturally
  aligned blocks and each is merged with its buddy (pfn XOR 2^k) for as long
  as the buddy is free at the same order.  A free buddy is inside the region
  by construction, so the merged block is too.
- A region that is not aligned to its size starts as the greedy
  decomposition into the largest aligned blocks that fit; it simply has
  smaller largest blocks.

Data structures, per order k: a set of free block pfns (O(1) buddy lookup,
insert, remove) and a min-heap of the same pfns with lazy deletion, so that
``alloc`` deterministically takes the *lowest* free block of the order it
uses (the kernel takes the head of a list; lowest-address-first keeps the
high end of a region free for large requests and makes runs reproducible).
Heap entries whose pfn has left the set (merged away, reserved) are skipped
when they surface; a heap is emptied whenever its set empties and rebuilt if
it grows past twice its set, so it stays O(live blocks).  An int bitmask of
the non-empty orders finds the smallest usable order in O(1) and is
``largest_free``.

A request no single block can serve is served, as drm_buddy's contiguous
mode does, from any free range the blocks of lower orders make together
(``Allocator.alloc_anywhere``: the lowest such range, claimed with
``reserve``), so buddy refuses only when no free range fits (SPEC 4b).

Costs: alloc O(orders + log n), free O(orders) (n free blocks per order,
orders <= log2(region pages) ~ 24 for 64 GiB).  ``reserve`` is O(pieces x
orders), ``holes``/``_check`` O(n log n); none of those is on the hot path.
"""

from __future__ import annotations

import errno
from heapq import heapify, heappop, heappush
from typing import Iterator

from cmad.allocators.interface import PAGE_SHIFT, PAGE_SIZE, Allocator, merge_adjacent, register
from cmad.errors import CmaError

_PAGE_MASK = PAGE_SIZE - 1


def _pieces(pfn: int, end: int) -> Iterator[tuple[int, int]]:
    """Cut [pfn, end) into maximal naturally aligned blocks, as (pfn, order), low to high."""
    while pfn < end:
        step = pfn & -pfn
        rem = end - pfn
        if not step or step > rem:
            step = 1 << (rem.bit_length() - 1)
        yield pfn, step.bit_length() - 1
        pfn += step


@register
class Buddy(Allocator):
    """Binary buddy allocator over one region; see the module docstring."""

    name = "buddy"
    groupable = True
    params = ()

    def __init__(self, start: int, size: int, **params: int):
        super().__init__(start, size, **params)
        if start & _PAGE_MASK or size & _PAGE_MASK or size <= 0:
            raise CmaError(errno.EINVAL, f"buddy: region {start:#x}+{size:#x} is not whole pages")
        if start < 0 or start + size > 1 << 64:
            raise CmaError(errno.EINVAL, f"buddy: region {start:#x}+{size:#x} is not within "
                                         "64-bit bus addresses")
        self._lo = start >> PAGE_SHIFT
        self._hi = (start + size) >> PAGE_SHIFT
        # No block can be larger than the region: orders 0 .. bit_length - 1.
        norders = (self._hi - self._lo).bit_length()
        self._sets: list[set[int]] = [set() for _ in range(norders)]
        self._heaps: list[list[int]] = [[] for _ in range(norders)]
        self._mask = 0  # bit k set iff order k has a free block
        for pfn, order in _pieces(self._lo, self._hi):
            self._add(pfn, order)

    # -- the two primitives every path goes through -------------------------

    def _add(self, pfn: int, order: int) -> None:
        """Put one free block on its order's set and heap (no merging).  O(log n)."""
        s = self._sets[order]
        h = self._heaps[order]
        if not s:
            self._mask |= 1 << order
        s.add(pfn)
        heappush(h, pfn)
        if len(h) > 2 * len(s) + 64:  # too many stale entries: rebuild
            h[:] = s
            heapify(h)

    def _remove(self, pfn: int, order: int) -> None:
        """Take a known free block off its order (its heap entry goes stale).  O(1)."""
        s = self._sets[order]
        s.remove(pfn)
        if not s:
            self._mask &= ~(1 << order)
            self._heaps[order].clear()

    # -- the interface ------------------------------------------------------

    def footprint(self, size: int, alignment: int) -> tuple[int, int]:
        """A whole naturally aligned block: the tail is given back only after the split."""
        block = max(1 << (size - 1).bit_length(), alignment)
        return block, block

    def alloc(self, size: int, alignment: int) -> tuple[int, int] | None:
        """Carve ``size`` bytes from the lowest block of the smallest order that fits.

        O(orders + log n).  Returns (start, size): the tail of the rounded-up
        block is free again before this returns.
        """
        pages = size >> PAGE_SHIFT
        order = (pages - 1).bit_length()
        align_order = (alignment >> PAGE_SHIFT).bit_length() - 1
        if align_order > order:
            order = align_order
        avail = self._mask >> order
        if not avail or pages <= 0:
            return None
        top = order + (avail & -avail).bit_length() - 1

        # __rmqueue_smallest: the lowest live entry of the heap of order top.
        s = self._sets[top]
        h = self._heaps[top]
        pfn = heappop(h)
        while pfn not in s:
            pfn = heappop(h)
        self._remove(pfn, top)

        add = self._add
        # expand(): give back the upper half at each order on the way down.
        while top > order:
            top -= 1
            add(pfn + (1 << top), top)
        # alloc_pages_exact(): give back [pfn + pages, pfn + 2^order).  Every
        # piece's buddy lies inside the block and is in use or lower in the
        # tail, never free, so no merging is needed.
        tail = pfn + pages
        end = pfn + (1 << order)
        while tail < end:
            step = tail & -tail
            add(tail, step.bit_length() - 1)
            tail += step

        self.free_bytes -= size
        return pfn << PAGE_SHIFT, size

    def free(self, start: int, size: int) -> None:
        """Give back [start, start + size), merging each piece with free buddies.

        O(pieces x orders), pieces <= 2 log2(pages).  The core only frees
        ranges it got from ``alloc`` or ``reserve``; only the bounds are checked.
        """
        pfn = start >> PAGE_SHIFT
        end = (start + size) >> PAGE_SHIFT
        if start & _PAGE_MASK or size & _PAGE_MASK or size <= 0 \
                or pfn < self._lo or end > self._hi:
            raise CmaError(errno.EINVAL, f"buddy: free of {start:#x}+{size:#x} outside the "
                                         f"region or not whole pages")
        self._release(pfn, end)
        self.free_bytes += size

    def _release(self, pfn: int, end: int) -> None:
        """__free_one_page for every maximal aligned block of [pfn, end)."""
        sets = self._sets
        remove = self._remove
        for block, order in _pieces(pfn, end):
            while True:
                bit = 1 << order
                buddy = block ^ bit
                if buddy not in sets[order]:
                    break
                remove(buddy, order)
                block &= ~bit
                order += 1
            self._add(block, order)

    def reserve(self, start: int, size: int) -> bool:
        """Claim exactly [start, start + size) if all of it is free.

        Each maximal aligned piece of the range is looked up in the free block
        that contains it, which is then split down to the piece.  Nothing
        changes unless every piece is free.  O(pieces x orders).
        """
        pfn = start >> PAGE_SHIFT
        end = (start + size) >> PAGE_SHIFT
        if start & _PAGE_MASK or size & _PAGE_MASK or size <= 0 \
                or pfn < self._lo or end > self._hi:
            return False
        pieces = list(_pieces(pfn, end))
        if any(self._containing(p, k) is None for p, k in pieces):
            return False
        for p, k in pieces:
            found = self._containing(p, k)
            assert found is not None  # earlier pieces only split other blocks
            block, order = found
            self._remove(block, order)
            while order > k:  # split down to the piece, freeing the other halves
                order -= 1
                half = 1 << order
                if p >= block + half:
                    self._add(block, order)
                    block += half
                else:
                    self._add(block + half, order)
        self.free_bytes -= size
        return True

    def _containing(self, pfn: int, order: int) -> tuple[int, int] | None:
        """The free block (pfn, order) that contains block (pfn, order), or None.  O(orders)."""
        sets = self._sets
        for k in range(order, len(sets)):
            block = pfn & ~((1 << k) - 1)
            if block in sets[k]:
                return block, k
        return None

    def blocks(self) -> list[tuple[int, int]]:
        """Every free block as (start, size) in address order (cf. /proc/buddyinfo).  O(n log n)."""
        return sorted((pfn << PAGE_SHIFT, PAGE_SIZE << k)
                      for k, s in enumerate(self._sets) for pfn in s)

    def holes(self) -> Iterator[tuple[int, int]]:
        """Free ranges (start, size) in address order, adjacent blocks merged.  O(n log n)."""
        return merge_adjacent(self.blocks())

    def largest_block(self) -> int:
        """The largest free block: the largest request ``alloc`` serves at once.  O(1)."""
        m = self._mask
        return PAGE_SIZE << (m.bit_length() - 1) if m else 0

    def largest_free(self) -> int:
        """The largest free range, blocks of lower orders merged: the largest
        page-aligned request that succeeds (``alloc_anywhere`` assembles it).
        O(n log n); the hot path never asks."""
        return max((size for _, size in self.holes()), default=self.largest_block())

    def _check(self) -> None:
        """Assert every invariant of the free lists.  O(n log n)."""
        lo, hi = self._lo, self._hi
        total = 0
        for k, s in enumerate(self._sets):
            bit = 1 << k
            assert bool(self._mask & bit) == bool(s), f"mask bit {k} disagrees with its set"
            assert set(self._heaps[k]) >= s, f"order {k}: a free block is missing from the heap"
            for pfn in s:
                assert pfn & (bit - 1) == 0, f"block {pfn:#x} not aligned to order {k}"
                assert lo <= pfn and pfn + bit <= hi, f"block {pfn:#x}/{k} outside the region"
                assert pfn ^ bit not in s, f"block {pfn:#x}/{k} and its buddy are both free"
                total += bit
        assert self._mask >> len(self._sets) == 0, "mask has bits past the largest order"
        prev_end = lo
        for start, size in self.blocks():
            assert start >> PAGE_SHIFT >= prev_end, f"free blocks overlap at {start:#x}"
            prev_end = (start + size) >> PAGE_SHIFT
        assert self.free_bytes == total << PAGE_SHIFT, \
            f"free_bytes {self.free_bytes} != sum of free blocks {total << PAGE_SHIFT}"
