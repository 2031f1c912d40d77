"""Grouping by mobility (SPEC 4b): pageblocks, allocation by mobility, bounded
compaction, and what the tree shows of them."""

import errno

import pytest
import trio
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cmad import Arena, Cma, CmaError
from cmad.allocators import pageblocks
from cmad.allocators.pageblocks import Grouped
from cmad.core.compaction import MOVE_RATIO
from cmad.daemon.metrics import render, show_stats
from fusefs import Caller

K, M = 1 << 10, 1 << 20
ALLOCATORS = ["bf", "buddy", "bitmap"]


def grouped(cma, name="r") -> Grouped:
    allocator = cma.region(name).allocator
    assert isinstance(allocator, Grouped)
    return allocator


@pytest.fixture(autouse=True)
def grouping_by_default(monkeypatch):
    """These tests are of the mechanism: regions group as if that were the default."""
    monkeypatch.setattr(pageblocks, "GROUP_BY_DEFAULT", True)


# -- the pageblock parameter ---------------------------------------------------

@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_grouping_is_off_unless_a_region_asks(allocator, monkeypatch):
    monkeypatch.setattr(pageblocks, "GROUP_BY_DEFAULT", False)
    cma = Cma(f"big=16M:{allocator};asks=16M:{allocator}(pageblock=2M)", "*=big")
    assert cma.region("big").stats().pageblock == 0
    assert not isinstance(cma.region("big").allocator, Grouped)
    assert cma.region("asks").stats().pageblock == 2 * M

@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_default_is_2m_blocks_where_a_region_holds_8(allocator):
    cma = Cma(f"big=16M:{allocator};small=8M:{allocator}", "*=big")
    assert cma.region("big").stats().pageblock == 2 * M
    assert cma.region("big").stats().blocks_free == 8
    assert cma.region("small").stats().pageblock == 0
    assert cma.region("small").pageblocks() == ""


def test_pageblock_parameter_sets_and_turns_off():
    cma = Cma("a=16M:bf(pageblock=1M);b=64M:buddy(pageblock=0);c=4M:bitmap(pageblock=512K)",
              "*=a")
    assert cma.region("a").stats().pageblock == M and cma.region("a").stats().blocks_free == 16
    assert cma.region("b").stats().pageblock == 0
    assert cma.region("c").stats().blocks_free == 8
    assert cma.region("a").alloc_text == "bf"


@pytest.mark.parametrize("spec", ["bf(pageblock=3M)", "bf(pageblock=2K)",
                                  "bitmap(order_per_bit=10,pageblock=2M)",
                                  "bf(pageblock=32M)", "buddy(pageblock=3000)"])
def test_bad_pageblocks_are_einval(spec):
    with pytest.raises(CmaError) as e:
        Cma(f"r=16M:{spec}", "*=r")
    assert e.value.errno == errno.EINVAL and "pageblock" in str(e.value)


def test_an_allocator_that_cannot_be_grouped_refuses_an_explicit_pageblock():
    from cmad.allocators.interface import Allocator

    class Plain(Allocator):
        name = "plain"

        def largest_free(self):
            return self.free_bytes

    cma = Cma("r=64M:bf", "*=r")
    cma.register_allocator(Plain)
    cma.set_allocator("r", "plain")  # default: no grouping for it
    assert cma.region("r").stats().pageblock == 0
    with pytest.raises(CmaError) as e:
        cma.set_allocator("r", "plain(pageblock=2M)")
    assert e.value.errno == errno.EINVAL


# -- allocation by mobility ------------------------------------------------------

@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_pinned_and_movable_take_blocks_of_their_own(allocator):
    cma = Cma(f"r=32M:{allocator}", "*=r")
    pinned = [cma.alloc("x", 16 * K) for _ in range(4)]
    movable = [cma.alloc("x", 16 * K, movable=True) for _ in range(4)]
    g = grouped(cma)
    assert len({g.owner_of(c.start) for c in pinned}) == 1
    assert {g.owner_of(c.start) for c in pinned}.isdisjoint(g.owner_of(c.start) for c in movable)
    # pinned from the top, movable from the bottom: long runs stay between them
    assert cma.region("r").pageblocks() == "M" + "." * 14 + "P"
    s = cma.region("r").stats()
    assert (s.blocks_free, s.blocks_pinned, s.blocks_movable, s.blocks_mixed) == (14, 1, 1, 0)
    for c in pinned + movable:
        cma.free(c.start)
    assert cma.region("r").pageblocks() == "." * 16  # free again when empty
    cma._check()


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_a_spanning_request_claims_a_run_of_free_blocks(allocator):
    cma = Cma(f"r=32M:{allocator}", "*=r")
    cma.alloc("x", 4 * K)
    cma.alloc("x", 4 * K, movable=True)
    nv12 = cma.alloc("x", 1920 * 1080 * 3 // 2)  # 3.0 MiB: two blocks (buddy: its 4 MiB block)
    picture = cma.region("r").pageblocks()
    assert picture.count("P") == 3 and "PP" in picture
    assert grouped(cma).owner_of(nv12.start) == grouped(cma).owner_of(nv12.end - 1)
    cma._check()


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_fallback_into_the_other_type_is_the_last_resort_and_counted(allocator):
    cma = Cma(f"r=16M:{allocator}", "*=r")
    walls = [cma.alloc("x", 2 * M - 64 * K) for _ in range(8)]  # every block pinned, 64K free
    assert cma.region("r").pageblocks() == "PPPPPPPP"
    m = cma.alloc("x", 16 * K, movable=True)
    s = cma.region("r").stats()
    assert s.fallbacks == 1 and s.blocks_mixed == 1 and "X" in cma.region("r").pageblocks()
    cma._check()
    cma.free(m.start)
    assert cma.region("r").pageblocks() == "PPPPPPPP"
    for c in walls:
        cma.free(c.start)
    assert cma.region("r").pageblocks() == "........"
    cma._check()


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_a_pinned_request_evacuates_the_cheapest_movable_window(allocator, arena):
    cma = Cma(f"r=16M:{allocator}", "*=r", arena=arena)
    movable = [cma.alloc("x", 512 * K, movable=True) for _ in range(16)]   # blocks 0-3
    pinned = [cma.alloc("x", 2 * M - 256 * K) for _ in range(4)]           # blocks 4-7
    for c in movable[1::2]:
        cma.free(c.start)       # each movable block half empty: 4 MiB free in M blocks
    for c in movable[::2]:
        cma.data(c)[:] = bytes([c.id]) * c.size
    before = {c.id: c.start for c in pinned}
    assert cma.region("r").largest_free() < 4 * M
    big = cma.alloc("x", 4 * M)  # two blocks: their movable chunks go to the other two
    r = cma.region("r")
    assert big.size == 4 * M and r.moved_bytes <= MOVE_RATIO * 4 * M and r.moved > 0
    assert {c.id: c.start for c in pinned} == before
    for c in movable[::2]:
        assert bytes(cma.data(c)) == bytes([c.id]) * c.size
    assert r.stats().fallbacks == 0
    cma._check()


def test_evacuation_that_cannot_fit_is_not_started(arena):
    cma = Cma("r=16M:bf", "*=r", arena=arena)
    for _ in range(4):
        cma.alloc("x", 2 * M, movable=True)                  # blocks 0-3, full
    pinned = [cma.alloc("x", M) for _ in range(8)]          # blocks 4-7
    for c in pinned[1::2]:
        cma.free(c.start)                                   # 4 MiB free, 1 MiB holes
    starts = [c.start for c in cma.chunks]
    assert cma.region("r").free == 4 * M and cma.region("r").largest_free() == M
    with pytest.raises(CmaError) as e:
        cma.alloc("x", 4 * M)   # windows of movable blocks exist, but nowhere to put them
    assert e.value.errno == errno.ENOMEM
    assert [c.start for c in cma.chunks] == starts
    assert cma.region("r").moved == 0 and cma.region("r").compactions == 0


def test_compaction_moves_movable_chunks_out_of_pinned_blocks():
    cma = Cma("r=16M:bf", "*=r")
    walls = [cma.alloc("x", 2 * M - 64 * K) for _ in range(8)]
    m = cma.alloc("x", 16 * K, movable=True)  # a fallback: the block is mixed
    cma.free(walls[0].start)                  # now a free block exists
    assert "X" in cma.region("r").pageblocks()
    assert cma.compact("r") == 1
    assert "X" not in cma.region("r").pageblocks() and "M" in cma.region("r").pageblocks()
    assert m.start in cma.chunks
    cma._check()


# -- what the tree shows -------------------------------------------------------

def test_stats_and_metrics_show_the_pageblock_keys():
    cma = Cma("r=16M:bf;s=4M:bf", "*=r")
    cma.alloc("x", 4 * K)
    text = show_stats(cma.region("r").stats())
    for key in ("pageblock 2097152", "blocks_free 7", "blocks_pinned 1", "blocks_movable 0",
                "blocks_mixed 0", "fallbacks 0"):
        assert key + "\n" in text
    assert "pageblock 0\n" in show_stats(cma.region("s").stats())
    assert "blocks_pinned 1\n" in show_stats(cma.stats())
    metrics = render(cma)
    assert 'cma_region_blocks_pinned{region="r"} 1' in metrics
    assert 'cma_region_fallbacks_total{region="r"} 0' in metrics


def test_pageblocks_file_has_64_blocks_per_line():
    from cmad.daemon.tree import Tree

    cma = Cma("r=256M:bf(pageblock=2M)", "*=r")
    cma.alloc("x", 4 * K)
    node = Tree(cma).regions.get(f"{cma.region('r').start:016x}").get("pageblocks")
    text = trio.run(node.render).decode()
    assert text == "." * 64 + "\n" + "." * 63 + "P\n"


async def test_a_compact_of_many_chunks_lets_stats_through():
    from cmad.daemon.tree import Tree

    cma = Cma("r=1G:bf", "*=r")
    chunks = [cma.alloc("x", 4 * K * (1 + i % 4), movable=i % 2 == 0) for i in range(20000)]
    for c in chunks[2::4]:  # 12K movable holes: the 4K movable chunks above move down
        cma.free(c.start)
    tree = Tree(cma)
    region = tree.regions.get(f"{cma.region('r').start:016x}")
    order = []

    async def compact():
        await region.get("compact").parse_and_store(b"1\n", Caller(0, 0, 1))
        order.append("compact")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(compact)
        while not cma.region("r").moved:  # until compaction is under way
            await trio.sleep(0)
        await tree.root.get("stats").render()
        order.append("stats")
    assert order == ["stats", "compact"]  # stats was served while compaction went on
    assert cma.region("r").moved > 0
    cma._check()


# -- allocator limits (issues 10 and 13) ---------------------------------------

@pytest.mark.parametrize("spec", ["big=1P:bitmap", "r=16M@0xfffffffffff00000:buddy",
                                  "r=16M@0xfffffffffff00000:bitmap"])
def test_impossible_regions_are_clean_errors(spec):
    with pytest.raises(CmaError) as e:
        Cma(spec, "*=r", arena_size=1 << 63)
    assert e.value.errno in (errno.EINVAL, errno.ENOMEM)


# -- the state machine ------------------------------------------------------------

class Grouping(RuleBasedStateMachine):
    """Random traffic of pinned and movable chunks, compactions and pins on a
    grouped region; every invariant after every step, including block types
    that agree with the chunks inside them (Cma._check), pinned chunks that
    never move, bytes that follow their chunk, and the move bound."""

    def __init__(self):
        super().__init__()
        self.arena = Arena(16 * M)
        self.cma = None

    @rule(allocator=st.sampled_from(["bf", "buddy", "bitmap(order_per_bit=1)"]))
    @precondition(lambda self: self.cma is None)
    def start(self, allocator):
        name, _, params = allocator.rstrip(")").partition("(")
        params = f"{params}," if params else ""
        self.cma = Cma(f"r=16M:{name}({params}pageblock=1M)", "*=r", arena=self.arena)
        self.pinned = {}

    @rule(pages=st.one_of(st.integers(1, 16), st.integers(100, 700)), movable=st.booleans())
    @precondition(lambda self: self.cma is not None)
    def alloc(self, pages, movable):
        region = self.cma.region("r")
        moved = region.moved_bytes
        try:
            c = self.cma.alloc("x", pages * 4 * K, movable=movable)
        except CmaError as e:
            assert e.errno == errno.ENOMEM
            assert region.moved_bytes == moved
            return
        assert region.moved_bytes - moved <= MOVE_RATIO * c.size
        self.cma.data(c)[:8] = c.id.to_bytes(8, "little")
        if not movable:
            self.pinned[c.id] = c.start

    @rule(pick=st.integers(0, 999))
    @precondition(lambda self: self.cma is not None and len(self.cma.chunks))
    def free(self, pick):
        chunks = list(self.cma.chunks)
        c = chunks[pick % len(chunks)]
        self.cma.free(c.start)
        self.pinned.pop(c.id, None)

    @rule(pick=st.integers(0, 999))
    @precondition(lambda self: self.cma is not None and len(self.cma.chunks))
    def pin(self, pick):
        chunks = list(self.cma.chunks)
        c = chunks[pick % len(chunks)]
        self.cma.pin(c)
        self.pinned[c.id] = c.start

    @rule()
    @precondition(lambda self: self.cma is not None)
    def compact(self):
        self.cma.compact("r")

    @invariant()
    def consistent(self):
        if self.cma is None:
            return
        self.cma._check()
        for c in self.cma.chunks:
            assert int.from_bytes(self.cma.data(c)[:8], "little") == c.id
            assert c.start == self.pinned.get(c.id, c.start)

    def teardown(self):
        self.arena.close()


TestGrouping = Grouping.TestCase
TestGrouping.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                 suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_a_small_pinned_request_aligned_past_a_block_is_served(allocator):
    cma = Cma(f"r=64M:{allocator}", "*=r")
    c = cma.alloc("x", 4 * K, alignment=16 * M)
    assert c.start % (16 * M) == 0
    cma._check()
