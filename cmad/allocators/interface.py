"""The allocator interface and registry, as in the patch's ``struct cma_allocator``.

An allocator manages the free space of one region.  The core guarantees:
sizes are multiples of PAGE_SIZE, alignments are powers of two >= PAGE_SIZE,
and calls for one region are serialised (the Cma lock).  Addresses are bus
addresses (absolute), so natural alignment means alignment of the address.

Subclasses implement ``alloc``, ``free``, ``reserve``, ``holes``,
``largest_free`` and ``_check``; ``free_bytes`` is kept here.  The
``*_for`` entry points carry a chunk's mobility: a plain allocator ignores
it, ``pageblocks.Grouped`` keeps pinned and movable chunks in blocks of
their own (SPEC 4b).  ``reserve_many`` (bulk recovery) has a generic loop
here; an allocator may override it to rebuild its index once.
"""

from __future__ import annotations

import errno
from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import Callable, Iterable, Iterator

from cmad.errors import CmaError
from cmad.memparse import align_up

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class Allocator:
    """Base class.  ``name`` is the registry name; ``params`` the accepted keywords."""

    name: str = "-"
    params: tuple[str, ...] = ()

    def __init__(self, start: int, size: int, **params: int):
        """init(region): manage [start, start + size), all of it free."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise CmaError(errno.EINVAL, f"{self.name}: unknown parameter {sorted(unknown)[0]!r}")
        self.start = start
        self.size = size
        self.free_bytes = size

    @classmethod
    def granule(cls, **params: int) -> int:
        """The smallest unit the allocator hands out; regions are placed aligned to it."""
        return PAGE_SIZE

    def footprint(self, size: int, alignment: int) -> tuple[int, int]:
        """The free window (size, alignment) ``alloc`` needs to serve a request."""
        return size, alignment

    def shape(self, size: int, alignment: int) -> tuple[int, int]:
        """The exact (size, alignment) of the chunk a request becomes: any free
        range that holds that serves it (``alloc_anywhere``).  Bitmap rounds to
        its block; buddy needs no more than the request itself."""
        return size, alignment

    def alloc(self, size: int, alignment: int) -> tuple[int, int] | None:
        """Return (start, size) of a new chunk, or None if no hole fits.

        The returned size may exceed the request where the allocator's
        granule says so (bitmap blocks); it is what ``free`` will be given.
        """
        raise NotImplementedError

    def free(self, start: int, size: int) -> None:
        """Give back a range earlier returned by alloc or reserve."""
        raise NotImplementedError

    def reserve(self, start: int, size: int) -> bool:
        """Claim exactly [start, start + size) if all of it is free (recovery, moves).

        Returns False and changes nothing if any part is in use or the range
        does not suit the allocator's granule.
        """
        raise NotImplementedError

    def reserve_many(self, ranges: list[tuple[int, int, bool]]) -> list[bool]:
        """``reserve_for`` each (start, size, movable) of ``ranges``, sorted by
        start (recovery).

        Exactly what a loop of ``reserve_for`` calls would do, in one call: an
        allocator can override it to rebuild its index once (``bf`` does).
        Returns one success flag per range.
        """
        return [self.reserve_for(start, size, movable) for start, size, movable in ranges]

    def holes(self) -> Iterator[tuple[int, int]]:
        """Free ranges (start, size) in address order, adjacent ones merged."""
        raise NotImplementedError

    def largest_free(self) -> int:
        """The region's largest free range: the largest request that succeeds now
        with page alignment (through ``alloc_anywhere`` if not ``alloc``)."""
        raise NotImplementedError

    def alloc_anywhere(self, size: int, alignment: int, movable: bool = False,
                       bound: int | None = None) -> tuple[int, int] | None:
        """The guarantee of SPEC 4b: the lowest free range that holds the request's
        ``shape`` (within one ``bound`` window, if given), claimed exactly,
        whatever the allocator's own policy would choose (drm_buddy's contiguous
        mode, the kernel's alloc_contig_range).  O(holes): the last step before
        ENOMEM, never the hot path."""
        need, align = self.shape(size, alignment)
        if bound is not None and need > bound:
            return None
        for start, length in self.holes():
            at = align_up(start, align)
            if bound is not None and at // bound != (at + need - 1) // bound:
                at = (at // bound + 1) * bound  # the next window, aligned as bound >= align
            if at + need <= start + length and self.reserve_for(at, need, movable):
                return at, need
        return None

    # -- mobility (SPEC 4b).  An allocator that knows nothing of it serves every
    # chunk alike; ``pageblocks.Grouped`` overrides these.

    groupable = False  # whether pageblocks.Grouped may split it by mobility

    @classmethod
    def full(cls, start: int, size: int, **params: int) -> "Allocator":
        """An instance over [start, start + size) with every byte in use."""
        allocator = cls(start, size, **params)
        if size and not allocator.reserve(start, size):
            raise CmaError(errno.EINVAL, f"{cls.name}: cannot start full")
        return allocator

    def alloc_for(self, size: int, alignment: int, movable: bool,
                  claim: bool = True) -> tuple[int, int] | None:
        """alloc for a chunk of that mobility; ``claim=False`` keeps to space the
        type already has (compaction moving a chunk down)."""
        return self.alloc(size, alignment)

    def fallback(self, size: int, alignment: int, movable: bool) -> tuple[int, int] | None:
        """The last resort before ENOMEM: space kept for the other mobility."""
        return None

    def free_for(self, start: int, size: int, movable: bool) -> None:
        self.free(start, size)

    def reserve_for(self, start: int, size: int, movable: bool) -> bool:
        return self.reserve(start, size)

    def retype(self, start: int, size: int, movable: bool) -> None:
        """The chunk at [start, start + size) is now of that mobility."""

    def cleanup(self) -> None:
        """cleanup(region): called when the region has no chunks left."""

    def carve(self, hole: int, hole_size: int, start: int, size: int) -> bool:
        """Claim [start, start + size) inside the hole [hole, hole + hole_size) that
        ``free`` just returned; here a plain ``reserve``, an allocator that knows
        its holes (bf) skips the search."""
        return self.reserve(start, size)

    # -- pageblocks (SPEC 4b): a plain allocator has none; Grouped overrides.

    pageblock = 0      # bytes per pageblock; 0: grouping off (and no ``block_counts``)
    fallbacks = 0      # allocations that took space kept for the other mobility

    def picture(self) -> str:
        """The ``pageblocks`` file: one character per block; empty without grouping."""
        return ""

    def check_chunks(self, chunks: Iterable[tuple[int, int, bool]]) -> None:
        """Assert the structure agrees with the region's chunks, every (start,
        size, movable) of them (tests); nothing to check here."""

    # -- compaction support (cmad.core.compaction): what it asks of any allocator.

    def windows(self, size: int, alignment: int, movable: bool, budget: int,
                chunks: Iterable[tuple[int, int, bool]]) -> list[tuple[int, int, int]]:
        """(cost, lo, hi) of the windows compaction may empty to serve the request,
        cheapest first.  Here: the request's ``shape`` at any aligned place
        between pinned chunks (``chunks``: the region's (start, end, movable) in
        address order) whose movable bytes, the cost, are at most ``budget``."""
        window, align = self.shape(size, alignment)
        if self.free_bytes < window:
            return []
        found = []
        for lo, hi, movable_chunks in _stretches(self.start, self.start + self.size, chunks):
            starts = [s for s, _ in movable_chunks]
            ends = [e for _, e in movable_chunks]
            weights = [0, *accumulate(e - s for s, e in movable_chunks)]
            for w in {align_up(lo, align), *(align_up(e, align) for e in ends)}:
                if w < lo or w + window > hi:
                    continue
                i, j = bisect_right(ends, w), bisect_left(starts, w + window)
                cost = weights[j] - weights[i]
                if 0 < cost <= budget:
                    found.append((cost, w, w + window))
        found.sort()
        return found

    def isolate(self, lo: int, hi: int, used: list[tuple[int, int]]) -> list | None:
        """Hold every free byte of [lo, hi) (``used``: the (start, size) of the
        chunks there, sorted) so nothing is placed there while compaction empties
        it; None (and nothing held) if it cannot be held.  ``release`` takes the
        result back."""
        held: list[tuple[int, int]] = []
        for gap in uncovered(lo, hi, used):
            if not self.reserve(*gap):
                self.release(held)
                return None
            held.append(gap)
        return held

    def release(self, holds: list) -> None:
        """Give back what ``isolate`` held."""
        for start, size in holds:
            self.free(start, size)

    def misplaced(self, start: int) -> bool:
        """Whether a movable chunk at ``start`` sits where movable chunks are not
        kept (a pinned block): compaction then moves it out.  Never, here."""
        return False

    def _check(self) -> None:
        """Assert every invariant of the structure (tests call it after each step)."""
        raise NotImplementedError


Factory = Callable[..., Allocator]

# The built-in allocators in registration order: the first is the default.
BUILTIN = ("bf", "buddy", "bitmap")
_registry: dict[str, type[Allocator]] = {}


def merge_adjacent(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(start, size) ranges in address order, with touching ones joined."""
    cur = end = None
    for start, size in ranges:
        if start == end:
            end += size
            continue
        if cur is not None:
            yield cur, end - cur
        cur, end = start, start + size
    if cur is not None:
        yield cur, end - cur


def _stretches(lo: int, hi: int, chunks: Iterable[tuple[int, int, bool]]
               ) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """The ranges of [lo, hi) between pinned chunks, each with the (start, end) of
    the movable chunks inside it."""
    start, movable = lo, []
    for c_start, c_end, c_movable in chunks:
        if c_movable:
            movable.append((c_start, c_end))
        else:
            yield start, c_start, movable
            start, movable = c_end, []
    yield start, hi, movable


def uncovered(lo: int, hi: int, used: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(start, size) of the parts of [lo, hi) that no (start, size) of ``used`` covers."""
    at = lo
    for s, n in used:
        if s > at:
            yield at, s - at
        at = max(at, s + n)
    if hi > at:
        yield at, hi - at


def register(cls: type[Allocator]) -> type[Allocator]:
    _registry[cls.name] = cls
    return cls


def registry() -> dict[str, type[Allocator]]:
    """Registered allocators, built-ins first in their fixed order (import order varies)."""
    import importlib

    for name in BUILTIN:  # each module registers its class
        importlib.import_module(f".{name}", __package__)

    ordered = {name: _registry[name] for name in BUILTIN}
    ordered.update(_registry)
    return ordered
