"""Through the kernel, across restarts: runtime allocator changes, a full state
disk, addresses from 2^63 up, and what a client can make the daemon log."""

import errno
import os
import signal
import subprocess

import pytest

from util.mount import daemon_stderr
from util.files import alloc, eventually, read, sh, write_errno
from util.daemon import cmad_check, shm_arena

REGIONS = "video=32M:bf;common=16M:buddy;dma=8M:bitmap(order_per_bit=2)"


def stop(daemon) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0


def labels(mnt) -> list[str]:
    return sorted(n for n in os.listdir(mnt / "chunks") if os.path.islink(mnt / "chunks" / n))


def test_alloc_attribute_written_at_runtime_survives_a_clean_restart(daemon, tmp_path):
    state = tmp_path / "state"
    arena = shm_arena(daemon, tmp_path)
    args = ("--state-dir", str(state), "--regions", REGIONS, *arena)
    mnt = daemon(*args)
    assert sh(f"echo bf > {mnt}/regions/dma/alloc").returncode == 0
    one = alloc(mnt, "@dma 4K label=one").split()[0]
    two = alloc(mnt, "@dma 4K label=two").split()[0]
    assert int(two, 16) == int(one, 16) + 4096  # inside one block of the bitmap's
    stop(daemon)
    daemon.crash_and_restart(mnt, *args)  # used to fail: "overlaps another chunk"
    assert read(mnt / "regions/dma/alloc") == "bf\n"
    assert (read(mnt / "chunks/one/start"), read(mnt / "chunks/two/start")) == (
        f"{one}\n", f"{two}\n")
    assert sh(f"echo one > {mnt}/free && echo two > {mnt}/free").returncode == 0
    stop(daemon)
    changed = REGIONS.replace("bitmap(order_per_bit=2)", "buddy")
    daemon.crash_and_restart(mnt, "--state-dir", str(state), "--regions", changed, *arena)
    assert read(mnt / "regions/dma/alloc") == "buddy\n"  # the configuration's later word
    stop(daemon)
    result = cmad_check(state)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs for the state directory, unmounted after the daemon stopped."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "cmad-test-disk",
                        str(disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk) -> None:
    fd = os.open(disk / "fill", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (1 << 16, 1 << 12, 1):
            try:
                while os.write(fd, b"\0" * block):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_full_state_disk_refuses_allocations_and_never_leaks_frees(small_disk, daemon,
                                                                  tmp_path):
    args = ("--state-dir", str(small_disk / "state"), *shm_arena(daemon, tmp_path))
    mnt = daemon(*args)
    keep = alloc(mnt, "camera 1M label=keep").split()[0]
    alloc(mnt, "camera 1M label=a")
    fd = os.open(mnt / "alloc", os.O_RDWR)
    os.write(fd, b"camera 1M transient label=t")
    fill(small_disk)
    assert write_errno(mnt / "alloc", b"camera 1M label=new") == errno.ENOSPC
    assert write_errno(mnt / "free", b"a") == 0  # used to be EIO
    os.close(fd)  # the transient chunk's release: used to leak until a restart
    assert eventually(lambda: labels(mnt) == ["keep"])
    assert read(mnt / "regions/video/users") == "1\n"
    assert sorted(os.listdir(mnt / "chunks")) == [keep, "keep"]
    os.unlink(small_disk / "fill")
    assert eventually(lambda: "frees that waited" in daemon_stderr(daemon.proc), timeout=30)
    alloc(mnt, "camera 1M label=new")
    daemon.crash_and_restart(mnt, *args)  # kill -9: only the journal speaks now
    assert labels(mnt) == ["keep", "new"]


def test_base_past_2_63_with_a_state_dir(daemon, tmp_path):
    args = ("--state-dir", str(tmp_path / "state"), "--base", "0x8000000000000000",
            *shm_arena(daemon, tmp_path))
    mnt = daemon(*args)
    start = alloc(mnt, "camera 1M label=high").split()[0]  # used to be EIO
    assert int(start, 16) >= 1 << 63
    daemon.crash_and_restart(mnt, *args)
    assert read(mnt / "chunks/high/start") == f"{start}\n"


def test_a_client_cannot_flood_or_bloat_the_log(daemon, tmp_path):
    mnt = daemon("--state-dir", str(tmp_path / "state"), *shm_arena(daemon, tmp_path))
    for _ in range(60):
        with pytest.raises(PermissionError):
            os.chmod(mnt / "map", 0o600)  # EPERM, logged at WARNING
    assert write_errno(mnt / "alloc", b"x" * 4000 + b" 4K") == errno.EINVAL
    assert write_errno(mnt / "alloc", b"camera " + b"9" * 4000) == errno.EINVAL
    assert write_errno(mnt / "free", b"L" * 4000) == errno.ENOENT
    assert write_errno(mnt / "alloc", b"camera 4K") == 0  # a write after them still logs
    lines = daemon_stderr(daemon.proc).splitlines()
    assert max(map(len, lines)) < 600
    eperm = [line for line in lines if "EPERM" in line]
    assert 1 <= len(eperm) <= 10, eperm  # one burst, the rest suppressed
    assert sum("no chunk labelled" in line for line in lines) == 1  # one refusal, one line
