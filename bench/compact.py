"""Compaction benchmark: ``compact()`` and make_room on big regions, in process.

For each allocator, with grouping on (the default) and off, and for 10,000
and 100,000 live chunks: a region filled with chunks of 1-16 pages, half
of them movable (alternating), then every fourth chunk freed so movable
chunks have lower holes to move into.  Printed: seconds for one
``compact()`` (CPU time, median of ROUNDS fresh states: on a shared machine
wall time measures the neighbours), chunks moved, the growth from 10k to
100k chunks, and the longest single step of ``compact_steps`` (what the
filesystem runs between checkpoints at least: the longest any other client
waits behind a compaction).  Prints, never asserts.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time

from cmad import Cma

ALLOCATORS = ("bf", "buddy", "bitmap")
COUNTS = (10_000, 100_000)
ROUNDS = 3


def build(allocator: str, grouping: bool, n: int, seed: int = 7) -> Cma:
    params = "" if grouping else "(pageblock=0)"
    cma = Cma(f"r=4G:{allocator}{params}", "*=r")
    rng = random.Random(seed)
    chunks = [cma.alloc("bench", rng.randint(1, 16) << 12, movable=i % 2 == 0)
              for i in range(n)]
    for c in chunks[2::4]:
        cma.free(c.start)
    return cma


def run(allocator: str, grouping: bool, n: int) -> tuple[float, int, float]:
    """(seconds for compact(), moves, longest step in seconds)."""
    times, worst, moved = [], 0.0, 0
    for round_ in range(ROUNDS):
        cma = build(allocator, grouping, n, seed=round_)
        gc.collect()
        gc.disable()
        t0 = last = time.process_time()
        for moved in cma.compact_steps("r"):
            now = time.process_time()
            worst = max(worst, now - last)
            last = now
        times.append(time.process_time() - t0)
        gc.enable()
        cma._check()
    return statistics.median(times), moved, worst


def main() -> None:
    print(f"compact: region r=4G, chunks of 1-16 pages, half movable, every 4th freed; "
          f"median of {ROUNDS} (python {sys.version.split()[0]})")
    print(f"{'allocator':<10}{'grouping':>9}" + "".join(f"{f'{n:,} s':>12}{'moves':>9}" for n in COUNTS)
          + f"{'growth':>9}{'longest step':>14}")
    for allocator in ALLOCATORS:
        for grouping in (True, False):
            rows = [run(allocator, grouping, n) for n in COUNTS]
            cells = "".join(f"{t:>12.2f}{m:>9,}" for t, m, _ in rows)
            growth = rows[-1][0] / rows[0][0]
            worst = max(w for _, _, w in rows)
            print(f"{allocator:<10}{'on' if grouping else 'off':>9}{cells}{growth:>8.1f}x"
                  f"{worst * 1000:>12.2f}ms")


if __name__ == "__main__":
    main()
