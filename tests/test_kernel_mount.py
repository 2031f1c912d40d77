"""Tier 3: the kernel's views through a real mount: files, bad writes, trace_pipe
followed by cat, a reader that loses events, a restart, and a kernel script."""

import errno
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from util.files import alloc, eventually, read, sh, write_errno
from util.daemon import shm_arena

REGIONS = "video=32M:bf;common=16M:buddy;dma=8M:bitmap(order_per_bit=2)"
SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "cma-report.sh"


def kernel(mnt, *parts) -> pathlib.Path:
    return mnt.joinpath("kernel", "sys", "kernel", *parts)


def pages(path) -> int:
    text = read(path)
    assert text.endswith("\n") and text.count("\n") == 1
    return int(text)


def test_files_and_writes_through_the_mount(daemon):
    mnt = daemon("--regions", REGIONS)
    video = kernel(mnt, "debug", "cma", "video")
    start = int(read(mnt / "regions/video/start"), 16)
    assert pages(video / "base_pfn") == start >> 12 and pages(video / "count") == 8192
    assert sh(f"echo 16 > {video}/alloc && echo 4 > {video}/free").returncode == 0
    assert pages(video / "used") == 12
    assert os.readlink(kernel(mnt, "debug", "cma", "cma-0")) == "video"
    assert sorted(os.listdir(kernel(mnt, "mm", "cma"))) == ["common", "dma", "video"]
    sysfs = kernel(mnt, "mm", "cma", "video")
    assert (pages(sysfs / "alloc_pages_success"), pages(sysfs / "release_pages_success")) \
        == (16, 4)
    for bad in (b"abc\n", b"0\n", b"8193\n"):
        assert write_errno(video / "alloc", bad) == errno.EINVAL
        assert write_errno(video / "free", bad) == errno.EINVAL
    assert pages(video / "used") == 12
    chunk = [line for line in read(mnt / "chunkinfo").splitlines() if " cma_debug " in line]
    assert len(chunk) == 1 and " 49152 video cma_debug " in chunk[0]


def test_cat_follows_the_trace_pipe(daemon):
    mnt = daemon("--regions", REGIONS)
    tracing = kernel(mnt, "tracing")
    assert sh(f"echo 1 > {tracing}/events/cma/enable").returncode == 0
    # SIGINT as a terminal's Ctrl-C sends it (a test run in the background ignores it)
    cat = subprocess.Popen(["cat", str(tracing / "trace_pipe")], stdout=subprocess.PIPE,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(0.2)
        line = alloc(mnt, "camera 64K label=traced")
        start = int(line.split()[0], 16)
        assert sh(f"echo traced > {mnt}/free").returncode == 0
        got = []
        os.set_blocking(cat.stdout.fileno(), False)
        assert eventually(lambda: got.append(cat.stdout.read() or b"")
                          or b"cma_release" in b"".join(got))
        out = b"".join(got)
    finally:
        cat.send_signal(signal.SIGINT)                 # Ctrl-C ends it
        assert cat.wait(timeout=10) != 0
    text = out.decode()
    me = f"-{os.getpid():<7} [000] ....."
    assert f"{me}" in text
    assert f"cma_alloc_finish: name=video pfn={start >> 12:#x} " in text
    assert "count=16 align=0 errorno=0" in text
    assert f"cma_release: name=video pfn={start >> 12:#x} " in text


def test_a_reader_that_falls_behind_is_told_what_it_lost(daemon):
    mnt = daemon("--regions", REGIONS)
    tracing = kernel(mnt, "tracing")
    assert sh(f"echo 1 > {tracing}/events/cma/cma_alloc_start/enable").returncode == 0
    fd = os.open(tracing / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
    try:
        try:
            os.read(fd, 4096)
        except BlockingIOError:
            pass
        hook = os.open(kernel(mnt, "debug", "cma", "common", "alloc"), os.O_WRONLY)
        hook_free = os.open(kernel(mnt, "debug", "cma", "common", "free"), os.O_WRONLY)
        for _ in range(4200):                           # the ring holds 4096
            os.write(hook, b"1")
            os.write(hook_free, b"1")
        os.close(hook), os.close(hook_free)
        first = os.read(fd, 65536).decode().splitlines()
    finally:
        os.close(fd)
    assert first[0] == "CPU:0 [LOST 104 EVENTS]"
    assert "cma_alloc_start: name=common request_count=1 " in first[1]


def test_counters_and_the_hook_list_after_a_restart(daemon, tmp_path):
    args = ("--state-dir", str(tmp_path / "state"), "--regions", REGIONS,
            *shm_arena(daemon, tmp_path))
    mnt = daemon(*args)
    video, sysfs = kernel(mnt, "debug", "cma", "video"), kernel(mnt, "mm", "cma", "video")
    assert sh(f"echo 16 > {video}/alloc && echo 8 > {video}/alloc"
              f" && echo 10 > {video}/free").returncode == 0
    kept = [line for line in read(mnt / "chunkinfo").splitlines() if "cma_debug" in line]
    assert len(kept) == 1 and " 57344 video " in kept[0]     # 16 pages less their head 2
    daemon.crash_and_restart(mnt, *args)
    assert read(mnt / "chunkinfo").splitlines() == kept
    success, release = pages(sysfs / "alloc_pages_success"), pages(sysfs / "release_pages_success")
    assert (success, release) == (14, 0)     # seeded with what recovery put back
    stats = dict(line.split() for line in read(mnt / "regions/video/stats").splitlines())
    assert (success - release) * 4096 == int(stats["bytes_allocated"])
    assert sh(f"echo 100 > {video}/free").returncode == 0     # the list came back too
    assert pages(video / "used") == 0 and pages(sysfs / "release_pages_success") == 14


def test_a_script_written_for_the_kernel_runs_against_the_mount(daemon):
    mnt = daemon("--regions", REGIONS)
    alloc(mnt, "@common 1M")
    env = dict(os.environ, ROOT=str(mnt / "kernel"), AREA="video")
    result = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("CMA in use: 256 pages (1024 kB)\n")
    assert "%-12s %10s %10s %10s %10s %10s" % ("common", 4096, 3840, 256, 0, 0) in out
    assert "video: used 0 -> 16 pages" in out
    assert "trace: 1 allocations, 2 releases" in out
    assert pages(kernel(mnt, "debug", "cma", "video", "used")) == 0
    assert read(kernel(mnt, "tracing", "events", "cma", "enable")) == "0\n"


def test_cmactl_trace_follows_with_human_sizes_until_ctrl_c(daemon):
    mnt = daemon("--regions", REGIONS)
    argv = [sys.executable, "-m", "cmad.clients.cmactl", "--mountpoint", str(mnt), "trace"]
    every = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    errors = subprocess.Popen(argv + ["--errors", "--region", "common"],
                              stdout=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    enable = kernel(mnt, "tracing", "events", "cma", "enable")
    assert eventually(lambda: read(enable) == "1\n")        # switched on for the run
    time.sleep(0.3)
    alloc(mnt, "camera 6M label=big")
    assert write_errno(mnt / "alloc", b"@common 64M") == errno.ENOMEM
    assert write_errno(mnt / "alloc", b"@video 64M") == errno.ENOMEM
    assert sh(f"echo big > {mnt}/free").returncode == 0
    time.sleep(0.5)
    for proc in (every, errors):
        proc.send_signal(signal.SIGINT)                     # Ctrl-C ends it, status 0
        assert proc.wait(timeout=10) == 0
    out, only = every.stdout.read(), errors.stdout.read()
    assert read(enable) == "0\n"                            # and off again
    assert re.search(r"\S+-\d+ asks    video 6\.0 MiB align 4\.0 KiB, 32\.0 MiB free", out)
    assert re.search(r"got     video 6\.0 MiB at 0x[0-9a-f]+\n", out)
    assert "FAILED  common 64.0 MiB: ENOMEM" in out and "freed   video 6.0 MiB at 0x" in out
    assert only.splitlines() == [line for line in out.splitlines()
                                 if "FAILED  common" in line]


def test_a_waiting_reader_does_not_hold_up_a_stop(daemon):
    """SIGTERM ends a read the daemon holds (pyfuse3 waits for every request
    in flight, and the kernel would wait the read out): before, neither the
    daemon nor the reader ever ended."""
    mnt = daemon("--regions", REGIONS)
    cat = subprocess.Popen(["cat", str(kernel(mnt, "tracing", "trace_pipe"))],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        assert cat.poll() is None                           # waiting for events
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=20) == 0
        assert cat.wait(timeout=10) != 0
    finally:
        if cat.poll() is None:
            cat.kill()
