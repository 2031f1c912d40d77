"""Building a physically contiguous arena: time, pages gathered against kept, longest run.

For arenas of 64 MiB, 512 MiB and 2 GiB (one region each, so the whole arena
must lie in one physical run), this builds the arena as the daemon does
(hugepage pool raised by what is missing, pages gathered, sorted by frame,
laid out, the rest given back) and prints, per size, the median of the
runs: seconds to build, pages gathered / kept (the ratio is the reference:
1.0 means the first pages the kernel gave held a long enough run), and the
longest physical run found.  A build with contiguous=virtual (pool raise and
allocation only) is timed alternately as the floor.  Root only; the pool is
restored after every build.  Never asserts.

    sudo .venv/bin/python bench/arena.py [--repeat 3] [--sizes 64M,512M,2G]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cmad.memory.hugepages import NR_HUGEPAGES, Pool  # noqa: E402
from cmad.memparse import human, memparse  # noqa: E402
from cmad.memory.physmap import Span, build_file  # noqa: E402


def nr() -> int:
    with open(NR_HUGEPAGES) as f:
        return int(f.read())


def build(size: int, physical: bool) -> tuple[float, int, int, int]:
    """One build and teardown; (seconds, gathered, kept, longest run in bytes)."""
    pool = Pool(None, "reserve")
    for attempt in range(3):  # another process may take the pages first (as the daemon)
        t0 = time.monotonic()
        try:
            fd, layout = build_file(None, size, [Span("r", 0, size, physical)], pool,
                                    strict=False)
            break
        except OSError:
            if attempt == 2:
                raise
    seconds = time.monotonic() - t0
    os.close(fd)  # the memfd's pages go back to the free pool ...
    pool.give_back()  # ... and the pool shrinks by what was added
    return seconds, layout.gathered, layout.kept, layout.longest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--sizes", default="64M,512M,2G")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/arena.py: needs root (the hugepage pool)")
        return 0
    logging.basicConfig(level=logging.INFO if os.environ.get("BENCH_LOG") else logging.WARNING)
    before = nr()
    print(f"machine: {os.cpu_count()} CPUs, vm.nr_hugepages {before} at start")
    print(f"{'arena':>8} {'build s':>8} {'floor s':>8} {'ratio':>6} {'gathered':>9} "
          f"{'kept':>6} {'gath/kept':>9} {'longest run':>12}")
    try:
        for text in args.sizes.split(","):
            size = memparse(text)
            phys, floor, rows = [], [], []
            for _ in range(args.repeat):  # alternate the build and its floor
                row = build(size, True)
                rows.append(row)
                phys.append(row[0])
                floor.append(build(size, False)[0])
            gathered = statistics.median(r[1] for r in rows)
            kept = rows[0][2]
            longest = statistics.median(r[3] for r in rows)
            print(f"{human(size):>8} {statistics.median(phys):8.2f} "
                  f"{statistics.median(floor):8.2f} "
                  f"{statistics.median(phys) / max(statistics.median(floor), 1e-9):6.1f} "
                  f"{gathered:9.0f} {kept:6d} {gathered / kept:9.2f} {human(int(longest)):>12}"
                  + ("" if longest >= size else "   (no run held the arena)"))
    finally:
        if nr() != before:
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(before))
    print(f"vm.nr_hugepages {nr()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
