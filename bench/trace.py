"""Trace events benchmark (SPEC 3a): what the kernel's views cost an allocation.

1. alloc+free through the mount (open+write+read+close of ``alloc``, then
   open+write+close of ``free``), three daemons side by side, iterations
   alternating among them (each first in turn), first 10% warm-up, medians:
     today    the code of ``--today`` (default: where this branch left main,
              ``git merge-base HEAD main``, so nothing but this work differs),
              extracted with ``git archive`` into a temporary directory
     off      this tree, every event disabled
     reader   this tree, every event enabled, one ``cat trace_pipe`` attached
   Client, daemons and reader pinned to CPU 0 (as bench/fs.py).
2. In process (the core alone, no FUSE): alloc+free pairs per second with
   today's code, with every event off, and with every event on and no
   reader, each in its own process pinned to CPU 1, rounds alternating
   (each first in turn), CPU time (the machine may be shared), medians: the cost
   of a disabled event without the FUSE round trip's noise around it.
3. A reader stopped with SIGSTOP for --stop seconds while 4 clients loop
   alloc+free, against the same load with events on and no reader: the
   latency of every request (p50, p99, max) and the events the reader is
   told it lost once it runs again.

Prints figures and ratios, never asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from util.mount import mounted  # noqa: E402

CPU = 0
REGIONS = "video=128M:bf;common=16M:buddy"
TRACING = ("kernel", "sys", "kernel", "tracing")


def pin(pid: int) -> None:
    subprocess.run(["taskset", "-apc", str(CPU), str(pid)], check=True, capture_output=True)


def pair(mnt: str) -> float:
    """One alloc+free through the mount, in seconds."""
    t0 = time.perf_counter()
    fd = os.open(f"{mnt}/alloc", os.O_RDWR)
    os.write(fd, b"camera 64K")
    line = os.read(fd, 4096)
    os.close(fd)
    fd = os.open(f"{mnt}/free", os.O_WRONLY)
    os.write(fd, line.split(b" ", 1)[0])
    os.close(fd)
    return time.perf_counter() - t0


def tracing(mnt: str, *parts: str) -> str:
    return os.path.join(mnt, *TRACING, *parts)


def daemon_argv(code: str, mnt: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {code!r}); "
            "from cmad.daemon.main import main; sys.exit(main())", "--mountpoint", mnt,
            "--regions", REGIONS, "--contiguous", "virtual", "--log-level", "error"]


def extract(ref: str, into: str) -> str | None:
    """The tree of git ref ``ref`` in ``into`` (read from git's objects only)."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "cmad", "fusefs"],
                             capture_output=True)
    if archive.returncode != 0:
        print(f"  (no '{ref}' to compare with: {archive.stderr.decode().strip()})")
        return None
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def side_by_side(iterations: int, today_ref: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "code"))
        today = extract(today_ref, os.path.join(tmp, "code")) if today_ref else None
        mnts = {name: os.path.join(tmp, name) for name in ("today", "off", "reader")}
        codes = {"today": today, "off": ROOT, "reader": ROOT}
        with contextlib.ExitStack() as stack:
            live = {}
            for name, code in codes.items():
                if code is None:
                    continue
                proc = stack.enter_context(mounted(daemon_argv(code, mnts[name]), mnts[name]))
                pin(proc.pid)
                live[name] = mnts[name]
            with open(tracing(mnts["reader"], "events", "cma", "enable"), "w") as f:
                f.write("1")
            cat = subprocess.Popen(["cat", tracing(mnts["reader"], "trace_pipe")],
                                   stdout=subprocess.DEVNULL)
            stack.callback(cat.wait)
            stack.callback(cat.kill)
            pin(cat.pid)
            times = {name: [] for name in live}
            names = list(live)
            for i in range(iterations):
                k = i % len(names)              # each daemon first in turn: no place favoured
                for name in names[k:] + names[:k]:
                    t = pair(live[name])
                    if i >= iterations // 10:
                        times[name].append(t)
        base = statistics.median(times["today"]) if "today" in times else None
        print(f"alloc+free through the mount, {iterations} iterations alternating, "
              f"pinned to CPU {CPU}, medians:")
        for name, label in (("today", f"today ({today_ref})"), ("off", "events off"),
                            ("reader", "events on, cat trace_pipe attached")):
            if name not in times:
                continue
            m = statistics.median(times[name])
            ratio = f"   ratio {m / base:5.3f}x today" if base else ""
            print(f"  {label:<36} {m * 1e6:7.1f} us{ratio}")


CORE = """
import sys, time
sys.path.insert(0, sys.argv[1])
from cmad import Cma
cma = Cma("r=256M", "*=r")
if sys.argv[2] == "on":
    from cmad.daemon.trace import Tracer
    Tracer(cma).enable(None, True)
live = [cma.alloc("x", 4096) for _ in range(1000)]
alloc, free = cma.alloc, cma.free
n = 20000
t0 = time.process_time()
for _ in range(n):
    free(alloc("x", 65536).start)
print(n / (time.process_time() - t0))
"""


def in_process(today_ref: str, rounds: int = 21) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        today = extract(today_ref, tmp) if today_ref else None
        runs = [("today", today, "off")] if today else []
        runs += [("off", ROOT, "off"), ("on", ROOT, "on")]
        rates = {name: [] for name, _, _ in runs}
        for i in range(rounds):
            k = i % len(runs)
            for name, code, events in runs[k:] + runs[:k]:
                out = subprocess.run(["taskset", "-c", "1", sys.executable, "-c", CORE, code,
                                      events],
                                     capture_output=True, text=True, check=True)
                rates[name].append(float(out.stdout))
    base = statistics.median(rates["today"]) if "today" in rates else None
    print(f"core alone, alloc+free pairs per CPU second with 1,000 live chunks, {rounds} "
          "rounds, medians:")
    for name, label in (("today", f"today ({today_ref})"), ("off", "events off"),
                        ("on", "events on, no reader")):
        m = statistics.median(rates[name])
        ratio = f"   ratio {m / base:5.3f}x today" if base else ""
        print(f"  {label:<36} {m:9,.0f}/s{ratio}")


def client(mnt: str, seconds: float, out) -> None:
    stop = time.monotonic() + seconds
    lat = []
    while time.monotonic() < stop:
        lat.append(pair(mnt))
    out.put(lat)


def load(mnt: str, seconds: float, clients: int = 4) -> list[float]:
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=client, args=(mnt, seconds, queue))
             for _ in range(clients)]
    for p in procs:
        p.start()
    lat = [t for _ in procs for t in queue.get()]
    for p in procs:
        p.join()
    return lat


def figures(lat: list[float]) -> str:
    lat = sorted(lat)
    p99 = lat[int(len(lat) * 0.99)]
    return (f"{len(lat):6d} pairs  p50 {statistics.median(lat) * 1e3:6.2f} ms  "
            f"p99 {p99 * 1e3:6.2f} ms  max {lat[-1] * 1e3:6.2f} ms")


def stopped_reader(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mnt = os.path.join(tmp, "mnt")
        with mounted(daemon_argv(ROOT, mnt), mnt):
            with open(tracing(mnt, "events", "cma", "enable"), "w") as f:
                f.write("1")
            print(f"4 clients looping alloc+free for {seconds:.0f} s, every event on:")
            print(f"  no reader                   {figures(load(mnt, seconds))}")
            log = os.path.join(tmp, "trace.log")
            with open(log, "wb") as sink:
                cat = subprocess.Popen(["cat", tracing(mnt, "trace_pipe")], stdout=sink)
                time.sleep(0.3)
                cat.send_signal(signal.SIGSTOP)
                lat = load(mnt, seconds)
                cat.send_signal(signal.SIGCONT)
                time.sleep(1.0)
                cat.kill()
                cat.wait()
            print(f"  reader stopped (SIGSTOP)    {figures(lat)}")
            with open(log, "rb") as f:
                lost = [line for line in f.read().decode().splitlines() if "LOST" in line]
            print(f"  the reader, continued, was told: {lost[0] if lost else 'nothing lost'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--today", default=None,
                   help="git ref of today's code (default: git merge-base HEAD main; '' to skip)")
    p.add_argument("--stop", type=float, default=10.0, help="seconds the reader is stopped")
    args = p.parse_args()
    if args.today is None:
        base = subprocess.run(["git", "-C", ROOT, "merge-base", "HEAD", "main"],
                              capture_output=True, text=True)
        args.today = base.stdout.strip()[:12] if base.returncode == 0 else "main"
    os.sched_setaffinity(0, {CPU})
    side_by_side(args.iterations, args.today)
    in_process(args.today)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    stopped_reader(args.stop)


if __name__ == "__main__":
    main()
