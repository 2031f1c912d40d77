"""The daemon's tree on a real mount: what only the kernel shows (modes, errnos, streams)."""

import errno
import mmap
import os
import signal
import stat

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cmad import Cma
from cmad.daemon.config import DEFAULT_MAP, DEFAULT_REGIONS
from util.daemon import cmad
from util.files import alloc, eventually, read, sh, write_errno

M = 1 << 20


def test_shell_session_of_the_spec(daemon, tmp_path):
    mnt = daemon()
    (tmp_path / "frame.raw").write_bytes(os.urandom(6 * M))
    assert sh(f"cat {mnt}/allocators").stdout == "bf buddy bitmap\n"
    assert sh(f"cat {mnt}/regions/video/size").stdout == f"{32 * M}\n"
    r = sh(f'echo "camera/preview 6M/1M label=frame0" > {mnt}/alloc')
    assert r.returncode == 0, r.stderr
    r = sh(f"dd if={tmp_path}/frame.raw of={mnt}/chunks/frame0/data bs=1M")
    assert r.returncode == 0, r.stderr
    start = sh(f"cat {mnt}/chunks/frame0/start").stdout.strip()
    assert start == "0000000040000000"
    assert (mnt / "chunks" / start / "data").read_bytes() == (tmp_path / "frame.raw").read_bytes()
    assert read(mnt / "chunks/frame0/type") == "preview\n"
    chunk_id = read(mnt / "chunks" / start / "id").strip()
    assert sh(f"readlink {mnt}/chunks/frame0").stdout == f"../ids/{chunk_id}\n"
    assert os.listdir(mnt / "ids") == [chunk_id]
    assert read(mnt / "ids" / chunk_id / "start") == f"{start}\n"
    assert sh(f"readlink {mnt}/regions/video").stdout == "0000000040000000\n"
    assert os.listdir(mnt / "regions/video/chunks") == [start]
    assert os.readlink(mnt / "regions/video/chunks" / start) == f"../../../ids/{chunk_id}"
    assert sh(f"echo frame0 > {mnt}/free").returncode == 0
    assert not (mnt / "chunks" / start).exists() and not (mnt / "chunks/frame0").exists()
    assert not (mnt / "ids" / chunk_id).exists()
    assert read(mnt / "regions/video/free") == f"{32 * M}\n"


def test_ls_shows_modes_and_honest_sizes(daemon):
    mnt = daemon()
    alloc(mnt, "camera 3M label=x")
    modes = {name: stat.S_IMODE(os.stat(mnt / name).st_mode)
             for name in ("map", "allocators", "alloc", "free", "stats", "metrics")}
    assert modes == {"map": 0o644, "allocators": 0o444, "alloc": 0o660, "free": 0o220,
                     "stats": 0o444, "metrics": 0o444}
    assert os.stat(mnt / "map").st_size == 4096
    assert stat.S_IMODE(os.stat(mnt / "regions/video/alloc").st_mode) == 0o644
    data = os.stat(mnt / "chunks/x/data")
    assert (stat.S_IMODE(data.st_mode), data.st_size, data.st_uid) == (0o600, 3 * M, 0)
    ls = sh(f"ls -l {mnt}/chunks/x/").stdout
    assert f" {3 * M} " in ls and "-r--r--r--" in ls


def test_every_file_matches_the_core(daemon):
    """The same operations on an in-process core give the same files."""
    mnt = daemon()
    core = Cma(DEFAULT_REGIONS, DEFAULT_MAP)
    steps = ["camera 6M/1M label=a", "net 5M", "@dma 12K", "camera 1M", "net 300K label=b"]
    chunks = []
    for text in steps:
        line = alloc(mnt, text)
        start, size, region, *label, chunk_id = line.split()
        from cmad.core.request import run
        c = run(core, text)
        assert (int(start, 16), int(size), region) == (c.start, c.size, c.region.name)
        assert chunk_id == f"id={c.id}" and label == ([c.label] if c.label else [])
        chunks.append(c)
    for c in chunks[1::2]:
        assert sh(f"echo {c.start:016x} > {mnt}/free").returncode == 0
        core.free(c.start)
    for r in core.regions:
        d = mnt / "regions" / f"{r.start:016x}"
        assert read(d / "name") == f"{r.name}\n"
        assert read(d / "start") == f"{r.start:016x}\n"
        assert read(d / "size") == f"{r.size}\n"
        assert read(d / "free") == f"{r.free}\n"
        assert read(d / "users") == f"{r.users}\n"
        assert read(d / "alloc") == f"{r.alloc_text}\n"
        stats = dict(line.split() for line in read(d / "stats").splitlines())
        s = r.stats()
        assert int(stats["alloc_ok"]) == s.alloc_ok and int(stats["freed"]) == s.freed
        assert int(stats["largest_free"]) == s.largest_free
        assert sorted(os.listdir(d / "chunks")) == sorted(c.name for c in core.chunks_of(r))
        bitmap = read(d / "bitmap").replace("\n", "")
        assert bitmap.count("#") * (r.size // len(bitmap)) == r.size - r.free
    for c in core.chunks:
        d = mnt / "chunks" / c.name
        assert read(d / "size") == f"{c.size}\n" and read(d / "region") == f"{c.region.name}\n"
        assert read(d / "dev") == f"{c.dev}\n" and read(d / "label") == f"{c.label or ''}\n"
        uid, pid = read(d / "owner").split()
        assert uid == "0" and int(pid) > 0
        assert read(d / "created").endswith("Z\n")
    names = set(os.listdir(mnt / "chunks"))
    assert names == {c.name for c in core.chunks} | {c.label for c in core.chunks if c.label}
    table = [line.split() for line in read(mnt / "chunkinfo").splitlines()]
    assert [(t[0], int(t[1]), t[2], t[3], t[4], t[9], t[10]) for t in table] == [
        (c.name, c.size, c.region.name, c.dev, c.type, c.label or "-", f"id={c.id}")
        for c in core.chunks]


def test_errnos_through_the_filesystem(daemon):
    mnt = daemon()
    assert write_errno(mnt / "alloc", b"camera 0") == errno.EINVAL
    assert write_errno(mnt / "alloc", b"camera 4K/3000") == errno.EINVAL
    assert write_errno(mnt / "alloc", b"camera 1G") == errno.ENOMEM
    assert write_errno(mnt / "alloc", b"@nope 4K") == errno.ENOENT
    assert write_errno(mnt / "free", b"0000000040000000") == errno.ENOENT
    assert write_errno(mnt / "map", b"x=y;f*x=z") == errno.EINVAL
    assert read(mnt / "map") == f"{DEFAULT_MAP}\n"
    alloc(mnt, "camera 1M label=busy")
    assert write_errno(mnt / "regions/video/alloc", b"buddy") == errno.EBUSY
    assert write_errno(mnt / "alloc", b"camera 1M label=busy") == errno.EEXIST
    for ro in ("allocators", "stats", "metrics", "regions/video/size", "chunks/busy/start",
               "chunks/busy/mmap"):
        assert write_errno(mnt / ro, b"1") == errno.EACCES, ro
    with pytest.raises(PermissionError):
        open(mnt / "free")
    assert write_errno(mnt / "nope", b"1") == errno.ENOENT
    assert sh(f"echo x > {mnt}/allocators").returncode != 0
    assert sh(f"echo busy > {mnt}/free").returncode == 0
    assert write_errno(mnt / "regions/video/alloc", b"buddy") == 0
    assert read(mnt / "regions/video/alloc") == "buddy\n"
    sh(f"echo wanted > {mnt}/regions/video/alloc")
    assert read(mnt / "regions/video/alloc") == "[wanted]\n"
    assert sh(f"echo > {mnt}/regions/video/alloc").returncode == 0
    assert read(mnt / "regions/video/alloc") == "bf\n"
    assert sh(f"echo 'x=video;*=common' > {mnt}/map").returncode == 0
    assert read(mnt / "map") == "x=video;*=common\n"
    assert write_errno(mnt / "alloc", b"nomatch 4K") == 0  # '*' matches it now


def test_alloc_is_a_stream(daemon):
    mnt = daemon()
    fd = os.open(mnt / "alloc", os.O_RDWR)
    try:
        assert os.read(fd, 100) == b""
        os.write(fd, b"camera 1M label=one\n")
        os.write(fd, b"@common,dma 8K")
        os.write(fd, b"camera 2M/2M")
        lines = os.read(fd, 4096).decode().splitlines()
        assert os.read(fd, 100) == b""
    finally:
        os.close(fd)
    assert [line.split()[2:] for line in lines] == [["video", "one", "id=1"], ["common", "id=2"],
                                                    ["video", "id=3"]]
    assert int(lines[2].split()[0], 16) % (2 * M) == 0
    assert sorted(os.listdir(mnt / "chunks")) == sorted([l.split()[0] for l in lines] + ["one"])


def test_transient_chunks_die_with_their_handle(daemon):
    mnt = daemon()
    fd = os.open(mnt / "alloc", os.O_RDWR)
    os.write(fd, b"camera 1M transient label=t")
    os.write(fd, b"camera 1M label=kept")
    assert (mnt / "chunks/t").exists()
    os.close(fd)
    assert eventually(lambda: not (mnt / "chunks/t").exists())
    assert (mnt / "chunks/kept").exists()
    assert read(mnt / "regions/video/users") == "1\n"


def test_data_is_coherent_with_the_mapping(daemon):
    mnt = daemon()
    alloc(mnt, "camera 2M label=buf")
    path, offset, length = read(mnt / "chunks/buf/mmap").split()
    assert int(length) == 2 * M
    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, int(length), offset=int(offset))
    finally:
        os.close(fd)
    data = mnt / "chunks/buf/data"
    m[100:105] = b"hello"
    with open(data, "rb") as f:
        f.seek(100)
        assert f.read(5) == b"hello"
    fd = os.open(data, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"abcdef", 2 * M - 3) == 3  # cut short at the end
    finally:
        os.close(fd)
    assert m[2 * M - 3:] == b"abc"
    with open(data, "rb") as f:
        f.seek(100)
        assert f.read(5) == b"hello"
        f.seek(2 * M)
        assert f.read(10) == b""
    fd = os.open(data, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", 2 * M)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    m.close()


def test_metrics_parse(daemon):
    mnt = daemon()
    alloc(mnt, "camera 1M")
    families = {f.name: f for f in text_string_to_metric_families(read(mnt / "metrics"))}
    ok = {s.labels["region"]: s.value for s in families["cma_region_alloc_ok"].samples
          if s.name.endswith("_total")}
    assert ok == {"video": 1.0, "common": 0.0, "dma": 0.0, "gpu": 0.0}
    used = {s.labels["region"]: s.value for s in families["cma_region_bytes_allocated"].samples}
    assert used["video"] == M
    stats = dict(line.split(None, 1) for line in read(mnt / "stats").splitlines())
    assert stats["bytes_allocated"] == str(M) and stats["page_size"] == "4096"
    assert stats["backing"] in ("hugetlb", "thp", "shm")


def snapshot(mnt) -> tuple:
    regions = tuple(read(mnt / "regions" / r / "free") for r in ("video", "common", "dma"))
    return tuple(sorted(os.listdir(mnt / "chunks"))), regions, read(mnt / "map")


BAD = [b"", b"\n", b"garbage", b"camera", b"camera -1", b"camera 99999999999999999999999",
       b"camera 16E", b"camera 0xffffffffffffffff", b"camera 4K/6M", b"camera 4K/0x3",
       b"camera\0 4K", b"\xff\xfe", "caméra 4K".encode(), b"camera 4K label=../x",
       b"camera 4K label=a/b", b"camera 4K label=", b"camera 4K bogus", b"x" * (1 << 20),
       b"@ 4K", b"@video,,dma 4K", b"camera 4K bound=3M", "camera 4K label=ñ".encode(),
       "camera\u00a04K".encode(), b"camera 4K bound=8E", b"camera 4K/0x8000000000000000"]


def test_bad_input_changes_nothing(daemon):
    mnt = daemon()
    alloc(mnt, "camera 1M label=keep")
    before = snapshot(mnt)
    for target in ("alloc", "free", "map", "regions/video/alloc"):
        for data in BAD:
            if data == b"":
                continue  # the VFS answers a zero-length write itself
            if target == "map" and data == b"\n":
                continue  # an empty map is a valid map
            if target == "regions/video/alloc" and data == b"\n":
                continue  # empty means the default allocator
            got = write_errno(mnt / target, data)
            assert got in (errno.EINVAL, errno.ENOENT, errno.ENOMEM, errno.EBUSY), (target, data)
            assert snapshot(mnt) == before, (target, data)


def test_sigterm_unmounts_cleanly(daemon):
    mnt = daemon()
    proc = daemon.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not os.path.ismount(mnt)


def test_version_and_help():
    from cmad import __version__
    assert cmad("--version").stdout == f"cmad {__version__}\n"
    help_text = cmad("--help").stdout
    for flag in ("--regions", "--map", "--mountpoint", "--arena-size", "--base", "--backing",
                 "--state-dir", "--group", "--config", "cmad check"):
        assert flag in help_text


@pytest.mark.parametrize("args, line", [
    (("--regions", "video=32M;video=1M"), "region 'video' is defined twice"),
    (("--map", "f*x=video"), "'*' may only end a pattern"),
    (("--backing", "magic"), "backing: 'magic' is not one of"),
    (("--arena-size", "12Q"), "arena_size: arena_size '12Q' is not a number"),
    (("--regions", "a=8M", "--arena-size", "4M"), "does not fit in the arena"),
])
def test_configuration_errors_stop_with_one_line(tmp_path, args, line):
    r = cmad("--mountpoint", str(tmp_path / "mnt"), *args)
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if "ERROR" in l]
    assert len(errors) == 1 and line in errors[0], r.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_configuration_file_errors_name_the_key(tmp_path):
    config = tmp_path / "cmad.toml"
    config.write_text('regions = "a=4M"\nmapp = "x"\n')
    r = cmad("--config", str(config), "--mountpoint", str(tmp_path / "mnt"))
    assert r.returncode == 2 and "mapp: unknown key" in r.stderr
    config.write_text("regions = \n")
    r = cmad("--config", str(config))
    assert r.returncode == 2 and "configuration: config:" in r.stderr
