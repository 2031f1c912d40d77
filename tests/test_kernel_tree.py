"""Tier 2: the kernel's views under kernel/ served by fusefs.Filesystem, no mount."""

import errno
import os
import stat

import pytest
import trio

from fusefs import Filesystem
from cmad import Cma
from cmad.daemon.tree import Tree
from util.fsops import ctx, errno_of, list_dir, lookup

P = 4096
REGIONS = "video=32M:bf;common=16M:buddy;dma=8M:bitmap(order_per_bit=2)"
DEBUG = "kernel/sys/kernel/debug/cma"
SYSFS = "kernel/sys/kernel/mm/cma"
TRACING = "kernel/sys/kernel/tracing"


@pytest.fixture
def fs():
    cma = Cma(REGIONS, "*=common")
    tree = Tree(cma)
    filesystem = Filesystem(tree.root)
    filesystem.cma, filesystem.tree = cma, tree
    return filesystem


async def read(fs, path, flags=os.O_RDONLY, size=1 << 16) -> bytes:
    fi = await fs.open(await lookup(fs, path), flags, ctx())
    try:
        return await fs.read(fi.fh, 0, size)
    finally:
        await fs.release(fi.fh)


async def write(fs, path, data: bytes, uid=0) -> int:
    fi = await fs.open(await lookup(fs, path), os.O_WRONLY, ctx(uid=uid))
    try:
        return await fs.write(fi.fh, 0, data)
    finally:
        await fs.release(fi.fh)


async def number(fs, path) -> int:
    text = await read(fs, path)
    assert text.endswith(b"\n") and text.count(b"\n") == 1
    return int(text)


async def names(fs, path):
    entries, _ = await list_dir(fs, await lookup(fs, path), 100)
    return [os.fsdecode(name) for name, _, _ in entries if name not in (b".", b"..")]


async def test_debugfs_files_hold_one_value_each(fs):
    video = fs.cma.region("video")
    assert await number(fs, f"{DEBUG}/video/base_pfn") == video.start >> 12
    assert await number(fs, f"{DEBUG}/video/count") == 8192
    assert await number(fs, f"{DEBUG}/video/order_per_bit") == 0
    assert await number(fs, f"{DEBUG}/dma/order_per_bit") == 2
    assert await number(fs, f"{DEBUG}/video/used") == 0
    assert await number(fs, f"{DEBUG}/video/maxchunk") == 8192
    chunk = fs.cma.alloc_from("dma", 5 * P)          # two 4-page blocks
    assert await number(fs, f"{DEBUG}/dma/used") == 8
    assert await number(fs, f"{DEBUG}/dma/maxchunk") == 2048 - 8
    words = (await read(fs, f"{DEBUG}/dma/bitmap")).decode()
    assert words.endswith("\n") and len(words.split()) == 2048 // 4 // 32
    bit = (chunk.start - fs.cma.region("dma").start) // (4 * P)
    values = [int(w) for w in words.split()]
    assert values[bit // 32] == 3 << (bit % 32) and sum(map(bool, values)) == 1


async def test_sysfs_counters_agree_with_stats(fs):
    for _ in range(3):
        fs.cma.alloc("x", 3 * P)
    fs.cma.free(next(iter(fs.cma.chunks)).start)
    with pytest.raises(OSError):
        fs.cma.alloc("x", 64 << 20)
    d = f"{SYSFS}/common"
    success, fail, release = [await number(fs, f"{d}/{k}") for k in (
        "alloc_pages_success", "alloc_pages_fail", "release_pages_success")]
    assert (success, fail, release) == (9, 16384, 3)
    stats = dict(line.split() for line in
                 (await read(fs, f"regions/{fs.cma.region('common').start:016x}/stats"))
                 .decode().splitlines())
    assert (success - release) * P == int(stats["bytes_allocated"])
    assert await number(fs, f"{d}/total_pages") == 4096
    assert await number(fs, f"{d}/available_pages") == 4096 - 6


async def test_layout_modes_and_the_older_names(fs):
    assert await names(fs, SYSFS) == ["video", "common", "dma"]     # nothing else
    assert await names(fs, DEBUG) == ["video", "common", "dma", "cma-0", "cma-1", "cma-2"]
    assert await names(fs, f"{DEBUG}/video") == [
        "alloc", "free", "base_pfn", "count", "order_per_bit", "used", "maxchunk", "bitmap"]
    assert await names(fs, f"{SYSFS}/video") == [
        "alloc_pages_success", "alloc_pages_fail", "release_pages_success", "total_pages",
        "available_pages"]
    assert await fs.readlink(await lookup(fs, f"{DEBUG}/cma-2"), ctx()) == b"dma"
    modes = {}
    for path in (f"{DEBUG}/video/alloc", f"{DEBUG}/video/free", f"{DEBUG}/video/bitmap",
                 f"{SYSFS}/video/total_pages", f"{TRACING}/trace_pipe",
                 f"{TRACING}/events/cma/enable", f"{TRACING}/events/cma/cma_release/enable"):
        modes[path.rsplit("/", 2)[-1]] = stat.S_IMODE(
            (await fs.getattr(await lookup(fs, path), ctx())).st_mode)
    assert modes == {"alloc": 0o200, "free": 0o200, "bitmap": 0o444, "total_pages": 0o444,
                     "trace_pipe": 0o440, "enable": 0o640}


async def test_debugfs_alloc_and_free_work_as_the_kernels_list(fs):
    hook = f"{DEBUG}/video"
    for n in (b"16\n", b"0x8", b"+010"):                # kstrtoull: 16, 8, octal 8
        await write(fs, f"{hook}/alloc", n)
    chunks = sorted((c for c in fs.cma.chunks if c.dev == "cma_debug"), key=lambda c: c.id)
    assert [c.size // P for c in chunks] == [16, 8, 8]
    assert {c.region.name for c in chunks} == {"video"}
    assert await number(fs, f"{hook}/used") == 32
    await write(fs, f"{hook}/free", b"10")     # the newest entry whole, 2 of the next's head
    first, second, third = chunks
    assert third.start not in fs.cma.chunks
    assert second.size == 6 * P and fs.cma.chunks.by_id(second.id) is second
    assert await number(fs, f"{hook}/used") == 22
    await write(fs, f"{hook}/free", b"1000")            # more than the list: all there is
    assert not [c for c in fs.cma.chunks if c.dev == "cma_debug"]
    await write(fs, f"{hook}/free", b"5")               # an empty list: nothing to do
    d = f"{SYSFS}/video"
    assert await number(fs, f"{d}/alloc_pages_success") == 32
    assert await number(fs, f"{d}/release_pages_success") == 32


async def test_a_chunk_freed_elsewhere_leaves_the_list(fs):
    await write(fs, f"{DEBUG}/video/alloc", b"4")
    await write(fs, f"{DEBUG}/video/alloc", b"4")
    newest = max((c for c in fs.cma.chunks), key=lambda c: c.id)
    await write(fs, "free", newest.name.encode())
    await write(fs, f"{DEBUG}/video/free", b"4")
    assert not list(fs.cma.chunks)


async def test_no_partial_release_when_blocks_are_bigger_than_a_page(fs):
    await write(fs, f"{DEBUG}/dma/alloc", b"8")
    await write(fs, f"{DEBUG}/dma/free", b"2")         # the kernel's order_per_bit != 0 case
    assert [c.size for c in fs.cma.chunks] == [8 * P]


@pytest.mark.parametrize("data", [b"", b"abc", b"0", b"-1", b"16 pages", b"0x", b"08", b" 1",
                                  b"1\n\n", b"++1",
                                  b"8193", b"99999999999999999999999", b"1\n2"])
async def test_bad_counts_are_einval_and_change_nothing(fs, data):
    fs.cma.alloc_from("video", P)
    before = [(c.start, c.size) for c in fs.cma.chunks]
    for name in ("alloc", "free"):
        assert await errno_of(write(fs, f"{DEBUG}/video/{name}", data)) == errno.EINVAL
    assert [(c.start, c.size) for c in fs.cma.chunks] == before
    assert fs.cma.region("video").alloc_pages == 1


async def test_hooks_and_switches_are_root_only(fs):
    assert await errno_of(write(fs, f"{DEBUG}/video/alloc", b"1", uid=1000)) == errno.EPERM
    assert await errno_of(write(fs, f"{TRACING}/events/cma/enable", b"1", uid=1000)) \
        == errno.EPERM
    assert not list(fs.cma.chunks) and fs.cma.tracer is None


async def test_enable_switches(fs):
    system = f"{TRACING}/events/cma/enable"
    assert await read(fs, system) == b"0\n"
    await write(fs, f"{TRACING}/events/cma/cma_release/enable", b"1\n")
    assert await read(fs, system) == b"X\n"
    assert fs.cma.tracer is fs.tree.tracer
    await write(fs, system, b"1")
    assert await read(fs, f"{TRACING}/events/cma/cma_alloc_start/enable") == b"1\n"
    for bad in (b"2", b"on", b""):
        assert await errno_of(write(fs, system, bad)) == errno.EINVAL
    assert await read(fs, system) == b"1\n"
    await write(fs, f"{TRACING}/tracing_on", b"0")
    assert fs.cma.tracer is None
    await write(fs, f"{TRACING}/tracing_on", b"1")
    await write(fs, system, b"0")
    assert fs.cma.tracer is None


async def test_trace_pipe_waits_for_events_and_nonblocking_reads_do_not(fs):
    await write(fs, f"{TRACING}/events/cma/enable", b"1")
    pipe = await lookup(fs, f"{TRACING}/trace_pipe")
    fi = await fs.open(pipe, os.O_RDONLY | os.O_NONBLOCK, ctx(pid=os.getpid()))
    assert await errno_of(fs.read(fi.fh, 0, 4096)) == errno.EAGAIN
    await fs.release(fi.fh)
    fi = await fs.open(pipe, os.O_RDONLY, ctx(pid=os.getpid()))
    got = []

    async def reader():
        got.append(await fs.read(fi.fh, 0, 4096))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(0.05)
        assert got == []                                # cat follows: nothing yet
        await write(fs, f"{DEBUG}/common/alloc", b"3")
    text = got[0].decode()
    assert "cma_alloc_start: name=common request_count=3 available_count=4096" in text
    assert " [000] ..... " in text and text.endswith("\n")
    await fs.release(fi.fh)
    assert fs.tree.tracer.readers == 0


async def test_a_released_reader_stops_waiting(fs):
    fi = await fs.open(await lookup(fs, f"{TRACING}/trace_pipe"), os.O_RDONLY,
                       ctx(pid=os.getpid()))
    handle = fs._handles[fi.fh]
    got = []

    async def reader():
        got.append(await fs.read(fi.fh, 0, 4096))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(0.02)
        handle.source.release()                          # its process was killed
    assert got == [b""]
    await fs.release(fi.fh)


async def test_a_read_for_a_dying_reader_ends(fs):
    fi = await fs.open(await lookup(fs, f"{TRACING}/trace_pipe"), os.O_RDONLY,
                       ctx(pid=2 ** 22 + 1))                # no such process
    with trio.fail_after(5):
        assert await errno_of(fs.read(fi.fh, 0, 4096)) == errno.EINTR
    await fs.release(fi.fh)
