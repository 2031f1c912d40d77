"""Grouping by mobility: pageblocks of one type each, around any allocator (SPEC 4b).

The kernel's page allocator keeps pinned ("unmovable") and movable pages
apart so that a few long-lived pinned pages cannot wall off every stretch a
large request could use; compaction then only ever has movable pages to
move.  Here a region is cut into *pageblocks* (2 MiB by default) and:

- every block is owned by the pool of free blocks, by the pinned type or by
  the movable type (``_owner``, one byte per block: "whose block is this" is
  O(1), as ``get_pageblock_migratetype``);
- each type has its own instance of the region's allocator (bf, buddy or
  bitmap) whose free space is exactly the free space inside that type's
  blocks: the per-type free lists of the kernel, so a request of one type
  never lands in the other's blocks by accident, and every search stays the
  allocator's own logarithmic one;
- the pool of whole free blocks is a bitmap with one bit per block.

A request (``alloc_for``) follows ``__rmqueue``: its own type's space first;
then whole free blocks claimed for it (a run of them for a request that
spans blocks, ``try_to_claim_block``); compaction may then empty a window
of movable blocks for a pinned request (``compaction.evacuate``, the
``alloc_contig_range`` step, which needs the chunks and so lives outside);
only as the last step before ENOMEM does ``fallback`` take space in a block
of the other type (the ``fallbacks[]`` table below), which makes that block
mixed and is counted.  A block whose last chunk leaves goes back to the pool.

Grouping decides where a chunk goes, never whether it fits (SPEC 4b): when
all of the above fail, ``alloc_anywhere`` takes any free range that holds
the request, whoever owns its blocks.  Such a chunk spans blocks of several
owners; each part of it lives in its block's owner (``_pieces``), and
``free_for``, ``reserve_for`` and ``reserve_many`` split it the same way.
Grouping is off unless a region asks for it (``GROUP_BY_DEFAULT``).

The shown type of a block follows from its owner and what it holds: free
(pool), pinned or movable (owner's type only), mixed (both).  Counts per
shown type are kept as blocks change, so stats are O(1).
"""

from __future__ import annotations

import errno
from array import array
from heapq import merge
from typing import Iterator

from cmad.errors import CmaError
from cmad.allocators.bitmap import MAX_ORDER_PER_BIT, Bitmap
from cmad.allocators.interface import PAGE_SHIFT, PAGE_SIZE, Allocator, uncovered, merge_adjacent

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

DEFAULT_PAGEBLOCK = 2 << 20
MIN_BLOCKS = 8          # grouping by default only where a region holds this many blocks
# Grouping is off unless a region asks for it (``pageblock=2M``): on bench/frag.py's
# suite it failed more frames than plain placement on five of nine traces for bf
# and bitmap and on one for buddy (README, "Fragmentation"), and SPEC 4b lets a
# default lose on no workload.
GROUP_BY_DEFAULT = False
DEFAULT_MAX_BLOCKS = 1 << 16  # the default block grows past 2 MiB to keep to this many
MAX_BLOCKS = 1 << 22    # an explicit pageblock may not cut a region finer
MAX_PAGEBLOCK = PAGE_SIZE << MAX_ORDER_PER_BIT  # the pool is a bitmap of blocks

# Policy as data, as the kernel's fallbacks[]: where a request may borrow
# space, in order, as its last resort; borrowing across mobility is counted.
FALLBACKS = {PINNED: (LARGE, MOVABLE), LARGE: (PINNED, MOVABLE), MOVABLE: (PINNED, LARGE)}


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def pageblock_size(cls: type[Allocator], start: int, size: int, params: dict) -> int:
    """The region's pageblock from its allocator parameters (0: grouping off).

    Default: 2 MiB (more for regions past 2^16 such blocks) where the region
    holds at least MIN_BLOCKS of them and its allocator can be grouped.
    EINVAL for a pageblock that is not a power of two, is finer than the
    allocator's block, or does not divide the region."""
    granule = cls.granule(**params)
    if "pageblock" not in params and not GROUP_BY_DEFAULT:
        return 0
    if "pageblock" not in params:
        block = min(max(DEFAULT_PAGEBLOCK, _pow2_at_least(-(-size // DEFAULT_MAX_BLOCKS))),
                    MAX_PAGEBLOCK)
        fits = (start % block == 0 and size % block == 0 and size >= MIN_BLOCKS * block
                and size // block <= MAX_BLOCKS)
        return block if cls.groupable and fits and granule <= block else 0
    block = params["pageblock"]
    if block == 0:
        return 0
    what = f"{cls.name}: pageblock={block:#x}"
    if not cls.groupable:
        raise CmaError(errno.EINVAL, f"{what}: allocator {cls.name!r} cannot group by mobility")
    if block & (block - 1) or block < max(granule, PAGE_SIZE) or block > MAX_PAGEBLOCK:
        raise CmaError(errno.EINVAL, f"{what} must be a power of two no smaller than the "
                                     f"allocator's block {granule:#x}")
    if start % block or size % block:
        raise CmaError(errno.EINVAL, f"{what} must divide the region {start:#x}+{size:#x}")
    if size // block > MAX_BLOCKS:
        raise CmaError(errno.EINVAL, f"{what} cuts the region into more than {MAX_BLOCKS} blocks")
    return block


def make_allocator(cls: type[Allocator], start: int, size: int, params: dict) -> Allocator:
    """The region's allocator: ``cls`` itself, or ``cls`` grouped by mobility."""
    params = dict(params)
    block = pageblock_size(cls, start, size, params)
    params.pop("pageblock", None)
    if not block:
        return cls(start, size, **params)
    return grouped_class(cls)(start, size, pageblock=block, **params)


_GROUPED: dict[type, type] = {}


def grouped_class(cls: type[Allocator]) -> type["Grouped"]:
    """A Grouped subclass that shows as ``cls`` (name, granule, params)."""
    sub = _GROUPED.get(cls)
    if sub is None:
        sub = _GROUPED[cls] = type(f"Grouped{cls.__name__}", (Grouped,), {
            "name": cls.name, "params": (*cls.params, "pageblock"), "inner": cls,
            "granule": cls.granule})
    return sub


class Grouped(Allocator):
    """One region's allocator split by mobility into pageblocks; see the module docstring."""

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

    # -- blocks ----------------------------------------------------------

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

    def claim_shape(self, size: int, alignment: int, kind: int) -> tuple[int, int]:
        """The run of whole blocks (bytes, alignment) a request of ``kind`` claims."""
        need, align = self._typed[kind].footprint(size, alignment)
        mask = self.pageblock - 1
        return (need + mask) & ~mask, max(align, self.pageblock)

    def _claim(self, kind: int, size: int, alignment: int) -> tuple[int, int] | None:
        """try_to_claim_block: take a run of whole free blocks for the request."""
        span, align = self.claim_shape(size, alignment, kind)
        top = kind == PINNED and span == align == self.pageblock
        run = self._highest_free() if top else self._pool.alloc(span, align)
        if run is None:
            return None
        self._assign(run[0], run[0] + span, kind)
        got = self._typed[kind].alloc(size, alignment)
        if got is None:
            self._unassign(run[0], run[0] + span, kind)
            return None
        self._account(got[0], got[0] + got[1], kind, 1)
        for i in self._span(run[0], run[0] + span):  # a claimed block the chunk missed
            if self._empty(i):
                self._reclaim(i)
        return got

    # -- the mobility-aware interface ------------------------------------

    def alloc_for(self, size: int, alignment: int, movable: bool,
                  claim: bool = True) -> tuple[int, int] | None:
        """Own type's blocks first, then a claimed run of free blocks.  O(log n)
        plus the claim's O(log blocks)."""
        kind = MOVABLE if movable else LARGE if size >= self._large else PINNED
        got = self._typed[kind].alloc(size, alignment)
        if got is None:
            got = self._claim(kind, size, alignment) if claim else None
            if got is not None:
                self.free_bytes -= got[1]
            return got
        lo, n = got
        i = (lo - self.start) >> self._shift
        if self._owner[i] == kind and i == (lo + n - 1 - self.start) >> self._shift:
            self._bytes[kind][i] += n  # _account's hot path, inline
        else:
            self._account(lo, lo + n, kind, 1)
        self.free_bytes -= n
        return got

    def fallback(self, size: int, alignment: int, movable: bool) -> tuple[int, int] | None:
        """The last resort: space kept for the other kinds, in FALLBACKS order;
        a block of the other mobility becomes mixed, and that is counted."""
        kind = self.kind(size, movable)
        for other in FALLBACKS[kind]:
            got = self._typed[other].alloc(size, alignment)
            if got is not None:
                self._account(got[0], got[0] + got[1], kind, 1)
                self.free_bytes -= got[1]
                self.fallbacks += (other == MOVABLE) != (kind == MOVABLE)
                return got
        return None

    def free_for(self, start: int, size: int, movable: bool) -> None:
        """Give a chunk back to the owners of the blocks that hold it (one, but for a
        chunk placed across owners by ``alloc_anywhere``).  O(log n + blocks)."""
        offset = start - self.start
        if offset < 0 or offset + size > self.size or size <= 0:
            raise CmaError(errno.EINVAL, f"{self.name}: free of {start:#x}+{size:#x} "
                                         "outside the region")
        i, j = offset >> self._shift, (offset + size - 1) >> self._shift
        owner_of = self._owner
        owner = owner_of[i]
        if owner_of.find(FREE, i, j + 1) >= 0:
            raise CmaError(errno.EINVAL, f"{self.name}: free of {start:#x}+{size:#x} "
                                         "in a free block")
        kind = MOVABLE if movable else LARGE if size >= self._large else PINNED
        if i == j:
            hole = self._typed[owner].free(start, size)
            self.free_bytes += size
            if owner == kind:
                held = self._bytes[kind]  # _account's hot path, inline
                held[i] -= size
                if not held[i] and self._empty(i):
                    self._freed_hole = hole  # what _reclaim carves the block from
                    self._reclaim(i)
                    self._freed_hole = None
                return
        else:
            hole = None
            for piece_owner, lo, hi in self._pieces(start, start + size):
                hole = self._typed[piece_owner].free(lo, hi - lo)
            self.free_bytes += size
        self._freed_hole = hole
        self._account(start, start + size, kind, -1)
        self._freed_hole = None

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

    def reserve_for(self, start: int, size: int, movable: bool) -> bool:
        """Claim exactly [start, start + size) for a chunk of that mobility.

        The range's free blocks are claimed for the chunk's kind; each part of it
        is then reserved from the owner of its block, so a range across owners
        (``alloc_anywhere``) is as good as one inside one type's blocks: the
        guarantee of SPEC 4b."""
        if size <= 0 or start < self.start or start + size > self.start + self.size:
            return False
        kind = self.kind(size, movable)
        span = self._span(start, start + size)
        claimed = self._claim_blocks(span.start, span.stop - 1, kind)
        taken = []
        for owner, lo, hi in self._pieces(start, start + size):
            if not self._typed[owner].reserve(lo, hi - lo):
                for owner2, lo2, hi2 in taken:
                    self._typed[owner2].free(lo2, hi2 - lo2)
                for i in claimed:
                    b = self._block(i)
                    self._unassign(b, b + self.pageblock, kind)
                return False
            taken.append((owner, lo, hi))
        self._account(start, start + size, kind, 1)
        self.free_bytes -= size
        return True

    def alloc_anywhere(self, size: int, alignment: int, movable: bool = False,
                       bound: int | None = None) -> tuple[int, int] | None:
        """Any free range that fits (the guarantee); sharing a block of the other
        mobility is counted in ``fallbacks``."""
        got = super().alloc_anywhere(size, alignment, movable, bound)
        if got is not None:
            owner_of = self._owner
            self.fallbacks += any((owner_of[i] == MOVABLE) != movable
                                  for i in self._span(got[0], got[0] + got[1]))
        return got

    def reserve_many(self, ranges: list[tuple[int, int, bool]]) -> list[bool]:
        """``reserve_for`` of every (start, size, movable), sorted by start (recovery):
        the blocks are claimed range by range as there, then each owner's allocator
        reserves all its parts of ranges in one ``reserve_many`` and the bytes are
        counted per block once.  Ranges come in address order, so the blocks a
        later range claims lie outside an earlier range's span: each range meets
        the state it would have met alone.  A range that fails gives back what
        it took, as ``reserve_for`` does."""
        lo, hi, shift, owner_of = self.start, self.start + self.size, self._shift, self._owner
        per_owner: dict[int, list] = {k: [] for k in KINDS}
        claims: dict[int, list[int]] = {}
        parts = [0] * len(ranges)  # parts of each range still to be reserved
        for at, (start, size, movable) in enumerate(ranges):
            if size <= 0 or start < lo or start + size > hi:
                parts[at] = -1
                continue
            first, last = (start - lo) >> shift, (start + size - 1 - lo) >> shift
            owner = owner_of[first]
            if first == last and owner != FREE:
                per_owner[owner].append((at, start, size))
                parts[at] = 1
                continue
            claims[at] = self._claim_blocks(first, last, self.kind(size, movable))
            for owner, p_lo, p_hi in self._pieces(start, start + size):
                per_owner[owner].append((at, p_lo, p_hi - p_lo))
                parts[at] += 1
        taken: list[list[tuple[int, int, int]]] = [[] for _ in ranges]
        for owner, wanted in per_owner.items():
            got = self._typed[owner].reserve_many([(s, n, False) for _, s, n in wanted])
            for (at, start, size), ok in zip(wanted, got):
                if ok:
                    parts[at] -= 1
                    taken[at].append((owner, start, size))
        return self._settle_reserved(ranges, parts, taken, claims)

    def _settle_reserved(self, ranges, parts, taken, claims) -> list[bool]:
        """reserve_many's end: count the ranges wholly reserved, undo the rest."""
        added: dict[int, dict[int, int]] = {k: {} for k in KINDS}  # kind -> block -> bytes
        done = [n == 0 for n in parts]
        for at, (start, size, movable) in enumerate(ranges):
            if done[at]:
                self._tally(added[self.kind(size, movable)], start, size)
                self.free_bytes -= size
            else:
                for owner, s, n in taken[at]:
                    self._typed[owner].free(s, n)
        self._add_bytes(added)
        for at, blocks in claims.items():
            if not done[at]:
                for i in blocks:
                    if self._empty(i):
                        self._reclaim(i)
        return done

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

    def retype(self, start: int, size: int, movable: bool) -> None:
        """A chunk changed mobility (a movable chunk was pinned): its bytes change sides."""
        was, now = self.kind(size, not movable), self.kind(size, movable)
        self._account(start, start + size, now, 1)
        self._account(start, start + size, was, -1)

    def owner_of(self, addr: int) -> int:
        """The type that owns the block holding ``addr`` (FREE for the pool).  O(1)."""
        return self._owner[(addr - self.start) >> self._shift]

    # -- compaction support ------------------------------------------------

    def windows(self, size: int, alignment: int, movable: bool, budget: int,
                chunks=()) -> list[tuple[int, int, int]]:
        """Compaction empties blocks for a pinned request (as a run of whole blocks
        it would claim), never for a movable one: movable requests take free
        blocks or fall back, never move others.  ``chunks`` are not needed: the
        blocks' byte counts say where the movable bytes are."""
        if movable:
            return []
        span, align = self.claim_shape(size, alignment, LARGE)
        return self.block_windows(span, align, budget)

    def misplaced(self, start: int) -> bool:
        """A movable chunk at ``start`` lies in a block not owned by the movable type."""
        return self.owner_of(start) != MOVABLE

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

    # -- the plain interface: a chunk of unknown mobility is pinned ----------

    def alloc(self, size: int, alignment: int) -> tuple[int, int] | None:
        return self.alloc_for(size, alignment, False)

    def free(self, start: int, size: int) -> None:
        self.free_for(start, size, False)

    def reserve(self, start: int, size: int) -> bool:
        return self.reserve_for(start, size, False)

    def footprint(self, size: int, alignment: int) -> tuple[int, int]:
        return self._typed[PINNED].footprint(size, alignment)

    def shape(self, size: int, alignment: int) -> tuple[int, int]:
        return self._typed[PINNED].shape(size, alignment)

    def holes(self) -> Iterator[tuple[int, int]]:
        """Free ranges of all three owners in address order, adjacent ones merged."""
        return merge_adjacent(merge(self._pool.holes(),
                                    *(self._typed[k].holes() for k in KINDS)))

    def largest_free(self) -> int:
        """The largest free range, whoever owns its blocks: the largest request that
        succeeds now (``alloc_anywhere``).  O(holes)."""
        return max((size for _, size in self.holes()), default=0)

    def cleanup(self) -> None:
        for k in KINDS:
            self._typed[k].cleanup()

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
