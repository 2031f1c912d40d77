"""Client benchmark: the zero-copy view against memcpy, and ``cmactl list`` on 10,000 chunks.

Data: a 64 MiB buffer from `cmad.clients.client`; GB/s writing into and reading out
of ``buf.view`` (one slice assignment each: memcpy into and out of the
arena's shared mapping) next to memcpy between two private 64 MiB buffers,
in the same run.  Rounds alternate view-write, view-read, private memcpy;
the first rounds are warm-up; medians.  Target: the view at least 0.8 of
memcpy.

Listing: ``cmactl list`` (a subprocess, as a user runs it, Python start-up
included) with 10,000 live chunks, unpinned as a user runs it: the first run
(the daemon creates each chunk's attribute files on first look) and a second.
Target: at most 2 s.  Prints, never asserts.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from util.mount import mounted  # noqa: E402

from cmad.clients.client import CHUNK_TABLE, Client  # noqa: E402

M = 1 << 20
SIZE = 64 * M
ROUNDS = 12
WARMUP = 2
CHUNKS = 10_000


def gbps(seconds: list[float]) -> float:
    return SIZE / statistics.median(seconds[WARMUP:]) / 1e9


def throughput(client: Client) -> None:
    with client.alloc_from("video", SIZE, label="bench") as buf:
        # memoryview to memoryview is one memcpy; `bytearray[:] = view` is
        # not (CPython copies through a temporary: ~1.3 GB/s either way).
        view = buf.view
        src = memoryview(os.urandom(M) * (SIZE // M))
        sink = memoryview(bytearray(SIZE))
        a, b = memoryview(bytearray(src)), memoryview(bytearray(SIZE))
        write, read, copy = [], [], []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            view[:] = src
            t1 = time.perf_counter()
            sink[:] = view
            t2 = time.perf_counter()
            b[:] = a
            t3 = time.perf_counter()
            write.append(t1 - t0), read.append(t2 - t1), copy.append(t3 - t2)
        assert sink == src and b == a  # the bytes went through
        del view
    w, r, c = gbps(write), gbps(read), gbps(copy)
    print(f"  view write 64 MiB   {w:6.2f} GB/s   memcpy {c:6.2f} GB/s   ratio {w / c:5.2f}"
          "   (target >= 0.8)")
    print(f"  view read  64 MiB   {r:6.2f} GB/s   memcpy {c:6.2f} GB/s   ratio {r / c:5.2f}"
          "   (target >= 0.8)")


def fill(mnt: str, count: int) -> None:
    """``count`` 4 KiB chunks in the pool region, one alloc handle, a quarter labelled."""
    fd = os.open(f"{mnt}/alloc", os.O_RDWR)
    try:
        for i in range(count):
            label = f" label=c{i}" if i % 4 == 0 else ""
            os.write(fd, f"@pool 4K{label}".encode())
            os.read(fd, 4096)
    finally:
        os.close(fd)


def listing(mnt: str, client: Client) -> None:
    t0 = time.perf_counter()
    fill(mnt, CHUNKS)
    print(f"  {CHUNKS} chunks allocated in {time.perf_counter() - t0:.1f} s")
    argv = [sys.executable, "-m", "cmad.clients.cmactl", "--mountpoint", mnt]
    start = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(argv + ["regions", "--json"], check=True, stdout=subprocess.DEVNULL)
        start.append(time.perf_counter() - t0)
    times = []
    for _ in range(2):  # the first run also makes the daemon build each chunk's files
        t0 = time.perf_counter()
        out = subprocess.run(argv + ["list"], check=True, capture_output=True).stdout
        times.append(time.perf_counter() - t0)
        assert out.count(b"\n") == CHUNKS + 2
    t0 = time.perf_counter()
    assert len(client.chunks()) == CHUNKS
    inproc = time.perf_counter() - t0
    how = f"from the daemon's {CHUNK_TABLE} table, streamed"
    print(f"  cmactl regions --json  {statistics.median(start) * 1e3:6.0f} ms (start-up)")
    print(f"  cmactl list, {CHUNKS} chunks  first {times[0]:6.2f} s, again {times[1]:6.2f} s"
          f"   (target <= 2 s; {how})")
    print(f"  Client.chunks() in process   {inproc:6.2f} s")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mnt = f"{tmp}/cmad"
        argv = [sys.executable, "-m", "cmad.daemon.main", "--mountpoint", mnt, "--regions",
                "video=80M:bf;pool=48M:bf", "--map", "*=video", "--log-level", "warning"]
        with mounted(argv, mnt):
            client = Client(mnt)
            print(f"client: {ROUNDS} rounds ({WARMUP} warm-up), medians")
            throughput(client)
            listing(mnt, client)


if __name__ == "__main__":
    main()
