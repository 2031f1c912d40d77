"""Recovery: journalled chunks back at exactly their old places.

The facade's ``restore`` (one chunk) and ``restore_many`` (all of them, in
bulk) call these under its lock: here the rows are checked against the
regions, the ranges reserved from each region's allocator and the chunks
built; the facade then indexes them and counts them.  Nothing here tells a
listener: the journal already has every chunk it gives back.
"""

from __future__ import annotations

import errno
from typing import Callable, Iterable

from cmad.allocators import PAGE_SHIFT
from cmad.core.chunks import Chunk
from cmad.core.regions import Region
from cmad.errors import CmaError
from cmad.memparse import exact, fmt_addr

Plan = dict[Region, tuple[list, list]]  # region -> ((start, size, movable) ranges, chunks)


def misfit(region: Region | None, name: str, start: int,
           size: int) -> tuple[int, str] | None:
    """(errno, why) a journalled chunk cannot go back into ``region``; None if it can."""
    if region is None or region.allocator is None:
        return errno.ENOENT, f"chunk {fmt_addr(start)}: region {name!r} is gone or has no allocator"
    if start < region.start or start + size > region.end:
        return errno.EADDRINUSE, (f"chunk {fmt_addr(start)}+{exact(size)} is not inside region "
                                  f"{name} [{fmt_addr(region.start)}, {fmt_addr(region.end)})")
    return None


def label_taken(start: int, label: str) -> str:
    return f"chunk {fmt_addr(start)}: label {label!r} is taken"


def not_free(start: int, size: int, region: str) -> str:
    return f"chunk {fmt_addr(start)}+{exact(size)} overlaps another chunk or is not free in region {region}"


def restore_one(regions: dict[str, Region], by_label: Callable[[str], Chunk | None], id: int,
                start: int, size: int, region: str, dev: str, type: str, **fields) -> Chunk:
    """The chunk recorded before a restart, its range reserved at exactly its old
    place (not indexed yet).  ENOENT if the region is gone, EADDRINUSE if the
    range is not free or not inside it, EEXIST if its label is taken."""
    r = regions.get(region)
    why = misfit(r, region, start, size)
    if why is not None:
        raise CmaError(*why)
    label = fields.get("label")
    if label is not None and by_label(label):
        raise CmaError(errno.EEXIST, label_taken(start, label))
    if not r.allocator.reserve_for(start, size, bool(fields.get("movable"))):
        raise CmaError(errno.EADDRINUSE, not_free(start, size, region))
    return Chunk(id, start, size, r, dev, type, **fields)


def plan_rows(rows: Iterable[tuple], regions: dict[str, Region],
              by_label: Callable[[str], Chunk | None]) -> tuple[Plan, list[Chunk], list[str]]:
    """The chunks of ``rows`` (tuples in ``chunks.RECORD`` order, best sorted by
    start) grouped by region, each region's in address order; every chunk in
    address order; and why each row that cannot go back cannot."""
    plan: Plan = {r: ([], []) for r in regions.values()}
    bounds = {r.name: (r, r.start, r.end) for r in plan if r.allocator is not None}
    restored: list[Chunk] = []
    problems: list[str] = []
    labels: set[str] = set()
    shared: dict = {}  # one object per distinct size, pid, dev...: not one per chunk
    share = shared.setdefault
    ordered, last = True, -1
    for (id, start, size, name, dev, type, uid, pid, label, created, movable,
         transient, bound, alignment) in rows:
        where = bounds.get(name)
        if where is None or start < where[1] or start + size > where[2]:
            problems.append(misfit(regions.get(name), name, start, size)[1])
            continue
        if label is not None:
            if label in labels or by_label(label):
                problems.append(label_taken(start, label))
                continue
            labels.add(label)
        r = where[0]
        chunk = Chunk(id, start, share(size, size), r, share(dev, dev), share(type, type),
                      share(uid, uid), share(pid, pid), label, created, movable == 1,
                      transient == 1, bound, share(alignment, alignment))
        ranges, chunks = plan[r]
        ranges.append((start, size, chunk.movable))
        chunks.append(chunk)
        restored.append(chunk)
        if start < last:
            ordered = False
        last = start
    plan = {r: entry for r, entry in plan.items() if entry[0]}
    if not ordered:
        for ranges, chunks in plan.values():
            ranges.sort()
            chunks.sort(key=lambda c: c.start)
        restored.sort(key=lambda c: c.start)
    return plan, restored, problems


def reserve_planned(plan: Plan, problems: list[str]) -> None:
    """Each region's allocator reserves its chunks; if anything failed, every
    reservation is given back and CmaError (EINVAL) names each problem."""
    granted = []
    for r, (ranges, _) in plan.items():
        done = r.allocator.reserve_many(ranges)
        granted.append((r, ranges, done))
        problems.extend(not_free(start, size, r.name)
                        for (start, size, _), ok in zip(ranges, done) if not ok)
    if problems:
        for r, ranges, done in granted:
            for (start, size, movable), ok in zip(ranges, done):
                if ok:
                    r.allocator.free_for(start, size, movable)
        raise CmaError(errno.EINVAL, "; ".join(problems))


def count_restored(region: Region, chunks: list[Chunk], held: dict[int, int]) -> int:
    """What indexing and ``restore`` count per chunk, for a region's restored
    chunks (``held``: bytes per uid); returns the id after the highest (0: none)."""
    used = 0
    for chunk in chunks:
        used += chunk.size
        held[chunk.uid] = held.get(chunk.uid, 0) + chunk.size
    region.users += len(chunks)
    region.used += used
    region.movable_users += sum(chunk.movable for chunk in chunks)
    region.alloc_ok += len(chunks)
    region.alloc_pages += used >> PAGE_SHIFT
    region.peak_used = max(region.peak_used, region.used)
    return max(chunk.id for chunk in chunks) + 1 if chunks else 0
