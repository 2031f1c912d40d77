"""The daemon's own hugepages and physically contiguous regions (SPEC 4a), and the
arena file rules of SPEC 5 (issue 10 items 3, 7, 8)."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import re
import signal
import sqlite3
import sys

import pytest

from cmad.daemon.config import Config
from cmad.memory.hugepages import (Pool, escaped_name, give_back_record, read_record,
                            record_key)
from cmad.daemon.assembly import arena_paths
from cmad.memory.physmap import Group, Span, assign, find_runs, groups_of
from util.pool import FakeKernel, nr
from util.files import alloc, read
from util.mount import daemon_stderr

M = 1 << 20
P = 2 * M


# -- the layout, in process ---------------------------------------------------

def test_runs_are_cut_where_frames_are_not_adjacent():
    frames = [5 * P, 1 * P, 2 * P, 9 * P, 6 * P, 3 * P]
    runs = find_runs(frames, P)
    assert [[frames[i] // P for i in r] for r in runs] == [[1, 2, 3], [5, 6], [9]]


def test_regions_sharing_a_hugepage_form_one_group():
    spans = [Span("a", 0, 3 * M, True), Span("b", 3 * M, 2 * M, True),
             Span("c", 8 * M, 4 * M, True), Span("s", 12 * M, 4 * M, False)]
    groups = groups_of(spans, P)
    assert [(g.names, g.first, g.count) for g in groups] == [(["a", "b"], 0, 3),
                                                             (["c"], 4, 2)]


def test_assign_gives_each_group_one_run_largest_first():
    frames = [10 * P, 11 * P, 12 * P, 20 * P, 21 * P, 30 * P, 40 * P]
    runs = find_runs(frames, P)
    order, placed = assign([Group(["small"], 0, 2), Group(["big"], 2, 3)], runs, 6)
    assert placed == {0, 1}
    assert [frames[i] // P for i in order[2:5]] == [10, 11, 12]  # the only 3-run
    assert [frames[i] // P for i in order[0:2]] == [20, 21]  # best fit for 2
    assert len(set(order)) == 6


def test_assign_leaves_a_group_without_a_long_enough_run():
    frames = [1 * P, 3 * P, 5 * P, 7 * P]
    order, placed = assign([Group(["a"], 0, 2)], find_runs(frames, P), 4)
    assert placed == set() and sorted(order) == [0, 1, 2, 3]


# -- the pool's accounting, in process (a fake kernel) --------------------------

def test_two_pools_give_back_only_their_own_pages(monkeypatch, tmp_path):
    kernel = FakeKernel(monkeypatch, nr=10, free=10)  # 10 pages the admin reserved
    ledger = str(tmp_path / "ledger")
    one, two = Pool("one", ledger=ledger), Pool("two", ledger=ledger)
    assert one.ensure(16)[0] >= 16 and one.added == 6  # only what was missing
    kernel.free -= 16  # one's arena takes them
    assert two.ensure(8)[0] >= 8 and two.added == 8
    kernel.free -= 8
    assert read_record("one", ledger=ledger) == 6
    kernel.free += 16  # one deletes its arena
    assert one.give_back() == 6 and kernel.nr == 18 and one.added == 0
    assert read_record("one", ledger=ledger) == 0
    kernel.free += 8
    assert two.give_back() == 8 and kernel.nr == 10  # as the admin left it


def test_give_back_never_takes_pages_others_hold(monkeypatch, tmp_path):
    kernel = FakeKernel(monkeypatch, nr=0, free=0)
    ledger = str(tmp_path / "ledger")
    pool = Pool("rec", ledger=ledger)
    pool.ensure(4)
    kernel.free = 1  # a client still maps three of them
    assert pool.give_back() == 1 and kernel.nr == 3
    assert read_record("rec", ledger=ledger) == 3  # the rest goes back later
    kernel.free = 3
    assert give_back_record("rec", ledger=ledger) == 3 and kernel.nr == 0


def test_free_mode_never_raises_the_pool(monkeypatch, tmp_path):
    kernel = FakeKernel(monkeypatch, nr=2, free=2)
    free, why = Pool(None, "free").ensure(8)
    assert free == 2 and kernel.nr == 2 and "hugepages=free" in why


# -- names of arena files (issue 10 item 3) -------------------------------------

def test_mountpoints_differing_in_slash_and_dash_get_different_arena_files():
    a = arena_paths(Config(mountpoint="/tmp/a-b"))
    b = arena_paths(Config(mountpoint="/tmp/a/b"))
    assert not set(a) & set(b)
    assert escaped_name("/tmp/a-b") != escaped_name("/tmp/a/b")
    assert escaped_name("/tmp/x") == escaped_name("/tmp/x/")


def test_arena_files_live_where_only_root_can_write():
    if os.geteuid() != 0:
        pytest.skip("root's directories")
    for path in arena_paths(Config(mountpoint="/run/cma")):
        assert not path.startswith("/dev/shm/cmad-run"), path  # not world-writable
        assert path.startswith("/run/cmad/"), path


# -- the real daemon -------------------------------------------------------------

def phys_lines(path: pathlib.Path) -> list[tuple[int, int]]:
    return [(int(a, 16), int(n)) for a, n in (line.split() for line in read(path).splitlines())]


def physical_or_skip(mnt: pathlib.Path, proc, *names: str) -> None:
    """Skip (saying what the daemon found) where the kernel's pages held no run."""
    for name in names:
        if read(mnt / "regions" / name / "contiguous").strip() != "physical":
            found = [line for line in daemon_stderr(proc).splitlines() if "arena:" in line]
            pytest.skip(f"the kernel gave no run long enough for region {name}: {found}")


def start_fails(tmp_path, *args: str) -> subprocess.CompletedProcess:
    mnt = tmp_path / "refused"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "cmad.daemon.main", "--mountpoint", str(mnt), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # it started: stop it cleanly, then fail
        proc.send_signal(2)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the daemon started although it should have refused: {err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


REGIONS = "a=32M:bf;b=64M:bf"
AUTO = ("--contiguous", "auto")


def test_physical_regions_of_32_and_64_mib_and_chunks_with_one_segment(pool, daemon):
    mnt = daemon("--regions", REGIONS, "--map", "*=a,b", *AUTO)
    physical_or_skip(mnt, daemon.proc, "a", "b")
    for name, size in (("a", 32 * M), ("b", 64 * M)):
        [(start, length)] = phys_lines(mnt / "regions" / name / "phys")
        assert length == size
    assert "physical_regions a,b" in read(mnt / "stats")
    assert 'cma_region_physical{region="b"} 1' in read(mnt / "metrics")
    for region, size in (("a", 6 * M), ("b", 16 * M)):
        start = int(alloc(mnt, f"@{region} {size} label=c{region}").split()[0], 16)
        [(rphys, _)] = phys_lines(mnt / "regions" / region / "phys")
        rstart = int(read(mnt / "regions" / region / "start"), 16)
        assert phys_lines(mnt / "chunks" / f"c{region}" / "phys") == [
            (rphys + start - rstart, size)]


def test_kill_9_keeps_physical_addresses_and_bytes(pool, daemon, tmp_path):
    state = str(tmp_path / "state")
    mnt = daemon("--regions", REGIONS, "--map", "*=a,b", "--state-dir", state, *AUTO)
    physical_or_skip(mnt, daemon.proc, "a", "b")
    alloc(mnt, "@b 16M label=frame")
    before = read(mnt / "chunks" / "frame" / "phys")
    start = read(mnt / "chunks" / "frame" / "start")
    payload = os.urandom(1 << 16)
    with open(mnt / "chunks" / "frame" / "data", "r+b") as f:
        f.seek(5 * M)
        f.write(payload)
    daemon.crash_and_restart(mnt, "--regions", REGIONS, "--map", "*=a,b", "--state-dir", state,
                              *AUTO)
    assert read(mnt / "regions" / "b" / "contiguous").strip() == "physical"
    assert read(mnt / "chunks" / "frame" / "start") == start
    assert read(mnt / "chunks" / "frame" / "phys") == before
    with open(mnt / "chunks" / "frame" / "data", "rb") as f:
        f.seek(5 * M)
        assert f.read(len(payload)) == payload


def test_changed_frames_are_refused_naming_the_region(pool, daemon, tmp_path):
    state = tmp_path / "state"
    args = ("--regions", REGIONS, "--map", "*=a,b", "--state-dir", str(state), *AUTO)
    mnt = daemon(*args)
    physical_or_skip(mnt, daemon.proc, "b")
    alloc(mnt, "@b 4M label=k")
    daemon.proc.kill()
    daemon.proc.wait()
    db = sqlite3.connect(state / "journal.db")
    layout = json.loads(db.execute("SELECT value FROM meta WHERE key='arena_layout'")
                        .fetchone()[0])
    layout["b"] += P  # as if the file's pages had moved
    db.execute("UPDATE meta SET value=? WHERE key='arena_layout'", (json.dumps(layout),))
    db.commit()
    db.close()
    r = start_fails(tmp_path, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "region b was physical at" in r.stderr and "refusing to start" in r.stderr


def balance(proc) -> tuple[int, int]:
    """Pages a daemon logged as added to the pool and as given back."""
    log = daemon_stderr(proc)
    return (sum(int(n) for n in re.findall(r"hugepages: added (\d+) pages", log)),
            sum(int(n) for n in re.findall(r"hugepages: gave (\d+) pages back", log)))


def stop(proc) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


def test_the_pool_is_as_found_after_a_clean_stop_with_no_chunks(pool, daemon):
    mnt = daemon("--regions", REGIONS, *AUTO)
    proc = daemon.proc
    assert read(mnt / "regions" / "a" / "contiguous").strip() in ("physical", "virtual")
    stop(proc)
    added, given = balance(proc)
    assert added == given, daemon_stderr(proc)
    assert read_record(record_key(None, str(mnt))) == 0
    assert nr() == pool, "another process may have changed the pool meanwhile: rerun"


def test_a_restarted_daemon_gives_back_what_the_killed_one_added(pool, daemon, tmp_path):
    state = tmp_path / "state"
    args = ("--regions", REGIONS, "--state-dir", str(state), *AUTO)
    mnt = daemon(*args)
    added, given = balance(daemon.proc)
    daemon.proc.kill()
    daemon.proc.wait()
    assert read_record(record_key(str(state), str(mnt))) == added - given  # with the arena
    daemon.crash_and_restart(mnt, *args)
    stop(daemon.proc)
    assert read_record(record_key(str(state), str(mnt))) == 0
    assert nr() == pool, "another process may have changed the pool meanwhile: rerun"


def test_cmad_reset_gives_the_pages_back(pool, daemon, tmp_path):
    state = tmp_path / "state"
    mnt = daemon("--regions", REGIONS, "--state-dir", str(state), *AUTO)
    alloc(mnt, "@a 4M label=k")
    path = read(mnt / "stats").split("arena_file ")[1].split()[0]
    daemon.proc.kill()
    daemon.proc.wait()
    r = subprocess.run([sys.executable, "-m", "cmad.daemon.main", "reset", "--state-dir", str(state)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(path) and read_record(record_key(str(state), str(mnt))) == 0
    assert nr() == pool, "another process may have changed the pool meanwhile: rerun"


def test_two_daemons_at_once_never_undo_each_others_pages(pool, daemon):
    first = daemon("--regions", "a=32M:bf", *AUTO)
    one = daemon.proc
    second = daemon("--regions", "a=32M:bf", *AUTO)
    two = daemon.proc
    alloc(second, "@a 8M label=keep")
    with open(second / "chunks" / "keep" / "data", "r+b") as f:
        f.write(b"second")
    phys = read(second / "chunks" / "keep" / "phys")
    assert alloc(first, "@a 4M label=x")
    (first / "free").write_text("x")
    stop(one)
    assert balance(one)[0] == balance(one)[1], daemon_stderr(one)
    with open(second / "chunks" / "keep" / "data", "rb") as f:
        assert f.read(6) == b"second"
    assert read(second / "chunks" / "keep" / "phys") == phys
    (second / "free").write_text("keep")
    stop(two)
    assert balance(two)[0] == balance(two)[1], daemon_stderr(two)
    assert nr() == pool, "another process may have changed the pool meanwhile: rerun"


def test_physical_fails_with_one_line_when_no_run_is_long_enough(pool, tmp_path):
    r = start_fails(tmp_path, "--regions", "big=1T:bf", "--contiguous", "physical")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    line = lines[0]
    assert "region big (1.0 TiB)" in line and "longest run" in line
    assert "hugepages=N" in line and "1 GiB pages" in line
    assert nr() == pool  # nothing changed


def test_sticky_is_refused_under_physical(tmp_path):
    r = start_fails(tmp_path, "--regions", "v=8M:bf(sticky);c=8M:bf", "--contiguous",
                    "physical")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "region v is sticky" in r.stderr


# -- arena file safety (issue 10 items 7, 8) --------------------------------------

def test_arena_file_that_is_not_ours_is_never_deleted(tmp_path):
    victim = pathlib.Path("/dev/shm") / f"cmad-test-victim-{os.getpid()}"
    victim.write_text("precious")
    os.chmod(victim, 0o644)
    try:
        r = start_fails(tmp_path, "--arena-file", str(victim), "--regions", "a=4M:bf")
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "not the daemon's own" in r.stderr
        assert victim.read_text() == "precious"
    finally:
        victim.unlink()


def test_proc_self_mem_as_arena_file_is_a_clean_error(tmp_path):
    r = start_fails(tmp_path, "--arena-file", "/proc/self/mem", "--regions", "a=4M:bf")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "/proc/self/mem" in r.stderr


def test_a_truncated_arena_file_is_refused_naming_it(daemon, tmp_path):
    state = str(tmp_path / "state")
    args = ("--regions", "a=8M:bf", "--backing", "shm", "--state-dir", state)
    mnt = daemon(*args)
    alloc(mnt, "@a 1M label=k")
    with open(mnt / "chunks" / "k" / "data", "r+b") as f:
        f.write(b"bytes")
    path = read(mnt / "chunks" / "k" / "mmap").split()[0]
    daemon.proc.kill()
    daemon.proc.wait()
    os.truncate(path, 0)
    r = start_fails(tmp_path, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert path in r.stderr and "shorter" in r.stderr


def test_a_failed_start_leaves_no_sparse_arena_file(tmp_path):
    state = str(tmp_path / "state")
    mnt = tmp_path / "refused"
    r = start_fails(tmp_path, "--regions", "a=4T:bf", "--backing", "shm", "--state-dir", state)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for path in arena_paths(Config(mountpoint=str(mnt), state_dir=state)):
        assert not os.path.exists(path), path
        legacy = "/dev/shm/cmad" + str(mnt).replace("/", "-")
        assert not os.path.exists(legacy), legacy
    give_back_record(record_key(state, str(mnt)))


def test_arena_files_are_created_0600_in_a_0700_directory(daemon):
    if os.geteuid() != 0:
        pytest.skip("root's directories")
    mnt = daemon("--regions", "a=4M:bf", "--backing", "shm", "--state-dir",
                 str(daemon.tmp_path / "st"))
    path = read(mnt / "stats").split("arena_file ")[1].split()[0]
    st = os.stat(os.path.dirname(path))
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700, path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
