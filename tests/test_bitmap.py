"""The bitmap allocator's own tests: blocks of 2^order_per_bit pages, first fit, the
superblock index.  The contract it shares with the other allocators (and the state
machine) is in test_allocators.py."""

from __future__ import annotations

import errno
import random

import pytest
from sortedcontainers import SortedDict

from cmad.allocators.interface import _registry
from cmad.allocators.bitmap import Bitmap
from cmad.errors import CmaError

from util.alloc import BASE, K, M, P, Odd, Tiny, align_up, complement, first_fit


class Model:
    """An allocator and the chunks it gave out, checked against first fit."""

    def __init__(self, start: int, size: int, order: int = 0, cls: type[Bitmap] = Bitmap):
        self.a = cls(start, size, order_per_bit=order)
        self.start, self.size, self.block = start, size, P << order
        self.chunks = SortedDict()

    def holes(self):
        return complement(self.start, self.size, self.chunks.items())

    def alloc(self, size: int, alignment: int):
        rounded = align_up(size, self.block)
        expect = first_fit(self.holes(), rounded, max(alignment, self.block))
        got = self.a.alloc(size, alignment)
        assert got == (None if expect is None else (expect, rounded)), (size, alignment)
        if got:
            self.chunks[got[0]] = got[1]
        return got

    def free_at(self, i: int):
        self.a.free(*self.chunks.popitem(i))

    def check(self):
        self.a._check()
        assert self.a.free_bytes + sum(self.chunks.values()) == self.size
        assert list(self.a.holes()) == self.holes()


# -- unit tests ---------------------------------------------------------------

def test_registered_with_order_per_bit():
    assert _registry["bitmap"] is Bitmap
    assert Bitmap.params == ("order_per_bit",)
    assert Bitmap(BASE, 16 * M).block == P
    assert Bitmap(BASE, 16 * M, order_per_bit=3).block == 8 * P


def test_unknown_parameter_is_einval():
    with pytest.raises(CmaError, match="unknown parameter 'order'") as e:
        Bitmap(BASE, 16 * M, order=1)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("order", [-1, 21, 1.5, True, None, "x", "2M"])
def test_bad_order_per_bit_is_einval(order):
    with pytest.raises(CmaError, match="order_per_bit") as e:
        Bitmap(BASE, 16 * M, order_per_bit=order)
    assert e.value.errno == errno.EINVAL


def test_granule_and_footprint_are_whole_blocks():
    assert Bitmap.granule() == P
    assert Bitmap.granule(order_per_bit=4) == 64 * K
    with pytest.raises(CmaError) as e:
        Bitmap.granule(order_per_bit=21)
    assert e.value.errno == errno.EINVAL
    a = Bitmap(BASE, 16 * M, order_per_bit=2)
    assert a.footprint(P, P) == (16 * K, 16 * K)
    assert a.footprint(20 * K, M) == (32 * K, M)


def test_order_per_bit_bounds_and_text():
    assert Bitmap(BASE, 16 * M, order_per_bit=0).block == P
    assert Bitmap(0, 4 * 1 << 32, order_per_bit=20).block == 4 << 30
    assert Bitmap(BASE, 16 * M, order_per_bit="2").block == 16 * K


@pytest.mark.parametrize("start, size", [(BASE + 0x3000, 16 * M), (BASE, 16 * M + 0x3000)])
def test_region_not_block_aligned_is_einval(start, size):
    with pytest.raises(CmaError) as e:
        Bitmap(start, size, order_per_bit=2)
    assert e.value.errno == errno.EINVAL
    assert f"{start:#x}" in e.value.why and f"{size:#x}" in e.value.why and "0x4000" in e.value.why


def test_page_granular_region_may_start_anywhere_on_a_page():
    a = Bitmap(BASE + 0x3000, 16 * M)
    assert a.alloc(P, P) == (BASE + 0x3000, P)
    assert a.alloc(P, 64 * K) == (BASE + 64 * K, P)
    a._check()


def test_fresh_region_is_one_hole():
    a = Bitmap(BASE, 64 * M, order_per_bit=4)
    a._check()
    assert list(a.holes()) == [(BASE, 64 * M)]
    assert a.largest_free() == 64 * M and a.free_bytes == 64 * M


def test_sizes_round_up_to_whole_blocks():
    a = Bitmap(BASE, 16 * M, order_per_bit=2)  # 16 KiB blocks
    assert a.alloc(P, P) == (BASE, 16 * K)
    assert a.alloc(20 * K, P) == (BASE + 16 * K, 32 * K)
    assert a.alloc(16 * K, P) == (BASE + 48 * K, 16 * K)
    assert a.free_bytes == 16 * M - 64 * K
    a._check()
    a.free(BASE + 16 * K, 32 * K)
    assert list(a.holes()) == [(BASE + 16 * K, 32 * K), (BASE + 64 * K, 16 * M - 64 * K)]
    a._check()


def test_first_fit_takes_the_lowest_hole_not_the_best():
    m = Model(BASE, 64 * P)
    chunks = [m.alloc(P * n, P) for n in (5, 1, 2, 1, 8, 1)]
    m.free_at(4)  # the 8-page chunk
    m.free_at(0)  # the 5-page chunk
    m.free_at(1)  # the 2-page chunk, now at index 1
    assert m.alloc(2 * P, P) == (BASE, 2 * P)  # not the exact 2-page hole
    assert m.alloc(2 * P, P) == (BASE + 2 * P, 2 * P)
    assert m.alloc(2 * P, P) == (BASE + 6 * P, 2 * P)
    m.check()
    assert chunks[1] == (BASE + 5 * P, P)


def test_alignment_is_of_bus_addresses_and_at_least_a_block():
    m = Model(BASE + 0x4000, 4 * M, order=2)  # block-aligned, not 1 MiB-aligned
    assert m.alloc(P, P) == (BASE + 0x4000, 16 * K)
    assert m.alloc(P, 8 * K) == (BASE + 0x8000, 16 * K)  # below a block: block alignment
    assert m.alloc(P, 64 * K) == (BASE + 64 * K, 16 * K)
    assert m.alloc(P, M) == (BASE + M, 16 * K)
    assert m.alloc(P, 4 * M) == (BASE + 4 * M, 16 * K)
    assert m.alloc(P, 8 * M) is None
    m.check()


def test_free_far_below_the_scan_point_is_found():
    m = Model(BASE, 256 * P, cls=Tiny)
    for _ in range(200):
        m.alloc(P, P)
    m.alloc(2 * P, P)
    m.alloc(2 * P, 8 * K)
    assert m.alloc(200 * P, P) is None
    # Two adjacent single pages make a new 2-page run far below the top.
    m.free_at(10)
    m.free_at(10)
    assert m.alloc(2 * P, P) == (BASE + 10 * P, 2 * P)
    m.free_at(2)  # pages 2 and 3: an 8 KiB-aligned pair
    m.free_at(2)
    assert m.alloc(2 * P, 8 * K) == (BASE + 2 * P, 2 * P)
    m.check()
    for i in range(120, 100, -1):  # a run longer than _limit, across superblocks
        m.free_at(i)
    m.check()
    assert m.alloc(20 * P, P) is not None  # over _limit: the plain scan
    assert m.alloc(5 * P, 4 * P) is not None
    m.check()


def test_largest_free_beyond_the_limit():
    a = Tiny(BASE, 64 * P)
    assert a.largest_free() == 64 * P
    a.reserve(BASE + 20 * P, P)
    assert a.largest_free() == 43 * P
    a._check()


@pytest.mark.parametrize("cls", [Bitmap, Tiny, Odd])
@pytest.mark.parametrize("order", [0, 1])
def test_random_against_first_fit(cls, order):
    """Seeded churn of mixed sizes and alignments, every result checked."""
    rng = random.Random(order)
    m = Model(BASE + (2 << order) * P, 8 * M, order, cls)
    for step in range(3000):
        op = rng.random()
        if op < 0.5:
            m.alloc(rng.choice((1, 1, 2, 3, 5, 8, 13, 40)) * P, P << rng.choice((0, 0, 0, 1, 3, 6)))
        elif op < 0.6:
            start = m.start + rng.randrange(m.size // m.block) * m.block
            size = rng.randint(1, 9) * m.block
            expect = any(s <= start and start + size <= s + n for s, n in m.holes())
            assert m.a.reserve(start, size) == expect
            if expect:
                m.chunks[start] = size
        elif m.chunks:
            m.free_at(rng.randrange(len(m.chunks)))
        if step % 50 == 0:
            m.check()
    m.check()


def test_reserve_claims_whole_free_blocks_only():
    a = Bitmap(BASE, 16 * M, order_per_bit=2)
    assert a.reserve(BASE + 3 * M, 5 * M)
    assert a.free_bytes == 11 * M
    assert list(a.holes()) == [(BASE, 3 * M), (BASE + 8 * M, 8 * M)]
    a._check()
    before = list(a.holes())
    for start, size in [(BASE + 3 * M - 16 * K, 32 * K), (BASE + 8 * M - 16 * K, 16 * K),
                        (BASE + 4 * M, 16 * K), (BASE, 16 * M),
                        (BASE - 16 * K, 32 * K), (BASE + 16 * M - 16 * K, 32 * K),
                        (BASE + P, 16 * K), (BASE, P), (BASE, 0)]:
        assert not a.reserve(start, size), (hex(start), size)
        assert list(a.holes()) == before and a.free_bytes == 11 * M
        a._check()
    assert a.reserve(BASE + 3 * M - 16 * K, 16 * K)  # adjacent is fine
    chunk = a.alloc(P, P)
    assert chunk == (BASE, 16 * K)
    assert not a.reserve(BASE, 16 * K)
    a._check()
    for c in [chunk, (BASE + 3 * M - 16 * K, 16 * K), (BASE + 3 * M, 5 * M)]:
        a.free(*c)
    a._check()
    assert list(a.holes()) == [(BASE, 16 * M)]


def test_free_outside_region_or_not_whole_blocks_is_einval():
    a = Bitmap(BASE, 16 * M, order_per_bit=1)
    for start, size in [(BASE - 8 * K, 8 * K), (BASE + 16 * M, 8 * K), (BASE + P, 8 * K), (BASE, P)]:
        with pytest.raises(CmaError) as e:
            a.free(start, size)
        assert e.value.errno == errno.EINVAL
    a._check()


def test_full_region_then_empty_again():
    a = Bitmap(BASE, 4 * M, order_per_bit=1)
    chunks = [a.alloc(P, P) for _ in range(4 * M // (8 * K))]
    assert None not in chunks and a.free_bytes == 0 and a.largest_free() == 0
    assert a.alloc(P, P) is None
    a._check()
    random.Random(3).shuffle(chunks)
    for c in chunks:
        a.free(*c)
    a._check()
    assert list(a.holes()) == [(BASE, 4 * M)]
