"""The block table of grouping by mobility (SPEC 4b): who owns each pageblock.

A region is cut into pageblocks; ``BlockTable`` keeps, for each block:

- its owner (``_owner``, one byte per block): the pool of free blocks
  (FREE) or one of three kinds of chunk (PINNED, MOVABLE, LARGE), each with
  an instance of the region's allocator (``_typed``) whose free space is
  exactly the free space inside that kind's blocks.  "Whose block is this"
  is O(1), as ``get_pageblock_migratetype``;
- the bytes each kind holds in it (``_bytes``), from which its shown type
  follows: free (pool), pinned or movable (the owner's kind only), mixed
  (both); the count of blocks per shown type (``_counts``) is kept as
  blocks change, so stats are O(1);
- the pool itself: a bitmap with one bit per block (``_pool``).

Moving blocks between the pool and a kind (``_assign``, ``_reclaim``),
counting a chunk's bytes per block (``_account``), cutting a range where
its owner changes (``_pieces``), and what compaction reads of the table
(``block_windows``, ``isolate``, ``release``) live here; which blocks a
request takes is the policy's (``pageblocks.Grouped``).
"""

from __future__ import annotations

from array import array
from heapq import merge
from typing import Iterator

from cmad.allocators.bitmap import Bitmap
from cmad.allocators.interface import PAGE_SHIFT, Allocator, merge_adjacent, uncovered

# What a block shows: free, pinned, movable, mixed (both, after a fallback).
FREE, PINNED, MOVABLE, MIXED = 0, 1, 2, 3
TYPE_CHARS = ".PMX"
# Who owns a block: the pool (FREE), or one of three kinds of chunk, each with
# an allocator of its own.  Pinned chunks of a block or more (frames) are
# LARGE: they show as pinned, but the tails of their blocks are kept for
# other large ones, so a small long-lived pinned chunk never settles in the
# blocks a frame leaves and pins them after the frame is gone.
LARGE = 4
KINDS = (PINNED, MOVABLE, LARGE)


class BlockTable(Allocator):
    """The blocks of one region, their owners and the bytes each kind holds in them;
    ``inner`` is the allocator class each owner gets an instance of."""

    inner: type[Allocator] = Allocator

    def __init__(self, start: int, size: int, *, pageblock: int, **params: int):
        inner = self.inner
        super().__init__(start, size)
        self.pageblock = pageblock
        self._shift = pageblock.bit_length() - 1
        self.nblocks = n = size >> self._shift
        granule = inner.granule(**params)
        self._large = pageblock - granule + 1  # sizes from here round up to a block or more
        self._pool = Bitmap(start, size, order_per_bit=self._shift - PAGE_SHIFT)
        # each kind's allocator and bytes per block, indexed by kind (tuples: the
        # hot path indexes them)
        self._typed = tuple(inner.full(start, size, **params) if k in KINDS else None
                            for k in range(LARGE + 1))
        self._owner = bytearray(n)
        self._bytes = tuple(array("q", bytes(8 * n)) if k in KINDS else None
                            for k in range(LARGE + 1))
        self._counts = [n, 0, 0, 0]  # blocks per shown type
        self.fallbacks = 0
        self._freed_hole: tuple[int, int] | None = None  # what the last free merged into

    # -- blocks ----------------------------------------------------------------

    def kind(self, size: int, movable: bool) -> int:
        """The kind of a chunk (or request) of that size and mobility."""
        if movable:
            return MOVABLE
        return LARGE if size >= self._large else PINNED

    def block_type(self, i: int) -> int:
        """The shown type of block i.  O(1)."""
        owner = self._owner[i]
        held = self._bytes
        if owner == FREE:
            return FREE
        if owner == MOVABLE:
            return MIXED if held[PINNED][i] or held[LARGE][i] else MOVABLE
        return MIXED if held[MOVABLE][i] else PINNED

    def _empty(self, i: int) -> bool:
        held = self._bytes
        return not (held[PINNED][i] or held[MOVABLE][i] or held[LARGE][i])

    def block_counts(self) -> tuple[int, int, int, int]:
        """Blocks that are free, pinned, movable, mixed.  O(1)."""
        return tuple(self._counts)  # type: ignore[return-value]

    def picture(self) -> str:
        """One character per block (``.PMX``), 64 per line."""
        cells = "".join(TYPE_CHARS[self.block_type(i)] for i in range(self.nblocks))
        return "\n".join(cells[i:i + 64] for i in range(0, len(cells), 64))

    def _span(self, lo: int, hi: int) -> range:
        start, shift = self.start, self._shift
        return range((lo - start) >> shift, ((hi - 1 - start) >> shift) + 1)

    def _block(self, i: int) -> int:
        return self.start + (i << self._shift)

    def owner_of(self, addr: int) -> int:
        """The type that owns the block holding ``addr`` (FREE for the pool).  O(1)."""
        return self._owner[(addr - self.start) >> self._shift]

    # -- moving blocks and bytes -----------------------------------------------

    def _account(self, lo: int, hi: int, kind: int, sign: int) -> None:
        """Add (sign 1) or take (-1) the bytes [lo, hi) of a chunk of ``kind``;
        the shown types follow, an emptied block goes back to the pool.
        O(blocks spanned).  (alloc_for and free_for inline the common case: one
        block of the chunk's own kind, whose shown type cannot change.)"""
        start, shift, pb = self.start, self._shift, self.pageblock
        held = self._bytes[kind]
        counts = self._counts
        for i in self._span(lo, hi):
            b = start + (i << shift)
            before = self.block_type(i)
            held[i] += sign * (min(hi, b + pb) - max(lo, b))
            after = self.block_type(i)
            if after != before:
                counts[before] -= 1
                counts[after] += 1
            if sign < 0 and self._empty(i):
                self._reclaim(i)

    def _set_owner(self, i: int, owner: int) -> None:
        counts = self._counts
        counts[self.block_type(i)] -= 1
        self._owner[i] = owner
        counts[self.block_type(i)] += 1

    def _reclaim(self, i: int) -> None:
        """An emptied block goes back to the pool (not while compaction holds part of it).
        The hole the last free merged into holds the block: carving it out of
        that hole needs no search where the allocator can (bf)."""
        owner = self._owner[i]
        b = self._block(i)
        if owner == FREE:
            return
        typed = self._typed[owner]
        hole = self._freed_hole
        if hole is not None and hole[0] <= b and b + self.pageblock <= hole[0] + hole[1]:
            taken = typed.carve(hole[0], hole[1], b, self.pageblock)
            rest = hole[0] + hole[1] - b - self.pageblock  # the next block may be in the tail
            self._freed_hole = (b + self.pageblock, rest) if taken and rest else None
        else:
            taken = typed.reserve(b, self.pageblock)
        if taken:
            self._pool.free(b, self.pageblock)
            self._set_owner(i, FREE)

    def _assign(self, lo: int, hi: int, kind: int) -> None:
        """Blocks [lo, hi), just taken from the pool, become space of ``kind``."""
        for i in self._span(lo, hi):
            self._set_owner(i, kind)
        self._typed[kind].free(lo, hi - lo)

    def _unassign(self, lo: int, hi: int, kind: int) -> None:
        """Undo ``_assign`` of blocks that are still wholly free."""
        taken = self._typed[kind].reserve(lo, hi - lo)
        assert taken, "unassigned blocks must be wholly free"
        self._pool.free(lo, hi - lo)
        for i in self._span(lo, hi):
            self._set_owner(i, FREE)

    def _highest_free(self) -> tuple[int, int] | None:
        """The free block at the highest address, taken from the pool.  O(blocks) in C.

        Small pinned requests claim from the top of the region and everything
        else from the bottom (the pool's first fit), so the blocks that pin
        memory for long gather at one end and leave long runs of free and
        movable blocks for the large requests."""
        i = len(self._owner)
        while True:
            i = self._owner.rfind(FREE, 0, i)
            if i < 0:
                return None
            b = self._block(i)
            if self._pool.reserve(b, self.pageblock):  # not held by compaction
                return b, self.pageblock

    def _pieces(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """[lo, hi) cut where the owner of its blocks changes: (owner, lo, hi)."""
        owner_of, shift, start = self._owner, self._shift, self.start
        i, last = (lo - start) >> shift, (hi - 1 - start) >> shift
        while i <= last:
            owner = owner_of[i]
            j = i + 1
            while j <= last and owner_of[j] == owner:
                j += 1
            end = min(hi, start + (j << shift))
            yield owner, lo, end
            lo, i = end, j

    def _claim_blocks(self, first: int, last: int, owner: int) -> list[int]:
        """Blocks first..last still in the pool become ``owner``'s; returns them."""
        claimed = []
        for i in range(first, last + 1):
            if self._owner[i] == FREE:
                b = self._block(i)
                taken = self._pool.reserve(b, self.pageblock)
                assert taken, f"free block {i} is not wholly in the pool"
                self._assign(b, b + self.pageblock, owner)
                claimed.append(i)
        return claimed

    def _tally(self, added: dict[int, int], start: int, size: int) -> None:
        """Add a chunk's bytes per block to ``added`` (block -> bytes)."""
        lo, shift, block = self.start, self._shift, self.pageblock
        first, last = (start - lo) >> shift, (start + size - 1 - lo) >> shift
        if first == last:
            added[first] = added.get(first, 0) + size
            return
        end = start + size
        for i in range(first, last + 1):
            b = lo + (i << shift)
            added[i] = added.get(i, 0) + min(end, b + block) - max(start, b)

    def _add_bytes(self, added: dict[int, dict[int, int]]) -> None:
        """``_account(+1)`` of many chunks at once: each block's shown type moves once."""
        counts = self._counts
        for kind, per_block in added.items():
            held = self._bytes[kind]
            for i, n in per_block.items():
                before = self.block_type(i)
                held[i] += n
                after = self.block_type(i)
                if after != before:
                    counts[before] -= 1
                    counts[after] += 1

    # -- compaction support ----------------------------------------------------

    def block_windows(self, span: int, align: int, budget: int) -> list[tuple[int, int, int]]:
        """Runs of ``span`` bytes at ``align`` made of free and movable-only blocks
        whose movable bytes (the cost of emptying them) are at most ``budget``
        and fit in the free space outside the run: (cost, lo, hi),
        cheapest first.  O(blocks)."""
        n, k = self.nblocks, span >> self._shift
        step = max(align >> self._shift, 1)
        first = (-(self.start >> self._shift)) % step
        owner, movable = self._owner, self._bytes[MOVABLE]
        pinned, large = self._bytes[PINNED], self._bytes[LARGE]
        cost = [0] * (n + 1)
        walls = [0] * (n + 1)   # blocks holding pinned bytes
        frees = [0] * (n + 1)   # pool blocks
        for i in range(n):
            cost[i + 1] = cost[i] + movable[i]
            walls[i + 1] = walls[i] + (pinned[i] > 0 or large[i] > 0 or owner[i] in (PINNED, LARGE))
            frees[i + 1] = frees[i] + (owner[i] == FREE)
        room_m = self._typed[MOVABLE].free_bytes
        room_pool = self._pool.free_bytes
        # movable chunks may also go to the holes of pinned blocks (a fallback,
        # so such windows come after those that need none)
        room_pinned = sum(self._typed[k].free_bytes for k in (PINNED, LARGE))
        out = []
        for i in range(first, n - k + 1, step):
            j = i + k
            c = cost[j] - cost[i]
            if walls[j] != walls[i] or c > budget or not c:
                continue
            free_in = frees[j] - frees[i]
            # The movable space inside the run is given up while it is emptied.
            m_in = (k - free_in) * self.pageblock - c
            room = room_m - m_in + room_pool - free_in * self.pageblock
            if room + room_pinned < c:
                continue
            out.append((room < c, c, self._block(i), self._block(j)))
        out.sort()
        return [w[1:] for w in out]

    def isolate(self, lo: int, hi: int, used: list[tuple[int, int]]) -> list[tuple[int, int, int]] | None:
        """Hold every free byte of [lo, hi) (``used`` lists the chunks' ranges, sorted)
        so nothing is placed there while it is emptied; None if it cannot be held."""
        holds: list[tuple[int, int, int]] = []
        for g_lo, g_size in uncovered(lo, hi, used):
            g_hi = g_lo + g_size
            for i in self._span(g_lo, g_hi):
                b = self._block(i)
                p_lo, p_hi = max(g_lo, b), min(g_hi, b + self.pageblock)
                owner = self._owner[i]
                where = self._pool if owner == FREE else self._typed[owner]
                if not where.reserve(p_lo, p_hi - p_lo):
                    self.release(holds)
                    return None
                holds.append((owner, p_lo, p_hi - p_lo))
        return holds

    def release(self, holds: list[tuple[int, int, int]]) -> None:
        """Give back what ``isolate`` held; blocks left empty go back to the pool."""
        for owner, start, size in holds:
            (self._pool if owner == FREE else self._typed[owner]).free(start, size)
        for owner, start, size in holds:
            for i in self._span(start, start + size):
                if self._owner[i] != FREE and self._empty(i):
                    self._reclaim(i)

    # -- the whole region ------------------------------------------------------

    def holes(self) -> Iterator[tuple[int, int]]:
        """Free ranges of all three owners in address order, adjacent ones merged."""
        return merge_adjacent(merge(self._pool.holes(),
                                    *(self._typed[k].holes() for k in KINDS)))

    def check_chunks(self, chunks) -> None:
        """Assert that block types agree with the chunks inside them:
        ``chunks`` is every (start, size, movable) of the region."""
        held = {k: [0] * self.nblocks for k in KINDS}
        for start, size, movable in chunks:
            kind = self.kind(size, movable)
            owners = {self._owner[i] for i in self._span(start, start + size)}
            assert FREE not in owners, f"chunk {start:#x}+{size:#x} lies in a free block"
            for i in self._span(start, start + size):
                b = self._block(i)
                held[kind][i] += min(start + size, b + self.pageblock) - max(start, b)
        for kind in KINDS:
            assert list(self._bytes[kind]) == held[kind], f"type {kind} bytes disagree with chunks"

    def _check(self) -> None:
        """Every pageblock invariant, and each owner's allocator's own."""
        self._pool._check()
        pb, n = self.pageblock, self.nblocks
        free_in = {k: [0] * n for k in KINDS}
        for start, size in self._pool.holes():
            assert (start - self.start) % pb == 0 and size % pb == 0, \
                f"pool hole {start:#x}+{size:#x} is not whole blocks"
            for i in self._span(start, start + size):
                assert self._owner[i] == FREE, f"pool holds block {i} of owner {self._owner[i]}"
        for kind in KINDS:
            allocator = self._typed[kind]
            allocator._check()
            for start, size in allocator.holes():
                for i in self._span(start, start + size):
                    assert self._owner[i] == kind, \
                        f"type {kind} has free space in block {i} of owner {self._owner[i]}"
                    b = self._block(i)
                    free_in[kind][i] += min(start + size, b + pb) - max(start, b)
        counts = [0, 0, 0, 0]
        for i in range(n):
            owner = self._owner[i]
            used = sum(self._bytes[k][i] for k in KINDS)
            assert min(self._bytes[k][i] for k in KINDS) >= 0
            if owner == FREE:
                assert used == 0, f"free block {i} holds {used} bytes"
            else:
                assert used > 0, f"empty block {i} was not given back to the pool"
                assert used + free_in[owner][i] == pb, f"block {i}: used + free != block"
            counts[self.block_type(i)] += 1
        assert counts == self._counts, (counts, self._counts)
        assert self._pool.free_bytes == counts[FREE] * pb
        assert self.free_bytes == self._pool.free_bytes + sum(
            self._typed[k].free_bytes for k in KINDS), "free bytes disagree with the owners"
