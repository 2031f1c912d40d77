"""Nothing lost: kill -9 and restart on the same state directory, and refusals."""

import os
import signal
import subprocess
import sys

import pytest

from util.daemon import cmad_check
from util.files import alloc, chunk_facts, read

M = 1 << 20


def test_kill9_and_restart_brings_back_every_acknowledged_chunk(daemon, tmp_path):
    state = tmp_path / "state"
    args = ("--state-dir", str(state))
    mnt = daemon(*args)
    alloc(mnt, "camera/preview 6M/1M label=frame0 movable")
    alloc(mnt, "net 5M bound=8M")
    alloc(mnt, "@dma 12K label=small")
    gone = alloc(mnt, "camera 1M label=gone").split()[0]
    for name in ("frame0", "small"):
        data = mnt / "chunks" / name / "data"
        data.write_bytes(os.urandom(data.stat().st_size))
    assert subprocess.run(["sh", "-c", f"echo gone > {mnt}/free"]).returncode == 0
    fd = os.open(mnt / "alloc", os.O_RDWR)  # a transient chunk whose handle dies with us
    os.write(fd, b"camera 1M transient label=temp")
    before = chunk_facts(mnt)
    assert "temp" in before
    daemon.crash_and_restart(mnt, *args)
    try:
        os.close(fd)  # its daemon is dead: the flush fails, the descriptor goes
    except OSError:
        pass
    after = chunk_facts(mnt)
    temp_id = before.pop("temp").removeprefix("../ids/")  # freed by recovery
    del before[next(n for n, f in before.items() if isinstance(f, dict)
                    and f["id"] == f"{temp_id}\n")]
    assert after == before
    assert gone not in after
    users = sum(int(read(mnt / "regions" / r / "users")) for r in ("video", "common", "dma"))
    assert users == 3
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    result = cmad_check(state)
    assert result.returncode == 0, result.stderr
    assert "ok: 3 chunks" in result.stdout


def test_arena_gone_starts_clean_with_a_warning(daemon, tmp_path):
    state = tmp_path / "state"
    arena = f"/dev/shm/cmad-test-gone-{os.getpid()}"
    args = ("--state-dir", str(state), "--arena-file", arena)
    mnt = daemon(*args)
    alloc(mnt, "camera 1M label=lost")
    daemon.proc.kill()
    daemon.proc.wait()
    os.unlink(arena)  # what a reboot does to /dev/shm
    daemon.crash_and_restart(mnt, *args)
    assert os.listdir(mnt / "chunks") == []
    with open(daemon.proc.stderr_path) as f:
        assert "arena file is gone" in f.read()


def test_shrunk_region_under_live_chunks_refuses_to_start(daemon, tmp_path):
    state = tmp_path / "state"
    mnt = daemon("--state-dir", str(state))
    start = alloc(mnt, "camera 20M label=big").split()[0]
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    r = subprocess.run([sys.executable, "-m", "cmad.daemon.main", "--mountpoint", str(mnt),
                        "--state-dir", str(state), "--regions", "video=8M;common=16M;dma=8M"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert start in r.stderr and "refusing to start" in r.stderr
    assert not os.path.ismount(mnt)
    result = cmad_check(state)  # the journal was not touched
    assert result.returncode == 0 and "ok: 1 chunks" in result.stdout


def test_a_second_daemon_never_touches_a_live_one(daemon, tmp_path):
    state = tmp_path / "state"
    mnt = daemon("--state-dir", str(state))
    alloc(mnt, "camera 1M label=mine")
    arena = read(mnt / "stats").split("arena_file ")[1].split()[0]
    for extra in ((), ("--state-dir", str(tmp_path / "other"))):
        r = subprocess.run([sys.executable, "-m", "cmad.daemon.main", "--mountpoint", str(mnt),
                            *extra], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and str(mnt) in r.stderr
        assert os.path.exists(arena)
        assert read(mnt / "chunks/mine/size") == f"{M}\n"


@pytest.mark.parametrize("change, message", [
    (("--base", "0x80000000"), "base changed from 0x40000000 to 0x80000000"),
    (("--arena-file", "/dev/shm/cmad-test-other-arena"), "arena_file changed from"),
])
def test_moving_the_arena_under_journalled_chunks_refuses(daemon, tmp_path, change, message):
    state = tmp_path / "state"
    mnt = daemon("--state-dir", str(state))
    alloc(mnt, "camera 1M label=keep")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    r = subprocess.run([sys.executable, "-m", "cmad.daemon.main", "--mountpoint", str(mnt),
                        "--state-dir", str(state), *change],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr
    assert not os.path.exists("/dev/shm/cmad-test-other-arena")
    assert cmad_check(state).returncode == 0
