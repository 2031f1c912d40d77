"""Fragmentation suite (issue 16, SPEC 4b): traces of distinct shapes, per
allocator, with grouping by mobility at its default and off (``pageblock=0``).

The traces and the oracle are in ``fragtraces.py`` (each trace is described
there and in the header this prints).  Each trace is one region sized from
its nominal fill, replayed with the same requests (same seed) by every
allocator and configuration, through the public ``Cma`` API only: ``alloc``
with ``movable``, ``free``, ``region(...).free``, ``chunks_of`` and a
listener that counts the bytes moved (``on_move``).  Compaction is whatever
the core does inside ``alloc``.

One row per (trace, seed, allocator, config):
- frames: frames requested after the warm-up (every stream at its steady state);
- failed: of those, refused (ENOMEM);
- frag: refused although the region's free bytes sufficed;
- fit-refused: requests of any kind (frames, descriptors, buffers; in brackets
  the frames among them) after the warm-up refused while a gap between the region's live chunks would have
  held them, the size rounded as the allocator rounds it (the oracle,
  ``fragtraces.fitting_start``); SPEC 4b says it must be 0;
- moved/served: bytes moved by compaction per byte served (all requests);
- worst: the largest bytes moved by one request / its size;
- fill: the region's mean use when a counted frame arrived.
A verdict per trace: the default loses where it fails more frames than
grouping off beyond max(2, 1% of the frames), for the same allocator and seed.

    python bench/frag.py                  # the suite, 2 seeds
    python bench/frag.py --quick          # 1 seed, a third of the steps
    python bench/frag.py --trace nv12 --seeds 1,2,3 --allocators bf
Prints, never asserts.
"""

from __future__ import annotations

import argparse
import errno
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

from cmad import Cma, CmaError
from cmad.allocators.pageblocks import GROUP_BY_DEFAULT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fragtraces import (BY_NAME, TRACES, Alloc, M, Trace, allocator_block,  # noqa: E402
                        chunk_spans, demand_fill, events, fitting_start, page_round)

ALLOCATORS = ("bf", "buddy", "bitmap")
CONFIGS = ("pb=2M", "pb=0")  # grouping on, grouping off: GROUP_BY_DEFAULT says which is the default
DEVICE = {"frame": "camera", "desc": "desc", "buf": "net"}


class MoveMeter:
    """A core listener that counts the bytes compaction moves."""

    def __init__(self) -> None:
        self.moved = 0

    def on_alloc(self, chunk) -> None:
        pass

    def on_free(self, chunk) -> None:
        pass

    def on_move(self, chunk, old_start: int) -> None:
        if chunk.start != old_start:  # not a pin (same start, movability changed)
            self.moved += chunk.size


@dataclass
class Row:
    trace: str
    seed: int
    allocator: str
    config: str
    frames: int = 0
    failed: int = 0
    frag: int = 0
    fit_refused: int = 0
    fit_refused_frames: int = 0
    served: int = 0
    moved: int = 0
    worst: float = 0.0
    fill_sum: float = 0.0
    seconds: float = 0.0
    picture: str = ""  # the region's pageblocks at the end (grouping on)

    @property
    def ratio(self) -> float:
        return self.moved / max(self.served, 1)

    @property
    def fill(self) -> float:
        return self.fill_sum / max(self.frames, 1)


def region_text(trace: Trace, allocator: str, config: str) -> str:
    spec = f"{allocator}(pageblock={'2M' if config == 'pb=2M' else 0})"
    return f"video={trace.region_size() // 1024}K:{spec}"


def replay(trace: Trace, seed: int, allocator: str, config: str, scale: float = 1.0) -> Row:
    """Replay one trace on one allocator and configuration; the row of figures."""
    text = region_text(trace, allocator, config)
    cma = Cma(text, "*=video")
    region = cma.region("video")
    meter = MoveMeter()
    cma.listeners.append(meter)
    block = allocator_block(text.split(":", 1)[1])
    row = Row(trace.name, seed, allocator, config)
    live: dict = {}  # key -> Chunk (a move updates chunk.start in place, SPEC 4c)
    began = time.perf_counter()
    for event in events(trace, seed, scale):
        if not isinstance(event, Alloc):
            chunk = live.pop(event.key, None)
            if chunk is not None:
                cma.free(chunk.start)
            continue
        request(cma, region, meter, row, live, event, block)
    row.seconds = time.perf_counter() - began
    row.picture = region.pageblocks()
    return row


def request(cma: Cma, region, meter: MoveMeter, row: Row, live: dict, event: Alloc,
            block: int) -> None:
    """One allocation: served or refused, with the oracle's word on a refusal."""
    need = page_round(event.size, block)
    if event.counted:
        row.frames += 1
        row.fill_sum += 1 - region.free / region.size
    moved_before = meter.moved
    try:
        live[event.key] = cma.alloc(DEVICE[event.kind], event.size, movable=event.movable)
        row.served += need
    except CmaError as e:
        if e.errno != errno.ENOMEM:
            raise
        refused(cma, region, row, event, need, block)
    moved = meter.moved - moved_before
    if moved:
        row.moved += moved
        row.worst = max(row.worst, moved / need)


def refused(cma: Cma, region, row: Row, event: Alloc, need: int, block: int) -> None:
    row.failed += event.counted
    if region.free < need:
        return  # full: no gap can hold it
    row.frag += event.counted
    if event.measured and fitting_start(chunk_spans(cma, region), region.start, region.end,
                                        event.size, block=block) is not None:
        row.fit_refused += 1
        row.fit_refused_frames += event.kind == "frame"


def _replay(job: tuple) -> Row:
    return replay(*job)


# -- printing ------------------------------------------------------------

HEADER = (f"{'trace':<9}{'seed':>4} {'alloc':<7}{'config':<8}{'frames':>7}{'failed':>7}"
          f"{'frag':>6}{'fit-refused':>12}{'moved/served':>13}{'worst':>7}{'fill':>6}{'s':>6}")


def format_row(r: Row) -> str:
    fit = f"{r.fit_refused}" + (f" ({r.fit_refused_frames}f)" if r.fit_refused_frames else "")
    return (f"{r.trace:<9}{r.seed:>4} {r.allocator:<7}{r.config:<8}{r.frames:>7}{r.failed:>7}"
            f"{r.frag:>6}{fit:>12}{r.ratio:>12.3f}x{r.worst:>6.2f}x{r.fill:>6.0%}"
            f"{r.seconds:>6.1f}")


def verdict(trace: Trace, rows: list[Row]) -> tuple[str, list[str]]:
    """Whether the default fails more frames than grouping off beyond
    max(2, 1% of the frames), per allocator and seed; the losses."""
    by = {(r.allocator, r.seed, r.config): r for r in rows if r.trace == trace.name}
    losses = []
    for (allocator, seed, config), on in by.items():
        off = by.get((allocator, seed, "pb=0"))
        if config != "pb=2M" or off is None:
            continue
        slack = max(2, on.frames // 100)
        if on.failed > off.failed + slack:
            losses.append(f"{allocator}/s{seed} {on.failed} vs {off.failed} (slack {slack})")
    word = "grouping LOSES to pageblock=0" if losses else "grouping holds"
    return word, losses


def describe(trace: Trace, seeds: list[int], scale: float) -> str:
    sizes = ", ".join(f"{z / M:.2f}" for z in trace.frame_sizes())
    fills = " ".join(f"{demand_fill(trace, s, scale):.0%}" for s in seeds)
    return (f"  {trace.name:<9} region {trace.region_size() // M} MiB, nominal fill "
            f"{trace.fill:.0%} (asked per seed: {fills}), frames {sizes} MiB: {trace.what}")


def parse_seeds(text: str) -> list[int]:
    """``3`` -> seeds 1, 2, 3; ``5,9`` -> seeds 5 and 9."""
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return list(range(1, int(text) + 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one seed, a third of the measured steps")
    parser.add_argument("--seeds", default=None, help="N (seeds 1..N) or a list: 3,7")
    parser.add_argument("--trace", action="append", choices=sorted(BY_NAME),
                        help="run only this trace (repeatable)")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS))
    parser.add_argument("--pictures", action="store_true",
                        help="print each region's pageblocks at the end (grouping on)")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes replaying in parallel (default: the CPUs allowed)")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds or ("1" if args.quick else "2"))
    scale = 1 / 3 if args.quick else 1.0
    traces = [BY_NAME[n] for n in args.trace] if args.trace else list(TRACES)
    allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]
    jobs = [(t, s, a, c, scale) for t in traces for s in seeds for a in allocators
            for c in CONFIGS]
    began = time.perf_counter()
    print(f"frag: {len(traces)} traces x {len(seeds)} seeds x {len(allocators)} allocators "
          f"x {len(CONFIGS)} configs (grouping on, pageblock=2M; off, pageblock=0; the default is "
          f"{'on' if GROUP_BY_DEFAULT else 'off'}){' [quick]' if args.quick else ''}")
    for trace in traces:
        print(describe(trace, seeds, scale))
    print(HEADER)
    rows: list[Row] = []
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        for row in pool.imap(_replay, jobs, chunksize=1):
            rows.append(row)
            print(format_row(row), flush=True)
    summarise(traces, rows)
    if args.pictures:
        for r in rows:
            if r.picture:
                print(f"\npageblocks of {r.trace}/s{r.seed} {r.allocator} {r.config} at the end:")
                print(r.picture.rstrip())
    print(f"frag: {time.perf_counter() - began:.0f} s with {args.jobs} jobs")


def summarise(traces: list[Trace], rows: list[Row]) -> None:
    print("\nverdicts (failed frames, pageblock=2M vs pageblock=0, same allocator and seed):")
    for trace in traces:
        word, losses = verdict(trace, rows)
        print(f"  {trace.name:<9} {word}" + (": " + "; ".join(losses) if losses else ""))
    bad = [r for r in rows if r.fit_refused]
    print("\nrefused with a fitting range (SPEC 4b: must be 0):" + ("" if bad else " none"))
    for r in bad:
        print(f"  {r.trace}/s{r.seed} {r.allocator} {r.config}: {r.fit_refused}"
              f" ({r.fit_refused_frames} frames)")
    print_summary(traces, rows)
    totals: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        t = totals.setdefault((r.allocator, r.config), [0, 0, 0, 0])
        t[0] += r.frames
        t[1] += r.failed
        t[2] += r.frag
        t[3] += r.fit_refused
    print("\ntotals over the traces: frames failed / frag / fit-refused")
    for (allocator, config), (frames, failed, frag, fit) in sorted(totals.items()):
        print(f"  {allocator:<7}{config:<8} {failed}/{frames} ({failed / max(frames, 1):.1%})"
              f" frag {frag} fit-refused {fit}")


def print_summary(traces: list[Trace], rows: list[Row]) -> None:
    """Per trace and allocator, over the seeds: failed frames and fit-refused
    requests, pageblock=2M / pageblock=0 (a markdown table, for docs/performance.md)."""
    allocators = list(dict.fromkeys(r.allocator for r in rows))
    print("\nsummary over the seeds: failed frames pageblock=2M / pageblock=0 "
          "[fit-refused pageblock=2M / pageblock=0]")
    print("| trace | frames | " + " | ".join(allocators) + " |")
    print("|---|---|" + "---|" * len(allocators))
    for trace in traces:
        mine = [r for r in rows if r.trace == trace.name]
        if not mine:
            continue
        cells = []
        for allocator in allocators:
            on = [r for r in mine if r.allocator == allocator and r.config == "pb=2M"]
            off = [r for r in mine if r.allocator == allocator and r.config == "pb=0"]
            cell = f"{sum(r.failed for r in on)} / {sum(r.failed for r in off)}"
            fits = (sum(r.fit_refused for r in on), sum(r.fit_refused for r in off))
            cells.append(cell + (f" [{fits[0]} / {fits[1]}]" if any(fits) else ""))
        frames = sum(r.frames for r in mine if r.allocator == allocators[0]
                     and r.config == "pb=2M")
        print(f"| {trace.name} | {frames} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
