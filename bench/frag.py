"""Fragmentation benchmark: two traces of a device needing large pinned buffers
among small ones, per allocator, with grouping by mobility on and off.

Trace "cam8" (seeded, so every run and every allocator sees the same requests):
- network buffers: 4-64 KiB, 3 to 5 arriving per step, each living 100-1200
  steps; 60% of them movable (like page-cache pages), the rest pinned;
- camera frames: 8 MiB, pinned (a DMA target), one every 5 steps, each held
  10-20 steps (2 to 4 in flight), so buffers arriving in between settle in
  the holes frames leave.
The network side keeps ~60 MiB busy in small chunks, so frames fail for
fragmentation while the free bytes would do.  Two layouts: "shared" is the
review's design, a 64 MiB sticky region shared by the camera and the movable
buffers, the pinned buffers in a 32 MiB region of their own; "mixed" puts
everything in one 96 MiB region.

Trace "nv12" (one 128 MiB region, "mixed" only): 1080p NV12 frames of
1920x1080x1.5 bytes (3.0 MiB, not a power of two), pinned, one every 4
steps, held 8-16 steps; movable staging buffers of 256 KiB-1 MiB, one every
other step, living 20-200 steps; long-lived pinned descriptors of 4-16 KiB,
one per step, living 500-3000 steps; movable buffers of 4-64 KiB, two per
step, living 100-1100 steps.

Each allocator replays each trace with grouping on (pageblocks, the default)
and off (``pageblock=0``), and with compaction (movable buffers are movable)
and without (the same requests, all pinned).  Printed for the frames' region:
frames served, failed, failed although the region had the free bytes ("frag
fail"), of those the ones no move could serve because pinned chunks left no
stretch long enough ("walled"), chunks and bytes moved, bytes moved per frame
byte served, and fallbacks into blocks of the other mobility.  Prints, never
asserts.
"""

from __future__ import annotations

import heapq
import random

from cmad import Cma, CmaError
from cmad.compaction import walled

K, M = 1 << 10, 1 << 20
NV12 = 1920 * 1080 * 3 // 2

LAYOUTS = {
    "shared": ("video=64M:{a}({p}sticky);common=32M:{a}({p})", "camera,netm=video;netp=common"),
    "mixed": ("video=96M:{a}({p})", "*=video"),
    "mixed128": ("video=128M:{a}({p})", "*=video"),
}


def cam8(rng: random.Random):
    """Per step: the network buffers, and every 5th step an 8 MiB frame."""
    for step in range(4000):
        events = [(rng.choice((4, 8, 16, 32, 64)) * K, rng.random() < 0.6,
                   rng.randint(100, 1200)) for _ in range(rng.choice((3, 4, 5)))]
        if step % 5 == 0:
            events.append((8 * M, False, rng.randint(10, 20)))
        yield step, events, 8 * M


def nv12(rng: random.Random):
    """Per step: descriptors, buffers, staging, and every 4th step an NV12 frame."""
    for step in range(3000):
        events = [(rng.choice((4, 8, 12, 16)) * K, False, rng.randint(500, 3000))]
        events += [(rng.choice((4, 8, 16, 32, 64)) * K, True, rng.randint(100, 1100))
                   for _ in range(2)]
        if step % 2:
            events.append((rng.choice((256, 512, 768, 1024)) * K, True, rng.randint(20, 200)))
        if step % 4 == 0:
            events.append((NV12, False, rng.randint(8, 16)))
        yield step, events, NV12


TRACES = {"cam8": (cam8, ("shared", "mixed")), "nv12": (nv12, ("mixed128",))}


def trace(shape, seed: int = 2010):
    """Yield ("alloc", key, size, movable, frame) and ("free", key) events."""
    rng = random.Random(seed)
    dying: list[tuple[int, int]] = []
    key = 0
    for step, events, frame in shape(rng):
        while dying and dying[0][0] <= step:
            yield ("free", heapq.heappop(dying)[1])
        for size, movable, life in events:
            key += 1
            yield ("alloc", key, size, movable, size == frame)
            heapq.heappush(dying, (step + life, key))


def replay(allocator: str, shape, layout: str, grouping: bool, compaction: bool) -> dict:
    regions, map_text = LAYOUTS[layout]
    p = "" if grouping else "pageblock=0,"
    cma = Cma(regions.format(a=allocator, p=p).replace(",)", ")").replace("()", ""),
              map_text)
    region = cma.region("video")
    live: dict[int, object] = {}  # key -> Chunk (a move updates chunk.start in place)
    served = failed = frag_failed = walls = served_bytes = 0
    for event in trace(shape):
        if event[0] == "free":
            chunk = live.pop(event[1], None)
            if chunk is not None:
                cma.free(chunk.start)
            continue
        _, key, size, movable, frame = event
        dev = "camera" if frame else ("netm" if movable else "netp")
        try:
            live[key] = cma.alloc(dev, size, movable=movable and compaction)
            served += frame
            served_bytes += size if frame else 0
        except CmaError:
            failed += frame
            if frame and region.free >= size:
                frag_failed += 1
                walls += walled(cma, region, *region.allocator.footprint(size, 4096))
    cma._check()
    stats = region.stats()
    return {"served": served, "failed": failed, "frag_failed": frag_failed, "walled": walls,
            "moved": region.moved, "moved_bytes": region.moved_bytes,
            "ratio": region.moved_bytes / max(served_bytes, 1), "fallbacks": stats.fallbacks,
            "pageblocks": region.pageblocks()}


def main() -> None:
    print("frag: figures of the frames' region ('video'); see the docstring for the traces")
    print(f"{'trace':<6}{'layout':<10}{'allocator':<10}{'grouping':>9}{'compaction':>11}"
          f"{'frames ok':>10}{'failed':>8}{'frag fail':>10}{'walled':>7}{'moves':>7}"
          f"{'moved':>10}{'moved/served':>13}{'fallbacks':>10}")
    pictures = {}
    for name, (shape, layouts) in TRACES.items():
        for layout in layouts:
            for allocator in ("bf", "buddy", "bitmap"):
                for grouping in (True, False):
                    for compaction in (False, True):
                        r = replay(allocator, shape, layout, grouping, compaction)
                        print(f"{name:<6}{layout:<10}{allocator:<10}"
                              f"{'on' if grouping else 'off':>9}{'yes' if compaction else 'no':>11}"
                              f"{r['served']:>10}{r['failed']:>8}{r['frag_failed']:>10}"
                              f"{r['walled']:>7}{r['moved']:>7}{r['moved_bytes'] / M:>8.1f}Mi"
                              f"{r['ratio']:>12.2f}x{r['fallbacks']:>10}")
                        if grouping and compaction and layout != "shared":
                            pictures[(name, allocator)] = r["pageblocks"]
    for (name, allocator), picture in pictures.items():
        print(f"\npageblocks of 'video' after trace {name}, {allocator} (grouping on, compaction):")
        print(picture)


if __name__ == "__main__":
    main()
