"""The core's hot path against the tree before the grouping work and a bare best fit.

bf alloc+free pairs per second at 1k, 10k and 100k live chunks, the workload
of bench/core.py (sizes 1-64 pages, seeded; region ``r=64G:bf``), on sides
run side by side:

- ``this tree``: the cmad package next to this file;
- ``before``: the tree before the grouping work (``--before PATH``, default
  commit 2fbbe7a exported with ``git archive`` into a temporary folder), with
  its default for ``r=64G:bf`` (grouping on there) and with ``bf(pageblock=0)``;
- ``bare``: bench/bare_bf.py, a best fit on a SortedList and two dicts, no Cma.

Each side runs in its own subprocess (the two cmad trees would clash in one
interpreter), fed the same trace of sizes and frees.  Rounds alternate
between the sides (drift hits all alike); round 0 is warm-up; medians are
printed, with ratios.  After the rounds every side reports a digest of its
live chunks' starts: sides that place alike say so.  Run it pinned
(``taskset -c 1``, as ``make bench`` does; the children inherit it).
Prints, never asserts.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEFORE = "2fbbe7a"
LIVE = (1_000, 10_000, 100_000)
PAIRS = 20_000
ROUNDS = 7
BASE = 0x40000000  # where Cma puts the first region
REGION = 64 << 30


# -- the worker: one side, in its own process ----------------------------

def trace(rng: random.Random, n: int, pairs: int) -> tuple[list[int], list[int]]:
    """The sizes and victims of ``pairs`` steps, drawn as bench/core.py draws them."""
    return ([rng.randint(1, 64) << 12 for _ in range(pairs)],
            [rng.randrange(n) for _ in range(pairs)])


class CmaSide:
    def __init__(self, spec: str, live: int):
        from cmad import Cma

        self.cma = Cma(spec, "*=r")
        self.rng = random.Random(1)
        self.starts = [self.cma.alloc("bench", self.rng.randint(1, 64) << 12).start
                       for _ in range(live)]

    def run(self, pairs: int) -> float:
        import core  # bench/core.py's loop, on the cmad this side's path gives

        return core.pairs_per_second(self.cma, self.starts, self.rng, pairs)

    def check(self) -> None:
        self.cma._check()


class BareSide:
    def __init__(self, spec: str, live: int):
        from bare_bf import BareBestFit

        self.bf = BareBestFit(BASE, REGION)
        self.rng = random.Random(1)
        self.sizes = [self.rng.randint(1, 64) << 12 for _ in range(live)]
        self.starts = [self.bf.alloc(size) for size in self.sizes]

    def run(self, pairs: int) -> float:
        sizes, victims = trace(self.rng, len(self.starts), pairs)
        alloc, free, starts, lens = self.bf.alloc, self.bf.free, self.starts, self.sizes
        gc.disable()
        t0 = time.perf_counter()
        for size, i in zip(sizes, victims):
            new = alloc(size)
            free(starts[i], lens[i])
            starts[i] = new
            lens[i] = size
        elapsed = time.perf_counter() - t0
        gc.enable()
        return pairs / elapsed

    def check(self) -> None:
        self.bf.by_size._check()


def worker(kind: str, spec: str, lives: list[int]) -> None:
    """Answer ``run LIVE PAIRS`` with a rate and ``digest`` with the placements."""
    cls = BareSide if kind == "bare" else CmaSide
    sides = {n: cls(spec, n) for n in lives}
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "run":
            print(sides[int(words[1])].run(int(words[2])), flush=True)
        elif words[0] == "digest":
            for side in sides.values():
                side.check()
            print(" ".join(f"{hash(tuple(s.starts)) & 0xffffffff:08x}" for s in sides.values()),
                  flush=True)


# -- the parent: alternate the sides, print medians ---------------------

def export_before(commit: str) -> str:
    """``git archive`` the commit's cmad package into a temporary folder."""
    where = tempfile.mkdtemp(prefix="cmad-before-")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "cmad"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", where], input=archive, check=True)
    return where


class Side:
    def __init__(self, label: str, kind: str, path: str, spec: str, lives: list[int]):
        self.label = label
        env = dict(os.environ, PYTHONPATH=path, PYTHONHASHSEED="0")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", spec,
             "--live", ",".join(map(str, lives))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/")
        self.rates: dict[int, list[float]] = {n: [] for n in lives}

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def wait_ready(self) -> None:
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"{self.label}: the worker did not start")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help=f"path holding the old tree's cmad/ (default: "
                                     f"git archive {BEFORE})")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--pairs", type=int, default=PAIRS)
    ap.add_argument("--live", default=",".join(map(str, LIVE)))
    ap.add_argument("--spec", default="r=64G:bf", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lives = [int(n) for n in args.live.split(",")]
    if args.worker:
        return worker(args.worker, args.spec, lives)
    before = args.before or export_before(BEFORE)
    try:
        run_sides(args, lives, before)
    finally:
        if not args.before:
            shutil.rmtree(before)


def run_sides(args: argparse.Namespace, lives: list[int], before: str) -> None:
    sides = [Side("this tree", "cma", str(ROOT), "r=64G:bf", lives),
             Side("before", "cma", before, "r=64G:bf", lives),
             Side("before, pageblock=0", "cma", before, "r=64G:bf(pageblock=0)", lives),
             Side("bare best fit", "bare", str(HERE), "", lives)]
    for side in sides:
        side.wait_ready()
    for round_ in range(args.rounds + 1):
        for n in lives:
            order = sides if round_ % 2 == 0 else sides[::-1]
            for side in order:
                rate = float(side.ask(f"run {n} {args.pairs}"))
                if round_:  # round 0 is warm-up
                    side.rates[n].append(rate)
    digests = {side.label: side.ask("digest").split() for side in sides}
    for side in sides:
        side.close()
    pinned = os.sched_getaffinity(0)
    print(f"core_compare: bf alloc+free pairs/s, r=64G:bf, median of {args.rounds} rounds of "
          f"{args.pairs} pairs, sides alternating, each in its own process, "
          f"CPUs {sorted(pinned)}{' (pinned)' if len(pinned) == 1 else ' (NOT pinned)'}, "
          f"python {sys.version.split()[0]}; before = {args.before or BEFORE}")
    med = {side.label: [statistics.median(side.rates[n]) for n in lives] for side in sides}
    ours = med["this tree"]
    print(f"{'side':<22}" + "".join(f"{n:>11,}" for n in lives)
          + f"{'growth':>9}" + "".join(f"{'ours/' + format(n, ','):>13}" for n in lives))
    for side in sides:
        m = med[side.label]
        print(f"{side.label:<22}" + "".join(f"{r:>11,.0f}" for r in m)
              + f"{m[0] / m[-1]:>8.2f}x" + "".join(f"{o / r:>12.2f}x" for o, r in zip(ours, m)))
    print("growth = pairs/s at the fewest live chunks / at the most (1.00x: no slowdown)")
    same = [side.label for side in sides if digests[side.label] == digests["this tree"]]
    print("placed exactly as this tree: " + "; ".join(same))


if __name__ == "__main__":
    main()
