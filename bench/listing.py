"""Listing benchmark: ``cmactl list`` and ``list --json`` over a synthetic chunk table.

The client's side of a listing only (the daemon's rendering of ``chunkinfo``
is measured elsewhere): a temporary directory laid out like the mount holds
a ``chunkinfo`` of N lines, and ``cmactl list`` runs on it in a subprocess
(Python start-up included, output to /dev/null) with the mount check
skipped.  Printed per command: the wall and CPU time (medians of the runs;
CPU is the steadier figure on a shared machine) and the child's peak RSS.
``--tree DIR`` runs another checkout's cmactl on the same table (a checkout
from before a change gives the figure before it), so both are measured side
by side, alternating.  Target at 1,000,000 chunks:
at most 3 s per command.  Prints, never asserts.

    python bench/listing.py [--chunks N] [--runs R] [--tree DIR ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OWN_TREE = os.path.dirname(HERE)

#: What a chunk table row holds (see cmad/clients/client.py CHUNK_TABLE).
REGIONS = (("video", 0x40000000), ("common", 0x80000000), ("dma", 0x100000000))
DEVS = ("camera preview", "camera -", "net -", "gpu scanout", "- -")

RUN = """\
import sys
import cmad.clients.client
cmad.clients.client.Client.check = lambda self: None
from cmad.clients.cmactl import main
sys.exit(main(sys.argv[1:]))
"""


def write_table(path: str, chunks: int) -> None:
    """``chunks`` rows by start, 4 KiB apart in three regions; a third labelled,
    one in four movable; created over ~5 minutes (so ages repeat, as they do)."""
    t0 = time.time() - 3 * 86400
    per_region = -(-chunks // len(REGIONS))
    with open(path, "w") as f:
        lines = []
        for i in range(chunks):
            name, base = REGIONS[i // per_region]
            start = base + (i % per_region) * 4096
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + i // 3000))
            label = f"buf{i}" if i % 3 == 0 else "-"
            lines.append(f"{start:016x} 4096 {name} {DEVS[i % len(DEVS)]} {1000 + i % 4} "
                         f"{4000 + i % 97} {created} {int(i % 4 == 0)} {label}\n")
            if len(lines) >= 65536:
                f.write("".join(lines))
                lines.clear()
        f.write("".join(lines))


def run(tree: str, mnt: str, args: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system: steadier on a shared machine)
    and peak RSS (KiB) of one cmactl run on ``tree``'s code."""
    env = {**os.environ, "PYTHONPATH": tree}
    with open(os.devnull, "w") as null:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", RUN, "--mountpoint", mnt, *args],
                                stdout=null, env=env, cwd=tree)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
    if status:
        raise SystemExit(f"cmactl {' '.join(args)} on {tree} failed: status {status}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tree", action="append", default=[],
                   help="another checkout to compare (e.g. /work/main)")
    args = p.parse_args()
    trees = [OWN_TREE] + args.tree
    with tempfile.TemporaryDirectory() as mnt:
        write_table(os.path.join(mnt, "chunkinfo"), args.chunks)
        size = os.path.getsize(os.path.join(mnt, "chunkinfo"))
        print(f"chunk table: {args.chunks:,} rows, {size / 1e6:.0f} MB; "
              f"median of {args.runs} runs, alternating trees")
        for command in (["list"], ["list", "--json"]):
            figures: dict[str, list[tuple[float, float, int]]] = {t: [] for t in trees}
            for _ in range(args.runs):
                for tree in trees:
                    figures[tree].append(run(tree, mnt, command))
            own = statistics.median(c for _, c, _ in figures[OWN_TREE])
            for tree in trees:
                wall = statistics.median(w for w, _, _ in figures[tree])
                cpu = statistics.median(c for _, c, _ in figures[tree])
                rss = max(r for _, _, r in figures[tree]) / 1024
                ratio = "" if tree == OWN_TREE else f"  ({cpu / own:.1f}x this tree's CPU)"
                print(f"cmactl {' '.join(command):12} {tree:24} {wall:7.2f} s wall "
                      f"{cpu:7.2f} s CPU  peak RSS {rss:6.0f} MiB{ratio}")
        load = os.getloadavg()[0]
        print(f"target at 1,000,000 chunks: at most 3 s per command (load average {load:.1f} "
              f"on {os.cpu_count()} CPUs while measuring)")


if __name__ == "__main__":
    main()
