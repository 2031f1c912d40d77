"""Fragmentation benchmark: a camera pipeline next to a network stack.

The trace (seeded, so every run and every allocator sees the same requests),
in one 64 MiB region:
- network buffers: 4-64 KiB, 3 to 5 arriving per step, each living 100-600
  steps; 60% of them movable (like page-cache pages), the rest pinned;
- camera frames: 6 MiB, pinned (a DMA target), one every 5 steps while the
  pipeline keeps 3 in flight; the oldest is freed before a new one comes.
The network side keeps ~35 MiB busy in small chunks scattered over the
region, so frames fail for fragmentation while the free bytes would do.

Each allocator replays the trace twice: with compaction (movable buffers may
be moved to open a hole) and without (the same requests, all pinned).
Printed per run: large requests served, large requests that failed although
the region had the free bytes ("fragmentation failures"), peak fragmentation
(1 - largest_free/free, sampled at every large request), bytes moved, and the
share of live chunks that are movable.  Prints, never asserts.
"""

from __future__ import annotations

import heapq
import random

from cmad import Cma, CmaError

M = 1 << 20
STEPS = 4000
FRAME = 6 * M


def trace(seed: int = 2010):
    """Yield ("alloc", key, size, movable) and ("free", key) events."""
    rng = random.Random(seed)
    dying: list[tuple[int, int]] = []
    frames: list[int] = []
    key = 0
    for step in range(STEPS):
        while dying and dying[0][0] <= step:
            yield ("free", heapq.heappop(dying)[1])
        for _ in range(rng.choice((3, 4, 5))):
            key += 1
            yield ("alloc", key, rng.choice((4, 8, 16, 32, 64)) << 10, rng.random() < 0.6)
            heapq.heappush(dying, (step + rng.randint(100, 600), key))
        if step % 5 == 0:
            if len(frames) >= 3:
                yield ("free", frames.pop(0))
            key += 1
            frames.append(key)
            yield ("alloc", key, FRAME, False)


def replay(allocator: str, compaction: bool) -> dict:
    cma = Cma(f"r=64M:{allocator}", "*=r")
    region = cma.region("r")
    live: dict[int, object] = {}  # key -> Chunk (a move updates chunk.start in place)
    served = failed = frag_failed = 0
    peak = 0.0
    movable_share = []
    for event in trace():
        if event[0] == "free":
            chunk = live.pop(event[1], None)
            if chunk is not None:
                cma.free(chunk.start)
            continue
        _, key, size, movable = event
        large = size >= FRAME
        if large:
            peak = max(peak, region.stats().fragmentation)
            movable_share.append(region.movable_users / max(region.users, 1))
        try:
            chunk = cma.alloc("x", size, movable=movable and compaction)
            live[key] = chunk
            served += large
        except CmaError:
            failed += large
            frag_failed += large and region.free >= size
    cma._check()
    return {"served": served, "failed": failed, "frag_failed": frag_failed, "peak": peak,
            "moved": region.moved, "moved_bytes": region.moved_bytes,
            "movable": sum(movable_share) / max(len(movable_share), 1)}


def main() -> None:
    print(f"frag: {STEPS} steps, 64 MiB region, 6 MiB pinned frames among 4-64 KiB buffers")
    print(f"{'allocator':<10}{'compaction':>11}{'large ok':>10}{'failed':>8}{'frag fail':>10}"
          f"{'peak frag':>10}{'moves':>7}{'moved':>10}{'movable':>9}")
    for allocator in ("bf", "buddy", "bitmap"):
        for compaction in (False, True):
            r = replay(allocator, compaction)
            print(f"{allocator:<10}{'yes' if compaction else 'no':>11}{r['served']:>10}"
                  f"{r['failed']:>8}{r['frag_failed']:>10}{r['peak']:>10.2f}{r['moved']:>7}"
                  f"{r['moved_bytes'] / M:>8.1f}Mi{r['movable']:>9.0%}")


if __name__ == "__main__":
    main()
