"""The Cma facade in process: placement, errnos, stats, map, allocator switching."""

import errno
import logging
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cmad import Arena, Cma, CmaError
from cmad.allocators.interface import Allocator, register
from util.core import DEFAULT, MAP, attach, raises

M = 1 << 20
def test_default_layout_lowest_fit_in_order(cma):
    assert [(r.name, r.start, r.size, r.alloc_text) for r in cma.regions] == [
        ("video", 0x40000000, 32 * M, "bf"), ("common", 0x42000000, 16 * M, "buddy"),
        ("dma", 0x43000000, 8 * M, "bitmap")]
    assert cma.arena_size == 56 * M
    assert cma.allocators == ["bf", "buddy", "bitmap"]


def test_fixed_start_placed_first_then_lowest_fit():
    cma = Cma("a=4M;b=8M@0x40200000;c=1M/1M")
    got = {r.name: r.start for r in cma.regions}
    assert got == {"b": 0x40200000, "a": 0x40a00000, "c": 0x40000000}


def test_start_rounded_up_to_alignment():
    cma = Cma("a=1M@0x40001000/1M")
    assert cma.region("a").start == 0x40100000


def test_layout_errors():
    raises(errno.EADDRINUSE, Cma, "a=4M@0x40000000;b=4M@0x40100000", match="overlaps region a")
    raises(errno.EINVAL, Cma, "a=4M@0x1000", match="below the arena base")
    raises(errno.EINVAL, Cma, "a=4M@0x80000000", arena_size=16 * M, match="past the arena")
    raises(errno.ENOMEM, Cma, "a=8M;b=9M", arena_size=16 * M, match="does not fit")
    raises(errno.EINVAL, Cma, "a=4M:nope", match="unknown allocator 'nope'")
    raises(errno.EINVAL, Cma, "a=4M:bf(x=1)", match="unknown parameter 'x'")
    raises(errno.EINVAL, Cma, "a=4M", base=0x1001)


def test_bitmap_region_is_placed_block_aligned():
    cma = Cma("a=4K;b=64K:bitmap(order_per_bit=4)")
    assert cma.region("b").start % (64 << 10) == 0
    raises(errno.EINVAL, Cma, "b=64K@0x40001000:bitmap(order_per_bit=4)")


def test_alloc_through_map_and_alignment(cma):
    c = cma.alloc("camera", 6 * M, alignment=M, label="frame0")
    assert c.region.name == "video" and c.start % M == 0 and c.size == 6 * M
    assert (c.dev, c.type, c.label) == ("camera", "common", "frame0")
    assert cma.alloc("net", 5 * M).region.name == "common"
    assert cma.region("common").free == 11 * M  # buddy gives back the tail
    cma._check()


def test_alloc_from_named_regions(cma):
    c = cma.alloc_from("video,common", 4096)
    assert c.region.name == "video" and c.dev == "-"
    raises(errno.ENOENT, cma.alloc_from, "nope", 4096, match="no region named 'nope'")


@pytest.mark.parametrize("size, alignment", [(0, 0), (-1, 0), (4096, 3000), (4096, 6 * M),
                                             (1 << 64, 0)])
def test_bad_requests_are_einval(cma, size, alignment):
    raises(errno.EINVAL, cma.alloc, "camera", size, alignment)
    assert len(cma.chunks) == 0


def test_enomem_names_regions_free_and_largest_hole(cma, caplog):
    caplog.set_level(logging.INFO)
    cma.set_map("x=video,common")
    a = cma.alloc("x", 16 * M)
    cma.alloc("x", 16 * M)
    cma.free(a.start)
    e = raises(errno.ENOMEM, cma.alloc, "x", 17 * M)
    assert "video (free 16.0 MiB, largest hole 16.0 MiB)" in e.why
    assert "common (free 16.0 MiB" in e.why and e.why in caplog.text
    assert cma.region("video").alloc_fail == 1 and cma.region("common").alloc_fail == 1


def test_alloc_fail_charged_to_regions_that_could_not_serve(cma):
    cma.set_map("x=dma,common")
    cma.alloc_from("dma", 8 * M)
    cma.alloc("x", M)
    assert cma.region("dma").alloc_fail == 1 and cma.region("common").alloc_ok == 1


def test_map_errors(cma):
    raises(errno.ENOENT, Cma(DEFAULT, "foo=video").alloc, "bar", 4096, match="no rule")
    raises(errno.ENOENT, Cma(DEFAULT, "*=gone,lost").alloc, "bar", 4096, match="none of")
    assert Cma(DEFAULT, "*=gone,dma").alloc("bar", 4096).region.name == "dma"


def test_set_map_validates_before_replacing(cma):
    raises(errno.EINVAL, cma.set_map, "camera=video;f*x=r")
    assert cma.map == MAP
    cma.set_map("*=dma;")
    assert cma.map == "*=dma"


def test_free_errors_and_warning(cma, caplog):
    c = cma.alloc("camera", 2 * M)
    raises(errno.ENOENT, cma.free, c.start + 4096, match="inside chunk")
    assert "WARNING" in caplog.text and "no chunk starts at" in caplog.text
    raises(errno.ENOENT, cma.free, "nolabel")
    raises(errno.EPERM, cma.free, c.start, uid=1000)
    assert len(cma.chunks) == 1
    assert cma.free(f"{c.start:016x}", uid=0) is c
    assert len(cma.chunks) == 0


@pytest.mark.parametrize("form", ["{:016x}", "{:#x}", "{:d}"])
def test_free_accepts_every_address_form(cma, form):
    c = cma.alloc("camera", M)
    cma.free(form.format(c.start))
    assert c.start not in cma.chunks


def test_labels(cma):
    cma.alloc("camera", M, label="frame0")
    raises(errno.EEXIST, cma.alloc, "camera", M, label="frame0")
    for bad in ["0abc", "", "a/b", "../x", "deadbeefdeadbeef", "x" * 65, "é"]:
        raises(errno.EINVAL, cma.alloc, "camera", M, label=bad)
    assert len(cma.chunks) == 1
    assert cma.free("frame0").label == "frame0"


def test_limits_edquot():
    cma = Cma(DEFAULT, MAP, limits={1000: 4 * M})
    cma.alloc("camera", 3 * M, uid=1000)
    raises(errno.EDQUOT, cma.alloc, "camera", 2 * M, uid=1000)
    cma.alloc("camera", 2 * M, uid=1001)
    assert cma.held(1000) == 3 * M


def test_bound_keeps_chunk_inside_one_window(cma):
    cma.alloc("camera", 12 << 10)
    c = cma.alloc("camera", 24 << 10, bound=2 * M)
    assert c.start // (2 * M) == (c.end - 1) // (2 * M)
    raises(errno.EINVAL, cma.alloc, "camera", 4 * M, bound=2 * M)
    raises(errno.EINVAL, cma.alloc, "camera", 4096, bound=3 * M)


def test_info(cma):
    cma.set_map("camera=video,common;*=dma")
    cma.alloc("camera", M)
    i = cma.info("camera")
    assert (i.lower_bound, i.upper_bound, i.total_size, i.free_size, i.count) == (
        0x40000000, 0x43000000, 48 * M, 47 * M, 2)
    raises(errno.ENOENT, Cma(DEFAULT, "x=video").info, "y")


def test_stats(cma):
    a = cma.alloc("camera", 8 * M)
    cma.alloc("camera", 8 * M)
    cma.free(a.start)
    s = cma.region("video").stats()
    assert (s.alloc_ok, s.freed, s.bytes_allocated, s.peak_used) == (2, 1, 8 * M, 16 * M)
    assert s.largest_free == 16 * M and s.fragmentation == pytest.approx(1 - 16 / 24)
    total = cma.stats()
    assert total.alloc_ok == 2 and total.largest_free == 16 * M


def test_allocator_switch_rules(cma):
    c = cma.alloc("camera", M)
    raises(errno.EBUSY, cma.set_allocator, "video", "buddy")
    cma.free(c.start)
    cma.set_allocator("video", "buddy")
    assert cma.region("video").alloc_text == "buddy"
    raises(errno.EINVAL, cma.set_allocator, "video", "bitmap(order_per_bit=x)")
    raises(errno.EINVAL, cma.set_allocator, "video", "bf(sticky)")
    assert cma.region("video").alloc_text == "buddy"
    cma.set_allocator("video", "")
    assert cma.region("video").alloc_text == "bf"  # empty: the default, attached at once
    cma.set_allocator("video", "later")
    assert cma.region("video").alloc_text == "[later]"
    cma.set_map("*=video")
    raises(errno.ENOMEM, cma.alloc, "x", M, match="no allocator")
    raises(errno.ENOENT, cma.set_allocator, "nope", "bf")


def test_pending_allocator_attaches_when_registered(cma):
    cma.set_allocator("dma", "later")

    class Later(Allocator):
        name = "later"

    # Registered only in this Cma, never globally: a stand-in bump allocator.
    class Bump(Later):
        def __init__(self, start, size):
            super().__init__(start, size)
            self.next = start

        def alloc(self, size, alignment):
            start = -(-self.next // alignment) * alignment
            if start + size > self.start + self.size:
                return None
            self.next = start + size
            self.free_bytes -= size
            return start, size

        def free(self, start, size):
            self.free_bytes += size

        def largest_free(self):
            return self.start + self.size - self.next

    cma.register_allocator(Bump)
    assert cma.region("dma").alloc_text == "later"
    assert cma.alloc_from("dma", 4096).start == cma.region("dma").start
    assert "later" in cma.allocators
    assert register  # the global registry stays untouched by this test


def test_threads_share_one_core():
    cma = Cma("r=256M:bf", "*=r")
    errors = []

    def worker(n):
        try:
            for i in range(300):
                c = cma.alloc(f"t{n}", 4096 * (1 + i % 7))
                cma.free(c.start)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(cma.chunks) == 0
    assert cma.region("r").stats().alloc_ok == 1200
    cma._check()


def test_listener_veto_undoes_the_allocation(cma):
    class Veto:
        def on_alloc(self, chunk):
            raise CmaError(errno.EIO, "journal full")

        def on_free(self, chunk):
            pass

    attach(cma, Veto())
    raises(errno.EIO, cma.alloc, "camera", M)
    assert len(cma.chunks) == 0 and cma.region("video").free == 32 * M
    cma._check()


def test_data_needs_an_arena(cma):
    c = cma.alloc("camera", M)
    raises(errno.ENODEV, cma.data, c)


def test_data_is_a_zero_copy_view_of_the_arena():
    arena = Arena(8 * M)
    cma = Cma("r=8M", "*=r", arena=arena)
    c = cma.alloc("x", M, alignment=M)
    view = cma.data(c)
    view[:5] = b"hello"
    assert bytes(arena.view(c.start - cma.base, 5)) == b"hello"
    assert len(view) == M
    arena.close()


def test_arena_smaller_than_regions_is_enomem():
    arena = Arena(4 * M)
    raises(errno.ENOMEM, Cma, "r=8M", arena=arena, match="does not fit")
    arena.close()


ops = st.lists(st.tuples(st.sampled_from(["alloc", "free"]),
                         st.integers(1, 2 * 1024 * 1024), st.sampled_from([0, 4096, 65536, M]),
                         st.integers(0, 1000)), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_facade_invariants_under_random_traffic(sequence):
    cma = Cma(DEFAULT, "cam*=video,dma;*=common,dma")
    live = []
    for op, size, alignment, pick in sequence:
        if op == "alloc" or not live:
            try:
                live.append(cma.alloc("cam" if pick % 2 else "net", size, alignment))
                assert live[-1].start % max(alignment, 4096) == 0
            except CmaError as e:
                assert e.errno == errno.ENOMEM
        else:
            cma.free(live.pop(pick % len(live)).start)
        cma._check()
    for c in live:
        cma.free(c.start)
    cma._check()
    for r in cma.regions:
        assert r.free == r.size and r.largest_free() > 0


def test_a_new_chunk_never_shows_a_freed_ones_bytes():
    arena = Arena(8 * M)
    try:
        cma = Cma("r=8M", "*=r", arena=arena)
        a = cma.alloc("x", M)
        cma.data(a)[:] = b"\xaa" * M
        cma.free(a.start)
        b = cma.alloc("x", M)
        assert b.start == a.start and bytes(cma.data(b)) == bytes(M)
    finally:
        arena.close()


def test_bound_and_limits_see_the_allocators_rounding():
    cma = Cma("r=8M:bitmap(order_per_bit=4)", "*=r", limits={1000: 32 << 10})
    raises(errno.EDQUOT, cma.alloc, "x", 4096, uid=1000)  # a 64 KiB block, over 32 KiB
    assert cma.held(1000) == 0 and len(cma.chunks) == 0
    raises(errno.ENOMEM, cma.alloc, "x", 4096, bound=4096)  # 64 KiB cannot keep a 4 KiB bound
    c = cma.alloc("x", 4096, bound=64 << 10)
    assert c.start // (64 << 10) == (c.end - 1) // (64 << 10)
    raises(errno.EINVAL, cma.alloc, "x", 4096, bound=1 << 63)
    cma._check()


def test_alloc_fail_is_charged_to_every_region_that_could_not_serve_even_after_compaction():
    cma = Cma("a=4M;b=4M;c=4M", "*=a,b,c")
    for name in ("a", "c"):
        cma.alloc_from(name, 4 * M)
    b = cma.region("b")
    chunks = [cma.alloc_from("b", M, movable=True) for _ in range(4)]
    cma.free(chunks[0].start)
    cma.free(chunks[2].start)
    got = cma.alloc("x", 2 * M)
    assert got.region is b and b.stats().moved >= 1
    assert [cma.region(n).alloc_fail for n in "abc"] == [1, 0, 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("afm"), st.integers(0, 40)), max_size=300))
def test_the_id_index_lists_live_chunks_in_id_order(steps):
    """Adds, frees and moves (remove and add again under the same id) in any
    order: ``ids_after`` lists exactly the live chunks, by id, whatever its
    tombstones and sweeps did."""
    from cmad.core.chunks import ChunkIndex, Chunk
    index, live, next_id = ChunkIndex(), {}, 1
    region = Cma("r=1G", "*=r").region("r")
    for op, n in steps:
        if op == "a" or not live:
            chunk = Chunk(next_id, next_id << 12, 4096, region, "d", "t")
            index.add(chunk)
            live[next_id], next_id = chunk, next_id + 1
            continue
        chunk = live[sorted(live)[n % len(live)]]
        index.remove(chunk)
        if op == "m":
            chunk.start += 1 << 40
            index.add(chunk)
        else:
            del live[chunk.id]
        after = sorted(live)[n % len(live)] if live and n % 3 else -1
        assert [c.id for c in index.ids_after(after)] == [i for i in sorted(live) if i > after]
    assert [c.id for c in index.ids_after(-1)] == sorted(live)
    assert all(index.by_id(i) is c for i, c in live.items())


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from("afmq"), st.integers(0, 200)), max_size=300))
def test_the_start_order_is_right_whether_kept_dropped_or_rebuilt(steps, monkeypatch):
    """ChunkIndex keeps its start order only while ordered queries come (IDLE,
    made tiny here so it is dropped and rebuilt often): ``holding``,
    ``last_before``, ``in_range`` and iteration always answer as a scan of the
    live chunks would."""
    from cmad.core import chunks as chunks_module
    from cmad.core.chunks import ChunkIndex, Chunk
    monkeypatch.setattr(chunks_module, "IDLE", 3)
    monkeypatch.setattr(chunks_module, "BATCH", 2)
    index, live, next_id = ChunkIndex(), {}, 1
    region = Cma("r=1G", "*=r").region("r")
    for op, n in steps + [("q", 0)]:
        addr = n << 12
        if op == "a" and addr not in live and index.holding(addr) is None:
            chunk = Chunk(next_id, addr, 4096, region, "d", "t")
            index.add(chunk)
            live[addr], next_id = chunk, next_id + 1
        elif op in "fm" and live:
            chunk = live.pop(sorted(live)[n % len(live)])
            if op == "f":
                index.remove(chunk)
                continue
            new = max(live, default=0) + (1 << 20)
            index.move(chunk, new)
            live[new] = chunk
        if op != "q":  # updates in a row let the order go
            continue
        ordered = [live[k] for k in sorted(live)]
        assert list(index) == ordered
        assert index.holding(addr + 7) is live.get(addr)
        assert index.last_before(addr) is (max((c for c in ordered if c.start < addr),
                                               key=lambda c: c.start, default=None))
        assert list(index.in_range(addr, addr + (64 << 12))) == [
            c for c in ordered if addr <= c.start < addr + (64 << 12)]
        assert all(index.get(k) is c for k, c in live.items()) and len(index) == len(live)


def test_the_start_order_goes_after_updates_alone_and_comes_back():
    """Kept while ordered queries come, dropped after max(IDLE, 4n) updates
    without one, rebuilt right by the next."""
    from cmad.core.chunks import IDLE, ChunkIndex, Chunk
    region = Cma("r=1G", "*=r").region("r")
    index = ChunkIndex()
    chunks = [Chunk(i + 1, i << 12, 4096, region, "d", "t") for i in range(10)]
    for chunk in chunks:
        index.add(chunk)
    assert index.holding(5 << 12) is chunks[5] and index._starts is not None
    for _ in range(IDLE // 2 + 1):
        index.remove(chunks[0])
        index.add(chunks[0])
    assert index._starts is None
    index.remove(chunks[3])
    assert list(index) == chunks[:3] + chunks[4:] and index._starts is not None
    assert index.last_before(4 << 12) is chunks[2] and index.holding(3 << 12) is None


@pytest.mark.parametrize("batch", [1, 2, 256])
def test_a_chunk_freed_while_a_listing_runs_is_skipped(batch, monkeypatch):
    """``in_range`` is lazy (chunkinfo renders what a reader reads): a chunk freed
    between two of its steps is not yielded, and nothing raises (the old
    SortedDict iterator raised IndexError)."""
    from cmad.core import chunks as chunks_module
    monkeypatch.setattr(chunks_module, "BATCH", batch)
    cma = Cma("r=1G", "*=r")
    a, b, c = (cma.alloc("d", 4096) for _ in range(3))
    listing = cma.chunks.in_range(0, 1 << 62)
    assert next(listing) is a
    cma.free(b.start)
    assert list(listing) == [c]
