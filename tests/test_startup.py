"""Start-up: no false success while no daemon serves, refusals through symlinks, stale
mounts told by pid and start time, and the capabilities the daemon keeps while serving."""

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fusefs.guard import alive, start_time
from fusefs.mountinfo import mount_owner, source_owner as _source_owner
from fusefs.paths import resolve
from util.daemon import RESTART_WRITER
from util.mount import cleanup, daemon_stderr, mounted, require_fuse, wait_for_mount
from util.daemon import cmad
from util.files import alloc, read
from util.users import capabilities

ROOT = pathlib.Path(__file__).resolve().parent.parent
CAP_SYS_ADMIN = 21
CYCLES = int(os.environ.get("CMAD_RESTART_CYCLES", "8"))



def test_no_write_succeeds_while_no_daemon_serves(daemon, tmp_path):
    state = tmp_path / "state"
    args = ("--state-dir", str(state))
    mnt = daemon(*args)
    for i in range(20):
        alloc(mnt, f"camera 64K label=c{i}")
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", RESTART_WRITER, str(mnt), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(CYCLES):
            daemon.crash_and_restart(mnt, *args)
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=60)
    counts = json.loads(out)
    ok, bare = counts.pop("ok", 0), counts.get("open:EPERM", 0)
    failed = sum(counts.values())
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    assert (ok, os.listdir(mnt)) == (0, []), f"{ok} false successes, {failed} refusals"
    assert failed > 0
    if mount_beneath_supported():  # each stale mount was replaced in place
        assert bare == 0, f"{bare} writes met the bare directory"


def mount_beneath_supported() -> bool:
    """move_mount(MOVE_MOUNT_BENEATH) is Linux 6.5 (fusefs/mountapi.py)."""
    release = os.uname().release.split("-")[0].split(".")
    return tuple(int(n) for n in release[:2]) >= (6, 5)


def mounts_on(path) -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(line.split()[4] == str(path) for line in f)


def second_daemon(*args: str) -> subprocess.CompletedProcess:
    """A daemon that should refuse to start; stopped (and failed) if it does not."""
    proc = subprocess.Popen([sys.executable, "-m", "cmad.daemon.main", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the second daemon started and served; stderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_live_mount_named_through_a_symlink_is_never_touched(daemon, tmp_path):
    mnt = daemon()
    alloc(mnt, "camera 1M label=mine")
    link = tmp_path / "link"
    link.symlink_to(mnt)
    r = second_daemon("--mountpoint", str(link))
    assert r.returncode == 1 and f"{link} (= {mnt}) is already a live mount" in r.stderr
    assert mounts_on(mnt) == 1
    assert read(link / "chunks/mine/size") == f"{1 << 20}\n"


def test_a_live_tmpfs_named_through_a_symlink_is_never_touched(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "cmad-test", str(target)], check=True)
    try:
        (target / "precious").write_text("kept")
        (tmp_path / "link").symlink_to(target)
        r = second_daemon("--mountpoint", str(tmp_path / "link"))
        assert r.returncode == 1 and "type tmpfs" in r.stderr
        assert mounts_on(target) == 1
        assert (target / "precious").read_text() == "kept"
    finally:
        subprocess.run(["umount", "-l", str(target)])


def test_resolve_follows_links_like_realpath(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "a").symlink_to("real")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "loop").symlink_to("loop")
    assert resolve(tmp_path / "b" / "mnt") == os.path.realpath(tmp_path / "b" / "mnt")
    assert resolve(tmp_path / "b" / ".." / "b") == os.path.realpath(tmp_path / "b/../b")
    with pytest.raises(OSError) as e:
        resolve(tmp_path / "loop")
    assert e.value.errno == errno.ELOOP


def test_the_mount_source_names_the_daemon_by_pid_and_start_time():
    pid = os.getpid()
    assert _source_owner(f"cmad:{mount_owner()}") == (pid, start_time(pid))
    assert _source_owner(f"cmad:{pid}") == (pid, None)  # daemons before start times
    assert _source_owner("cmad") is None
    assert alive(pid, start_time(pid)) and alive(pid)
    assert not alive(pid, start_time(pid) + 1)  # this pid, but not the process that mounted


def process_with_pid(pid: int, tries: int = 300) -> subprocess.Popen | None:
    """A `sleep` holding *pid* (ns_last_pid), as any process may after the daemon died."""
    for _ in range(tries):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError:
            return None
        proc = subprocess.Popen(["sleep", "120"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


def test_a_dead_daemons_pid_held_by_another_process_does_not_block_the_restart(daemon,
                                                                               tmp_path):
    args = ("--state-dir", str(tmp_path / "state"))
    mnt = daemon(*args)
    alloc(mnt, "camera 1M label=keep")
    dead = daemon.proc.pid
    daemon.proc.kill()
    daemon.proc.wait()
    impostor = process_with_pid(dead)
    if impostor is None:
        pytest.skip(f"could not start a process with pid {dead} (ns_last_pid)")
    try:
        daemon.crash_and_restart(mnt, *args)
        assert read(mnt / "chunks/keep/size") == f"{1 << 20}\n"
        assert "stale FUSE mount" in daemon_stderr(daemon.proc)
    finally:
        impostor.kill()
        impostor.wait()


def test_state_dir_a_regular_file_is_one_line_and_exit_2(tmp_path):
    state = tmp_path / "state"
    state.write_text("not a directory")
    r = cmad("--mountpoint", str(tmp_path / "mnt"), "--state-dir", str(state))
    errors = [line for line in r.stderr.splitlines() if "ERROR" in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and f"state_dir {state} exists and is not a directory" in errors[0]
    assert state.read_text() == "not a directory"


def test_reset_on_a_live_state_dir_is_refused_naming_the_daemon(daemon, tmp_path):
    state = tmp_path / "state"
    mnt = daemon("--state-dir", str(state))
    alloc(mnt, "camera 1M label=keep")
    arena = read(mnt / "stats").split("arena_file ")[1].split()[0]
    before = sorted(os.listdir(state))
    r = cmad("reset", "--state-dir", str(state))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"pid {daemon.proc.pid}" in r.stderr and "refusing to reset" in r.stderr
    assert sorted(os.listdir(state)) == before and os.path.exists(arena)
    assert read(mnt / "chunks/keep/size") == f"{1 << 20}\n"
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    check = cmad("check", "--state-dir", str(state))
    assert check.returncode == 0 and "ok: 1 chunks" in check.stdout


def test_the_serving_daemon_keeps_only_cap_sys_admin_and_none_effective(daemon):
    mnt = daemon()
    caps = capabilities(daemon.proc.pid)
    assert caps["CapEff"] == set() and caps["CapInh"] == set() and caps["CapAmb"] == set()
    assert caps["CapPrm"] == caps["CapBnd"] == {CAP_SYS_ADMIN}
    alloc(mnt, "camera 64K label=p")
    segments = [line.split() for line in read(mnt / "chunks/p/phys").splitlines()]
    assert segments and all(int(addr, 16) > 0 for addr, _ in segments)  # pagemap kept
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    assert mounts_on(mnt) == 0  # the unmount raised CAP_SYS_ADMIN again
    assert "failed to unmount" not in daemon_stderr(daemon.proc)


def unit_capabilities() -> list[str]:
    for line in (ROOT / "systemd/cmad.service").read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return line.split("=", 1)[1].split()
    return []


def test_the_daemon_starts_serves_and_stops_within_the_units_bounding_set(daemon, tmp_path):
    caps = unit_capabilities()
    assert "CAP_SYS_ADMIN" in caps and "CAP_DAC_OVERRIDE" not in caps
    spec = ",".join(["-all"] + ["+" + c.lower().removeprefix("cap_") for c in caps])
    plain_argv = daemon.argv
    daemon.argv = lambda mnt, args: ["setpriv", "--no-new-privs", "--inh-caps=-all",
                                     f"--bounding-set={spec}", *plain_argv(mnt, args)]
    args = ("--state-dir", str(tmp_path / "state"))
    mnt = daemon(*args)
    start = alloc(mnt, "camera 1M label=a").split()[0]
    (mnt / "chunks/a/data").write_bytes(b"hello")
    assert (mnt / "chunks/a/data").read_bytes()[:5] == b"hello"
    assert read(mnt / "chunks/a/phys")
    daemon.crash_and_restart(mnt, *args)  # clears the stale mount within the same set
    assert read(mnt / "chunks/a/start") == start + "\n"
    assert subprocess.run(["sh", "-c", f"echo a > {mnt}/free"]).returncode == 0
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    stderr = daemon_stderr(daemon.proc)
    assert mounts_on(mnt) == 0
    assert "stale FUSE mount" in stderr and "Traceback" not in stderr
    assert "cannot make the mountpoint immutable" not in stderr


def guard_of(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        for child in f.read().split():
            with open(f"/proc/{child}/cmdline", "rb") as c:
                if b"guard.py" in c.read():
                    return int(child)
    raise AssertionError(f"daemon {pid} has no guard")


def test_a_dead_daemons_late_guard_never_aborts_the_next_daemons_mount(daemon, tmp_path):
    args = ("--state-dir", str(tmp_path / "state"))
    mnt = daemon(*args)
    alloc(mnt, "camera 1M label=keep")
    old_guard = guard_of(daemon.proc.pid)
    os.kill(old_guard, signal.SIGSTOP)  # a guard slower than the restart
    try:
        daemon.crash_and_restart(mnt, *args)  # the new mount may reuse the old minor
    finally:
        os.kill(old_guard, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while alive(old_guard) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(old_guard)
    assert read(mnt / "chunks/keep/size") == f"{1 << 20}\n"
    assert daemon.proc.poll() is None


def test_the_bare_mountpoint_refuses_writes_after_a_stop_and_leftovers_are_named(daemon,
                                                                                 tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "free").write_text("left by an older daemon")
    daemon(mountpoint=mnt)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    assert "holds free: while no daemon serves it" in daemon_stderr(daemon.proc)
    with pytest.raises(PermissionError):
        (mnt / "alloc").write_text("x")
    assert os.listdir(mnt) == ["free"]


def test_raised_gives_a_permitted_capability_back_for_a_block_only():
    script = textwrap.dedent("""
        from cmad import privileges as p
        p.drop()
        before = p.current()[0]
        with p.raised(p.CAP_SYS_ADMIN):
            inside = p.current()[0]
        with p.raised(p.CAP_LINUX_IMMUTABLE):  # dropped: not given back
            other = p.current()[0]
        print(sorted(before), sorted(inside), sorted(other), sorted(p.current()[0]))
    """)
    if os.geteuid() != 0:
        pytest.skip("needs root's capabilities")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["[]", f"[{CAP_SYS_ADMIN}]", "[]", "[]"]


def test_replace_root_hands_the_mount_its_tree_before_init():
    from fusefs import Dir, Filesystem

    fs = Filesystem(Dir())
    tree = Dir(mode=0o750)
    fs.replace_root(tree)
    assert fs.root is tree and fs.known(1) and fs.lookup_count(1) == 1
    with pytest.raises(ValueError):
        fs.replace_root(tree.add("sub", Dir()))  # not a root


LIBFUSE_ONLY = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv.pop(1))
    import fusefs.mountapi
    fusefs.mountapi.supported = lambda options: False  # as on a kernel before 6.5
    import fusefs_demo
    sys.exit(fusefs_demo.main(sys.argv[1:]))
""")


def test_without_the_mount_api_a_stale_mount_is_detached_then_mounted(tmp_path):
    require_fuse()
    mnt = tmp_path / "mnt"

    def argv(path):
        return [sys.executable, "-c", LIBFUSE_ONLY, str(ROOT / "tests"), str(path), "--many",
                "3"]

    first = subprocess.Popen(argv(mnt), stderr=subprocess.DEVNULL)
    try:
        wait_for_mount(first, mnt)
        first.kill()
        first.wait()
        with mounted(argv(tmp_path / "other"), tmp_path / "other"):  # a fresh directory
            assert (tmp_path / "other/ro").read_text() == "read only\n"
        second = subprocess.Popen(argv(mnt), stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(mnt / "ro") and time.monotonic() < deadline:
                time.sleep(0.02)  # ENOTCONN from the stale mount until it is replaced
            assert (mnt / "ro").read_text() == "read only\n" and mounts_on(mnt) == 1
        finally:
            second.send_signal(signal.SIGTERM)
            _, err = second.communicate(timeout=20)
        assert second.returncode == 0 and "stale FUSE mount" in err
        assert "mounting through libfuse, after detaching the stale mount" in err
        with pytest.raises(PermissionError):  # detached, sealed, mounted, unmounted
            (mnt / "free").write_text("x")
    finally:
        cleanup(first, str(mnt))


def test_sigterm_while_the_tree_is_built_unmounts_and_exits_0(daemon, tmp_path):
    args = ("--state-dir", str(tmp_path / "state"))
    mnt = daemon(*args)
    fd = os.open(mnt / "alloc", os.O_RDWR)
    try:
        for i in range(3000):  # recovery and the tree build take a while
            os.write(fd, f"@common 4K label=c{i}".encode())
            os.read(fd, 4096)
    finally:
        os.close(fd)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    proc = subprocess.Popen(daemon.argv(mnt, args), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not mounts_on(mnt) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)  # mounted, not yet serving
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM during start-up: unmounted before serving" in err
    assert mounts_on(mnt) == 0
