"""Fragmentation benchmark: a camera pipeline next to a network stack.

The trace (seeded, so every run and every allocator sees the same requests):
- network buffers: 4-64 KiB, 3 to 5 arriving per step, each living 100-1200
  steps; 60% of them movable (like page-cache pages), the rest pinned;
- camera frames: 8 MiB, pinned (a DMA target), one every 5 steps, each held
  10-20 steps (2 to 4 in flight), so buffers arriving in between settle in
  the holes frames leave.
The network side keeps ~60 MiB busy in small chunks, so frames fail for
fragmentation while the free bytes would do.

Two layouts (SCENARIOS): "shared" is the review's design, a 64 MiB sticky
region shared by the camera and the movable buffers, the pinned buffers in a
32 MiB region of their own; "mixed" puts everything in one 96 MiB region.
Each allocator replays the trace in each layout twice: with compaction
(movable buffers may be moved to open a hole) and without (the same
requests, all pinned).

Printed for the 'video' region: frames served, frames failed, frames that
failed although the region had the free bytes ("frag fail"), and of those
the ones no compaction could serve, because pinned chunks left no stretch
long enough for the frame ("walled"), peak
fragmentation (1 - largest_free/free, sampled at every frame request),
chunks and bytes moved, and the mean share of live chunks that are movable.
Prints, never asserts.
"""

from __future__ import annotations

import heapq
import random

from cmad import Cma, CmaError
from cmad.compaction import walled

M = 1 << 20
STEPS = 4000
FRAME = 8 * M

SCENARIOS = {
    "shared": ("video=64M:{a}(sticky);common=32M:{a}", "camera,netm=video;netp=common"),
    "mixed": ("video=96M:{a}", "*=video"),
}


def trace(seed: int = 2010):
    """Yield ("alloc", key, size, movable) and ("free", key) events."""
    rng = random.Random(seed)
    dying: list[tuple[int, int]] = []
    key = 0
    for step in range(STEPS):
        while dying and dying[0][0] <= step:
            yield ("free", heapq.heappop(dying)[1])
        for _ in range(rng.choice((3, 4, 5))):
            key += 1
            yield ("alloc", key, rng.choice((4, 8, 16, 32, 64)) << 10, rng.random() < 0.6)
            heapq.heappush(dying, (step + rng.randint(100, 1200), key))
        if step % 5 == 0:
            key += 1
            yield ("alloc", key, FRAME, False)
            heapq.heappush(dying, (step + rng.randint(10, 20), key))


def replay(allocator: str, compaction: bool, scenario: str) -> dict:
    regions, map_text = SCENARIOS[scenario]
    cma = Cma(regions.format(a=allocator), map_text)
    region = cma.region("video")
    live: dict[int, object] = {}  # key -> Chunk (a move updates chunk.start in place)
    served = failed = frag_failed = walls = 0
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
        dev = "camera" if large else ("netm" if movable else "netp")
        try:
            live[key] = cma.alloc(dev, size, movable=movable and compaction)
            served += large
        except CmaError:
            failed += large
            if large and region.free >= size:
                frag_failed += 1
                walls += walled(cma, region, *region.allocator.footprint(size, 4096))
    cma._check()
    return {"served": served, "failed": failed, "frag_failed": frag_failed, "walled": walls,
            "peak": peak,
            "moved": region.moved, "moved_bytes": region.moved_bytes,
            "movable": sum(movable_share) / max(len(movable_share), 1)}


def main() -> None:
    print(f"frag: {STEPS} steps, 8 MiB pinned frames among 4-64 KiB buffers (60% movable); "
          "figures of the 'video' region")
    print(f"{'layout':<8}{'allocator':<10}{'compaction':>11}{'frames ok':>10}{'failed':>8}"
          f"{'frag fail':>10}{'walled':>7}{'peak frag':>10}{'moves':>7}{'moved':>10}"
          f"{'movable':>9}")
    for scenario in SCENARIOS:
        for allocator in ("bf", "buddy", "bitmap"):
            for compaction in (False, True):
                r = replay(allocator, compaction, scenario)
                print(f"{scenario:<8}{allocator:<10}{'yes' if compaction else 'no':>11}"
                      f"{r['served']:>10}{r['failed']:>8}{r['frag_failed']:>10}{r['walled']:>7}"
                      f"{r['peak']:>10.2f}{r['moved']:>7}{r['moved_bytes'] / M:>8.1f}Mi"
                      f"{r['movable']:>9.0%}")


if __name__ == "__main__":
    main()
