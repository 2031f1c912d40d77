"""cmad.clients.client against a real mount: zero-copy views, numpy, freeing, listings, errors."""

import calendar
import errno
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cmad import CmaError
import cmad.clients.buffer as buffer_module
import cmad.clients.tables as tables_module
from cmad.clients.client import Buffer, ChunkInfo, Client, NotMounted, parse_created, parse_result
from util.fake_tree import fake_chunk, fake_mount
from util.files import alloc, eventually, read_value, write_errno

M = 1 << 20
MANY = 24


def test_importable_without_the_daemon_stack():
    code = ("import sys; import cmad.clients.client; "
            "assert not {'pyfuse3', 'trio', 'fusefs', 'cmad.daemon.tree', 'cmad.daemon.main'} & "
            "set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_view_and_data_file_are_the_same_bytes(daemon):
    mnt = daemon()
    client = Client(mnt)
    buf = client.alloc("camera", 2 * M, alignment=M, label="frame", type="preview")
    assert (buf.start, buf.size, buf.region, buf.label) == (0x40000000, 2 * M, "video", "frame")
    assert read_value(mnt / "chunks/frame/type") == "preview"
    view = buf.view
    assert isinstance(view, memoryview) and not view.readonly and len(view) == 2 * M
    data = mnt / "chunks" / buf.name / "data"
    view[:5] = b"hello"
    view[-3:] = b"end"
    with open(data, "rb") as f:
        assert f.read(5) == b"hello"
        f.seek(2 * M - 3)
        assert f.read() == b"end"
    pattern = os.urandom(64 << 10)
    fd = os.open(data, os.O_WRONLY)
    try:
        assert os.pwrite(fd, pattern, M) == len(pattern)
    finally:
        os.close(fd)
    assert buf.view[M:M + len(pattern)] == pattern
    assert buf.view is view  # mapped once
    buf.free()


def test_numpy_shares_the_memory(daemon):
    mnt = daemon()
    client = Client(mnt)
    buf = client.alloc_from("dma", 1 * M)
    frame = buf.numpy("uint32", (256, 1024))
    assert frame.shape == (256, 1024) and frame.flags.writeable
    frame[0, 0] = 0xDEADBEEF
    frame[-1, -1] = 7
    assert bytes(buf.view[:4]) == (0xDEADBEEF).to_bytes(4, sys.byteorder)
    assert np.shares_memory(frame, buf.numpy())
    with open(mnt / "chunks" / buf.name / "data", "rb") as f:
        f.seek(M - 4)
        assert f.read() == (7).to_bytes(4, sys.byteorder)
    assert buf.numpy().size == M
    with pytest.raises(ValueError, match="needs 4194304 bytes"):
        buf.numpy("uint32", (1024, 1024))
    with pytest.raises(BufferError, match="views of it are still alive"):
        buf.free()  # the array still points into the chunk
    assert (mnt / "chunks" / buf.name).exists() and not buf.freed
    frame[1, 1] = 1  # and still works
    del frame
    buf.free()
    assert not (mnt / "chunks" / buf.name).exists()


def test_free_is_idempotent_and_with_frees(daemon):
    mnt = daemon()
    client = Client(mnt)
    with client.alloc("net", 64 << 10, label="pkt") as buf:
        assert buf.region == "common"
        part = buf.view[:16]
        part[:] = b"x" * 16
        with pytest.raises(BufferError, match="views of it are still alive"):
            buf.free()  # the slice outlives the view: the mapping must stay
        part[0] = ord("y")
        assert bytes(buf.view[:2]) == b"yx"
        del part
        assert (mnt / "chunks/pkt").exists()
    assert buf.freed and not (mnt / "chunks/pkt").exists()
    buf.free()  # again: nothing
    with pytest.raises(ValueError, match="was freed"):
        buf.view
    assert read_value(mnt / "regions/common/users") == "0"

    with pytest.raises(RuntimeError):
        with client.alloc("net", 4096) as other:
            raise RuntimeError("the block fails")
    assert other.freed and read_value(mnt / "regions/common/users") == "0"

    never_mapped = client.alloc("net", 4096)
    client.free(never_mapped.start)  # freed behind its back
    with pytest.raises(CmaError) as e:
        never_mapped.free()
    assert e.value.errno == errno.ENOENT and never_mapped.freed


def test_transient_buffers_live_while_held(daemon):
    mnt = daemon()
    client = Client(mnt)
    buf = client.alloc("camera", M, transient=True, label="t1")
    assert (mnt / "chunks/t1").exists()
    buf.view[0] = 1
    buf.free()
    assert not (mnt / "chunks/t1").exists()
    client.alloc("camera", M, transient=True, label="t2")  # dropped at once
    assert eventually(lambda: not (mnt / "chunks/t2").exists())
    kept = client.alloc_from(["dma", "common"], 12 << 10, movable=True, bound="2M")
    assert kept.region == "dma" and read_value(mnt / "chunks" / kept.name / "movable") == "1"


def test_errors_carry_the_errno(daemon, tmp_path, monkeypatch):
    mnt = daemon()
    client = Client(mnt)
    for call, code in ((lambda: client.alloc("camera", "1G"), errno.ENOMEM),
                       (lambda: client.alloc_from(["nope"], 4096), errno.ENOENT),
                       (lambda: client.alloc("camera", 4096, alignment=3000), errno.EINVAL),
                       (lambda: client.alloc("camera", 4096, label="a movable"), errno.EINVAL),
                       (lambda: client.free("nolabel"), errno.ENOENT),
                       (lambda: client.free(0x40000000), errno.ENOENT)):
        with pytest.raises(CmaError) as e:
            call()
        assert isinstance(e.value, OSError) and e.value.errno == code, e.value
    assert read_value(mnt / "regions/video/users") == "0"

    with pytest.raises(NotMounted, match="no such directory") as e:
        Client(tmp_path / "missing")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(NotMounted, match="not mounted"):
        Client(tmp_path)
    monkeypatch.setenv("CMAD_MOUNTPOINT", str(mnt))
    assert Client().mountpoint == str(mnt)


def test_unreadable_arena_file_says_so(daemon, monkeypatch):
    mnt = daemon()
    client = Client(mnt)
    buf = client.alloc("camera", M)
    arena = read_value(mnt / "chunks" / buf.name / "mmap").rsplit(" ", 2)[0]
    real_open = os.open

    def refuse_arena(path, flags, *args):  # what a user outside the daemon's group gets
        if os.fspath(path) == arena:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_arena)
    with pytest.raises(PermissionError, match=f"cannot map chunk id={buf.id}: the arena file "
                       f"{arena} is not accessible to uid {os.geteuid()}"):
        buf.view
    monkeypatch.undo()
    buf.free()


def test_chunks_listing_matches_the_files(daemon):
    mnt = daemon()
    client = Client(mnt)
    assert client.chunks() == []
    bufs = [client.alloc("camera", 64 << 10, label=f"c{i}" if i % 3 == 0 else None,
                         type="preview" if i % 2 else None) for i in range(MANY)]
    bufs.append(client.alloc_from("dma", 8192))
    chunks = client.chunks()
    assert [c.start for c in chunks] == sorted(b.start for b in bufs)
    for c in chunks:
        d = mnt / "chunks" / c.name
        assert (c.size, c.region, c.dev, c.type, c.created) == \
            (int(read_value(d / "size")), read_value(d / "region"), read_value(d / "dev"), read_value(d / "type"),
             read_value(d / "created"))
        assert f"{c.uid} {c.pid}" == read_value(d / "owner") and c.pid == os.getpid()
        assert c.label == (read_value(d / "label") or None)
    assert [c.start for c in client.chunks("dma")] == [bufs[-1].start]
    assert {r.name: r.users for r in client.regions()} == \
        {"video": MANY, "common": 0, "dma": 1, "gpu": 0}
    video = client.region("video")
    assert video.used == MANY * (64 << 10) == video.stats["bytes_allocated"]
    assert client.bitmap("video").count("#") * 4096 == video.used
    assert client.stats()["bytes_allocated"] == video.used + 8192
    for b in bufs:
        b.free()
    assert client.chunks() == []


def test_chunk_table_is_used_when_the_daemon_has_one(tmp_path, monkeypatch):
    """The one-file listing (not published yet): parsed without touching chunks/."""
    (tmp_path / "chunkinfo").write_text(
        "0000000040000000 6291456 video camera preview 0 42 2026-11-25T06:29:29Z 0 frame0\n"
        "0000000043000000 4096 dma - - 1000 7 2026-11-25T06:30:00Z 1 -\n")
    monkeypatch.setattr(Client, "check", lambda self: None)
    client = Client(tmp_path)
    chunks = client.chunks()
    assert [(c.name, c.size, c.region, c.dev, c.type, c.uid, c.pid, c.label, c.movable)
            for c in chunks] == [
        ("0000000040000000", 6 * M, "video", "camera", "preview", 0, 42, "frame0", False),
        ("0000000043000000", 4096, "dma", "-", "-", 1000, 7, None, True)]
    assert chunks[0].created == "2026-11-25T06:29:29Z"
    assert [c.start for c in client.chunks("dma")] == [0x43000000]
    assert client.movable_chunks("dma") == [(0x43000000, 4096)]
    assert client.movable_chunks("video") == []
    (tmp_path / "chunkinfo").write_text("\n")  # an attribute's newline, no chunks
    assert client.chunks() == []
    assert repr(Buffer(client, 0x40000000, 4096, "video", "x")) == \
        "<Buffer 0000000040000000+0x1000 video x>"


# -- Fake trees: a temporary directory laid out like the mount -----------------





def test_result_line_gives_the_id():
    assert parse_result("0000000040000000 4096 video id=7\n") == \
        (0x40000000, 4096, "video", None, 7)
    assert parse_result("0000000040000000 4096 video frame0 id=12\n") == \
        (0x40000000, 4096, "video", "frame0", 12)
    assert parse_result("0000000040000000 4096 video frame0\n") == \
        (0x40000000, 4096, "video", "frame0", None)  # a daemon without ids


def test_buffer_reaches_its_chunk_by_id_and_follows_a_move(tmp_path, monkeypatch):
    mnt = fake_mount(tmp_path / "mnt", monkeypatch=monkeypatch)
    arena = tmp_path / "arena"
    arena.write_bytes(bytes(4 * 65536))
    client = Client(mnt)
    buf = Buffer(client, 0x40000000, 4096, "video", None, id=7, movable=True)
    assert buf.path == str(mnt / "ids/7")
    fake_chunk(mnt, 7, 0x40000000, arena=arena, offset=0)
    assert buf.start == 0x40000000
    fake_chunk(mnt, 7, 0x40020000, arena=arena, offset=0x20000)  # moved by compaction
    assert (buf.start, buf.name) == (0x40020000, "0000000040020000")
    buf.view[:5] = b"moved"  # maps where the chunk is now, not its first place
    data = arena.read_bytes()
    assert data[0x20000:0x20005] == b"moved" and data[:5] == bytes(5)
    fake_chunk(mnt, 7, 0x40030000)  # cannot happen once mapped (mmap pins): not re-read
    assert buf.start == 0x40020000
    buf.free()
    assert (mnt / "free").read_text() == "id=7"  # its own chunk, wherever it is
    assert repr(buf) == "<Buffer 0000000040020000+0x1000 video id=7 freed>"


def test_buffer_of_a_vanished_chunk_is_enoent_and_frees_nothing_else(tmp_path, monkeypatch):
    mnt = fake_mount(tmp_path / "mnt", monkeypatch=monkeypatch)
    client = Client(mnt)
    (mnt / "chunks/0000000040000000").mkdir()  # another chunk now at the old address
    buf = Buffer(client, 0x40000000, 4096, "video", None, id=3, movable=True)
    for touch in (lambda: buf.start, lambda: buf.view):
        with pytest.raises(CmaError, match="chunk id=3 is gone") as e:
            touch()
        assert e.value.errno == errno.ENOENT
    assert repr(buf) == "<Buffer 0000000040000000+0x1000 video id=3>"  # reads nothing
    pinned = Buffer(client, 0x40001000, 4096, "video", "p", id=4)
    assert pinned.start == 0x40001000  # a pinned chunk never moves: nothing read
    client.free(pinned)
    assert (mnt / "free").read_text() == "id=4"
    old = Buffer(client, 0x40002000, 4096, "video", None)  # a daemon without ids
    assert old.path == str(mnt / "chunks/0000000040002000")
    client.free(old)
    assert (mnt / "free").read_text() == "0000000040002000"


TABLE = ("0000000040000000 6291456 video camera preview 0 42 2026-11-25T06:29:29Z 0 frame0 id=1\n"
         "0000000043000000 4096 dma - - 1000 7 2026-11-25T06:30:00Z 1 - id=2\n")


def test_chunk_table_is_parsed_as_it_is_read(tmp_path, monkeypatch):
    mnt = fake_mount(tmp_path, chunkinfo=TABLE * 50, monkeypatch=monkeypatch)
    monkeypatch.setattr(tables_module, "TABLE_READ", 7)  # lines cut across reads
    client = Client(mnt)
    rows = client.chunk_rows()
    assert next(rows)[:3] == ["0000000040000000", "6291456", "video"]
    assert sum(1 for _ in rows) == 99
    chunks = list(client.iter_chunks())
    assert len(chunks) == 100
    assert chunks[:2] == [
        ChunkInfo(0x40000000, 6 * M, "video", "camera", "preview", 0, 42, "frame0",
                  "2026-11-25T06:29:29Z", False, 1),
        ChunkInfo(0x43000000, 4096, "dma", "-", "-", 1000, 7, None,
                  "2026-11-25T06:30:00Z", True, 2)]
    assert {c.id for c in client.iter_chunks("dma")} == {2}
    (mnt / "chunkinfo").write_text(TABLE.replace(" id=1", "").replace(" id=2", ""))
    assert [c.id for c in client.chunks()] == [None, None]  # a daemon without ids
    (mnt / "chunkinfo").unlink()
    assert client.chunks() == []


def test_parse_created_is_utc_seconds():
    assert parse_created("2026-11-25T06:29:29Z") == \
        calendar.timegm(time.strptime("2026-11-25T06:29:29Z", "%Y-%m-%dT%H:%M:%SZ"))
    assert parse_created("1970-01-01T00:01:00Z") == 60


def test_region_facts_that_only_some_daemons_have(tmp_path, monkeypatch):
    regions = (("video", 0x40000000, 4 * M), ("dma", 0x43000000, M))
    mnt = fake_mount(tmp_path, regions, monkeypatch=monkeypatch,
                     contiguous={"video": "physical\n"},
                     pageblocks={"video": "P.M" + "." * 61 + "\nX\n"})
    client = Client(mnt)
    assert [(r.name, r.contiguous) for r in client.regions()] == \
        [("video", "physical"), ("dma", None)]
    assert client.pageblocks("video") == "P.M" + "." * 61 + "X"
    assert client.pageblocks("dma") is None


def test_a_moved_buffer_writes_and_frees_its_own_chunk(daemon):
    """Issue 10 item 2: compaction moves a root Buffer's movable chunk and hands
    its old address to W; the Buffer maps, writes and frees its own chunk."""
    mnt = daemon("--regions", "r=2M:bf", "--map", "*=r")
    client = Client(mnt)
    buf = client.alloc("x", 256 << 10, movable=True)  # not mapped: free to move
    first = buf.start
    assert first == client.region("r").start and buf.id is not None
    for request in ("x 512K label=pad", "x 256K label=wall", "x 1M label=wall2"):
        alloc(mnt, request)
    assert write_errno(mnt / "free", b"pad") == 0
    w = alloc(mnt, "x 512K/512K label=W")
    assert int(w.split()[0], 16) == first  # W took the buffer's old place...
    assert buf.start != first  # ...because the buffer moved
    w_bytes = b"W" * 20
    (mnt / "chunks/W/data").write_bytes(w_bytes)

    buf.view[:20] = b"root buffer, moved.."
    assert (mnt / "chunks/W/data").read_bytes()[:20] == w_bytes
    assert (mnt / "chunks" / buf.name / "data").read_bytes()[:20] == b"root buffer, moved.."
    assert read_value(mnt / "chunks" / buf.name / "id") == str(buf.id)
    assert read_value(mnt / "chunks" / buf.name / "movable") == "0"  # mapping pinned it

    gone = buf.name
    buf.free()
    assert (mnt / "chunks/W").exists() and (mnt / "chunks/W/data").read_bytes()[:20] == w_bytes
    assert not (mnt / "chunks" / gone).exists() and not (mnt / "ids" / str(buf.id)).exists()
    assert read_value(mnt / "regions/r/users") == "3"  # wall, wall2, W


def test_a_buffer_freed_behind_its_back_is_enoent_not_its_successor(daemon):
    mnt = daemon("--regions", "r=2M:bf", "--map", "*=r")
    client = Client(mnt)
    buf = client.alloc("x", 256 << 10, movable=True)
    start = buf.start
    client.free(start)  # by address, behind the Buffer's back
    successor = alloc(mnt, "x 256K label=next")
    assert int(successor.split()[0], 16) == start  # the same address, another chunk
    with pytest.raises(CmaError) as e:
        buf.view
    assert e.value.errno == errno.ENOENT
    with pytest.raises(CmaError, match=f"free chunk id={buf.id}: it is gone") as e:
        buf.free()
    assert e.value.errno == errno.ENOENT and buf.freed
    assert (mnt / "chunks/next").exists() and read_value(mnt / "regions/r/users") == "1"


def test_a_buffer_whose_files_answer_enxio_is_gone(tmp_path, monkeypatch):
    """A freed chunk's files, once looked up, answer ENXIO: the Buffer says gone."""
    mnt = fake_mount(tmp_path, monkeypatch=monkeypatch)
    buf = Buffer(Client(mnt), 0x40000000, 4096, "video", None, id=9, movable=True)

    def enxio(path):
        raise OSError(errno.ENXIO, "No such device or address", path)

    monkeypatch.setattr(buffer_module, "read_value", enxio)
    with pytest.raises(CmaError, match="chunk id=9 is gone") as e:
        buf.start
    assert e.value.errno == errno.ENOENT
