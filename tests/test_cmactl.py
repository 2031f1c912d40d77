"""cmactl against a real mount, run as a user would: a subprocess, on a pipe or a pty."""

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import cmad.clients.cmactl as cmactl_module
import cmad.clients.cmactl_out as cmactl_out
from cmad.clients.client import Client
from cmad.memparse import human
from util.fake_tree import fake_mount
from util.files import eventually, read_value

M = 1 << 20
COLOUR = re.compile(r"\x1b\[(?:\d+;)*(?:3[0-8]|9[0-7])(?:;\d+)*m")  # a foreground colour


def cmactl(mnt, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmad.clients.cmactl", "--mountpoint", str(mnt), *args],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def ok(mnt, *args: str) -> str:
    r = cmactl(mnt, *args)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return r.stdout


def in_pty(mnt, *args: str, env: dict | None = None) -> tuple[int, str]:
    """Run cmactl with a pseudo-terminal as stdin, stdout and stderr."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cmad.clients.cmactl", "--mountpoint", str(mnt),
                             *args], stdin=slave, stdout=slave, stderr=slave,
                            env={**os.environ, "TERM": "xterm-256color", **(env or {})})
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    return proc.wait(timeout=10), out.decode(errors="replace")


def rows_of(text: str) -> list[list[str]]:
    """A table's rows, split into cells (the header and its rule left out)."""
    lines = text.splitlines()
    assert set(lines[1].replace(" ", "")) == {"─"}, lines[:2]
    return [line.split() for line in lines[2:]]


def test_regions_table_bytes_and_json(daemon):
    mnt = daemon()
    assert ok(mnt, "alloc", "camera/preview", "6M/1M", "--label", "frame0") == \
        "0000000040000000 6.0 MiB video frame0 id=1\n"
    table = {row[0]: row for row in rows_of(ok(mnt, "regions"))}
    # A contiguous column exactly where the daemon has the file (SPEC §4a).
    def contiguous(name: str) -> list[str]:
        path = mnt / "regions" / name / "contiguous"
        return [read_value(path)] if path.exists() else []

    assert table["video"] == ["video", "0000000040000000", "32.0", "MiB", "6.0", "MiB", "26.0",
                              "MiB", "1", "bf", "exclusive", *contiguous("video"), "0.0%"]
    assert table["common"][9:] == ["buddy", "exclusive", *contiguous("common"), "0.0%"]
    assert table["dma"][1] == "0000000043000000" and table["dma"][9] == "bitmap"
    exact = {row[0]: row for row in rows_of(ok(mnt, "regions", "--bytes"))}
    assert exact["video"][2:6] == [str(32 * M), str(6 * M), str(26 * M), "1"]
    listed = json.loads(ok(mnt, "regions", "--json"))
    assert [r["name"] for r in listed] == ["video", "common", "dma", "gpu"]
    for r in listed:
        d = mnt / "regions" / r["start"]
        assert r["name"] == read_value(d / "name") and r["start"] == read_value(d / "start")
        assert (r["size"], r["free"], r["users"]) == \
            (int(read_value(d / "size")), int(read_value(d / "free")), int(read_value(d / "users")))
        assert r["used"] == r["size"] - r["free"]
        assert (r["allocator"], r["kind"]) == (read_value(d / "alloc"), read_value(d / "kind"))
        stats = dict(line.split() for line in read_value(d / "stats").splitlines())
        assert {k: str(v) if not isinstance(v, float) else f"{v:.4f}"
                for k, v in r["stats"].items()} == stats
        assert r["largest_free"] == int(stats["largest_free"])


def test_alloc_list_free_round_trip(daemon):
    mnt = daemon()
    assert ok(mnt, "alloc", "camera/preview", "6M/1M", "--label", "frame0") == \
        "0000000040000000 6.0 MiB video frame0 id=1\n"
    line = ok(mnt, "--bytes", "alloc", "@dma,common", "12K")  # global option before the command
    assert line == f"0000000043000000 {12 << 10} dma id=2\n"
    made = json.loads(ok(mnt, "alloc", "net", "300K", "--movable", "--json"))
    assert made == {"start": "0000000042000000", "size": 300 << 10, "region": "common",
                    "label": None, "id": 3}
    assert read_value(mnt / "chunks/0000000042000000/id") == "3"
    assert read_value(mnt / "chunks/0000000042000000/movable") == "1"

    table = rows_of(ok(mnt, "list"))
    assert [r[0] for r in table] == ["0000000040000000", "0000000042000000",
                                     "0000000043000000"]
    frame = table[0]
    assert frame[1:4] == ["6.0", "MiB", "video"] and frame[4] == "camera/preview"
    assert frame[5] == "0" and int(frame[6]) > 0 and frame[7] == "frame0"
    assert re.fullmatch(r"\d+s", frame[8])
    assert rows_of(ok(mnt, "list", "--bytes"))[1][1] == str(300 << 10)
    assert [r[0] for r in rows_of(ok(mnt, "list", "--region", "dma"))] == ["0000000043000000"]

    listed = json.loads(ok(mnt, "list", "--json"))
    assert len(listed) == 3
    for c in listed:
        d = mnt / "chunks" / c["start"]
        assert (c["size"], c["region"], c["dev"], c["type"], c["created"]) == \
            (int(read_value(d / "size")), read_value(d / "region"), read_value(d / "dev"), read_value(d / "type"),
             read_value(d / "created"))
        assert f"{c['uid']} {c['pid']}" == read_value(d / "owner")
        assert c["label"] == (read_value(d / "label") or None)

    assert ok(mnt, "free", "frame0", "id=2") == ""
    assert ok(mnt, "free", "0x42000000") == ""
    assert json.loads(ok(mnt, "list", "--json")) == []
    assert rows_of(ok(mnt, "list")) == []
    assert not (mnt / "chunks/frame0").exists()
    assert read_value(mnt / "regions/video/free") == str(32 * M)


def test_transient_alloc_dies_with_cmactl(daemon):
    mnt = daemon()
    line = ok(mnt, "alloc", "camera", "1M", "--transient", "--label", "t")
    assert line.endswith(" video t id=1\n")
    assert eventually(lambda: read_value(mnt / "regions/video/users") == "0")
    r = cmactl(mnt, "alloc", "--help")
    assert "--transient" in r.stdout and "cmactl exits" in r.stdout


def test_errors_are_one_line_with_the_errno(daemon, tmp_path):
    mnt = daemon()
    cases = [
        (("alloc", "camera", "1G"), "cmactl: alloc: Cannot allocate memory (ENOMEM)\n"),
        (("alloc", "@nope", "4K"), "cmactl: alloc: No such file or directory (ENOENT); no map "
                                   "rule matches that device, or no such region\n"),
        (("free", "nope"), "cmactl: free: No such file or directory (ENOENT); no chunk starts "
                           "at, is labelled or has the id 'nope'\n"),
        (("alloc", "camera", "4K/3000"), None),
        (("alloc", "camera", "4K", "--label", "two words"), None),
    ]
    for args, line in cases:
        r = cmactl(mnt, *args)
        assert r.returncode == 1 and r.stdout == "", (args, r)
        if line is not None:
            assert r.stderr == line
        else:
            assert r.stderr.startswith("cmactl: alloc: Invalid argument (EINVAL)")
            assert r.stderr.count("\n") == 1
    assert read_value(mnt / "regions/video/users") == "0"

    r = cmactl(tmp_path / "missing", "regions")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.startswith(f"cmactl: {tmp_path}/missing: no such directory")
    (tmp_path / "empty").mkdir()
    r = cmactl(tmp_path / "empty", "list")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"cmactl: {tmp_path}/empty: cmad is not mounted there; start cmad or "
                        "pass the right mountpoint\n")
    r = cmactl(tmp_path / "empty", "regions", env={"CMAD_MOUNTPOINT": str(mnt)})
    assert r.returncode == 1  # the flag wins over the environment
    r = subprocess.run([sys.executable, "-m", "cmad.clients.cmactl", "regions", "--json"],
                       capture_output=True, text=True, env={**os.environ,
                                                            "CMAD_MOUNTPOINT": str(mnt)})
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 4
    daemon.proc.kill()
    daemon.proc.wait()
    r = cmactl(mnt, "list")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"cmactl: {mnt}: stale mount, its cmad daemon is gone (ENOTCONN); "
                        "restart cmad\n")


def test_map_has_one_row_per_region(daemon):
    """From the bitmaps: pageblocks turned off (a daemon without them draws so)."""
    mnt = daemon("--regions", "video=32M:bf(pageblock=0);common=16M:buddy(pageblock=0);"
                 "dma=8M:bitmap")
    ok(mnt, "alloc", "@video", "16M")
    ok(mnt, "alloc", "@common", "4M", "--movable")
    out = ok(mnt, "map", "--width", "32").splitlines()
    assert len(out) == 4  # three regions and the key
    video, common, dma, key = out
    assert video == "video  " + "#" * 16 + "." * 16 + "  50%"
    assert common == "common " + "m" * 8 + "." * 24 + "  25%"
    assert dma == "dma    " + "." * 32 + "   0%"
    assert "# used" in key and ". free" in key and "m movable" in key
    two = ok(mnt, "map", "--width", "16", "--rows", "2").splitlines()
    assert [line[:7].strip() for line in two[:6]] == ["video", "", "common", "", "dma", ""]
    assert two[0][7:23] + two[1][7:23] == "#" * 16 + "." * 16
    full = ok(mnt, "map").splitlines()  # a pipe: 80 columns
    assert len(full) == 4 and all(len(line) <= 80 for line in full)


def test_top_draws_one_frame_on_a_terminal(daemon):
    mnt = daemon()
    ok(mnt, "alloc", "camera", "8M")
    rc, out = in_pty(mnt, "top", "--iterations", "1")
    assert rc == 0, out
    assert f"cmad at {mnt}" in out
    for word in ("region", "alloc/s", "fails", "largest", "video", "common", "dma", "8.0 MiB"):
        assert word in out, (word, out)
    assert COLOUR.search(out)  # colour on a terminal...
    rc, out = in_pty(mnt, "regions", env={"NO_COLOR": "1"})
    assert rc == 0 and "video" in out and not COLOUR.search(out)  # ...unless NO_COLOR
    rc, out = in_pty(mnt, "map")
    assert rc == 0 and COLOUR.search(out) and "█" in out
    rc, out = in_pty(mnt, "list")
    assert rc == 0 and COLOUR.search(out) and "0000000040000000" in out and "camera/" in out
    assert "\x1b" not in ok(mnt, "regions") + ok(mnt, "list") + ok(mnt, "map")  # a pipe
    frames = ok(mnt, "top", "--iterations", "2", "--interval", "0.1")  # a pipe: like top -b
    assert frames.count("cmad at") == 2 and "\x1b" not in frames
    video = [line.split() for line in frames.splitlines() if line.startswith("video")]
    assert [row[-5] for row in video] == ["-", "0.0"]  # alloc/s once there is a previous frame


def test_sizes_are_human(daemon):
    mnt = daemon()
    for size in (4096, 300 << 10, 5 * M):
        assert ok(mnt, "alloc", "@dma", str(size)).split(" ", 1)[1].rsplit(" ", 1)[0] == \
            f"{human(size)} dma"
    assert human(6 * M) == "6.0 MiB"


# -- In process, on fake trees (a temporary directory laid out like the mount) --


def run_main(capsys, mnt, *args: str) -> str:
    assert cmactl_module.main(["--mountpoint", str(mnt), *args]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def test_regions_say_physical_or_virtual_where_the_daemon_does(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NO_COLOR", "1")
    regions = (("video", 0x40000000, 4 * M), ("dma", 0x43000000, M))
    plain = fake_mount(tmp_path / "plain", regions, monkeypatch=monkeypatch)
    assert "contiguous" not in run_main(capsys, plain, "regions")  # today's daemon
    assert [r["contiguous"] for r in json.loads(run_main(capsys, plain, "regions", "--json"))] \
        == [None, None]
    mnt = fake_mount(tmp_path / "mnt", regions, monkeypatch=monkeypatch,
                     contiguous={"video": "physical\n", "dma": "virtual\n"})
    lines = run_main(capsys, mnt, "regions").splitlines()
    assert lines[0].split() == ["name", "start", "size", "used", "free", "chunks", "alloc",
                                "kind", "contiguous", "frag"]
    table = {line.split()[0]: line.split() for line in lines[2:]}
    assert table["video"][-2:] == ["physical", "0.0%"] and table["dma"][-2] == "virtual"
    assert [r["contiguous"] for r in json.loads(run_main(capsys, mnt, "regions", "--json"))] \
        == ["physical", "virtual"]


def test_map_draws_pageblocks_by_type_else_the_bitmap(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NO_COLOR", "1")
    regions = (("video", 0x40000000, 16 * M), ("dma", 0x43000000, 32 << 10))
    mnt = fake_mount(tmp_path, regions, monkeypatch=monkeypatch,
                     pageblocks={"video": "PPMMXX..\n"})
    (mnt / "regions/0000000043000000/bitmap").write_text("##......\n")
    video, dma, block_key, bitmap_key = run_main(capsys, mnt, "map", "--width", "8") \
        .splitlines()
    assert video == "video PPMMXX..   0%"
    assert dma == "dma   ##......   0%"  # no pageblocks file: the bitmap, as before
    assert ". free  P pinned  M movable  X mixed" in block_key and "pageblocks" in block_key
    assert "# used" in bitmap_key and "pageblocks" not in bitmap_key
    assert run_main(capsys, mnt, "map", "--width", "4").splitlines()[0] == "video PMX.   0%"
    assert cmactl_module.pageblock_cells("PM..MM?.", 4) == ["mixed", "free", "movable", "mixed"]


def test_list_streams_rows_as_they_are_parsed(tmp_path, monkeypatch):
    mnt = fake_mount(tmp_path, monkeypatch=monkeypatch)
    monkeypatch.setattr(cmactl_out, "STREAM_BATCH", 10)
    monkeypatch.setattr(cmactl_out, "GRID_WINDOW", 10)
    pulled = []

    def rows(self, region=None):
        for i in range(100):
            pulled.append(i)
            yield [f"{0x40000000 + i * 4096:016x}", "4096", "video", "cam", "-", "0", "1",
                   "2026-11-25T06:29:29Z", "0", f"l{i}" if i == 99 else "-", f"id={i + 1}"]

    monkeypatch.setattr(Client, "chunk_rows", rows)
    for args in (["list", "--json"], ["list"]):
        writes = []
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        real_write = sys.stdout.write
        monkeypatch.setattr(sys.stdout, "write",
                            lambda text: writes.append((len(pulled), text)) or real_write(text))
        pulled.clear()
        assert cmactl_module.main(["--mountpoint", str(mnt), "--bytes", *args]) == 0
        text = "".join(t for _, t in writes)
        assert len(pulled) == 100 and writes[1][0] < 100, args  # written before the end
        if "--json" in args:
            lines = text.splitlines()
            assert lines[0] == "[" and lines[-1] == "]" and len(lines) == 102  # no indent
            listed = json.loads(text)
            assert listed[0] == {"start": "0000000040000000", "size": 4096, "region": "video",
                                 "dev": "cam", "type": "-", "uid": 0, "pid": 1,
                                 "label": None, "created": "2026-11-25T06:29:29Z",
                                 "movable": False, "id": 1}
            assert listed[99]["label"] == "l99" and listed[99]["id"] == 100
        else:
            table = rows_of(text)
            assert len(table) == 100 and table[0][:4] == ["0000000040000000", "4096", "video",
                                                          "cam/-"]
            assert table[99][6] == "l99"  # past the window: printed, in its column or over


def test_list_json_escapes_what_clients_named(tmp_path, monkeypatch, capsys):
    table = ('0000000040000000 4096 video "cam\\ \u00e9t\u00e9\x01 0 1 2026-11-25T06:29:29Z 1 - id=5\n'
             "0000000040001000 8192 video a b 1000 2 2026-11-25T06:29:30Z 0 frame0\n")
    mnt = fake_mount(tmp_path, chunkinfo=table, monkeypatch=monkeypatch)
    listed = json.loads(run_main(capsys, mnt, "list", "--json"))
    assert (listed[0]["dev"], listed[0]["type"]) == ('"cam\\', "\u00e9t\u00e9\x01")
    assert (listed[0]["movable"], listed[0]["id"]) == (True, 5)
    assert (listed[1]["label"], listed[1]["id"], listed[1]["uid"]) == ("frame0", None, 1000)
    assert json.loads(run_main(capsys, mnt, "list", "--json", "--region", "dma")) == []
    (mnt / "chunkinfo").write_text("\n")
    assert run_main(capsys, mnt, "list", "--json") == "[]\n"


def test_list_of_thousands_through_a_daemon(daemon):
    mnt = daemon("--regions", "r=64M:bf", "--map", "*=r")
    fd = os.open(mnt / "alloc", os.O_RDWR)
    try:
        for i in range(3000):
            os.write(fd, (f"x 4K label=c{i}" if i % 2 else "x 4K movable").encode())
    finally:
        os.close(fd)
    table = rows_of(ok(mnt, "list", "--bytes"))
    assert len(table) == 3000 and [r[0] for r in table] == sorted(r[0] for r in table)
    assert {r[6] for r in table if len(r) == 8} == {f"c{i}" for i in range(1, 3000, 2)}
    listed = json.loads(ok(mnt, "list", "--json"))
    assert len(listed) == 3000
    assert sum(c["movable"] for c in listed) == 1500
    assert {c["label"] for c in listed} == {None} | {f"c{i}" for i in range(1, 3000, 2)}
    assert [c["start"] for c in listed] == [r[0] for r in table]


def test_map_of_a_daemon_with_pageblocks(daemon):
    mnt = daemon("--regions", "r=32M:bf(pageblock=2M);small=1M:bf", "--map", "*=r")
    ok(mnt, "alloc", "@r", "1M")
    ok(mnt, "alloc", "@r", "1M", "--movable")
    blocks = read_value(mnt / "regions/r/pageblocks").replace("\n", "")
    assert sorted(blocks) == ["."] * 14 + ["M", "P"]  # where each goes is the daemon's choice
    r, small, *keys = ok(mnt, "map", "--width", "16").splitlines()
    assert r == f"r     {blocks}   6%"
    assert small == "small " + "." * 16 + "   0%"  # too small for pageblocks: its bitmap
    assert any("P pinned" in k for k in keys) and any("# used" in k for k in keys)


def test_grid_in_colour_streams_window_by_window(monkeypatch, capsys):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(cmactl_out, "GRID_WINDOW", 3)
    out = cmactl_module.Out(False)
    assert out.colour
    cells = [(f"r{i}", str(10 ** (i % 4)), "x" * (i % 5)) for i in range(10)]
    cmactl_module.grid(out, ["name", "n", "tail"], iter(cells), right={1},
                       styles={0: "cyan"})
    text = capsys.readouterr().out
    assert COLOUR.search(text)
    lines = re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()
    assert lines[0].split() == ["name", "n", "tail"] and len(lines) == 12
    assert lines[2:5] == ["r0     1 ", "r1    10 x", "r2   100 xx"]  # the first window's widths
    assert lines[5] == "r3   1000 xxx"  # wider than the window measured: overflows its column
    assert lines[11] == "r9    10 xxxx"
