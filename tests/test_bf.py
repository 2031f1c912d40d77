"""The best-fit allocator's own tests: its placement, its start index, ``ceiling``.
The contract it shares with the other allocators (and the state machine) is in
test_allocators.py."""

from __future__ import annotations

import errno
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sortedcontainers import SortedDict, SortedList

from cmad.allocators.interface import _registry, registry
from cmad.allocators.bf import BestFit, ceiling
from cmad.errors import CmaError

from util.alloc import BASE, K, M, P, complement


def with_holes(pattern: str, start: int = BASE) -> tuple[BestFit, list[tuple[int, int]]]:
    """A region laid out by pattern, one page per character: '.' free, '#' used."""
    a = BestFit(start, len(pattern) * P)
    for i, c in enumerate(pattern):
        if c == "#":
            assert a.reserve(start + i * P, P)
    a._check()
    return a, list(a.holes())


# -- unit tests ---------------------------------------------------------------

def test_registered_first_without_params():
    assert _registry["bf"] is BestFit
    assert next(iter(registry())) == "bf"  # the default allocator
    assert BestFit.params == ()
    with pytest.raises(CmaError, match="unknown parameter 'order_per_bit'") as e:
        BestFit(BASE, 16 * M, order_per_bit=1)
    assert e.value.errno == errno.EINVAL


def test_granule_and_footprint_are_the_request():
    assert BestFit.granule() == P
    assert BestFit(BASE, 16 * M).footprint(3 * P, 64 * K) == (3 * P, 64 * K)


def test_empty_region():
    a = BestFit(BASE, 0)
    a._check()
    assert list(a.holes()) == [] and a.largest_free() == 0
    assert a.alloc(P, P) is None


def test_picks_the_smallest_hole_that_fits_lowest_address_on_ties():
    #                      5 free   3 free  8 free    3 free  1
    a, holes = with_holes(".....#...#........#...#.")
    assert a.alloc(3 * P, P) == (BASE + 6 * P, 3 * P)  # first of the two 3-page holes
    assert a.alloc(3 * P, P) == (BASE + 19 * P, 3 * P)  # then the other one
    assert a.alloc(4 * P, P) == (BASE, 4 * P)  # 5-page hole, not the 8-page one
    assert a.alloc(P, P) == (BASE + 4 * P, P)  # the 1-page remnant, lowest address
    assert a.alloc(P, P) == (BASE + 23 * P, P)
    assert a.alloc(8 * P, P) == (BASE + 10 * P, 8 * P)
    assert a.alloc(P, P) is None and a.free_bytes == 0 and a.largest_free() == 0
    a._check()


def test_alignment_skips_smaller_misaligned_holes():
    # Holes of 2 pages at page 1, 3 pages at page 4 and 8 pages at page 8.
    a, _ = with_holes("#..#...#" + "." * 8)
    # 2 pages at 8 KiB alignment: the 2-page hole starts at an odd page, so
    # it cannot hold them; the 3-page hole can, from page 4.
    assert a.alloc(2 * P, 8 * K) == (BASE + 4 * P, 2 * P)
    # The 3-page hole is split: its tail page stays free.
    assert (BASE + 6 * P, P) in list(a.holes())
    a._check()


def test_aligned_alloc_splits_into_head_and_tail():
    a = BestFit(BASE + 0x3000, 4 * M)
    got = a.alloc(64 * K, M)
    assert got == (BASE + M, 64 * K)
    assert list(a.holes()) == [(BASE + 0x3000, M - 0x3000), (BASE + M + 64 * K, 3 * M + 0x3000 - 64 * K)]
    assert a.free_bytes == 4 * M - 64 * K
    a._check()
    a.free(*got)
    assert list(a.holes()) == [(BASE + 0x3000, 4 * M)]
    a._check()


def test_alignment_larger_than_any_fit_fails():
    a = BestFit(BASE + 0x3000, M - 0x4000)  # holds no 1 MiB-aligned address
    assert a.alloc(P, M) is None
    assert a.alloc(P, 512 * K) == (BASE + 512 * K, P)
    a._check()


def test_split_and_complete_merge():
    a = BestFit(BASE, 16 * P)
    x, y, z = (a.alloc(4 * P, P) for _ in range(3))
    assert [x[0], y[0], z[0]] == [BASE, BASE + 4 * P, BASE + 8 * P]
    assert list(a.holes()) == [(BASE + 12 * P, 4 * P)]
    a.free(*y)
    assert list(a.holes()) == [(BASE + 4 * P, 4 * P), (BASE + 12 * P, 4 * P)]
    a._check()
    a.free(*x)  # merges with its right neighbour
    assert list(a.holes()) == [(BASE, 8 * P), (BASE + 12 * P, 4 * P)]
    a._check()
    a.free(*z)  # merges with both
    assert list(a.holes()) == [(BASE, 16 * P)]
    assert a.largest_free() == 16 * P and a.free_bytes == 16 * P
    a._check()


def test_exact_fit_removes_the_hole():
    a, _ = with_holes("#...#.")
    assert a.alloc(3 * P, P) == (BASE + P, 3 * P)
    assert list(a.holes()) == [(BASE + 5 * P, P)]
    a._check()


def test_reserve_interleaved_with_alloc_and_free():
    """The start index reserve keeps is dropped by alloc and free, rebuilt after."""
    rng = random.Random(5)
    a = BestFit(BASE, 4 * M)
    live = SortedDict()
    for _ in range(2000):
        op = rng.random()
        if op < 0.4:
            got = a.alloc(rng.randint(1, 8) * P, P << rng.randint(0, 4))
            if got:
                live[got[0]] = got[1]
        elif op < 0.7 and live:
            a.free(*live.popitem(rng.randrange(len(live))))
        else:
            start, size = BASE + rng.randrange(1024) * P, rng.randint(1, 4) * P
            free = any(s <= start and start + size <= s + n for s, n in a.holes())
            assert a.reserve(start, size) == (free and start + size <= BASE + 4 * M)
            if free:
                live[start] = size
        a._check()
        assert list(a.holes()) == complement(BASE, 4 * M, live.items())


def test_start_index_survives_any_mix_of_reserves_allocs_and_frees(monkeypatch):
    """The start index is kept while reserves come and dropped when idle; reserve
    stays right either way, and carve claims inside the hole free returned."""
    import random

    import cmad.allocators.bf as bf

    monkeypatch.setattr(bf, "IDLE", 8)
    a = BestFit(0x40000000, 4 << 20)
    rng = random.Random(5)
    live = []
    for step in range(3000):
        op = rng.random()
        if op < 0.4 or not live:
            got = a.alloc(rng.randint(1, 8) << 12, 4096)
            if got:
                live.append(got)
        elif op < 0.75:
            start, size = live.pop(rng.randrange(len(live)))
            hole = a.free(start, size)
            assert hole[0] <= start and start + size <= hole[0] + hole[1]
            if rng.random() < 0.2 and a.carve(hole[0], hole[1], start, size):
                live.append((start, size))
        else:
            start = 0x40000000 + (rng.randrange(1024) << 12)
            size = rng.randint(1, 4) << 12
            free_before = a.free_bytes
            if a.reserve(start, size):
                live.append((start, size))
                assert a.free_bytes == free_before - size
            else:
                assert any(s < start + size and start < s + n for s, n in live) \
                    or start + size > 0x40000000 + (4 << 20)
        if step % 50 == 0:
            a._check()
    a._check()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1 << 70)), max_size=3000),
       st.lists(st.integers(0, 1 << 71), min_size=1, max_size=20))
def test_ceiling_is_irange_first(ops, probes):
    """``ceiling`` (two bisects on the SortedList's sublists) answers as
    ``next(irange(key))``, through adds and removes that split and join the
    sublists (a small load makes many)."""
    keys = SortedList()
    keys._reset(8)
    for add, key in ops:
        if add or not keys:
            keys.add(key)
        else:
            keys.remove(keys[key % len(keys)])
        probes.append(key)
    for key in probes + [0, max(keys, default=0), max(keys, default=0) + 1]:
        assert ceiling(keys, key) == next(keys.irange(key), None)
