"""The fragmentation suite's traces and its oracle (issue 16, SPEC 4b).

Two things live here, both free of the core's internals so that tests can
import them (``sys.path.insert(0, "bench"); import fragtraces``) and they
keep working whatever the allocators become:

- **The oracle** (``fitting_start``, ``gaps``, ``largest_gap``,
  ``allocator_block``): given the live chunks of a region as (start, size)
  pairs, is there a gap between them that would hold a request of this size,
  alignment and bound?  SPEC 4b's guarantee says ENOMEM is only allowed when
  there is none, so every ENOMEM for which ``fitting_start`` returns a start
  is a request "refused with a fitting range".

- **The traces**: workloads of distinct shapes, each one region, each a list
  of streams (frames, descriptors, buffers) that arrive per step and live a
  number of steps.  ``events(trace, seed)`` yields the same requests for the
  same seed, so every allocator and every configuration replays exactly the
  same workload.  The region's size is derived from the streams' expected
  demand and the trace's nominal fill, so "fill 90%" means the requests keep
  on average 90% of the region's bytes busy once warmed up.
"""

from __future__ import annotations

import heapq
import random
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

K, M = 1 << 10, 1 << 20
PAGE = 4096
PAGEBLOCK = 2 * M  # the default pageblock, for the region's rounding

# Frame sizes with a meaning: 1080p and 4K NV12 (1.5 bytes a pixel), XGA YUYV.
NV12_1080P = 1920 * 1080 * 3 // 2     # 2.97 MiB (3.1 MB), not a multiple of 2 MiB
NV12_1088P = 1920 * 1088 * 3 // 2     # 2.99 MiB, the macroblock-padded variant
NV12_4K = 3840 * 2160 * 3 // 2        # 11.87 MiB
YUYV_XGA = 1024 * 768 * 2             # exactly 1.5 MiB
ODD_5M2 = 5 * M + M // 5              # 5.2 MiB
NV12_3M1 = 3 * M + M // 10            # 3.1 MiB


# -- the oracle ----------------------------------------------------------


def page_round(size: int, block: int = PAGE) -> int:
    """``size`` rounded up to a multiple of ``block`` (a power of two)."""
    return (size + block - 1) & -block


def allocator_block(spec: str) -> int:
    """The unit an allocator rounds a request's size (and start) to, from its
    region text (``bitmap(order_per_bit=2,pageblock=0)`` -> 16 KiB): bitmap
    holds whole blocks of 2^order_per_bit pages; bf and buddy hand back page
    multiples (buddy gives the tail of a rounded-up block back, SPEC 1)."""
    name = spec.split("(", 1)[0].strip()
    if name != "bitmap":
        return PAGE
    found = re.search(r"order_per_bit\s*=\s*(\w+)", spec)
    return PAGE << (int(found.group(1), 0) if found else 0)


def gaps(chunks: Iterable[tuple[int, int]], lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The free ranges (start, end) of [lo, hi) between ``chunks``, (start, size)
    pairs sorted by start and lying inside [lo, hi)."""
    at = lo
    for start, size in chunks:
        if start > at:
            yield at, start
        at = max(at, start + size)
    if hi > at:
        yield at, hi


def _place(gap_start: int, gap_end: int, size: int, alignment: int,
           bound: int | None) -> int | None:
    """The lowest start in the gap that holds ``size`` bytes aligned to
    ``alignment`` without crossing a multiple of ``bound``; None if none."""
    start = page_round(gap_start, alignment)
    if bound is not None and start // bound != (start + size - 1) // bound:
        start = page_round((start // bound + 1) * bound, alignment)
    return start if start + size <= gap_end else None


def fitting_start(chunks: Iterable[tuple[int, int]], lo: int, hi: int, size: int,
                  alignment: int = PAGE, bound: int | None = None,
                  block: int = PAGE) -> int | None:
    """Where a request would fit in a gap between the live chunks of region
    [lo, hi), or None when no gap holds it.

    ``chunks``: (start, size) pairs sorted by start.  ``size`` is the request
    as the caller gave it; it is rounded up to ``block`` (the allocator's unit,
    ``allocator_block``), the alignment is at least ``block``.  ``bound``: the
    chunk may not cross a multiple of it (SPEC 4).  An ENOMEM for which this
    returns a start is a refusal SPEC 4b forbids."""
    alignment = max(alignment or PAGE, block)
    size = page_round(size, block)
    if bound is not None and size > bound:
        return None
    for gap_start, gap_end in gaps(chunks, lo, hi):
        if gap_end - gap_start >= size:
            start = _place(gap_start, gap_end, size, alignment, bound)
            if start is not None:
                return start
    return None


def largest_gap(chunks: Iterable[tuple[int, int]], lo: int, hi: int,
                block: int = PAGE) -> int:
    """The largest page-aligned (block-aligned) request a gap would hold: what
    SPEC 2 calls the region's largest hole."""
    return max(((end & -block) - page_round(start, block)
                for start, end in gaps(chunks, lo, hi)), default=0)


def chunk_spans(cma, region) -> list[tuple[int, int]]:
    """The region's live chunks as sorted (start, size) pairs, through the
    public ``Cma.chunks_of``."""
    return sorted((c.start, c.size) for c in cma.chunks_of(region))


# -- the traces ----------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """Requests of one kind: ``rate`` arrivals per step (a fraction arrives
    with that probability) or one burst of ``burst`` every ``every`` steps;
    each lives a number of steps drawn from ``life``."""

    kind: str                   # "frame" (counted), "desc" or "buf"
    sizes: tuple[int, ...]
    life: tuple[int, int]
    movable: bool = False
    rate: float = 0.0
    every: int = 0              # periodic arrivals (frames): every N steps
    burst: int = 1              # requests per periodic arrival
    phase: int = 0              # step of the first periodic arrival
    movable_share: float = -1.0  # 0..1: this share movable, the rest pinned

    def arrivals(self, step: int, rng: random.Random) -> int:
        if self.every:
            return self.burst if step >= self.phase and (step - self.phase) % self.every == 0 else 0
        whole = int(self.rate)
        return whole + (rng.random() < self.rate - whole)

    def mean_bytes(self) -> float:
        """Bytes this stream keeps busy on average once warmed up."""
        per_step = self.burst / self.every if self.every else self.rate
        mean_size = sum(page_round(s) for s in self.sizes) / len(self.sizes)
        return per_step * (self.life[0] + self.life[1]) / 2 * mean_size


@dataclass(frozen=True)
class Trace:
    name: str
    what: str
    fill: float                  # nominal: mean demand / region size
    streams: tuple[Stream, ...]
    steps: int                   # measured steps, after the warm-up

    @property
    def warmup(self) -> int:
        """Steps before frames count: every stream has reached its steady state."""
        return max(s.life[1] for s in self.streams)

    def region_size(self) -> int:
        demand = sum(s.mean_bytes() for s in self.streams)
        return page_round(int(demand / self.fill), PAGEBLOCK)

    def frame_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({z for s in self.streams if s.kind == "frame" for z in s.sizes}))


@dataclass(frozen=True)
class Alloc:
    key: int
    size: int
    movable: bool
    kind: str        # "frame", "desc", "buf"
    counted: bool    # a frame after the warm-up: in the figures
    measured: bool   # after the warm-up
    step: int


@dataclass(frozen=True)
class Free:
    key: int
    step: int


def events(trace: Trace, seed: int, scale: float = 1.0) -> Iterator[Alloc | Free]:
    """The trace's requests, the same ones for the same (seed, scale): per step
    first the frees that are due, then the arrivals, stream by stream.
    ``scale`` shortens the measured part (``--quick``)."""
    rng = random.Random(f"{trace.name}/{seed}")
    dying: list[tuple[int, int]] = []
    key = 0
    warmup = trace.warmup
    for step in range(warmup + max(1, int(trace.steps * scale))):
        while dying and dying[0][0] <= step:
            yield Free(heapq.heappop(dying)[1], step)
        for stream in trace.streams:
            for _ in range(stream.arrivals(step, rng)):
                key += 1
                movable = (rng.random() < stream.movable_share
                           if stream.movable_share >= 0 else stream.movable)
                size = rng.choice(stream.sizes)
                yield Alloc(key, size, movable, stream.kind,
                            stream.kind == "frame" and step >= warmup, step >= warmup, step)
                heapq.heappush(dying, (step + rng.randint(*stream.life), key))


def demand_fill(trace: Trace, seed: int, scale: float = 1.0) -> float:
    """The fill the requests ask for, measured: the bytes requested and not yet
    freed at the end of each measured step (after the warm-up; failures
    aside), averaged, as a share of the region."""
    live: dict[int, int] = {}
    used = area = 0
    step = 0
    for event in events(trace, seed, scale):
        if event.step != step:  # ``used`` is where step ended, until event.step
            area += used * (event.step - max(step, trace.warmup)) if event.step > trace.warmup else 0
            step = event.step
        if isinstance(event, Free):
            used -= live.pop(event.key)
        else:
            live[event.key] = page_round(event.size)
            used += live[event.key]
    return area / max(step - trace.warmup, 1) / trace.region_size()


# Small buffers, the kinds the traces mix with frames.
DESC_SIZES = (4 * K, 8 * K, 16 * K, 32 * K, 64 * K)   # descriptors, 4-64 KiB
NET_SIZES = (4 * K, 8 * K, 16 * K, 32 * K, 64 * K)
STAGING = (256 * K, 512 * K, 768 * K, 1024 * K)


TRACES: tuple[Trace, ...] = (
    Trace("ring2m", "ring buffers of exactly one pageblock (2 MiB), pinned, 16 in flight; "
          "pinned descriptors short- and long-lived; movable network buffers", 0.92, (
              Stream("frame", (2 * M,), (12, 20), every=1),
              Stream("desc", DESC_SIZES, (5, 60), rate=2),
              Stream("desc", DESC_SIZES, (300, 900), rate=0.5),
              Stream("buf", NET_SIZES, (100, 600), movable=True, rate=2),
          ), 1500),
    Trace("nv12", "1080p NV12 frames (2.97 MiB), 4 in flight, among long-lived pinned "
          "descriptors, movable buffers and staging", 0.90, (
              Stream("frame", (NV12_1080P,), (8, 16), every=3),
              Stream("desc", (4 * K, 8 * K, 12 * K, 16 * K), (300, 1500), rate=1),
              Stream("buf", NET_SIZES, (100, 800), movable=True, rate=2),
              Stream("buf", STAGING, (20, 200), movable=True, rate=0.5),
          ), 2000),
    Trace("cam8", "8 MiB camera frames, 3 in flight, among network buffers 60% movable, "
          "40% pinned, living 100-1200 steps", 0.80, (
              Stream("frame", (8 * M,), (10, 20), every=5),
              Stream("buf", NET_SIZES, (100, 1200), movable_share=0.6, rate=4),
          ), 2500),
    Trace("uhd12", "4K NV12 frames (11.87 MiB), 3 in flight, among long-lived pinned "
          "descriptors and movable staging", 0.90, (
              Stream("frame", (NV12_4K,), (12, 24), every=6),
              Stream("desc", DESC_SIZES, (400, 1200), rate=1),
              Stream("buf", STAGING, (20, 150), movable=True, rate=0.5),
          ), 2500),
    Trace("xga1m5", "1.5 MiB frames (XGA YUYV), ~15 in flight, among long-lived pinned "
          "descriptors and movable buffers", 0.90, (
              Stream("frame", (YUYV_XGA,), (20, 40), every=2),
              Stream("desc", DESC_SIZES, (400, 1200), rate=1),
              Stream("buf", NET_SIZES, (100, 800), movable=True, rate=2),
          ), 2000),
    Trace("odd5m2", "5.2 MiB frames (not a pageblock multiple), 4 in flight, at 97% fill, "
          "mostly movable buffers, short-lived pinned descriptors", 0.97, (
              Stream("frame", (ODD_5M2,), (10, 22), every=4),
              Stream("desc", DESC_SIZES, (5, 60), rate=1),
              Stream("buf", NET_SIZES + STAGING, (50, 400), movable=True, rate=1),
          ), 2000),
    Trace("mixed", "frames of 1.5, 2, 3.1, 5.2, 8 and 12 MiB at 75% fill among pinned "
          "descriptors short- and long-lived and movable buffers", 0.75, (
              Stream("frame", (YUYV_XGA, 2 * M, NV12_3M1, ODD_5M2, 8 * M, NV12_4K),
                     (6, 30), every=2),
              Stream("desc", DESC_SIZES, (5, 60), rate=1),
              Stream("desc", DESC_SIZES, (300, 1200), rate=0.5),
              Stream("buf", NET_SIZES + STAGING, (50, 600), movable=True, rate=1),
          ), 2500),
    Trace("burst3m1", "pipeline restarts: 8 NV12 frames of 3.1 MiB allocated at once every "
          "150 steps, held 100-140, short-lived pinned descriptors, 70% fill", 0.70, (
              Stream("frame", (NV12_3M1,), (100, 140), every=150, burst=8),
              Stream("desc", DESC_SIZES, (5, 80), rate=3),
              Stream("buf", NET_SIZES, (100, 600), movable=True, rate=1),
          ), 6000),
    Trace("pinned93", "pinned only (nothing to compact): 5.2 MiB and 2 MiB frames among "
          "long-lived pinned descriptors at 93% fill", 0.93, (
              Stream("frame", (ODD_5M2, 2 * M), (8, 24), every=3),
              Stream("desc", DESC_SIZES, (300, 1000), rate=1),
              Stream("desc", DESC_SIZES, (5, 40), rate=1),
          ), 2000),
)

BY_NAME = {t.name: t for t in TRACES}
