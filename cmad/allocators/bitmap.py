"""Bitmap first fit, like bootmem and mainline mm/cma.c.

One bit per block of 2^order_per_bit pages; a chunk holds whole blocks, so
its size is the request rounded up to the block size.  Allocation is first
fit with alignment, as ``bitmap_find_next_zero_area_off``: the lowest
aligned run of enough free blocks.  Alignment is of bus addresses; the
region start is block-aligned, so block i is aligned to ``align`` blocks
when ``(start_block + i) % align == 0``.

The "bitmap" is a bytearray with one byte per block (0 free, 1 used) so
scans run in C (``bytearray.find`` of a run of zero bytes).  A scan from
block 0, as mainline does, costs O(used blocks) per allocation once the
region is busy.  So, like the block metadata of the kernel's percpu
allocator (``contig_hint`` per bitmap block), the map is cut into
superblocks of ``SUPER`` blocks, and a max-tree over them holds, per
superblock, the longest free run that *starts* in it (measured up to
``LIMIT`` blocks).  The first fit starts in the first superblock whose
value is >= the request: the tree finds it in O(log N), and a short scan
finds the run.  With an alignment, a superblock whose runs fit only when
misaligned sends the search on to the next one.  Only the superblocks where
the run around a changed range starts are updated; a superblock is
rescanned only when its longest run shrank.  Requests over ``LIMIT`` blocks
fall back to the plain scan from block 0.

Costs, N blocks, S = SUPER, L = LIMIT: alloc O(log N + S + L) (the scans
in C), plus O(S) per superblock skipped for misalignment; free and reserve
O(size + log N + S + L); largest_free O(1), past LIMIT cached per map version; holes
O(N).
"""

from __future__ import annotations

import errno
import re
from typing import Iterator

from cmad.allocators.interface import PAGE_SHIFT, PAGE_SIZE, Allocator, register
from cmad.errors import CmaError

MAX_ORDER_PER_BIT = 20
MAX_BITS = 1 << 32  # one byte each: a bigger map is refused, not left to MemoryError
SUPER = 512  # blocks per superblock
LIMIT = 1 << 16  # free runs are measured up to this many blocks

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
    groupable = True
    params = ("order_per_bit",)
    _super = SUPER  # class attributes so tests can shrink them (_limit >= _super)
    _limit = LIMIT

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
        if start < 0 or start + size > 1 << 64:
            raise CmaError(errno.EINVAL, f"bitmap: region {start:#x}+{size:#x} is not within "
                                         "64-bit bus addresses")
        if size >> shift > MAX_BITS:
            raise CmaError(errno.EINVAL, f"bitmap: region of {size:#x} bytes needs "
                                         f"{size >> shift} bits, more than {MAX_BITS}; raise "
                                         "order_per_bit")
        self._first = start >> shift  # bus block number of block 0
        try:
            self._map = bytearray(size >> shift)
        except MemoryError:
            raise CmaError(errno.ENOMEM, f"bitmap: no memory for a map of {size >> shift} "
                                         "blocks; raise order_per_bit") from None
        nsuper = -(-len(self._map) // self._super)
        leaves = 1
        while leaves < nsuper:
            leaves <<= 1
        self._leaves = leaves  # tree[leaves + k] is superblock k; tree[i] = max of its children
        self._tree = [0] * (2 * leaves)
        self._version = 0  # bumped by every change of the map
        self._longest = (-1, 0)  # (version, longest run) once runs pass LIMIT
        if self._map:
            self._update(0, self._run(0))

    @classmethod
    def granule(cls, **params: int) -> int:
        """One block, 2^order_per_bit pages: regions are placed aligned to it."""
        return PAGE_SIZE << _order(params.get("order_per_bit", 0))

    def footprint(self, size: int, alignment: int) -> tuple[int, int]:
        """Whole blocks, block-aligned at least."""
        block = self.block
        return (size + block - 1) & -block, max(alignment, block)

    shape = footprint  # a chunk is exactly its whole blocks

    # -- the summary tree ----------------------------------------------

    def _update(self, k: int, value: int) -> None:
        """Set superblock k's longest run and fix the maxima above it.  O(log N)."""
        tree = self._tree
        i = self._leaves + k
        tree[i] = value
        i >>= 1
        while i:
            left = tree[2 * i]
            right = tree[2 * i + 1]
            value = left if left > right else right
            if tree[i] == value:
                break
            tree[i] = value
            i >>= 1

    def _next(self, k: int, count: int) -> int:
        """The first superblock >= k with a run of count blocks starting in it, or -1."""
        tree = self._tree
        leaves = self._leaves
        if k >= leaves:
            return -1
        i = leaves + k
        if tree[i] >= count:
            return k
        while i > 1:  # climb until a right sibling holds one
            if not i & 1 and tree[i + 1] >= count:
                i += 1
                break
            i >>= 1
        else:
            return -1
        while i < leaves:  # then take the leftmost leaf that does
            i <<= 1
            if tree[i] < count:
                i += 1
        return i - leaves

    def _run(self, at: int) -> int:
        """Length of the free run starting at block at, up to LIMIT.  O(L) in C."""
        bmap = self._map
        stop = at + self._limit
        end = bmap.find(_USED, at, stop)
        if end < 0:
            end = stop if stop < len(bmap) else len(bmap)
        return end - at

    def _scan(self, k: int) -> int:
        """Longest free run starting in superblock k, up to LIMIT.  O(S + L) in C.

        Looks for a run longer than the longest so far, measures it, and
        goes on after it: one pair of C scans per record, not per run.
        """
        bmap = self._map
        lo = k * self._super
        hi = min(lo + self._super, len(bmap))
        if lo and bmap[lo - 1] == _FREE:  # the run going on at lo started before
            lo = bmap.find(_USED, lo, hi)
            if lo < 0:
                return 0
        best = 0
        limit = self._limit
        while best < limit:
            # lo is used or starts a run, so a match starts a run, in [lo, hi).
            at = bmap.find(bytes(best + 1), lo, hi + best)
            if at < 0:
                break
            best = self._run(at)
            lo = at + best
        return best

    def _take(self, at: int, end: int) -> None:
        """Mark the free blocks [at, end) used and update the tree."""
        self._version += 1
        bmap = self._map
        edge = at - self._limit if at > self._limit else 0
        left = bmap.rfind(_USED, edge, at) + 1 or edge
        # The run [left, ...) around [at, end) is cut; if it began before
        # edge its head stays LIMIT long and its superblock keeps its value.
        known = left > edge or not edge
        if known:
            before = self._run(left)
        bmap[at:end] = b"\x01" * (end - at)
        tail = self._run(end) if end < len(bmap) and bmap[end] == _FREE else 0
        tree = self._tree
        leaves = self._leaves
        home = -1
        if known:
            home = left // self._super
            if tree[leaves + home] <= before:  # that was its longest run
                keep = at - left
                if end // self._super == home and tail > keep:
                    keep = tail
                if keep < before:  # and what is left of it is shorter (not capped)
                    self._update(home, self._scan(home))
        if tail:  # the tail is a new run
            k = end // self._super
            if k != home and tree[leaves + k] < tail:
                self._update(k, tail)

    def _give(self, at: int, end: int) -> None:
        """The blocks [at, end) were just freed: update the tree."""
        self._version += 1
        bmap = self._map
        tree = self._tree
        leaves = self._leaves
        edge = at - self._limit if at > self._limit else 0
        left = bmap.rfind(_USED, edge, at) + 1 or edge
        known = left > edge or not edge  # else the run on the left is LIMIT long already
        home = left // self._super if known else -1
        if end < len(bmap) and bmap[end] == _FREE:  # the run on the right no longer starts at end
            k = end // self._super
            if k != home and tree[leaves + k] <= self._run(end):
                self._update(k, self._scan(k))
        if known:
            length = self._run(left)
            if tree[leaves + home] < length:
                self._update(home, length)

    # -- the interface -------------------------------------------------

    def _search(self, count: int, align: int, at: int, stop: int) -> int:
        """First block >= at where an aligned run of count free blocks ends by stop, or -1."""
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
        """Lowest aligned run of free blocks.  O(log N + S + L) unless misaligned."""
        shift = self._shift
        count = (size + (1 << shift) - 1) >> shift
        align = alignment >> shift or 1
        if _aligned_up(self._first, 0, align - 1) + count > len(self._map):
            return None  # cannot fit: never build a run that long to search for
        if count > self._limit:
            at = self._search(count, align, 0, len(self._map))
        else:
            tree = self._tree
            if tree[1] < count:
                return None
            leaves = self._leaves
            i = 1
            while i < leaves:  # the first superblock where a long enough run starts
                i <<= 1
                if tree[i] < count:
                    i += 1
            k = i - leaves
            if align == 1:
                at = self._map.find(bytes(count), k * self._super)
            else:
                while True:
                    lo = k * self._super
                    # A run starting in k is aligned within align blocks, if at all.
                    at = self._search(count, align, lo, lo + self._super + align + count)
                    if at >= 0:
                        break
                    k = self._next(k + 1, count)
                    if k < 0:
                        break
        if at < 0:
            return None
        self._take(at, at + count)
        size = count << shift
        self.free_bytes -= size
        return self.start + (at << shift), size

    def free(self, start: int, size: int) -> None:
        """Clear the chunk's blocks.  O(size + log N + S + L).

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
        end = at + (size >> shift)
        self._map[at:end] = bytes(end - at)
        self._give(at, end)
        self.free_bytes += size

    def reserve(self, start: int, size: int) -> bool:
        """Claim exactly [start, start + size) if whole blocks, all free."""
        offset = start - self.start
        if size <= 0 or offset < 0 or offset % self.block or size % self.block or offset + size > self.size:
            return False
        shift = self._shift
        at = offset >> shift
        end = at + (size >> shift)
        if self._map.find(_USED, at, end) >= 0:
            return False
        self._take(at, end)
        self.free_bytes -= size
        return True

    def holes(self) -> Iterator[tuple[int, int]]:
        """Runs of free blocks in address order.  O(N)."""
        start, shift = self.start, self._shift
        for run in _FREE_RUN.finditer(self._map):
            yield start + (run.start() << shift), (run.end() - run.start()) << shift

    def largest_free(self) -> int:
        """Longest run of free blocks: any request up to it fits.  O(1) below LIMIT;
        past it, O(1) while the map is unchanged, else O(runs past LIMIT x log N)
        tree steps and one C scan along each such run (``_long_runs``)."""
        longest = self._tree[1]
        if longest >= self._limit:
            version, longest = self._longest
            if version != self._version:
                longest = self._long_runs()
                self._longest = (self._version, longest)
        return longest << self._shift

    def _long_runs(self) -> int:
        """The longest free run, measured from each superblock the tree says a run
        of LIMIT or more starts in; superblocks inside a run are skipped."""
        bmap, limit, sb = self._map, self._limit, self._super
        want = bytes(limit)
        best = 0
        k = self._next(0, limit)
        while k >= 0:
            lo = k * sb
            at = bmap.find(want, lo, min(lo + sb, len(bmap)) + limit - 1)
            if at < 0:  # cannot happen while the tree is right; stay correct anyway
                k = self._next(k + 1, limit)
                continue
            end = bmap.find(_USED, at)
            if end < 0:
                end = len(bmap)
            best = max(best, end - at)
            k = self._next(max(k + 1, end // sb), limit)
        return best

    def _check(self) -> None:
        bmap = self._map
        shift = self._shift
        assert self.start % self.block == 0 and len(bmap) << shift == self.size
        used = bmap.count(_USED)
        assert used + bmap.count(_FREE) == len(bmap), "bytes other than 0 and 1 in the map"
        assert (len(bmap) - used) << shift == self.free_bytes, (used, self.free_bytes)
        tree = self._tree
        leaves = self._leaves
        assert leaves >= -(-len(bmap) // self._super) and len(tree) == 2 * leaves
        longest = [0] * leaves
        for run in _FREE_RUN.finditer(bmap):
            k = run.start() // self._super
            longest[k] = max(longest[k], min(run.end() - run.start(), self._limit))
        assert tree[leaves:] == longest, "superblock maxima disagree with the map"
        for i in range(1, leaves):
            assert tree[i] == max(tree[2 * i], tree[2 * i + 1]), f"tree node {i}"
        longest = max((len(run) for run in _FREE_RUN.findall(bmap)), default=0)
        assert self.largest_free() == longest << shift, "largest_free disagrees with the map"
