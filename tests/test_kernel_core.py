"""Tier 1 for the kernel's views (SPEC 3a): page counters, release_head, the trace ring."""

import errno
import random

import pytest

from cmad import Cma, CmaError
from cmad.daemon.recovery import recover
from cmad.store.journal import Journal
from cmad.daemon.trace import NO_PFN, Tracer, format_line, page_token
from util.core import attach

M = 1 << 20
P = 4096
ALLOCATORS = ["bf", "buddy", "bitmap", "bf(pageblock=0)", "bitmap(order_per_bit=2)"]


def in_use_holds(cma):
    """alloc_pages_success - release_pages_success == pages in use, per region."""
    for r in cma.regions:
        assert r.alloc_pages - r.release_pages == r.used // P, r.name


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_page_counters_add_up_through_allocs_frees_and_partial_releases(allocator):
    cma = Cma(f"r=8M:{allocator}", "*=r")
    rng = random.Random(7)
    live = []
    for step in range(400):
        what = rng.random()
        if what < 0.5 or not live:
            try:
                live.append(cma.alloc("x", rng.choice([1, 2, 3, 16, 64]) * P))
            except CmaError as e:
                assert e.errno == errno.ENOMEM
        elif what < 0.8:
            cma.free(live.pop(rng.randrange(len(live))).start)
        else:
            chunk = rng.choice(live)
            try:
                cma.release_head(chunk, P)
            except CmaError as e:
                assert e.errno == errno.EINVAL   # a 1-page chunk, or blocks of 4 pages
        in_use_holds(cma)
        cma._check()
    r = cma.region("r")
    assert r.alloc_pages > 0 and r.release_pages > 0


def test_failures_count_the_pages_asked_in_every_region_tried():
    cma = Cma("a=1M;b=1M", "*=a,b")
    with pytest.raises(CmaError):
        cma.alloc("x", 2 * M)
    assert [r.fail_pages for r in cma.regions] == [512, 512]
    assert [r.alloc_fail for r in cma.regions] == [1, 1]


def test_compaction_moves_change_no_counter(arena):
    cma = Cma("r=16M:bf(pageblock=0)", "*=r", arena=arena)
    chunks = [cma.alloc("x", M, movable=i % 2 == 1) for i in range(16)]
    for c in chunks[2::4]:
        cma.free(c.start)
    r = cma.region("r")
    before = (r.alloc_pages, r.release_pages)
    assert cma.compact("r") >= 1
    assert (r.alloc_pages, r.release_pages) == before
    in_use_holds(cma)


def test_release_head_keeps_the_chunk_and_its_tail_bytes(arena):
    cma = Cma("r=4M", "*=r", arena=arena)
    chunk = cma.alloc("x", 8 * P, label="keep")
    cma.data(chunk)[:] = bytes(range(8)) * P
    old, id = chunk.start, chunk.id
    cma.release_head(chunk, 3 * P)
    assert (chunk.start, chunk.size, chunk.id) == (old + 3 * P, 5 * P, id)
    assert cma.find("keep") is chunk and cma.chunks.get(old) is None
    assert bytes(cma.data(chunk)) == (bytes(range(8)) * P)[3 * P:]
    assert cma.region("r").used == 5 * P and cma.held(0) == 5 * P
    assert cma.alloc_from("r", 3 * P).start == old or cma.region("r").free >= 3 * P
    cma._check()


@pytest.mark.parametrize("size", [0, P // 2, 8 * P, 9 * P, -P])
def test_release_head_refuses_a_bad_size_and_changes_nothing(size):
    cma = Cma("r=4M", "*=r")
    chunk = cma.alloc("x", 8 * P)
    with pytest.raises(CmaError) as e:
        cma.release_head(chunk, size)
    assert e.value.errno == errno.EINVAL
    assert chunk.size == 8 * P and cma.region("r").used == 8 * P
    cma._check()


def test_release_head_keeps_whole_blocks_and_alignment():
    cma = Cma("r=4M:bitmap(order_per_bit=2);s=4M", "*=r")
    chunk = cma.alloc("x", 16 * P)
    with pytest.raises(CmaError):
        cma.release_head(chunk, P)                  # part of a 4-page block
    cma.release_head(chunk, 4 * P)
    aligned = cma.alloc_from("s", 16 * P, alignment=8 * P)
    with pytest.raises(CmaError):
        cma.release_head(aligned, 4 * P)            # the rest would lose its alignment
    cma.release_head(aligned, 8 * P)
    assert aligned.start % (8 * P) == 0
    cma._check()


def test_release_head_is_journalled_and_comes_back_after_a_restart(tmp_path):
    regions = "r=4M"
    cma, journal = Cma(regions, "*=r"), Journal(str(tmp_path))
    recover(cma, journal, arena_survived=True)
    attach(cma, journal)
    chunk = cma.alloc("x", 8 * P, label="head")
    cma.release_head(chunk, 2 * P)
    journal.close()
    cma2, journal2 = Cma(regions, "*=r"), Journal(str(tmp_path))
    assert recover(cma2, journal2, arena_survived=True) == 1
    back = cma2.find("head")
    assert (back.start, back.size, back.id) == (chunk.start, 6 * P, chunk.id)
    r = cma2.region("r")            # recovery seeds the counters with what is in use
    assert (r.alloc_pages, r.release_pages, r.fail_pages) == (6, 0, 0)
    in_use_holds(cma2)
    journal2.close()


# -- the trace ring ----------------------------------------------------------


def traced(regions="r=4M", capacity=64):
    cma = Cma(regions, "*=r")
    tracer = Tracer(cma, capacity=capacity, clock=lambda: 12.5)
    return cma, tracer


def lines(reader, size=1 << 20):
    return reader.take(size).decode().splitlines()


def test_disabled_events_leave_the_core_without_a_hook():
    cma, tracer = traced()
    assert cma.tracer is None
    tracer.enable("cma_release", True)
    assert cma.tracer is tracer
    tracer.set_tracing_on(False)
    assert cma.tracer is None
    tracer.set_tracing_on(True)
    tracer.enable(None, False)
    assert cma.tracer is None
    cma.free(cma.alloc("x", P).start)
    assert tracer.next_seq == 0


def test_events_in_the_kernels_field_order():
    cma, tracer = traced()
    tracer.enable(None, True)
    tracer.pid = 0
    reader = tracer.open_reader()
    chunk = cma.alloc("x", 6 * P, alignment=4 * P)
    with pytest.raises(CmaError):
        cma.alloc("x", 8 * M)
    cma.free(chunk.start)
    got = lines(reader)
    prefix = "          <idle>-0       [000] .....    12.500000: "
    pfn = chunk.start >> 12
    assert got == [
        prefix + "cma_alloc_start: name=r request_count=6 available_count=1024 "
                 "total_count=1024 align=2",
        prefix + f"cma_alloc_finish: name=r pfn={pfn:#x} page={page_token(chunk)} count=6 "
                 "align=2 errorno=0",
        prefix + "cma_alloc_start: name=r request_count=2048 available_count=1018 "
                 "total_count=1024 align=0",
        prefix + f"cma_alloc_finish: name=r pfn={NO_PFN:#x} page=0000000000000000 "
                 "count=2048 align=0 errorno=-12",
        prefix + f"cma_release: name=r pfn={pfn:#x} page={page_token(chunk)} count=6",
    ]


def test_a_compaction_move_is_a_busy_retry_at_the_old_place(arena):
    cma = Cma("r=16M:bf(pageblock=0)", "*=r", arena=arena)
    tracer = Tracer(cma)
    chunks = [cma.alloc("x", M, movable=i % 2 == 1) for i in range(16)]
    for c in chunks[2::4]:
        cma.free(c.start)
    where = {c.id: c.start for c in cma.chunks}
    tracer.enable("cma_alloc_busy_retry", True)
    reader = tracer.open_reader()
    cma.alloc("x", 2 * M)
    moved = [line for line in lines(reader)]
    assert moved and all("cma_alloc_busy_retry: name=r pfn=" in line for line in moved)
    pfns = {int(line.split("pfn=")[1].split()[0], 16) for line in moved}
    assert pfns <= {start >> 12 for start in where.values()}
    assert all("count=256 align=0" in line for line in moved)


def test_a_reader_that_falls_behind_is_told_how_many_events_it_lost():
    cma, tracer = traced(capacity=8)
    tracer.enable("cma_alloc_start", True)
    slow, fast = tracer.open_reader(), tracer.open_reader()
    for _ in range(5):
        cma.free(cma.alloc("x", P).start)
    assert len(lines(fast)) == 5
    for _ in range(10):
        cma.free(cma.alloc("x", P).start)
    got = lines(slow)
    assert got[0] == "CPU:0 [LOST 7 EVENTS]" and len(got) == 9
    got = lines(fast)
    assert got[0] == "CPU:0 [LOST 2 EVENTS]" and len(got) == 9 and lines(fast) == []
    assert tracer.readers == 2


def test_a_read_cut_short_keeps_the_rest_of_the_line():
    cma, tracer = traced()
    tracer.enable("cma_alloc_start", True)
    reader = tracer.open_reader()
    cma.alloc("x", P)
    first = reader.take(10)
    assert len(first) == 10
    assert (first + reader.take(4096)).decode().endswith("align=0\n")


def test_a_new_reader_starts_after_what_was_read():
    cma, tracer = traced()
    tracer.enable("cma_alloc_start", True)
    cma.alloc("x", P)
    first = tracer.open_reader()
    assert len(lines(first)) == 1          # what was buffered before anyone read
    first.release()
    assert lines(tracer.open_reader()) == []   # trace_pipe consumed it
    cma.alloc("x", P)
    assert len(lines(tracer.open_reader())) == 1


def test_readers_are_bounded():
    cma, tracer = traced()
    readers = [tracer.open_reader() for _ in range(16)]
    with pytest.raises(OSError) as e:
        tracer.open_reader()
    assert e.value.errno == errno.EBUSY
    readers[0].release()
    readers[0].release()                    # twice counts once
    assert tracer.readers == 15


def test_format_line_pads_like_ftrace():
    region = Cma("r=4M", "*=r").region("r")
    line = format_line((3.000007, 1234, "bash", "cma_release", (region, 0x40000000, 2, P)))
    assert line == ("            bash-1234    [000] .....     3.000007: cma_release: name=r "
                    "pfn=0x40000 page=ffffea0000000080 count=1\n")
