"""Core benchmark: alloc+free pairs per second per allocator, in process.

For each allocator and each live-chunk count (1k, 10k, 100k) the region is
filled with that many chunks of mixed sizes (1-64 pages, seeded), then each
step allocates one chunk and frees a random live one, so the count stays put.
Rounds alternate between the configurations (drift hits all alike); the first
round is warm-up; medians are printed.  Also: bytes the core holds per live
chunk at 100k chunks (tracemalloc), and at 10k chunks the same allocators
with grouping by mobility on (``pageblock=2M``; off is the default, see
docs/configuration.md, "grouping by mobility") against the default: what pageblocks cost on
the hot path.  Prints, never asserts.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time
import tracemalloc

from cmad import Cma

ALLOCATORS = ("bf", "buddy", "bitmap")
LIVE = (1_000, 10_000, 100_000)
PAIRS = 20_000
ROUNDS = 5


def setup(allocator: str, live: int, seed: int = 1) -> tuple[Cma, list[int], random.Random]:
    cma = Cma(f"r=64G:{allocator}", "*=r")  # allocator may carry params: bf(pageblock=2M)
    rng = random.Random(seed)
    starts = [cma.alloc("bench", rng.randint(1, 64) << 12).start for _ in range(live)]
    return cma, starts, rng


def pairs_per_second(cma: Cma, starts: list[int], rng: random.Random, pairs: int) -> float:
    sizes = [rng.randint(1, 64) << 12 for _ in range(pairs)]
    victims = [rng.randrange(len(starts)) for _ in range(pairs)]
    alloc, free = cma.alloc, cma.free
    gc.disable()
    t0 = time.perf_counter()
    for size, i in zip(sizes, victims):
        new = alloc("bench", size).start
        free(starts[i])
        starts[i] = new
    elapsed = time.perf_counter() - t0
    gc.enable()
    return pairs / elapsed


def bytes_per_chunk(n: int = 100_000) -> float:
    gc.collect()
    tracemalloc.start()
    cma = Cma("r=64G:bf", "*=r")
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(n):
        cma.alloc("bench", 4096)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / n


def main() -> None:
    configs = {(a, n): setup(a, n) for a in ALLOCATORS for n in LIVE}
    configs.update({(f"{a}(pageblock=2M)", LIVE[1]): setup(f"{a}(pageblock=2M)", LIVE[1])
                    for a in ALLOCATORS})
    results: dict[tuple[str, int], list[float]] = {k: [] for k in configs}
    for round_ in range(ROUNDS + 1):
        for key, (cma, starts, rng) in configs.items():
            rate = pairs_per_second(cma, starts, rng, PAIRS)
            if round_:  # round 0 is warm-up
                results[key].append(rate)
    for key, (cma, _, _) in configs.items():
        cma._check()
    print(f"core: alloc+free pairs/s, median of {ROUNDS} rounds of {PAIRS} pairs "
          f"(python {sys.version.split()[0]})")
    print(f"{'allocator':<10}" + "".join(f"{n:>12,}" for n in LIVE) + f"{'100k/1k cost':>14}")
    for a in ALLOCATORS:
        med = [statistics.median(results[(a, n)]) for n in LIVE]
        print(f"{a:<10}" + "".join(f"{m:>12,.0f}" for m in med) + f"{med[0] / med[-1]:>13.2f}x")
    print(f"grouping by mobility at {LIVE[1]:,} live chunks, pairs/s on / off (the default):")
    for a in ALLOCATORS:
        on = statistics.median(results[(f"{a}(pageblock=2M)", LIVE[1])])
        off = statistics.median(results[(a, LIVE[1])])
        print(f"{a:<10}{on:>12,.0f}{off:>12,.0f}{on / off:>13.2f}x")
    print(f"memory held by the core per live chunk at 100,000 chunks: "
          f"{bytes_per_chunk():,.0f} bytes")


if __name__ == "__main__":
    main()
