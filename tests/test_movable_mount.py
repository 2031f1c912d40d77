"""Moves, compaction, physical segments and bound= through the mounted tree."""

import os
import stat
import subprocess

import pytest

from util.files import alloc, read, write_errno
from util.daemon import cmad_check
from util.files import chunk_facts

M = 1 << 20
REGIONS = ("--regions", "r=16M:bf;other=8M:buddy", "--map", "*=r")


def checkerboard(mnt) -> dict:
    """16 chunks of 1 MiB, odd ones movable; then every fourth pinned one freed."""
    starts = {}
    for i in range(16):
        line = alloc(mnt, f"x 1M label=c{i}" + (" movable" if i % 2 else ""))
        starts[f"c{i}"] = line.split()[0]
    for i in range(2, 16, 4):
        assert write_errno(mnt / "free", f"c{i}".encode()) == 0
        del starts[f"c{i}"]
    for label in starts:
        (mnt / "chunks" / label / "data").write_bytes(label.encode() * (M // 4))
    return starts


def test_compaction_on_enomem_and_the_tree_follows(daemon):
    mnt = daemon(*REGIONS)
    starts = checkerboard(mnt)
    line = alloc(mnt, "x 2M label=big")
    assert int(line.split()[1]) == 2 * M
    moved = 0
    for label, start in starts.items():
        now = read(mnt / "chunks" / label / "start").strip()
        if int(label[1:]) % 2 == 0:
            assert now == start  # pinned
        moved += now != start
        written = label.encode() * (M // 4)
        assert (mnt / "chunks" / label / "data").read_bytes()[:len(written)] == written
        assert read(mnt / "chunks" / now / "label") == f"{label}\n"
    assert moved >= 1
    live = {read(mnt / "chunks" / label / "start").strip() for label in starts}
    assert live <= set(os.listdir(mnt / "regions/r/chunks"))
    stats = dict(line.split() for line in read(mnt / "regions/r/stats").splitlines())
    assert int(stats["moved"]) == moved and int(stats["compactions"]) == 1


def test_compact_file_is_root_only_and_works(daemon):
    mnt = daemon(*REGIONS)
    for i in range(8):
        alloc(mnt, f"x 1M label=m{i} movable")
    for i in range(0, 8, 2):
        write_errno(mnt / "free", f"m{i}".encode())
    mode = stat.S_IMODE(os.stat(mnt / "regions/r/compact").st_mode)
    assert mode == 0o200
    assert int(read(mnt / "regions/r/stats").split("largest_free ")[1].split()[0]) == 8 * M
    assert subprocess.run(["sh", "-c", f"echo 1 > {mnt}/regions/r/compact"]).returncode == 0
    stats = dict(line.split() for line in read(mnt / "regions/r/stats").splitlines())
    # grouped by mobility, two moves empty two blocks (4 MiB) and leave six free
    assert int(stats["largest_free"]) == 12 * M and 1 <= int(stats["moved"]) <= 4


def test_reading_mmap_pins_a_movable_chunk(daemon):
    mnt = daemon(*REGIONS)
    alloc(mnt, "x 1M label=m movable")
    assert read(mnt / "chunks/m/movable") == "1\n"
    assert stat.S_IMODE(os.stat(mnt / "chunks/m/mmap").st_mode) == 0o400  # root maps
    read(mnt / "chunks/m/mmap")
    assert read(mnt / "chunks/m/movable") == "0\n"


def test_crash_between_copy_and_commit_loses_nothing(daemon, tmp_path):
    state = tmp_path / "state"
    args = ("--state-dir", str(state), *REGIONS)
    mnt = daemon(*args, env={"CMAD_FAULT": "move-copied"})
    checkerboard(mnt)
    before = chunk_facts(mnt)
    fd = os.open(mnt / "alloc", os.O_RDWR)
    with pytest.raises(OSError):  # the daemon dies in the middle of the first move
        os.write(fd, b"x 2M label=big")
    try:
        os.close(fd)
    except OSError:
        pass
    daemon.proc.wait(timeout=20)
    daemon.crash_and_restart(mnt, *args)
    assert chunk_facts(mnt) == before
    alloc(mnt, "x 2M label=big")  # and without the fault it works
    daemon.proc.terminate()
    assert daemon.proc.wait(timeout=20) == 0
    assert cmad_check(state).returncode == 0


def test_phys_is_root_only_and_covers_the_chunk(daemon):
    mnt = daemon(*REGIONS)
    alloc(mnt, "x 256K label=p")
    assert stat.S_IMODE(os.stat(mnt / "chunks/p/phys").st_mode) == 0o400
    segments = [line.split() for line in read(mnt / "chunks/p/phys").splitlines()]
    assert sum(int(n) for _, n in segments) == 256 << 10
    assert all(len(a) == 16 for a, _ in segments)


def test_bound_on_hugepages_is_physically_contiguous(daemon, hugepages):
    mnt = daemon("--regions", "r=8M:bf", "--map", "*=r")
    assert "hugetlb" in read(mnt / "stats")
    alloc(mnt, "x 12K label=pad")
    alloc(mnt, "x 1M bound=2M label=dma")
    start = int(read(mnt / "chunks/dma/start"), 16)
    assert start // (2 * M) == (start + M - 1) // (2 * M)
    segments = read(mnt / "chunks/dma/phys").splitlines()
    assert len(segments) == 1 and segments[0].split()[1] == str(M)


def test_pageblocks_file_and_keys_through_the_mount(daemon):
    mnt = daemon("--regions", "r=16M:bf(pageblock=2M);other=8M:buddy", "--map", "*=r")
    alloc(mnt, "x 16K")
    alloc(mnt, "x 16K movable")
    assert read(mnt / "regions/r/pageblocks") == "M......P\n"  # pinned from the top
    assert read(mnt / "regions/other/pageblocks") == "\n"       # grouping off by default
    stats = dict(line.split() for line in read(mnt / "regions/r/stats").splitlines())
    assert (stats["pageblock"], stats["blocks_free"], stats["blocks_pinned"],
            stats["blocks_movable"], stats["blocks_mixed"], stats["fallbacks"]) == \
        (str(2 * M), "6", "1", "1", "0", "0")
    assert 'cma_region_blocks_free{region="r"} 6' in read(mnt / "metrics")
