"""A service that survives a reboot and its local users (issue 17): start-up after
a reboot, foreign files, mountpoints through symlinks, the hugepage record, two
daemons at once, state files only root reads."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from cmad.daemon.config import Config
from cmad.memory.hugepages import escaped_name
from cmad.daemon.assembly import arena_paths
from util.mount import daemon_stderr, mounted, require_fuse
from util.daemon import cmad
from util.files import alloc, read

REPO = pathlib.Path(__file__).resolve().parent.parent


def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("root's directories and mounts")


# -- item 1: a reboot (a mount-namespace test: the host's /run is untouched) -------

REBOOT = """
set -u
# What a reboot loses: /run (a tmpfs) and the private hugetlbfs mount under it.
umount -l /run/cmad/hugetlbfs 2>/dev/null
umount -l /run/cmad/tmpfs 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /run || exit 97
{prepare}
"$PY" -m cmad.daemon.main --mountpoint "$MNT" {args} 2>"$LOG" &
pid=$!
i=0
while [ ! -e "$MNT/allocators" ]; do
    kill -0 $pid 2>/dev/null || break
    i=$((i + 1)); [ $i -gt 600 ] && break
    sleep 0.05
done
[ -e "$MNT/allocators" ] && echo served
grep -o 'arena_file [^ ]*' "$MNT/stats" 2>/dev/null
echo "hugetlbfs-dir: $(stat -f -c %T /run/cmad/hugetlbfs 2>/dev/null) $(ls -A /run/cmad/hugetlbfs 2>/dev/null | tr '\\n' ' ')"
kill -INT $pid 2>/dev/null
wait $pid
echo "status=$?"
"""


def after_reboot(mnt: pathlib.Path, state: pathlib.Path, log: pathlib.Path, args: str,
                 prepare: str = "") -> str:
    """Start cmad in a private mount namespace whose /run is a fresh tmpfs, as
    after a reboot; serve, stop it with SIGINT; its stdout says what it saw."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    script = REBOOT.format(prepare=prepare, args=args)
    env = dict(os.environ, PY=sys.executable, MNT=str(mnt), STATE=str(state), LOG=str(log))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    if r.returncode == 97 or "unshare failed" in r.stderr:
        pytest.skip(f"no private mount namespace here: {r.stderr.strip()}")
    return r.stdout


def stopped_with_a_chunk(daemon, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """A daemon with a state dir, one chunk, stopped cleanly (arena kept)."""
    state = tmp_path / "state"
    mnt = daemon("--regions", "a=8M:bf", "--backing", "shm", "--state-dir", str(state))
    alloc(mnt, "@a 1M label=k")
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(timeout=30) == 0
    return mnt, state


def test_after_a_reboot_the_records_are_dropped_with_a_warning_and_it_serves(daemon,
                                                                            tmp_path):
    root_only()
    mnt, state = stopped_with_a_chunk(daemon, tmp_path)
    log = tmp_path / "reboot.log"
    out = after_reboot(mnt, state, log, '--state-dir "$STATE" --regions a=8M:bf --backing shm')
    text = log.read_text()
    assert "served" in out and "status=0" in out, text
    assert "arena file is gone" in text and "dropping 1 recorded" in text, text
    assert "Traceback" not in text


def test_after_a_reboot_no_arena_lands_in_an_unmounted_hugetlbfs_directory(daemon,
                                                                           tmp_path):
    root_only()
    mnt, state = stopped_with_a_chunk(daemon, tmp_path)
    gone = "/run/cmad/hugetlbfs/cmad-lost-arena"
    db = sqlite3.connect(state / "journal.db")  # as a hugetlbfs arena had recorded it
    db.execute("UPDATE meta SET value=? WHERE key='arena_file'", (gone,))
    db.commit()
    db.close()
    log = tmp_path / "reboot.log"
    prepare = "mkdir -m 0700 /run/cmad /run/cmad/hugetlbfs"  # there, and nothing mounted on it
    out = after_reboot(mnt, state, log, '--state-dir "$STATE" --regions a=8M:bf --backing shm',
                       prepare)
    text = log.read_text()
    assert "served" in out and "status=0" in out, text
    line = next(line for line in out.splitlines() if line.startswith("hugetlbfs-dir:"))
    kind, *files = line.split()[1:]
    assert kind == "hugetlbfs" or not files, (line, text)
    arena = next(line for line in out.splitlines() if line.startswith("arena_file"))
    assert not arena.split()[1].startswith("/run/cmad/hugetlbfs/"), arena


# -- item 2: foreign files in world-writable directories -----------------------------

def test_foreign_files_in_dev_shm_never_stop_the_daemon(tmp_path):
    """An ordinary user's /dev/shm/cmad-0/<name> (here in a private /dev/shm)."""
    root_only()
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    names = {escaped_name(str(mnt)), escaped_name(str(mnt), str(state))}
    prepare = "mount -t tmpfs tmpfs /dev/shm && mkdir /dev/shm/cmad-0 && " + " && ".join(
        f"touch /dev/shm/cmad-0/{n}" for n in names) + " && chown -R 65534 /dev/shm/cmad-0"
    for args in ("--regions a=8M:bf", '--state-dir "$STATE" --regions a=8M:bf'):
        log = tmp_path / "shm.log"
        out = after_reboot(mnt, state, log, args + " --hugepages free --contiguous virtual",
                           prepare)
        text = log.read_text()
        assert "served" in out and "status=0" in out, text
        assert "/dev/shm" not in text, text


def test_arena_files_are_never_looked_for_in_world_writable_directories():
    root_only()
    for state in (None, "/var/lib/cmad"):
        for path in arena_paths(Config(mountpoint="/run/cma", state_dir=state)):
            assert path.startswith("/run/cmad/"), path


# -- item 5: two state directories on one mountpoint ----------------------------------

def arena_of(mnt: pathlib.Path) -> str:
    return read(mnt / "stats").split("arena_file ")[1].split()[0]


def test_two_state_dirs_on_one_mountpoint_keep_their_own_arenas(daemon, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    args = ("--regions", "a=8M:bf", "--backing", "shm")
    mnt = daemon(*args, "--state-dir", str(s1))
    alloc(mnt, "@a 1M label=one")
    first = arena_of(mnt)
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(timeout=30) == 0
    mnt = daemon(*args, "--state-dir", str(s2), mountpoint=mnt)
    alloc(mnt, "@a 1M label=two")
    with open(mnt / "chunks" / "two" / "data", "r+b") as f:
        f.write(b"second")
    second = arena_of(mnt)
    assert second != first and os.path.exists(first), "B removed A's arena"
    r = cmad("reset", "--state-dir", str(s1))
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(first) and os.path.exists(second)
    with open(mnt / "chunks" / "two" / "data", "rb") as f:
        assert f.read(6) == b"second"


def test_reset_never_removes_an_arena_a_live_daemon_holds(daemon, tmp_path):
    """A journal naming another daemon's arena (an older cmad named arenas by
    mountpoint only): reset keeps it, naming the holder."""
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    mnt = daemon("--regions", "a=8M:bf", "--backing", "shm", "--state-dir", str(s2))
    alloc(mnt, "@a 1M label=two")
    live = arena_of(mnt)
    s1.mkdir(mode=0o700)
    db = sqlite3.connect(s1 / "journal.db")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('arena_file', ?)", (live,))
    db.commit()
    db.close()
    r = cmad("reset", "--state-dir", str(s1))
    assert os.path.exists(live), r.stderr
    assert f"pid {daemon.proc.pid}" in r.stderr and "kept" in r.stderr
    assert read(mnt / "chunks" / "two" / "size") == f"{1 << 20}\n"


# -- item 3: mountpoints another user could redirect ----------------------------------

def refused_mountpoint(tmp_path, given: pathlib.Path, victim: pathlib.Path) -> None:
    r = cmad("--mountpoint", str(given), "--regions", "a=4M:bf", "--backing", "shm",
             "--hugepages", "free", "--contiguous", "virtual")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "root" in r.stderr and "mountpoint is refused" in r.stderr, r.stderr
    assert not os.path.ismount(victim)
    (victim / "probe").write_text("not sealed")  # EPERM had cmad made it immutable
    (victim / "probe").unlink()


def test_a_symlink_planted_by_another_user_is_refused(tmp_path):
    root_only()
    victim = tmp_path / "victim"
    victim.mkdir()
    link = tmp_path / "m"
    link.symlink_to(victim)
    os.chown(link, 65534, 65534, follow_symlinks=False)
    refused_mountpoint(tmp_path, link, victim)


def test_a_directory_of_another_user_on_the_way_is_refused(tmp_path):
    root_only()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    victim = theirs / "mnt"
    victim.mkdir()
    os.chown(theirs, 65534, 65534)
    refused_mountpoint(tmp_path, victim, victim)


def test_a_world_writable_directory_on_the_way_is_refused(tmp_path):
    root_only()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit: anyone can rename what is in it
    victim = shared / "mnt"
    victim.mkdir()
    refused_mountpoint(tmp_path, victim, victim)


def test_roots_own_symlink_is_followed_and_names_the_real_mountpoint(tmp_path):
    """/var/run/cma -> /run/cma: root's link is fine; the arena and the hugepage
    record are named by the real path, whatever path named it (item 8)."""
    require_fuse()
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(real)
    real.mkdir()
    argv = [sys.executable, "-m", "cmad.daemon.main", "--mountpoint", str(link), "--regions",
            "a=4M:bf", "--backing", "shm", "--hugepages", "free"]
    with mounted(argv, real):
        assert os.path.ismount(real)
        assert os.path.basename(arena_of(real)) == escaped_name(str(real))


# -- item 7 (second half): the unexpected-error path is rate-limited -----------------

async def test_an_unexpected_error_a_client_repeats_is_rate_limited():
    from fusefs import Attr, Dir, Filesystem
    from cmad.daemon.ratelimit import ClientLogFilter
    from util.logs import logger_with, restore
    from util.fsops import ctx, errno_of, lookup

    root = Dir()
    root.add("crash", Attr(store=lambda t, c: bytes(1 << 62)))  # MemoryError, say
    fs = Filesystem(root)
    log, handler = logger_with(ClientLogFilter(clock=lambda: 0.0), "fusefs")
    try:
        fi = await fs.open(await lookup(fs, "crash"), os.O_WRONLY, ctx())
        for _ in range(200):
            assert await errno_of(fs.write(fi.fh, 0, b"1")) == errno.EIO
        await fs.release(fi.fh)
    finally:
        restore(log, handler)
    assert len(handler.lines) == 10, handler.lines[:3]
    assert all("unexpected error, answering EIO" in line for line in handler.lines)


# -- item 6: two daemons started at once on one mountpoint ---------------------------

def test_two_daemons_started_at_once_on_one_mountpoint_one_mounts(tmp_path):
    require_fuse()
    mnt = tmp_path / "mnt"
    for attempt in range(5):
        procs = [subprocess.Popen(
            [sys.executable, "-m", "cmad.daemon.main", "--mountpoint", str(mnt), "--regions",
             "a=4M:bf", "--backing", "shm", "--hugepages", "free", "--contiguous", "virtual",
             "--state-dir", str(tmp_path / f"s{attempt}-{i}")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True) for i in range(2)]
        try:
            loser = None
            for _ in range(600):
                done = [p for p in procs if p.poll() is not None]
                if done:
                    loser = done[0]
                    break
                time.sleep(0.05)
            assert loser is not None, "both daemons run: both mounted"
            winner = procs[1 - procs.index(loser)]
            err = loser.stderr.read()
            assert loser.returncode == 1 and "Traceback" not in err, err
            assert f"pid {winner.pid}" in err or f"cmad:{winner.pid}:" in err, err
            assert winner.poll() is None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
                    p.wait(timeout=30)
                p.stderr.close()
        assert not os.path.ismount(mnt)


# -- items 9, 10: the state directory ---------------------------------------------------

def test_state_files_are_0600_in_a_0700_state_dir(daemon, tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    mnt = daemon("--regions", "a=4M:bf", "--backing", "shm", "--state-dir", str(state))
    alloc(mnt, "@a 1M label=k")
    assert oct(os.stat(state).st_mode & 0o777) == oct(0o700)
    for name in os.listdir(state):
        assert os.stat(state / name).st_mode & 0o077 == 0, name
    assert "lets others read the journal" in daemon_stderr(daemon.proc)


def test_a_second_daemon_on_one_state_dir_names_the_first(daemon, tmp_path):
    state = str(tmp_path / "state")
    daemon("--regions", "a=4M:bf", "--backing", "shm", "--state-dir", state)
    r = cmad("--mountpoint", str(tmp_path / "other"), "--regions", "a=4M:bf", "--backing",
             "shm", "--state-dir", state)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"pid {daemon.proc.pid}" in r.stderr and "database is locked" not in r.stderr


@pytest.mark.parametrize("layout", ['{"a": "x"}', "[1]", "garbage", '{"a": -1}'])
def test_a_tampered_arena_layout_is_one_line_and_cmad_check_reports_it(daemon, tmp_path,
                                                                      layout):
    state = tmp_path / "state"
    args = ("--regions", "a=4M:bf", "--backing", "shm", "--state-dir", str(state))
    mnt = daemon(*args)
    alloc(mnt, "@a 1M label=k")
    daemon.proc.kill()
    daemon.proc.wait()
    db = sqlite3.connect(state / "journal.db")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('arena_layout', ?)", (layout,))
    db.commit()
    db.close()
    r = cmad("--mountpoint", str(tmp_path / "again"), *args)
    errors = [line for line in r.stderr.splitlines() if "ERROR" in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and "arena_layout" in errors[0], r.stderr
    check = cmad("check", "--state-dir", str(state))
    assert check.returncode == 1 and "arena_layout" in check.stderr, check.stderr


def test_a_daemon_meeting_the_mount_lock_names_its_holder(tmp_path):
    """The lock held from check to mount: while another start holds it (here this
    process), a daemon fails at once, naming the holder, and touches nothing."""
    from cmad.daemon.preflight import mount_lock, mount_unlock
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lock = mount_lock(str(mnt))
    try:
        r = cmad("--mountpoint", str(mnt), "--regions", "a=4M:bf", "--backing", "shm",
                 "--hugepages", "free")
    finally:
        mount_unlock(lock)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"another cmad (pid {os.getpid()})" in r.stderr
    assert not os.path.ismount(mnt)


# -- items 4, 8: the ledger of added hugepages, reconciled with the pool --------------

from cmad.memory import hugepages, kernelpool  # noqa: E402
from cmad.memory.ledger import me as _me  # noqa: E402
from cmad.memory.hugepages import Ledger, Pool, give_back_record, read_record, sweep  # noqa: E402
from util.pool import FakeKernel, nr  # noqa: E402


def test_a_pool_lowered_by_another_process_is_never_given_back_by_cmad(monkeypatch,
                                                                       tmp_path):
    kernel = FakeKernel(monkeypatch, nr=0, free=0)
    ledger = str(tmp_path / "ledger")
    daemon_pool = Pool("cmad-a", ledger=ledger)
    daemon_pool.ensure(28)
    assert read_record("cmad-a", ledger=ledger) == 28
    kernel.write(0)  # another root process lowers the pool: the free pages go
    assert daemon_pool.give_back() == 0 and kernel.nr == 0
    assert read_record("cmad-a", ledger=ledger) == 0
    kernel.write(28)  # and raises it for its own use: never cmad's to give back
    assert give_back_record("cmad-a", ledger=ledger) == 0 and kernel.nr == 28


def test_pages_that_became_surplus_under_the_arena_are_not_given_back(monkeypatch,
                                                                      tmp_path):
    """The pool lowered to 6 while the arena held our 10: the kernel keeps 4 as
    surplus, which go with the file; only 6 are ours to give back."""
    kernel = FakeKernel(monkeypatch, nr=0, free=0)
    ledger = str(tmp_path / "ledger")
    arena = tmp_path / "arena"
    arena.write_bytes(b"")
    one = Pool("cmad-a", ledger=ledger)
    one.ensure(10)
    one.held_in(str(arena))
    kernel.free -= 10  # in the arena
    kernel.nr = 6  # lowered by another process under them: 4 surplus
    monkeypatch.setattr(kernelpool, "meminfo", lambda: {"MemAvailable": 1 << 30,
                                                         "Hugepagesize": 2048,
                                                         "HugePages_Surp": 4})
    hugepages.unlink_arena(str(arena), ledger=ledger)
    kernel.free += 6  # the 4 surplus pages vanished with the file
    assert read_record("cmad-a", ledger=ledger) == 6
    assert Ledger(ledger).load()["cmad-a"][2] == "-"
    assert give_back_record("cmad-a", ledger=ledger) == 6 and kernel.nr == 0


def test_an_entry_of_another_boot_is_dropped(monkeypatch, tmp_path):
    kernel = FakeKernel(monkeypatch, nr=8, free=8)  # reserved at boot
    ledger = tmp_path / "ledger"
    ledger.write_text("boot 00000000-old-boot\ntotal 8\ncmad-a 8 1:1 -\n")
    assert read_record("cmad-a", ledger=str(ledger)) == 0
    assert Pool("cmad-a", ledger=str(ledger)).give_back() == 0 and kernel.nr == 8


def test_sweep_gives_back_dead_daemons_pages_that_no_arena_holds(monkeypatch, tmp_path):
    kernel = FakeKernel(monkeypatch, nr=0, free=0)
    ledger = str(tmp_path / "ledger")
    kept = tmp_path / "kept-arena"
    kept.write_bytes(b"")
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = _me()
    Ledger(ledger).save({"gathering": [5, f"{dead.pid}:1", "-"],
                         "memfd": [3, f"{dead.pid}:1", "-"],
                         "gone": [2, f"{dead.pid}:1", str(tmp_path / "removed")],
                         "restartable": [4, f"{dead.pid}:1", str(kept)],
                         "live": [6, me, "-"]})
    kernel.nr, kernel.free = 20, 20 - 4  # the kept arena holds its 4
    assert sweep(ledger=ledger) == 10 and kernel.nr == 10
    left = Ledger(ledger).load()
    assert sorted(left) == ["live", "restartable"]


def test_reset_by_mountpoint_reaches_a_daemon_without_a_state_dir(daemon, tmp_path):
    mnt = daemon("--regions", "a=8M:bf", "--backing", "shm")
    arena = arena_of(mnt)
    daemon.proc.kill()
    daemon.proc.wait()
    assert os.path.exists(arena)
    link = tmp_path / "link"
    link.symlink_to(mnt)  # whatever path names it
    r = cmad("reset", "--mountpoint", str(link))
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(arena) and f"removed arena {arena}" in r.stdout


def test_kill_9_without_a_state_dir_leaves_no_page_the_next_start_cannot_reach(pool,
                                                                              daemon):
    mnt = daemon("--regions", "a=32M:bf", "--contiguous", "auto")
    key = hugepages.record_key(None, str(mnt))
    added = read_record(key)
    if not added:
        pytest.skip("the daemon added no hugepages (free ones were there already)")
    daemon.proc.kill()
    daemon.proc.wait()
    daemon.crash_and_restart(mnt, "--regions", "a=4M:bf", "--backing", "shm")
    daemon.proc.send_signal(signal.SIGINT)
    daemon.proc.wait(timeout=30)
    assert read_record(key) == 0
    assert nr() == pool, "another process may have changed the pool meanwhile: rerun"


# -- also: what each process holds ------------------------------------------------------

def guard_of(pid: int) -> int:
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        if "guard.py" in open(f"/proc/{child}/cmdline").read():
            return int(child)
    raise AssertionError(f"no guard process under pid {pid}")


def test_the_guard_holds_no_capability_and_the_daemon_still_stops_it(daemon):
    root_only()
    from util.users import capabilities
    daemon("--regions", "a=4M:bf", "--backing", "shm")
    guard = None
    for _ in range(100):  # the guard drops them as its first act
        try:
            guard = guard_of(daemon.proc.pid)
            caps = capabilities(guard)
        except (AssertionError, OSError):
            caps = None
        if caps and not caps["CapPrm"]:
            break
        time.sleep(0.05)
    assert caps is not None, "no guard"
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == set(), caps
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    assert not os.path.exists(f"/proc/{guard}") or "Z" in open(f"/proc/{guard}/stat").read()


def test_a_daemon_of_another_user_keeps_its_files_in_its_runtime_dir(monkeypatch,
                                                                    tmp_path):
    from cmad.memory.hugepages import user_dir
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert user_dir() == str(runtime / "cmad")
    os.chmod(runtime, 0o777)  # not the user's alone: not used
    assert user_dir() == f"/dev/shm/cmad-{os.geteuid()}"


def test_an_older_cmads_record_joins_the_ledger_if_it_is_of_this_boot(monkeypatch,
                                                                      tmp_path):
    kernel = FakeKernel(monkeypatch, nr=5, free=5)
    ledger = str(tmp_path / "ledger")
    this_boot, last_boot = tmp_path / "this", tmp_path / "last"
    this_boot.write_text("added 3\n")
    last_boot.write_text("added 5\n")
    os.utime(last_boot, (0, 0))  # written before this boot began
    assert hugepages.adopt_old_record(str(last_boot), "cmad-a", None, ledger=ledger) == 0
    assert hugepages.adopt_old_record(str(this_boot), "cmad-a", None, ledger=ledger) == 3
    assert not this_boot.exists() and not last_boot.exists()
    assert sweep(ledger=ledger) == 3 and kernel.nr == 2  # a dead daemon's, in no arena


def test_pages_another_process_adds_and_takes_back_are_not_cmads_loss(monkeypatch,
                                                                       tmp_path):
    """Another process raises the pool for itself and lowers it again while the
    daemon's pages are in its arena: the daemon still gives back all of its own."""
    kernel = FakeKernel(monkeypatch, nr=0, free=0)
    ledger = str(tmp_path / "ledger")
    arena = tmp_path / "arena"
    arena.write_bytes(b"")
    one = Pool("cmad-a", ledger=ledger)
    kernel.write(4)  # someone else's 4
    one.ensure(4 + 16)  # takes 16 more (the 4 are free: counted, not added)
    one.held_in(str(arena))
    kernel.free -= 20
    kernel.free += 4
    kernel.write(kernel.nr - 4)  # the other process takes its 4 back
    hugepages.unlink_arena(str(arena), ledger=ledger)
    kernel.free += 16
    assert give_back_record("cmad-a", ledger=ledger) == 16 and kernel.nr == 0
