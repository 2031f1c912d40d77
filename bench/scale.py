"""Scale benchmark: one daemon holding 10k, 200k, 1M chunks of 4 KiB.

The state: a sticky region ``r=8G:bf(sticky)``, the state directory and the
arena file on tmpfs (/dev/shm); the daemon takes no hugepages (``--hugepages
free --contiguous virtual``: an 8 GiB pool is not the subject here).  It is built in bulk, not through the
filesystem: an in-process Cma with the Journal as its listener allocates the
N chunks (the same code and rows the daemon writes, in one transaction), the
arena file gets the chunks' pages, and the daemon starts from that journal,
as after a crash.  (Through one ``alloc`` descriptor a 1M state takes ~10
minutes; the result is the same journal.)

Printed side by side per size (medians unless said; nothing is asserted):

- restart: kill -9, then a new daemon until ``allocators`` is readable
  (stale mount cleared, journal recovered, tree built); two rounds; and the
  daemon's CPU time by then (utime + stime: the cost, less sensitive to a
  loaded machine than the wall time, which includes the taskset exec), and
  the CPU time of the journal's recovery alone, run in a separate process;
- alloc latency under load: one client allocates 4 KiB through one ``alloc``
  descriptor (write + read) for ``--seconds`` while two other clients
  allocate and free in a loop (each on its own descriptor): p50, p99, max,
  and how many waited more than 50 ms;
- alloc and free cost, quiet: open+write+read+close of ``alloc`` and
  open+write+close of ``free`` (as bench/fs.py), the daemon and client
  pinned to one CPU;
- daemon memory per chunk: RssAnon (the Python heap; the arena's shared
  pages are not counted) above an empty daemon's, divided by N; after a
  ``find`` over the mount; and after ``echo 2 > /proc/sys/vm/drop_caches``
  makes the kernel FORGET the entries;
- ``cmactl list`` wall time (a subprocess, Python start-up included), and
  one read of ``stats``.

Usage: bench/scale.py [--sizes 10k,200k,1m] [--seconds 10] [--find-max 200k]
                      [--gc tamed|default] [--growth]
(``--gc default`` runs the daemon with CPython's collector untouched, for the
comparison with the tamed one: frozen after start-up and after each full
collection, see cmad/daemon/main.py.  ``--growth`` also allocates each size in
process, chunk by chunk, under both policies, and prints the worst single
allocation: full collections over a growing heap are what stalls a filling
daemon, and a state restored from the journal does not show them.)
Above ``--find-max`` chunks the find walks ``chunks/`` one level only (a
full find of 1M chunk directories is ~13M lookups).  Needs root and FUSE.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from util.mount import cleanup, is_mounted  # noqa: E402

REGIONS = "r=8G:bf(sticky)"
MAP = "*=r"
CHUNK = 4096
DAEMON_CPU = "0"
LOAD_CPU = "1"


def parse_size(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1000, "m": 1000_000}.get(text[-1:], 1)
    return int(text.rstrip("km")) * mult


def recovery_cpu(state_dir: str) -> float:
    """CPU seconds of the journal's recovery alone, in a fresh process, as the
    daemon runs it (no collection during start-up)."""
    code = ("import gc, sys, time; gc.disable()\n"
            "from cmad import Cma\nfrom cmad.daemon.recovery import recover\n"
            "from cmad.store.journal import Journal\n"
            f"cma = Cma({REGIONS!r}, {MAP!r}); journal = Journal(sys.argv[1])\n"
            "t = time.process_time(); recover(cma, journal, arena_survived=True)\n"
            "print(time.process_time() - t)")
    run = subprocess.run(["taskset", "-c", DAEMON_CPU, sys.executable, "-c", code, state_dir],
                         capture_output=True, text=True, check=True, cwd=os.path.join(HERE, ".."))
    return float(run.stdout)


GROWTH = """
import gc, sys, time
from cmad import Cma
from cmad.daemon.main import settle_gc
n, policy = int(sys.argv[1]), sys.argv[2]
if policy == "tamed":
    settle_gc()
pause, began = [0.0, 0.0], [0.0, 0.0]
def timer(phase, info):  # the longest full collection, wall and CPU time
    now = (time.perf_counter(), time.process_time())
    if info["generation"] == 2 and phase == "start":
        began[:] = now
    elif info["generation"] == 2:
        pause[:] = [max(p, n - b) for p, n, b in zip(pause, now, began)]
gc.callbacks.insert(0, timer)
cma = Cma({regions!r}, {map!r})
clock, worst, slow = time.perf_counter, 0.0, 0
for i in range(n):
    t = clock()
    cma.alloc_from("r", 4096)
    d = clock() - t
    worst = max(worst, d)
    slow += d > 0.05
print(worst, slow, gc.get_stats()[2]["collections"], *pause)
"""


def growth_stalls(n: int, policy: str) -> tuple[float, int, int, float, float]:
    """Allocate n chunks in process, one by one, as a daemon fills up: the worst
    single allocation, how many took > 50 ms, how many full collections ran and
    the longest of them (wall, CPU)."""
    code = GROWTH.format(regions=REGIONS, map=MAP)
    run = subprocess.run(["taskset", "-c", DAEMON_CPU, sys.executable, "-c", code, str(n),
                          policy], capture_output=True, text=True, check=True,
                         cwd=os.path.join(HERE, ".."))
    worst, slow, full, wall, cpu = run.stdout.split()
    return float(worst), int(slow), int(full), float(wall), float(cpu)


def build_state(n: int, state_dir: str, arena_file: str) -> None:
    """N journalled chunks, as the daemon would have recorded them, and their pages."""
    from cmad import Cma
    from cmad.store.journal import Journal

    cma = Cma(REGIONS, MAP)
    journal = Journal(state_dir)
    cma.listeners.append(journal)
    journal.db.execute("BEGIN")
    for _ in range(n):
        cma.alloc_from("r", CHUNK)
    journal.db.execute("COMMIT")
    journal.set(arena_file=arena_file, regions=REGIONS, base=cma.base,
                arena_size=cma.arena_size)
    journal.close()
    fd = os.open(arena_file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, cma.arena_size)
    if n:
        os.posix_fallocate(fd, 0, n * CHUNK)  # chunks sit at the region's start
    os.close(fd)


class Daemon:
    def __init__(self, mnt: str, state_dir: str, arena_file: str, gc: str):
        self.mnt, self.state_dir, self.arena_file = mnt, state_dir, arena_file
        self.env = dict(os.environ, CMAD_GC=gc)
        self.proc: subprocess.Popen | None = None
        self.log = open(os.path.join(os.path.dirname(state_dir), "daemon.log"), "ab")

    def start(self) -> float:
        """Start and return the seconds until ``allocators`` reads."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            ["taskset", "-c", DAEMON_CPU, sys.executable, "-m", "cmad.daemon.main",
             "--mountpoint", self.mnt, "--regions", REGIONS, "--map", MAP,
             "--state-dir", self.state_dir, "--arena-file", self.arena_file,
             "--log-level", "warning", "--hugepages", "free", "--contiguous", "virtual"],
            env=self.env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=self.log, cwd=os.path.join(HERE, ".."))
        path = os.path.join(self.mnt, "allocators")
        while True:
            try:
                with open(path) as f:
                    if f.read():
                        return time.perf_counter() - t0
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited {self.proc.returncode}; see {self.log.name}")
            time.sleep(0.005)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def cpu(self) -> float:
        """CPU seconds the daemon used so far: start-up cost on a loaded machine."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_anon(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc is not None:
            cleanup(self.proc, self.mnt)


def alloc(mnt: str) -> bytes:
    fd = os.open(f"{mnt}/alloc", os.O_RDWR)
    os.write(fd, b"@r 4K")
    line = os.read(fd, 4096)
    os.close(fd)
    return line.split(b" ", 1)[0]


def free(mnt: str, start: bytes) -> None:
    fd = os.open(f"{mnt}/free", os.O_WRONLY)
    os.write(fd, start)
    os.close(fd)


def churn(mnt: str, stop_at: float) -> None:
    """Another client: allocate and free in a loop on its own descriptor."""
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    fd = os.open(f"{mnt}/alloc", os.O_RDWR)
    held: list[bytes] = []
    while time.monotonic() < stop_at:
        os.write(fd, b"@r 4K")
        held.append(os.read(fd, 4096).split(b" ", 1)[0])
        if len(held) > 32:
            free(mnt, held.pop(0))
    for start in held:
        free(mnt, start)
    os.close(fd)


def latency_under_load(mnt: str, seconds: float) -> tuple[list[float], list[bytes]]:
    stop_at = time.monotonic() + seconds
    others = [multiprocessing.Process(target=churn, args=(mnt, stop_at)) for _ in range(2)]
    for p in others:
        p.start()
    os.sched_setaffinity(0, {int(DAEMON_CPU)})
    fd = os.open(f"{mnt}/alloc", os.O_RDWR)
    waits, starts = [], []
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        os.write(fd, b"@r 4K")
        line = os.read(fd, 4096)
        waits.append(time.perf_counter() - t0)
        starts.append(line.split(b" ", 1)[0])
    os.close(fd)
    for p in others:
        p.join()
    return waits, starts


def quiet_costs(mnt: str, rounds: int = 2000) -> tuple[float, float]:
    a, f = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        start = alloc(mnt)
        t1 = time.perf_counter()
        free(mnt, start)
        t2 = time.perf_counter()
        if i >= rounds // 10:
            a.append(t1 - t0)
            f.append(t2 - t1)
    return statistics.median(a), statistics.median(f)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def settle_rss(daemon: Daemon, wait: float = 1.0) -> int:
    time.sleep(wait)
    return daemon.rss_anon()


def measure(n: int, args: argparse.Namespace, empty_rss: int | None) -> dict:
    top = tempfile.mkdtemp(prefix="cmad-scale-", dir="/dev/shm")
    mnt = tempfile.mkdtemp(prefix="cmad-scale-mnt-")
    state_dir, arena_file = os.path.join(top, "state"), os.path.join(top, "arena")
    out: dict = {"n": n}
    t0 = time.perf_counter()
    build_state(n, state_dir, arena_file)
    out["build"] = time.perf_counter() - t0
    out["recovery cpu"] = recovery_cpu(state_dir)
    daemon = Daemon(mnt, state_dir, arena_file, args.gc)
    try:
        out["first start"] = daemon.start()
        restarts, cpus = [], []
        for _ in range(2):
            daemon.kill9()
            restarts.append(daemon.start())
            cpus.append(daemon.cpu())
        out["restart"] = statistics.median(restarts)
        out["restart cpu"] = statistics.median(cpus)
        out["rss"] = settle_rss(daemon)
        subprocess.run(["taskset", "-apc", DAEMON_CPU, str(daemon.proc.pid)], check=True,
                       capture_output=True)
        out["stats"] = min(timed(["cat", f"{mnt}/stats"]) for _ in range(5))
        out["list"] = timed([sys.executable, "-m", "cmad.clients.cmactl", "--mountpoint", mnt, "list"])
        out["alloc"], out["free"] = quiet_costs(mnt)
        waits, starts = latency_under_load(mnt, args.seconds)
        out["p50"], out["p99"], out["max"] = pct(waits, .5), pct(waits, .99), max(waits)
        out["over50"], out["samples"] = sum(w > 0.05 for w in waits), len(waits)
        t0 = time.perf_counter()
        for start in starts:
            free(mnt, start)
        out["free under"] = (time.perf_counter() - t0) / max(len(starts), 1)
        out["rss"] = settle_rss(daemon)
        deep = n <= args.find_max
        find = ["find", mnt] if deep else ["find", f"{mnt}/chunks", "-maxdepth", "1"]
        out["find"] = "full" if deep else "chunks/ 1 level"
        out["find time"] = timed(find)
        out["rss find"] = settle_rss(daemon)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        out["rss forget"] = settle_rss(daemon, 3.0)
    finally:
        daemon.stop()
        shutil.rmtree(top, ignore_errors=True)
        if not is_mounted(mnt):
            os.rmdir(mnt)
    base = empty_rss or 0
    for key in ("rss", "rss find", "rss forget"):
        out[key + "/chunk"] = (out[key] - base) / n if n else 0
    return out


ROWS = [
    ("restart after kill -9 (s)", "restart", "{:.2f}"),
    ("  daemon CPU time until then (s)", "restart cpu", "{:.2f}"),
    ("  of which journal recovery (CPU s)", "recovery cpu", "{:.2f}"),
    ("first start from journal (s)", "first start", "{:.2f}"),
    ("alloc p50 under load (us)", "p50", "{:.0f}", 1e6),
    ("alloc p99 under load (us)", "p99", "{:.0f}", 1e6),
    ("alloc max under load (ms)", "max", "{:.1f}", 1e3),
    ("requests > 50 ms / samples", None, None),
    ("alloc open+write+read+close (us)", "alloc", "{:.0f}", 1e6),
    ("free open+write+close (us)", "free", "{:.0f}", 1e6),
    ("free after load (us each)", "free under", "{:.0f}", 1e6),
    ("RssAnon per chunk (B)", "rss/chunk", "{:.0f}"),
    ("  after find (B)", "rss find/chunk", "{:.0f}"),
    ("  after the kernel forgets (B)", "rss forget/chunk", "{:.0f}"),
    ("find (s)", "find time", "{:.1f}"),
    ("cmactl list (s)", "list", "{:.2f}"),
    ("stats read (ms)", "stats", "{:.1f}", 1e3),
]


def table(results: list[dict]) -> None:
    head = f"{'chunks':<34}" + "".join(f"{r['n']:>14,}" for r in results)
    print(head)
    for label, key, fmt, *scale in ROWS:
        if key is None:
            cells = [f"{r['over50']}/{r['samples']}" for r in results]
        else:
            cells = [fmt.format(r[key] * (scale[0] if scale else 1)) for r in results]
        print(f"{label:<34}" + "".join(f"{c:>14}" for c in cells))
    print(f"{'find walked':<34}" + "".join(f"{r['find']:>14}" for r in results))
    if len(results) > 1:
        small, big = results[0], results[-1]
        print(f"ratios {big['n']:,} / {small['n']:,}: p99 {big['p99'] / small['p99']:.2f}x, "
              f"alloc {big['alloc'] / small['alloc']:.2f}x, free {big['free'] / small['free']:.2f}x")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # daemons cleaned up on the way out
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10k")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--find-max", default="200k")
    p.add_argument("--growth", action="store_true",
                   help="also grow each size in process under both collector policies")
    p.add_argument("--gc", default="tamed", choices=("tamed", "default"),
                   help="default: the daemon keeps CPython's collector as it is (CMAD_GC)")
    args = p.parse_args()
    args.find_max = parse_size(args.find_max)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    print(f"scale bench: {REGIONS}, chunks of {CHUNK} B built in bulk in the journal; "
          f"daemon and measuring client on CPU {DAEMON_CPU}, two churning clients on CPU "
          f"{LOAD_CPU}; {args.seconds:.0f} s under load; garbage collector {args.gc}", flush=True)
    empty = measure(0, argparse.Namespace(seconds=1.0, find_max=0, gc=args.gc), None)["rss"]
    print(f"empty daemon RssAnon {empty / 2**20:.1f} MiB", flush=True)
    results = []
    for n in sizes:
        results.append(measure(n, args, empty))
        print(f"  {n:,} chunks measured (state built in {results[-1]['build']:.1f} s)",
              flush=True)
    table(results)
    if args.growth:
        print("\ngrowing in process (the core allocating n chunks one by one, as a daemon "
              "filling up through alloc): worst allocation, allocations > 50 ms, full "
              "collections, the longest full collection (wall / CPU)")
        for n in sizes:
            for policy in ("default", "tamed"):
                worst, slow, full, wall, cpu = growth_stalls(n, policy)
                print(f"  {n:>9,} chunks, collector {policy:<8} worst {worst * 1e3:7.1f} ms, "
                      f"{slow:4d} over 50 ms, {full:3d} full collections, longest "
                      f"{wall * 1e3:6.1f} / {cpu * 1e3:6.1f} ms", flush=True)


if __name__ == "__main__":
    main()
