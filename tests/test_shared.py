"""Regions shared with a group (SPEC 4d): the grammar, the arena's overlays, the
gather's limit, and, on a real mount, real users in and out of the group."""

import errno
import os
import pathlib
import shutil
import signal
import subprocess
import textwrap

import pytest

from cmad import Cma
from cmad.memory.arena import Arena
from cmad.daemon.config import ConfigError, load
from cmad.errors import CmaError
from cmad.memory.hugepages import Pool, parse_gather_limit, read_record, record_key
from cmad.memory.physmap import Layout, Span, allocate, refusal
from cmad.core.regions import AllocSpec, alloc_spec_text, parse_alloc_spec, parse_regions
from cmad.memory.shared import SHARED_DIR, files_of
from util.files import alloc, read
from util.users import as_user

M = 1 << 20
REPO = pathlib.Path(__file__).resolve().parents[1]


# -- the grammar: the core consumes group= like sticky ---------------------------


def test_group_is_consumed_before_the_allocator_sees_its_parameters():
    spec = parse_alloc_spec("bitmap(sticky,group=render,order_per_bit=2)")
    assert spec == AllocSpec("bitmap", {"order_per_bit": 2}, "sticky", "render")
    assert parse_alloc_spec(alloc_spec_text(spec)) == spec
    assert alloc_spec_text(spec) == "bitmap(sticky,group=render,order_per_bit=2)"


@pytest.mark.parametrize("text", ["bf(group=a,group=b)", "bf(group=..)", "bf(group=a b)",
                                  "bf(group=)", "bf(group=x/y)"])
def test_bad_group_is_einval(text):
    with pytest.raises(CmaError) as e:
        parse_alloc_spec(text)
    assert e.value.errno == errno.EINVAL


def test_shared_region_lies_on_whole_2m_pages():
    cma = Cma("small=4K;gpu=2M:bf(group=render);after=4K")
    gpu = cma.region("gpu")
    assert gpu.group == "render" and (gpu.start - cma.base) % (2 * M) == 0
    assert cma.region("small").group is None
    with pytest.raises(CmaError, match="multiple of 2.0 MiB") as e:
        parse_regions("gpu=3M:bf(group=render)")
    assert e.value.errno == errno.EINVAL


def test_group_cannot_be_written_to_the_alloc_attribute():
    cma = Cma("gpu=2M:bf(group=render);plain=1M")
    with pytest.raises(CmaError, match="set by the configuration") as e:
        cma.set_allocator("plain", "bf(group=render)")
    assert e.value.errno == errno.EINVAL
    assert cma.region("plain").group is None


# -- the arena: a shared region's file mapped over its place -----------------------


def test_overlay_backs_its_range_with_its_own_file(tmp_path):
    arena = Arena(4 * M, path=str(tmp_path / "arena"), backing="shm", holes=True)
    fd = os.open(tmp_path / "gpu", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 2 * M)
    try:
        arena.overlay(2 * M, 2 * M, fd, str(tmp_path / "gpu"))
        arena.populate(2 * M, 2 * M)  # lands in the region's file, not the arena's
        assert os.fstat(fd).st_blocks * 512 >= 2 * M
        assert os.stat(tmp_path / "arena").st_blocks == 0
        arena.view(2 * M + 5, 5)[:] = b"hello"
        assert os.pread(fd, 5, 5) == b"hello"
        os.pwrite(fd, b"world", 100)
        assert bytes(arena.view(2 * M + 100, 5)) == b"world"
        arena.view(0, 3)[:] = b"abc"  # the rest is the arena file's
        assert os.pread(fd, 3, 0) == b"\0\0\0"
    finally:
        os.close(fd)
        arena.close()


def test_overlay_off_whole_pages_is_einval(tmp_path):
    arena = Arena(4 * M, path=str(tmp_path / "arena"), backing="shm")
    try:
        with pytest.raises(CmaError) as e:
            arena.overlay(100, 4096, 0, "x")
        assert e.value.errno == errno.EINVAL and arena.overlays == []
    finally:
        arena.close()


def test_allocate_leaves_the_arena_file_a_hole_where_a_shared_file_takes_the_pages(tmp_path):
    fd = os.open(tmp_path / "arena", os.O_RDWR | os.O_CREAT, 0o600)
    piece = os.open(tmp_path / "gpu", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 6 * M)
        os.ftruncate(piece, 2 * M)
        allocate(fd, 6 * M, [(2 * M, 2 * M, piece)])
        assert os.fstat(piece).st_blocks * 512 == 2 * M
        assert os.fstat(fd).st_blocks * 512 == 4 * M
    finally:
        os.close(fd)
        os.close(piece)


# -- honest limits: gather_limit ------------------------------------------------


def test_gather_limit_is_a_share_or_a_size():
    assert parse_gather_limit("50%") == (0.5, None)
    assert parse_gather_limit("48G") == (None, 48 << 30)
    assert load(None, {}).gather_limit == "50%"
    assert load(None, {"gather_limit": "25%"}).gather_limit == "25%"
    for bad in ("0%", "150%", "lots", "-1"):
        with pytest.raises(ConfigError, match="gather_limit"):
            load(None, {"gather_limit": bad})


def test_a_search_the_cap_ended_says_so():
    pool = Pool(None, gather_limit="50%")
    assert pool.cap_text().startswith("half of MemAvailable (")
    layout = Layout(gathered=24576, longest=31 << 30, stopped=pool.cap_text())
    line = layout.cut_short()
    assert line.startswith("gathered 24,576 pages, stopped at the cap of half of MemAvailable")
    assert "longest run 31.0 GiB; raise gather_limit or reserve at boot" in line
    error = refusal(Span("gpu", 0, 48 << 30, True), 31 << 30, 24576, stopped=pool.cap_text())
    assert error.errno == errno.ENOMEM
    assert "region gpu" in error.why and "raise gather_limit or reserve at boot" in error.why
    assert "gather_limit" not in refusal(Span("gpu", 0, 8 * M, True), 2 * M, 8).why
    assert Layout(gathered=8).cut_short() == ""


def test_an_absolute_gather_limit_counts_what_was_added():
    pool = Pool(None, gather_limit="64M")
    pool.added = 10
    assert pool.room() == max(64 * M // pool.page - 10, 0)
    assert pool.cap_text() == "gather_limit=64M"


# -- the real mount: users in and out of the group ---------------------------------


REGIONS = "video=4M:bf;gpu=8M:bf(group={group})"
MAP = "gpu=gpu;*=video"

MEMBER = textwrap.dedent("""
    import os, sys
    from cmad.clients.client import Client
    mnt = sys.argv[1]
    client = Client(mnt)
    buf = client.alloc("gpu", "1M", label="mine", movable=True)
    buf.view[:5] = b"hello"                       # through the mapping
    data = os.path.join(buf.path, "data")
    with open(data, "rb") as f:
        assert f.read(5) == b"hello"              # ... read back through data
    with open(data, "r+b") as f:
        f.seek(4096)
        f.write(b"world")                         # through data ...
    assert bytes(buf.view[4096:4101]) == b"world"  # ... read through the mapping
    assert buf.length == 1 << 20 and buf.address > 0
    import ctypes
    assert ctypes.string_at(buf.address, 5) == b"hello"
    try:
        buf.phys()
        print("phys readable")
    except PermissionError:
        pass
    path = open(os.path.join(buf.path, "mmap")).read().split()[0]
    print(path, buf.start, open(os.path.join(buf.path, "movable")).read().strip())
""")


def member_python(tmp: pathlib.Path) -> list[str]:
    """A Python and a copy of the client a throwaway user can run (the venv may be
    under root's home)."""
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                   if os.path.exists(p)), None)
    if python is None:
        pytest.skip("no system python3 for the throwaway users")
    lib = tmp / "lib"
    if not lib.exists():
        shutil.copytree(REPO / "cmad", lib / "cmad")
        for path in [lib, *lib.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    return [f"PYTHONPATH={lib}", python]


def run_as(user: str, tmp: pathlib.Path, script: str, *args) -> subprocess.CompletedProcess:
    (tmp / "script.py").write_text(script)
    (tmp / "script.py").chmod(0o644)
    env, python = member_python(tmp)
    return as_user(user, f"{env} {python} {tmp}/script.py {' '.join(map(str, args))}")


def shared_daemon(daemon, public_tmp, group, *args):  # noqa: F811
    return daemon("--group", group, "--regions", REGIONS.format(group=group), "--map", MAP,
                  *args, mountpoint=public_tmp / "mnt")


@pytest.mark.parametrize("backing", ["auto", "shm"])
def test_member_maps_a_shared_chunk_outsider_gets_eacces(public_tmp, users, daemon,  # noqa: F811
                                                         backing):
    group, member, outsider = users
    mnt = shared_daemon(daemon, public_tmp, group, "--backing", backing)
    r = run_as(member, public_tmp, MEMBER, mnt)
    assert r.returncode == 0, r.stderr
    path, start, movable = r.stdout.split()
    assert movable == "0"  # mapped: pinned
    assert pathlib.Path(path).parent.parent == pathlib.Path(SHARED_DIR) / group
    st = os.stat(path)
    gid = int(subprocess.check_output(["getent", "group", group], text=True).split(":")[2])
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o660)
    folder = os.stat(pathlib.Path(SHARED_DIR) / group)
    assert (folder.st_gid, folder.st_mode & 0o777) == (gid, 0o750)
    with open(path, "rb") as f:  # the region's file holds the chunk's bytes
        f.seek(int(read(mnt / "chunks/mine/mmap").split()[1]))
        assert f.read(5) == b"hello"
    assert (mnt / "chunks/mine/data").read_bytes()[4096:4101] == b"world"
    mode = os.stat(mnt / "chunks/mine/mmap")
    assert (mode.st_gid, mode.st_mode & 0o777) == (gid, 0o440)
    assert os.stat(mnt / "chunks/mine/phys").st_mode & 0o777 == 0o400
    assert "Permission denied" in as_user(outsider, f"cat {mnt}/chunks/mine/mmap").stderr
    assert "Permission denied" in as_user(outsider, f"cat {path}").stderr
    assert "Permission denied" in as_user(outsider, f"ls {SHARED_DIR}/{group}").stderr
    assert read(mnt / "regions/gpu/group") == f"{group}\n"


def test_unshared_chunk_stays_root_only(public_tmp, users, daemon):  # noqa: F811
    group, member, outsider = users
    mnt = shared_daemon(daemon, public_tmp, group)
    assert as_user(member, f"printf 'cam 1M label=v' > {mnt}/alloc").returncode == 0
    assert os.stat(mnt / "chunks/v/mmap").st_mode & 0o777 == 0o400
    assert "Permission denied" in as_user(member, f"cat {mnt}/chunks/v/mmap").stderr
    assert read(mnt / "chunks/v/mmap").split()[0] == read(mnt / "stats").split(
        "arena_file ")[1].split()[0]


def test_a_mapped_movable_chunk_is_not_moved_by_compaction(public_tmp, users, daemon):  # noqa: F811
    group, member, outsider = users
    mnt = shared_daemon(daemon, public_tmp, group)
    alloc(mnt, "gpu 1M label=first")
    r = run_as(member, public_tmp, MEMBER, mnt)
    assert r.returncode == 0, r.stderr
    start = read(mnt / "chunks/mine/start")
    assert read(mnt / "chunks/mine/movable") == "0\n"
    (mnt / "free").write_text("first")
    (mnt / "regions/gpu/compact").write_text("1")
    assert read(mnt / "chunks/mine/start") == start
    assert (mnt / "chunks/mine/data").read_bytes()[:5] == b"hello"


def region_phys(mnt) -> str:
    try:
        return read(mnt / "regions/gpu/phys") if read(mnt / "regions/gpu/contiguous") \
            == "physical\n" else ""
    except OSError:
        return ""


@pytest.mark.parametrize("backing", ["auto", "shm"])
def test_kill_9_keeps_the_file_and_reset_removes_it(public_tmp, users, daemon,  # noqa: F811
                                                    backing):
    group, member, outsider = users
    state = public_tmp / "state"
    args = ("--state-dir", str(state), "--contiguous", "auto", "--backing", backing)
    mnt = shared_daemon(daemon, public_tmp, group, *args)
    r = run_as(member, public_tmp, MEMBER, mnt)
    assert r.returncode == 0, r.stderr
    path = r.stdout.split()[0]
    mmap_line, phys = read(mnt / "chunks/mine/mmap"), region_phys(mnt)
    daemon.crash_and_restart(mnt, "--group", group, "--regions", REGIONS.format(group=group),
                             "--map", MAP, *args)
    assert read(mnt / "chunks/mine/mmap") == mmap_line  # the same file and offset
    assert region_phys(mnt) == phys  # the same frames, where hugepages back it
    assert (mnt / "chunks/mine/data").read_bytes()[:5] == b"hello"
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    out = subprocess.run([*daemon_cmd(), "reset", "--state-dir", str(state)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"removed shared region file {path}" in out.stdout
    assert not os.path.exists(path)
    assert read_record(record_key(str(state), str(mnt))) == 0  # the pages went back
    assert files_of(os.path.basename(path).rsplit(".", 1)[0]) == []


def daemon_cmd() -> list[str]:
    import sys
    return [sys.executable, "-m", "cmad.daemon.main"]


def test_clean_empty_stop_removes_the_file(public_tmp, users, daemon):  # noqa: F811
    group, member, outsider = users
    mnt = shared_daemon(daemon, public_tmp, group)
    line = alloc(mnt, "gpu 1M label=x")
    path = read(mnt / "chunks/x/mmap").split()[0]
    assert os.path.exists(path) and line
    (mnt / "free").write_text("x")
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(timeout=30)
    assert not os.path.exists(path)
    assert not os.path.exists(pathlib.Path(SHARED_DIR) / group)  # nothing left behind


def test_a_region_shared_after_its_chunks_were_journalled_refuses(public_tmp, users, daemon):  # noqa: F811,E501
    group, member, outsider = users
    state = public_tmp / "state"
    mnt = daemon("--state-dir", str(state), "--regions", "video=4M:bf;gpu=8M:bf",
                 "--map", MAP, mountpoint=public_tmp / "mnt")
    alloc(mnt, "gpu 1M label=x")
    from util.mount import MountError
    with pytest.raises(MountError, match="region gpu was not shared with a group when its 1 "
                                         "chunks were journalled"):
        daemon.crash_and_restart(mnt, "--state-dir", str(state), "--regions",
                                 REGIONS.format(group=group), "--map", MAP, timeout=15)


def test_a_region_without_chunks_becomes_shared_at_restart(public_tmp, users, daemon):  # noqa: F811,E501
    group, member, outsider = users
    state = public_tmp / "state"
    mnt = daemon("--state-dir", str(state), "--regions", "video=4M:bf;gpu=8M:bf",
                 "--map", MAP, mountpoint=public_tmp / "mnt")
    alloc(mnt, "cam 1M label=keep")
    daemon.crash_and_restart(mnt, "--state-dir", str(state), "--regions",
                             REGIONS.format(group=group), "--map", MAP)
    alloc(mnt, "gpu 1M label=x")
    path = read(mnt / "chunks/x/mmap").split()[0]
    assert pathlib.Path(path).parent.parent == pathlib.Path(SHARED_DIR) / group
    assert (mnt / "chunks/keep").exists()


class FakeGather:
    """Pages whose frames are never adjacent: no run is ever long enough."""

    def __init__(self, page):
        self.page, self.count, self.frames = page, 0, []

    def grow(self, count):
        self.count, self.frames = count, [i * 2 * self.page for i in range(count)]

    def hand_over(self, order):
        pass

    def close(self):
        pass


class CappedPool:
    """A pool that has the arena's pages free and may be raised by 4 more: the cap."""

    mode, page, added, capped = "reserve", 2 * M, 0, False

    def __init__(self, free):
        self.free = free

    def ensure(self, pages, partial=False):
        self.capped = pages > self.free + 4
        self.free = min(pages, self.free + 4) if partial else self.free
        return self.free, ""

    def cap_text(self):
        return "half of MemAvailable (8.0 MiB, gather_limit=50%)"

    def lock(self):
        pass

    unlock = lock

    def give_back(self, pages=None):
        return 0


def test_the_cap_ending_the_gather_is_in_the_physical_refusal(monkeypatch):
    from cmad.memory import physmap
    monkeypatch.setattr(physmap, "Gather", FakeGather)
    spans = [Span("gpu", 0, 8 * M, True)]
    with pytest.raises(CmaError) as e:
        physmap.build_file(None, 8 * M, spans, CappedPool(4), strict=True)
    assert e.value.errno == errno.ENOMEM
    assert "region gpu" in e.value.why
    assert "stopped at the cap of half of MemAvailable" in e.value.why
    assert "raise gather_limit or reserve at boot" in e.value.why


# -- tier 2: the tree's files for a shared region (fusefs ops, no mount) -----------


async def test_mmap_of_a_shared_chunk_is_the_groups_and_names_the_region_file(tmp_path):
    from fusefs import Filesystem
    from cmad.daemon.tree import Tree
    from util.fsops import ctx, lookup
    from util.fsops import read_file

    cma = Cma("plain=4M:bf;gpu=4M:bf(group=render)", "gpu=gpu;*=plain",
              arena=Arena(8 * M, path=str(tmp_path / "arena"), backing="shm"))
    gpu = cma.region("gpu")
    gpu.gid, gpu.file = 4242, "/run/cmad-shared/render/shm/a.gpu"
    mine = cma.alloc("gpu", 8192, movable=True)
    theirs = cma.alloc("cam", 4096)
    fs = Filesystem(Tree(cma).root)
    shared = await fs.getattr(await lookup(fs, f"chunks/{mine.name}/mmap"), ctx())
    assert (shared.st_mode & 0o777, shared.st_gid) == (0o440, 4242)
    phys = await fs.getattr(await lookup(fs, f"chunks/{mine.name}/phys"), ctx())
    assert (phys.st_mode & 0o777, phys.st_gid) == (0o400, 0)
    plain = await fs.getattr(await lookup(fs, f"chunks/{theirs.name}/mmap"), ctx())
    assert (plain.st_mode & 0o777, plain.st_gid) == (0o400, 0)
    line = await read_file(fs, await lookup(fs, f"chunks/{mine.name}/mmap"))
    assert line.decode().split() == [gpu.file, str(mine.start - gpu.start), "8192"]
    assert not mine.movable  # handed out: pinned
    line = await read_file(fs, await lookup(fs, f"chunks/{theirs.name}/mmap"))
    assert line.decode().split()[1] == str(theirs.start - cma.base)
    cma.arena.close()
