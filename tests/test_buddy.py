"""The buddy allocator's own tests: its blocks, natural alignment, coalescing.
The contract it shares with the other allocators (and the state machine) is in
test_allocators.py."""

from __future__ import annotations

import errno
import random

import pytest

from cmad.allocators.interface import PAGE_SIZE, _registry
from cmad.allocators.buddy import Buddy
from cmad.errors import CmaError

from util.alloc import BASE, K, M, greedy


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


def test_reserve_and_free_of_part_of_a_page_are_refused():
    """Whole pages only (bf takes any byte range): the rest of the contract is in
    test_allocators.py."""
    a = Buddy(BASE, 16 * M)
    before = a.blocks()
    assert not a.reserve(BASE + 0x800, PAGE_SIZE)
    assert a.blocks() == before
    with pytest.raises(CmaError) as e:
        a.free(BASE + 0x10, PAGE_SIZE)
    assert e.value.errno == errno.EINVAL
    a._check()
    assert a.blocks() == before and a.free_bytes == 16 * M
