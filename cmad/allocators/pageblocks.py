"""Grouping by mobility: pageblocks of one type each, around any allocator (SPEC 4b).

The kernel's page allocator keeps pinned ("unmovable") and movable pages
apart so that a few long-lived pinned pages cannot wall off every stretch a
large request could use; compaction then only ever has movable pages to
move.  Here a region is cut into *pageblocks* (2 MiB by default) and:

- every block is owned by the pool of free blocks, by the pinned type or by
  the movable type ("whose block is this" is O(1), as
  ``get_pageblock_migratetype``; the table is ``blocks.BlockTable``);
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

This module is the policy (the request path: ``alloc_for``, ``fallback``,
``free_for``, ``reserve_for``, ``reserve_many``); the block table it works
on is ``blocks.BlockTable``.

The shown type of a block follows from its owner and what it holds: free
(pool), pinned or movable (owner's type only), mixed (both).  Counts per
shown type are kept as blocks change, so stats are O(1).
"""

from __future__ import annotations

import errno

from cmad.errors import CmaError
from cmad.allocators.bitmap import MAX_ORDER_PER_BIT
from cmad.allocators.blocks import FREE, KINDS, LARGE, MOVABLE, PINNED, BlockTable
from cmad.allocators.interface import PAGE_SIZE, Allocator

DEFAULT_PAGEBLOCK = 2 << 20
MIN_BLOCKS = 8          # grouping by default only where a region holds this many blocks
# Grouping is off unless a region asks for it (``pageblock=2M``): on bench/frag.py's
# suite it failed more frames than plain placement on five of nine traces for bf
# and bitmap and on one for buddy (docs/performance.md, "Fragmentation"), and SPEC 4b lets a
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


class Grouped(BlockTable):
    """One region's allocator split by mobility into pageblocks; see the module docstring."""

    # -- the request path ------------------------------------------------------

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
        if owner == FREE or (i != j and owner_of.find(FREE, i, j + 1) >= 0):
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

    def retype(self, start: int, size: int, movable: bool) -> None:
        """A chunk changed mobility (a movable chunk was pinned): its bytes change sides."""
        was, now = self.kind(size, not movable), self.kind(size, movable)
        self._account(start, start + size, now, 1)
        self._account(start, start + size, was, -1)

    # -- compaction support ----------------------------------------------------

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

    # -- the plain interface: a chunk of unknown mobility is pinned ------------

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

    def largest_free(self) -> int:
        """The largest free range, whoever owns its blocks: the largest request that
        succeeds now (``alloc_anywhere``).  O(holes)."""
        return max((size for _, size in self.holes()), default=0)

    def cleanup(self) -> None:
        for k in KINDS:
            self._typed[k].cleanup()
