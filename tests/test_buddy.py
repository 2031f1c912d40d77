"""The buddy allocator: unit tests, then a rule-based property test with _check()."""

from __future__ import annotations

import errno
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sortedcontainers import SortedDict

from cmad.allocators.interface import PAGE_SIZE, _registry
from cmad.allocators.buddy import Buddy
from cmad.errors import CmaError

from allocutil import BASE, K, M, complement


def greedy(start: int, size: int) -> list[tuple[int, int]]:
    """The expected free blocks of a fresh region: largest aligned block that fits, left to right."""
    out = []
    end = start + size
    while start < end:
        block = PAGE_SIZE
        while start % (block * 2) == 0 and start + block * 2 <= end:
            block *= 2
        out.append((start, block))
        start += block
    return out


# -- unit tests ---------------------------------------------------------------

def test_registered_without_params():
    assert _registry["buddy"] is Buddy
    assert Buddy.params == ()
    with pytest.raises(CmaError) as e:
        Buddy(BASE, 16 * M, order_per_bit=1)
    assert e.value.errno == errno.EINVAL


def test_fresh_aligned_region_is_one_block():
    a = Buddy(BASE, 64 * M)
    a._check()
    assert a.blocks() == [(BASE, 64 * M)]
    assert list(a.holes()) == [(BASE, 64 * M)]
    assert a.largest_free() == 64 * M
    assert a.free_bytes == 64 * M


@pytest.mark.parametrize("start", [BASE, BASE + 0x3000, 0])
def test_power_of_two_chunks_are_naturally_aligned(start):
    a = Buddy(start, 64 * M + 0x5000)
    rng = random.Random(1)
    live = []
    for _ in range(300):
        size = PAGE_SIZE << rng.randrange(0, 12)
        got = a.alloc(size, PAGE_SIZE)
        if got is None:
            continue
        assert got[1] == size
        assert got[0] % size == 0, f"{got[0]:#x} not aligned to {size:#x}"
        live.append(got)
        if rng.random() < 0.3:
            a.free(*live.pop(rng.randrange(len(live))))
        a._check()


def test_alignment_beyond_size_costs_only_size():
    a = Buddy(BASE, 16 * M)
    start, size = a.alloc(PAGE_SIZE, M)
    assert start % M == 0 and size == PAGE_SIZE
    assert a.free_bytes == 16 * M - PAGE_SIZE
    a._check()
    # The rest of that 1 MiB block is free again: the next page comes from it.
    assert a.alloc(PAGE_SIZE, PAGE_SIZE) == (start + PAGE_SIZE, PAGE_SIZE)


def test_lowest_address_first_and_deterministic():
    a = Buddy(BASE, 16 * M)
    assert [a.alloc(PAGE_SIZE, PAGE_SIZE)[0] for _ in range(8)] == \
        [BASE + i * PAGE_SIZE for i in range(8)]


def test_five_mib_costs_five_mib_and_the_tail_is_reusable():
    a = Buddy(BASE, 8 * M)
    start, size = a.alloc(5 * M, PAGE_SIZE)
    assert (start, size) == (BASE, 5 * M)
    assert a.free_bytes == 3 * M
    a._check()
    assert list(a.holes()) == [(BASE + 5 * M, 3 * M)]
    # The 3 MiB tail is a 1 MiB and a 2 MiB block: both usable.
    assert a.alloc(2 * M, PAGE_SIZE) == (BASE + 6 * M, 2 * M)
    assert a.alloc(M, PAGE_SIZE) == (BASE + 5 * M, M)
    assert a.free_bytes == 0 and a.largest_free() == 0
    assert a.alloc(PAGE_SIZE, PAGE_SIZE) is None
    a._check()
    for chunk in [(BASE, 5 * M), (BASE + 6 * M, 2 * M), (BASE + 5 * M, M)]:
        a.free(*chunk)
        a._check()
    assert a.blocks() == [(BASE, 8 * M)]


def test_64mib_of_pages_coalesces_back_to_one_block():
    a = Buddy(BASE, 64 * M)
    pages = [a.alloc(PAGE_SIZE, PAGE_SIZE) for _ in range(64 * M // PAGE_SIZE)]
    assert None not in pages
    assert len({p for p, _ in pages}) == len(pages)
    assert a.free_bytes == 0 and a.alloc(PAGE_SIZE, PAGE_SIZE) is None
    a._check()
    random.Random(7).shuffle(pages)
    for p in pages:
        a.free(*p)
    a._check()
    assert a.blocks() == [(BASE, 64 * M)]
    assert a.largest_free() == 64 * M


def test_unaligned_region():
    start, size = BASE + 0x3000, 10 * M + 12 * K
    a = Buddy(start, size)
    a._check()
    assert a.blocks() == greedy(start, size)
    assert list(a.holes()) == [(start, size)]
    largest = max(n for _, n in greedy(start, size))
    assert a.largest_block() == largest and a.largest_free() == size
    got = a.alloc(largest, PAGE_SIZE)
    assert got is not None and got[0] % largest == 0
    assert a.alloc(largest + PAGE_SIZE, PAGE_SIZE) is None
    a.free(*got)
    a._check()
    assert a.blocks() == greedy(start, size)
    # Fill it with odd sizes, empty it, and get the decomposition back.
    live = []
    while (got := a.alloc(3 * PAGE_SIZE, PAGE_SIZE)) is not None:
        assert start <= got[0] and got[0] + got[1] <= start + size
        live.append(got)
    assert a.free_bytes < 3 * PAGE_SIZE or a.largest_block() < 4 * PAGE_SIZE
    a._check()
    for chunk in live:
        a.free(*chunk)
    assert a.blocks() == greedy(start, size)


def test_reserve_claims_exact_ranges_and_refuses_overlap():
    a = Buddy(BASE, 16 * M)
    assert a.reserve(BASE + 3 * M + 0x5000, 5 * M)
    assert a.free_bytes == 11 * M
    a._check()
    assert list(a.holes()) == [(BASE, 3 * M + 0x5000), (BASE + 8 * M + 0x5000, 8 * M - 0x5000)]
    before = a.blocks()
    # Overlapping the reserved range at either end, or inside it: refused, nothing changes.
    for start, size in [(BASE + 3 * M, 0x6000), (BASE + 8 * M + 0x4000, 0x2000),
                        (BASE + 4 * M, PAGE_SIZE), (BASE, 16 * M)]:
        assert not a.reserve(start, size)
        assert a.blocks() == before and a.free_bytes == 11 * M
    # Outside the region or not whole pages.
    assert not a.reserve(BASE - PAGE_SIZE, 2 * PAGE_SIZE)
    assert not a.reserve(BASE + 16 * M - PAGE_SIZE, 2 * PAGE_SIZE)
    assert not a.reserve(BASE + 0x800, PAGE_SIZE)
    assert a.blocks() == before
    # Adjacent ranges are fine; an allocated chunk cannot be reserved.
    assert a.reserve(BASE + 3 * M + 0x4000, PAGE_SIZE)
    chunk = a.alloc(M, PAGE_SIZE)
    assert not a.reserve(chunk[0], PAGE_SIZE)
    a._check()
    a.free(*chunk)
    a.free(BASE + 3 * M + 0x4000, PAGE_SIZE)
    a.free(BASE + 3 * M + 0x5000, 5 * M)
    a._check()
    assert a.blocks() == [(BASE, 16 * M)]


def test_free_outside_region_is_einval():
    a = Buddy(BASE, 16 * M)
    for start, size in [(BASE - PAGE_SIZE, PAGE_SIZE), (BASE + 16 * M, PAGE_SIZE),
                        (BASE + 0x10, PAGE_SIZE)]:
        with pytest.raises(CmaError) as e:
            a.free(start, size)
        assert e.value.errno == errno.EINVAL
    a._check()


# -- property test ------------------------------------------------------------

class BuddyMachine(RuleBasedStateMachine):
    """Random alloc/free/reserve against a model of the live chunks."""

    @initialize(
        start=st.one_of(st.just(BASE), st.integers(0, 1 << 14).map(lambda p: BASE + p * PAGE_SIZE),
                        st.just(0)),
        pages=st.one_of(st.integers(1, 256), st.integers(1, 64 * M // PAGE_SIZE)),
    )
    def setup(self, start, pages):
        self.start, self.size = start, pages * PAGE_SIZE
        self.a = Buddy(start, self.size)
        self.initial = greedy(start, self.size)
        self.chunks = SortedDict()  # start -> size

    def _overlaps(self, start, size):
        i = self.chunks.bisect_left(start + size)
        if i == 0:
            return False
        prev = self.chunks.peekitem(i - 1)
        return prev[0] + prev[1] > start

    @rule(pages=st.integers(1, 64), align_shift=st.integers(0, 8))
    def alloc(self, pages, align_shift):
        size, align = pages * PAGE_SIZE, PAGE_SIZE << align_shift
        got = self.a.alloc(size, align)
        order = max((pages - 1).bit_length(), align_shift)
        if got is None:
            # Only when no free block of the needed order exists.
            assert self.a.largest_block() < PAGE_SIZE << order
            return
        start, n = got
        assert n == size
        assert start % align == 0
        assert self.start <= start and start + n <= self.start + self.size
        assert not self._overlaps(start, n)
        self.chunks[start] = n

    @rule(data=st.data())
    def free(self, data):
        if not self.chunks:
            return
        i = data.draw(st.integers(0, len(self.chunks) - 1))
        start, size = self.chunks.popitem(i)
        self.a.free(start, size)

    @rule(data=st.data(), pages=st.integers(1, 64))
    def reserve(self, data, pages):
        region_pages = self.size // PAGE_SIZE
        pages = min(pages, region_pages)
        offset = data.draw(st.integers(0, region_pages - pages))
        start, size = self.start + offset * PAGE_SIZE, pages * PAGE_SIZE
        expect = not self._overlaps(start, size)
        before = None if expect else self.a.blocks()
        assert self.a.reserve(start, size) == expect
        if expect:
            self.chunks[start] = size
        else:
            assert self.a.blocks() == before

    @rule()
    def largest_free_is_honest(self):
        lf = self.a.largest_free()
        assert lf <= self.a.free_bytes
        if lf:
            got = self.a.alloc_anywhere(lf, PAGE_SIZE)
            assert got is not None and got[1] == lf
            self.a.free(*got)
        else:
            assert self.a.free_bytes == 0
        assert self.a.alloc_anywhere(lf + PAGE_SIZE, PAGE_SIZE) is None
        assert self.a.largest_block() <= lf

    @invariant()
    def consistent(self):
        self.a._check()
        assert self.a.free_bytes + sum(self.chunks.values()) == self.size
        assert list(self.a.holes()) == complement(self.start, self.size, self.chunks.items())

    def teardown(self):
        if not hasattr(self, "a"):
            return
        for start, size in list(self.chunks.items()):
            self.a.free(start, size)
        self.a._check()
        assert self.a.blocks() == self.initial
        assert self.a.free_bytes == self.size


BuddyMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
TestBuddyMachine = BuddyMachine.TestCase
