"""Filesystem benchmark: cmad against a do-nothing pyfuse3 filesystem (the floor),
and ``data`` throughput against memcpy into the same chunk's mapping (the ceiling).

Latency: one allocation is open(alloc) + write + read + close; one free is
open(free) + write + close.  The client and both daemons are pinned to CPU 0
(FUSE round trips are bimodal across CPUs, see BENCHMARKING.md); iterations
alternate cmad, floor, cmad, floor; the first 10% are warm-up; medians.
Prints ratios, never asserts.
"""

from __future__ import annotations

import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from util.mount import mounted  # noqa: E402

M = 1 << 20
CPU = 0
ITER = 2000


def pin(proc: subprocess.Popen) -> None:
    subprocess.run(["taskset", "-apc", str(CPU), str(proc.pid)], check=True,
                   capture_output=True)


def one_alloc(mnt: str, request: bytes) -> tuple[float, float]:
    t0 = time.perf_counter()
    fd = os.open(f"{mnt}/alloc", os.O_RDWR)
    os.write(fd, request)
    line = os.read(fd, 4096)
    os.close(fd)
    t1 = time.perf_counter()
    fd = os.open(f"{mnt}/free", os.O_WRONLY)
    os.write(fd, line.split(b" ", 1)[0])
    os.close(fd)
    return t1 - t0, time.perf_counter() - t1


def latency(cmad: str, floor: str) -> None:
    a_cmad, f_cmad, a_floor, f_floor = [], [], [], []
    for i in range(ITER):
        a, f = one_alloc(cmad, b"camera 64K")
        b, g = one_alloc(floor, b"camera 64K")
        if i >= ITER // 10:
            a_cmad.append(a), f_cmad.append(f), a_floor.append(b), f_floor.append(g)
    for what, mine, ref in (("alloc (open+write+read+close)", a_cmad, a_floor),
                            ("free  (open+write+close)", f_cmad, f_floor)):
        m, r = statistics.median(mine) * 1e6, statistics.median(ref) * 1e6
        print(f"  {what:<32} cmad {m:7.1f} us   floor {r:7.1f} us   ratio {m / r:5.2f}x")


def throughput(mnt: str) -> None:
    fd = os.open(f"{mnt}/alloc", os.O_RDWR)
    os.write(fd, b"@video 64M label=bench")
    os.read(fd, 4096)
    os.close(fd)
    path, offset, length = open(f"{mnt}/chunks/bench/mmap").read().split()
    length = int(length)
    afd = os.open(path, os.O_RDWR)
    mapping = mmap.mmap(afd, length, offset=int(offset))
    os.close(afd)
    src = os.urandom(M) * (length // M)
    sink = bytearray(length)
    w, r, c = [], [], []
    dfd = os.open(f"{mnt}/chunks/bench/data", os.O_RDWR)
    for _ in range(7):
        t0 = time.perf_counter()
        for off in range(0, length, M):
            os.pwrite(dfd, src[off:off + M], off)
        t1 = time.perf_counter()
        view = memoryview(sink)
        for off in range(0, length, M):
            os.preadv(dfd, [view[off:off + M]], off)
        t2 = time.perf_counter()
        mapping[:] = src
        t3 = time.perf_counter()
        w.append(length / (t1 - t0)), r.append(length / (t2 - t1)), c.append(length / (t3 - t2))
    os.close(dfd)
    assert bytes(sink) == src  # the bytes went through
    mapping.close()
    cw, cr, cc = (statistics.median(x[1:]) / 1e9 for x in (w, r, c))
    print(f"  data write 1 MiB blocks  {cw:6.2f} GB/s   memcpy {cc:6.2f} GB/s   ratio {cw / cc:5.2f}")
    print(f"  data read  1 MiB blocks  {cr:6.2f} GB/s   memcpy {cc:6.2f} GB/s   ratio {cr / cc:5.2f}")


def main() -> None:
    os.sched_setaffinity(0, {CPU})
    with tempfile.TemporaryDirectory() as tmp:
        floor_mnt = f"{tmp}/floor"
        with mounted([sys.executable, os.path.join(HERE, "nullfs.py"), floor_mnt],
                     floor_mnt) as floor:
            pin(floor)
            print(f"fs: {ITER} iterations, client and daemons pinned to CPU {CPU}, medians")
            for journal in (False, True):
                cmad_mnt = f"{tmp}/cmad{int(journal)}"
                argv = [sys.executable, "-m", "cmad.daemon.main", "--mountpoint", cmad_mnt,
                        "--regions", "video=128M:bf;common=16M:buddy", "--log-level", "warning"]
                if journal:
                    argv += ["--state-dir", f"{tmp}/state"]
                with mounted(argv, cmad_mnt) as cmad:
                    pin(cmad)
                    print(f" journal {'on (WAL, synchronous=NORMAL)' if journal else 'off'}:")
                    latency(cmad_mnt, floor_mnt)
                    if not journal:
                        throughput(cmad_mnt)


if __name__ == "__main__":
    main()
