"""cmad.client against a real mount: zero-copy views, numpy, freeing, listings, errors."""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from cmad import CmaError
from cmad.client import LIST_WORKERS, Buffer, Client, NotMounted
from test_daemon import eventually

M = 1 << 20


def read(path) -> str:
    with open(path) as f:
        return f.read().removesuffix("\n")


def test_importable_without_the_daemon_stack():
    code = ("import sys; import cmad.client; "
            "assert not {'pyfuse3', 'trio', 'fusefs', 'cmad.tree', 'cmad.main'} & "
            "set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_view_and_data_file_are_the_same_bytes(daemon):
    mnt = daemon()
    client = Client(mnt)
    buf = client.alloc("camera", 2 * M, alignment=M, label="frame", type="preview")
    assert (buf.start, buf.size, buf.region, buf.label) == (0x40000000, 2 * M, "video", "frame")
    assert read(mnt / "chunks/frame/type") == "preview"
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
    assert read(mnt / "regions/common/users") == "0"

    with pytest.raises(RuntimeError):
        with client.alloc("net", 4096) as other:
            raise RuntimeError("the block fails")
    assert other.freed and read(mnt / "regions/common/users") == "0"

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
    assert kept.region == "dma" and read(mnt / "chunks" / kept.name / "movable") == "1"


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
    assert read(mnt / "regions/video/users") == "0"

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
    arena = read(mnt / "chunks" / buf.name / "mmap").rsplit(" ", 2)[0]
    real_open = os.open

    def refuse_arena(path, flags, *args):  # what a user outside the daemon's group gets
        if os.fspath(path) == arena:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_arena)
    with pytest.raises(PermissionError, match=f"cannot map chunk {buf.name}: the arena file "
                       f"{arena} is not accessible to uid {os.geteuid()}"):
        buf.view
    monkeypatch.undo()
    buf.free()


def test_chunks_listing_matches_the_files(daemon):
    mnt = daemon()
    client = Client(mnt)
    assert client.chunks() == []
    bufs = [client.alloc("camera", 64 << 10, label=f"c{i}" if i % 3 == 0 else None,
                         type="preview" if i % 2 else None) for i in range(3 * LIST_WORKERS)]
    bufs.append(client.alloc_from("dma", 8192))
    chunks = client.chunks()  # enough for the threaded path
    assert [c.start for c in chunks] == sorted(b.start for b in bufs)
    for c in chunks:
        d = mnt / "chunks" / c.name
        assert (c.size, c.region, c.dev, c.type, c.created) == \
            (int(read(d / "size")), read(d / "region"), read(d / "dev"), read(d / "type"),
             read(d / "created"))
        assert f"{c.uid} {c.pid}" == read(d / "owner") and c.pid == os.getpid()
        assert c.label == (read(d / "label") or None)
    assert [c.start for c in client.chunks("dma")] == [bufs[-1].start]
    assert {r.name: r.users for r in client.regions()} == \
        {"video": 3 * LIST_WORKERS, "common": 0, "dma": 1}
    video = client.region("video")
    assert video.used == 3 * LIST_WORKERS * (64 << 10) == video.stats["bytes_allocated"]
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
