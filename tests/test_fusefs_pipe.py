"""Tier 2: fusefs.Pipe, a read-only file whose reads wait, through Filesystem ops."""

import errno
import os
import stat

import pytest
import trio

import fusefs.pipe as pipe_module
from fusefs import Dir, Filesystem, Pipe
from util.fsops import ctx, errno_of, lookup


class Source:
    def __init__(self):
        self.data = b""
        self.ended = False
        self.released = 0
        self.more = trio.Event()

    def take(self, size):
        out, self.data = self.data[:size], self.data[size:]
        return out

    async def wait(self):
        await self.more.wait()
        self.more = trio.Event()

    def put(self, data):
        self.data += data
        self.more.set()

    def release(self):
        self.released += 1


@pytest.fixture
def served():
    source = Source()
    root = Dir()
    root.add("pipe", Pipe(lambda caller: source))
    return Filesystem(root), source


async def open_pipe(fs, flags=os.O_RDONLY, pid=None):
    inode = await lookup(fs, "pipe")
    return (await fs.open(inode, flags, ctx(pid=os.getpid() if pid is None else pid))).fh


async def test_a_pipe_is_read_only_with_no_size(served):
    fs, _ = served
    attr = await fs.getattr(await lookup(fs, "pipe"), ctx())
    assert (stat.S_IMODE(attr.st_mode), attr.st_size) == (0o440, 0)
    assert await errno_of(fs.open(await lookup(fs, "pipe"), os.O_WRONLY, ctx())) == errno.EACCES


async def test_reads_wait_for_data_and_nonblocking_ones_do_not(served):
    fs, source = served
    fh = await open_pipe(fs, os.O_RDONLY | os.O_NONBLOCK)
    assert await errno_of(fs.read(fh, 0, 10)) == errno.EAGAIN
    source.put(b"ready")
    assert await fs.read(fh, 0, 3) == b"rea"
    assert await fs.read(fh, 3, 100) == b"dy"
    await fs.release(fh)
    fh = await open_pipe(fs)
    got = []

    async def reader():
        got.append(await fs.read(fh, 0, 100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(0.05)
        assert got == []
        source.put(b" now")
    assert got == [b" now"]
    source.ended = True
    assert await fs.read(fh, 0, 100) == b""             # the end of the file
    await fs.release(fh)
    assert source.released == 2


async def test_a_read_for_a_dying_reader_or_a_stopping_daemon_ends(served, monkeypatch):
    fs, _ = served
    fh = await open_pipe(fs, pid=2 ** 22 + 3)             # no such process
    with trio.fail_after(5):
        assert await errno_of(fs.read(fh, 0, 10)) == errno.EINTR
    fh = await open_pipe(fs)
    monkeypatch.setattr(pipe_module, "_stopping", False)
    got = []

    async def reader():
        got.append(await errno_of(fs.read(fh, 0, 10)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(0.05)
        pipe_module.end_waits()
    assert got == [errno.EINTR]


def test_dying_reads_the_pending_signals():
    assert not pipe_module.dying(os.getpid())
    assert pipe_module.dying(2 ** 22 + 5)
