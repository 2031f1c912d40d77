"""The contract every allocator keeps (bf, buddy, bitmap), checked the same way for
each: the scenarios they share, then one rule-based state machine with a small oracle
per allocator.  The free space is always the gaps between the live chunks; where a
request goes is each allocator's own model.  Each allocator's structure (blocks,
bitmaps, the start index) is tested in its own file."""

from __future__ import annotations

import errno
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)
from sortedcontainers import SortedDict

from cmad.allocators.bf import BestFit
from cmad.allocators.bitmap import Bitmap
from cmad.allocators.buddy import Buddy
from cmad.errors import CmaError
from util.alloc import BASE, M, P, Odd, Tiny, align_up, best_fit, complement, first_fit, greedy

#: Anywhere in a gap that fits: buddy's model of placement (no exact address).
ANYWHERE = object()


# -- the oracles: where a request goes, what the region looks like at rest --------------


class Oracle:
    """One allocator over [start, start + size) in units of ``block`` bytes."""

    name = ""

    def __init__(self, a, start: int, size: int, block: int = P):
        self.a, self.start, self.size, self.block = a, start, size, block

    @classmethod
    def new(cls, start: int, size: int) -> Oracle:
        """The allocator at page granularity (for the shared scenarios)."""
        raise NotImplementedError

    def place(self, holes, size: int, alignment: int):
        """The (start, size) a request gets, None where it must fail, or ANYWHERE."""
        raise NotImplementedError

    def refusal_is_right(self, size: int, alignment: int) -> bool:
        """Where ``place`` says ANYWHERE: may the allocator refuse this request?"""
        return False

    def structure(self):
        """What a refused reserve must leave unchanged."""
        return list(self.a.holes())

    def check_largest_free(self, holes) -> None:
        """``largest_free`` is the largest hole, it can be had, and no more."""
        lf = self.a.largest_free()
        assert lf == max((n for _, n in holes), default=0)
        if lf:
            got = self.a.alloc(lf, P)
            assert got is not None
            self.a.free(*got)
        assert self.a.alloc(lf + self.block, P) is None

    def check_at_rest(self) -> None:
        """Everything freed: the region as it was made."""
        assert list(self.a.holes()) == [(self.start, self.size)]
        assert self.a.free_bytes == self.size


class BestFitOracle(Oracle):
    name = "bf"
    starts = st.one_of(st.just(BASE), st.integers(0, 1 << 14).map(lambda p: BASE + p * P))

    @classmethod
    def new(cls, start, size):
        return cls(BestFit(start, size), start, size)

    @classmethod
    def draw(cls, data) -> Oracle:
        start = data.draw(cls.starts, label="start")
        pages = data.draw(st.one_of(st.integers(1, 256), st.integers(1, 64 * M // P)), "pages")
        return cls.new(start, pages * P)

    def place(self, holes, size, alignment):
        at = best_fit(holes, size, alignment)
        return None if at is None else (at, size)


class BuddyOracle(Oracle):
    name = "buddy"

    def __init__(self, a, start, size, block=P):
        super().__init__(a, start, size, block)
        self.initial = greedy(start, size)

    @classmethod
    def new(cls, start, size):
        return cls(Buddy(start, size), start, size)

    @classmethod
    def draw(cls, data) -> Oracle:
        start = data.draw(st.one_of(BestFitOracle.starts, st.just(0)), label="start")
        pages = data.draw(st.one_of(st.integers(1, 256), st.integers(1, 64 * M // P)), "pages")
        return cls.new(start, pages * P)

    def place(self, holes, size, alignment):
        return ANYWHERE

    def refusal_is_right(self, size, alignment):
        """Only when no free block of the needed order exists."""
        order = max((size // P - 1).bit_length(), (alignment // P).bit_length() - 1)
        return self.a.largest_block() < P << order

    def structure(self):
        return self.a.blocks()

    def check_largest_free(self, holes):
        """Buddy's largest_free is what alloc_anywhere can give, at most every free byte."""
        lf = self.a.largest_free()
        assert lf <= self.a.free_bytes
        if lf:
            got = self.a.alloc_anywhere(lf, P)
            assert got is not None and got[1] == lf
            self.a.free(*got)
        else:
            assert self.a.free_bytes == 0
        assert self.a.alloc_anywhere(lf + P, P) is None
        assert self.a.largest_block() <= lf

    def check_at_rest(self):
        assert self.a.blocks() == self.initial
        assert self.a.free_bytes == self.size


class BitmapOracle(Oracle):
    name = "bitmap"

    @classmethod
    def new(cls, start, size, order: int = 0, kind: type[Bitmap] = Bitmap):
        return cls(kind(start, size, order_per_bit=order), start, size, P << order)

    @classmethod
    def draw(cls, data) -> Oracle:
        kind = data.draw(st.sampled_from([Bitmap, Tiny, Odd]), label="class")
        order = data.draw(st.integers(0, 3), label="order")
        block = P << order
        start = BASE + data.draw(st.integers(0, 1 << 12), label="blocks_in") * block
        pages = data.draw(st.one_of(st.integers(1, 256), st.integers(1, 64 * M // P)), "pages")
        return cls.new(start, max(block, pages * P // block * block), order, kind)

    def place(self, holes, size, alignment):
        rounded = align_up(size, self.block)
        at = first_fit(holes, rounded, max(alignment, self.block))
        return None if at is None else (at, rounded)


ORACLES = [BestFitOracle, BuddyOracle, BitmapOracle]
each = pytest.mark.parametrize("oracle", ORACLES, ids=[o.name for o in ORACLES])


# -- the shared scenarios --------------------------------------------------------------


@each
def test_fresh_region_is_one_hole(oracle):
    a = oracle.new(BASE, 64 * M).a
    a._check()
    assert list(a.holes()) == [(BASE, 64 * M)]
    assert a.largest_free() == 64 * M and a.free_bytes == 64 * M


@each
def test_reserve_claims_exact_ranges_and_refuses_overlap(oracle):
    o = oracle.new(BASE, 16 * M)
    a = o.a
    assert a.reserve(BASE + 3 * M + 0x5000, 5 * M)
    assert a.free_bytes == 11 * M
    assert list(a.holes()) == [(BASE, 3 * M + 0x5000), (BASE + 8 * M + 0x5000, 8 * M - 0x5000)]
    a._check()
    before = o.structure()
    # Overlapping the reserved range at either end or inside it, or outside the region.
    for start, size in [(BASE + 3 * M, 0x6000), (BASE + 8 * M + 0x4000, 0x2000),
                        (BASE + 4 * M, P), (BASE, 16 * M),
                        (BASE - P, 2 * P), (BASE + 16 * M - P, 2 * P), (BASE + 16 * M, P)]:
        assert not a.reserve(start, size), (hex(start), size)
        assert o.structure() == before and a.free_bytes == 11 * M
        a._check()
    # Adjacent ranges are fine; an allocated chunk cannot be reserved.
    assert a.reserve(BASE + 3 * M + 0x4000, P)
    chunk = a.alloc(M, P)
    assert not a.reserve(chunk[0], P)
    a._check()
    a.free(*chunk)
    a.free(BASE + 3 * M + 0x4000, P)
    a.free(BASE + 3 * M + 0x5000, 5 * M)
    a._check()
    o.check_at_rest()


@each
def test_free_outside_region_is_einval(oracle):
    a = oracle.new(BASE, 16 * M).a
    for start, size in [(BASE - P, P), (BASE + 16 * M, P), (BASE + 16 * M - P, 2 * P)]:
        with pytest.raises(CmaError) as e:
            a.free(start, size)
        assert e.value.errno == errno.EINVAL
    a._check()
    assert a.free_bytes == 16 * M


@each
def test_check_catches_a_double_free(oracle):
    a = oracle.new(BASE, 16 * P).a
    x = a.alloc(2 * P, P)
    a.alloc(P, P)
    a.free(*x)
    a.free(*x)
    with pytest.raises(AssertionError):
        a._check()


@each
@pytest.mark.parametrize("start", [BASE, BASE + 0x3000], ids=["aligned", "unaligned"])
def test_every_page_taken_then_all_merge_back(oracle, start):
    o = oracle.new(start, 4 * M)
    a = o.a
    pages = [a.alloc(P, P) for _ in range(4 * M // P)]
    assert None not in pages and len({p for p, _ in pages}) == len(pages)
    assert a.alloc(P, P) is None and a.free_bytes == 0 and a.largest_free() == 0
    a._check()
    random.Random(7).shuffle(pages)
    for p in pages:
        a.free(*p)
    a._check()
    assert list(a.holes()) == [(start, 4 * M)] and a.largest_free() == 4 * M
    o.check_at_rest()


# -- the state machine ------------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free/reserve against the live chunks; the oracle says where."""

    ORACLE: type[Oracle] = Oracle

    @initialize(data=st.data())
    def setup(self, data):
        self.o = self.ORACLE.draw(data)
        self.chunks = SortedDict()  # start -> size

    def holes(self):
        return complement(self.o.start, self.o.size, self.chunks.items())

    @rule(pages=st.integers(1, 64), align_shift=st.integers(0, 8))
    def alloc(self, pages, align_shift):
        o, size, alignment = self.o, pages * P, P << align_shift
        holes = self.holes()
        expect = o.place(holes, size, alignment)
        got = o.a.alloc(size, alignment)
        if expect is ANYWHERE:
            if got is None:
                assert o.refusal_is_right(size, alignment)
                return
            assert got[1] == size
        else:
            assert got == expect, (size, alignment)
            if got is None:
                return
        start, n = got
        assert start % alignment == 0 and start % o.block == 0
        assert any(s <= start and start + n <= s + m for s, m in holes)  # in a gap
        self.chunks[start] = n

    @rule(data=st.data())
    def free(self, data):
        if self.chunks:
            i = data.draw(st.integers(0, len(self.chunks) - 1))
            self.o.a.free(*self.chunks.popitem(i))

    @rule(data=st.data(), units=st.integers(1, 64))
    def reserve(self, data, units):
        o = self.o
        region_units = o.size // o.block
        units = min(units, region_units)
        offset = data.draw(st.integers(0, region_units - units))
        start, size = o.start + offset * o.block, units * o.block
        expect = any(s <= start and start + size <= s + n for s, n in self.holes())
        before = None if expect else o.structure()
        assert o.a.reserve(start, size) == expect
        if expect:
            self.chunks[start] = size
        else:
            assert o.structure() == before

    @rule()
    def largest_free_is_honest(self):
        self.o.check_largest_free(self.holes())

    @invariant()
    def consistent(self):
        if hasattr(self, "o"):
            self.o.a._check()
            assert self.o.a.free_bytes + sum(self.chunks.values()) == self.o.size
            assert list(self.o.a.holes()) == self.holes()

    def teardown(self):
        if not hasattr(self, "o"):
            return
        for start, size in list(self.chunks.items()):
            self.o.a.free(start, size)
        self.o.a._check()
        self.o.check_at_rest()


MACHINE_SETTINGS = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)


@each
def test_random_alloc_free_reserve_keep_the_contract(oracle):
    machine = type(f"{oracle.__name__}Machine", (AllocatorMachine,), {"ORACLE": oracle})
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)
