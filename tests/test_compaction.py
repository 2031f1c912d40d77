"""Sticky regions, movable chunks and compaction, in process."""

import errno
import os
import shutil
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cmad import Arena, Cma, CmaError
from cmad.daemon.recovery import recover
from cmad.store.journal import Journal
from util.core import attach

M = 1 << 20
ALLOCATORS = ["bf", "buddy", "bitmap(order_per_bit=2)"]


def ungrouped(allocator: str) -> str:
    """The allocator with grouping by mobility off (pageblock=0)."""
    name, _, params = allocator.rstrip(")").partition("(")
    return f"{name}({params + ',' if params else ''}pageblock=0)"


def checkerboard(cma, n=16, movable_every=2):
    """n 1 MiB chunks filling the region; every other one movable and then some freed."""
    chunks = [cma.alloc("x", M, movable=bool(movable_every) and i % movable_every == 1,
                        label=f"c{i}")
              for i in range(n)]
    for c in chunks[2::4]:  # free some pinned ones: holes of 1 MiB, never 2 together
        cma.free(c.start)
    return [c for c in chunks if c.start in cma.chunks]


def fill(cma, chunk):
    cma.data(chunk)[:] = bytes([chunk.id % 251]) * chunk.size


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_fragmentation_enomem_becomes_success_by_moving_movable_chunks(allocator, arena):
    cma = Cma(f"r=16M:{ungrouped(allocator)}", "*=r", arena=arena)
    live = checkerboard(cma)
    for c in live:
        fill(cma, c)
    pinned = {c.id: c.start for c in live if not c.movable}
    before = {c.id: bytes(cma.data(c)) for c in live}
    assert cma.region("r").free == 4 * M and cma.region("r").largest_free() < 2 * M
    big = cma.alloc("x", 2 * M)
    assert big.size == 2 * M
    assert {c.id: c.start for c in live if not c.movable} == pinned  # pinned never move
    for c in live:
        assert bytes(cma.data(c)) == before[c.id] and cma.chunks.by_label(c.label) is c
    stats = cma.region("r").stats()
    assert stats.moved >= 1 and stats.compactions == 1 and stats.alloc_fail == 0
    cma._check()


def test_no_movable_chunks_means_enomem_and_nothing_moves(arena):
    cma = Cma("r=16M:bf(pageblock=0)", "*=r", arena=arena)
    live = checkerboard(cma, movable_every=None)
    starts = [c.start for c in live]
    with pytest.raises(CmaError) as e:
        cma.alloc("x", 2 * M)
    assert e.value.errno == errno.ENOMEM
    assert [c.start for c in cma.chunks] == starts and cma.region("r").stats().moved == 0


def test_pinned_walls_leave_no_window(arena):
    cma = Cma("r=8M:bf", "*=r", arena=arena)
    for i in range(8):
        cma.alloc("x", M, movable=(i % 2 == 1))
    for c in [c for c in cma.chunks if c.movable][:2]:
        cma.free(c.start)
    # every 2 MiB window holds a pinned chunk: compaction cannot help
    with pytest.raises(CmaError):
        cma.alloc("x", 2 * M)
    cma._check()


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_compact_slides_movable_chunks_down(allocator, arena):
    cma = Cma(f"r=16M:{allocator}", "*=r", arena=arena)
    chunks = [cma.alloc("x", M, movable=True) for _ in range(16)]
    for c in chunks[::2]:
        cma.free(c.start)
    for c in chunks[1::2]:
        fill(cma, c)
    data = {c.id: bytes(cma.data(c)) for c in chunks[1::2]}
    assert cma.region("r").largest_free() == M
    moved = cma.compact("r")
    assert moved >= 4
    assert cma.region("r").largest_free() >= 4 * M
    for c in chunks[1::2]:
        assert bytes(cma.data(c)) == data[c.id]
    cma._check()


def test_moves_are_journalled(tmp_path, arena):
    cma = Cma("r=16M:bf(pageblock=0)", "*=r", arena=arena)
    journal = attach(cma, Journal(str(tmp_path)))
    live = checkerboard(cma)
    cma.alloc("x", 2 * M)
    journal.close()
    again = Cma("r=16M:bf(pageblock=0)", "*=r")
    recover(again, Journal(str(tmp_path)), arena_survived=True)
    assert {c.id: c.start for c in again.chunks} == {c.id: c.start for c in cma.chunks}
    assert {c.label for c in live} <= {c.label for c in again.chunks}


def test_pin_stops_moves(arena):
    cma = Cma("r=16M:bf(pageblock=0)", "*=r", arena=arena)
    live = checkerboard(cma)
    for c in live:
        cma.pin(c)
    assert cma.region("r").movable_users == 0
    with pytest.raises(CmaError):
        cma.alloc("x", 2 * M)


def blocks(path) -> int:
    return os.stat(path).st_blocks * 512


def test_sticky_gives_memory_back_exclusive_keeps_it(tmp_path):
    path = f"/dev/shm/cmad-test-sticky-{os.getpid()}"
    arena = Arena(16 * M, path=path, backing="shm")
    try:
        cma = Cma("s=8M:bf(sticky);e=8M:bf", "s=s;*=e", arena=arena)
        assert cma.region("s").kind == "sticky" and cma.region("e").kind == "exclusive"
        assert blocks(path) == 8 * M  # only the exclusive region is backed
        a = cma.alloc("s", 4 * M)
        assert blocks(path) == 12 * M
        b = cma.alloc("e", 4 * M)
        assert blocks(path) == 12 * M
        cma.free(a.start)
        assert blocks(path) == 8 * M  # the sticky range went back to the system
        cma.free(b.start)
        assert blocks(path) == 8 * M  # the exclusive one is kept
    finally:
        arena.close(unlink=True)


def test_sticky_parameters_reach_the_allocator():
    cma = Cma("pool=64M:bitmap(sticky,order_per_bit=2)")
    r = cma.region("pool")
    assert r.kind == "sticky" and cma.alloc_from("pool", 4096).size == 16 << 10


def test_phys_segments_cover_the_chunk(arena):
    if os.geteuid() != 0:
        pytest.skip("frame numbers need root")
    cma = Cma("r=8M", "*=r", arena=arena)
    c = cma.alloc("x", 256 << 10)
    segments = cma.phys(c)
    assert sum(n for _, n in segments) == c.size
    assert all(a % 4096 == 0 and a > 0 for a, _ in segments)


moves = st.lists(st.tuples(st.sampled_from(["alloc", "free", "compact"]),
                           st.integers(1, 24), st.booleans(), st.integers(0, 999)),
                 max_size=50)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(ALLOCATORS), moves)
def test_compaction_keeps_every_invariant(allocator, sequence):
    arena = Arena(8 * M)
    try:
        cma = Cma(f"r=8M:{allocator}", "*=r", arena=arena)
        pinned = {}
        for op, pages, movable, pick in sequence:
            live = list(cma.chunks)
            if op == "alloc" or not live:
                try:
                    c = cma.alloc("x", pages * 4096, movable=movable)
                except CmaError as e:
                    assert e.errno == errno.ENOMEM
                    continue
                fill(cma, c)
                if not movable:
                    pinned[c.id] = c.start
            elif op == "free":
                c = live[pick % len(live)]
                cma.free(c.start)
                pinned.pop(c.id, None)
            else:
                cma.compact("r")
            for c in cma.chunks:
                assert bytes(cma.data(c)[:1]) == bytes([c.id % 251])
                assert c.start == pinned.get(c.id, c.start)
            cma._check()
    finally:
        arena.close()


def test_phys_without_cap_sys_admin_is_eacces():
    """Run as nobody: the kernel hides frame numbers, phys says EACCES, not a crash."""
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.path.exists(python):
        pytest.skip("needs root to switch to nobody, and the system python")
    # nobody may not traverse the checkout (a clone in a 0700 directory): copy the package
    public = tempfile.mkdtemp(prefix="cmad-nobody-", dir="/tmp")
    try:
        os.chmod(public, 0o755)
        package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "cmad")
        shutil.copytree(package, os.path.join(public, "cmad"))
        script = (f"import sys, errno; sys.path.insert(0, {public!r})\n"
                  "from cmad.memory.arena import Arena\n"
                  "a = Arena(1 << 20); a.populate(0, 1 << 20)\n"
                  "try:\n    a.phys(0, 8192)\nexcept OSError as e:\n"
                  "    print(errno.errorcode[e.errno])\n")
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            python, "-c", script], capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "EACCES", r.stderr
    finally:
        shutil.rmtree(public, ignore_errors=True)



def test_a_compaction_that_cannot_succeed_is_not_started(arena):
    K = 1024
    cma = Cma("r=6M:bf", "*=r", arena=arena)
    cma.alloc("x", 1536 * K, movable=True)  # [0, 1.5M): can only leave for a 1.5M hole
    temps = [cma.alloc("x", M)]              # [1.5M, 2.5M), freed below
    cma.alloc("x", 4 * K)                    # a wall at 2.5M
    for _ in range(6):                       # 512K holes between 4K walls
        temps.append(cma.alloc("x", 512 * K))
        cma.alloc("x", 4 * K)
    cma.alloc("x", 484 * K)
    for c in temps:
        cma.free(c.start)
    region = cma.region("r")
    assert region.free == 4 * M and region.largest_free() == M
    starts = [c.start for c in cma.chunks]
    with pytest.raises(CmaError):
        cma.alloc("x", 2 * M)
    # the window [0, 2M) is cheap enough, but its chunk fits nowhere else
    assert [c.start for c in cma.chunks] == starts
    assert region.moved == 0 and region.compactions == 0
    cma._check()


def test_a_failed_move_gives_everything_back(arena):
    cma = Cma("r=16M:bf(pageblock=0)", "*=r", arena=arena)
    live = checkerboard(cma)

    class Failing:
        def on_alloc(self, chunk):
            pass

        def on_free(self, chunk):
            pass

        def on_move(self, chunk, old_start):
            raise CmaError(errno.EIO, "journal full")

    attach(cma, Failing())
    starts = {c.id: c.start for c in live}
    free = cma.region("r").free
    with pytest.raises(CmaError):
        cma.alloc("x", 2 * M)
    assert {c.id: c.start for c in cma.chunks} == starts and cma.region("r").free == free
    cma._check()


def test_pin_of_a_freed_chunk_is_enxio(arena):
    cma = Cma("r=16M:bf", "*=r", arena=arena)
    c = cma.alloc("x", M, movable=True)
    cma.free(c.start)
    d = cma.alloc("x", M, movable=True)
    with pytest.raises(CmaError) as e:
        cma.pin(c)
    assert e.value.errno == errno.ENXIO and d.movable and cma.region("r").movable_users == 1
