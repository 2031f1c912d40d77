"""The Cma facade: regions, map, allocators and chunks behind one lock.

This is the whole core API; the filesystem is one client of it, the tests
another.  Every method either succeeds or raises CmaError and changes nothing.
The facade takes the lock and hands over: the listeners and their veto and
undo are ``events``, moves, heads released and pins ``mover``, compaction
``compaction`` (through the mover and the allocator interface), putting
journalled chunks back ``recovery``.
"""

from __future__ import annotations

import errno
import functools
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from cmad.core import compaction, recovery

from cmad.allocators import PAGE_SHIFT, PAGE_SIZE, Allocator, registry
from cmad.memory.arena import Arena
from cmad.core.chunks import Chunk, ChunkIndex, check_label
from cmad.core.events import Listener, Listeners, Tracer  # noqa: F401 (Listener: re-exported)
from cmad.errors import CmaError, clip, einval
from cmad.core.map import DEFAULT_TYPE, Map
from cmad.core.mover import Mover
from cmad.memparse import U64_MAX, exact, fmt_addr, human, is_power_of_two
from cmad.protocol import SUMMED_KEYS, FreeKey, parse_free_key
from cmad.core.regions import (AllocSpec, Region, RegionSpec, RegionStats, check_name, fragmentation,
                      layout, parse_alignment, parse_alloc_spec, parse_regions)

log = logging.getLogger(__name__)

DEFAULT_BASE = 0x40000000

# Policy as data: what an allocation tries, in order, when no region served it
# at once.  Taking a free range that fits (across pageblocks of other types, or
# assembled from buddy blocks of lower orders) comes before moving anything:
# grouping decides where a chunk goes among the ranges that fit, never whether
# it fits (SPEC 4b).
SLOW_PATHS = ("fallback", "anywhere", "compact")


@dataclass(frozen=True)
class Info:
    """The patch's cma_info: what the map gives one (device, type) request."""

    lower_bound: int
    upper_bound: int
    total_size: int
    free_size: int
    count: int


def _locked(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self: "Cma", *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


def allocator_class(allocators: dict[str, type[Allocator]], name: str | None,
                    what: str) -> type[Allocator]:
    """The named allocator, or the default (first registered) for None; EINVAL if unknown."""
    if name is None:
        if not allocators:
            raise einval(f"{what}: no allocator is registered")
        return next(iter(allocators.values()))
    try:
        return allocators[name]
    except KeyError:
        raise einval(f"{what}: unknown allocator {name!r} (registered: "
                     f"{' '.join(allocators)})") from None


def plan_regions(text: str, base: int, arena_size: int | None,
                 allocators: dict[str, type[Allocator]]) -> tuple[list[RegionSpec], dict[str, int]]:
    """Parse and place the regions without building their allocators."""
    specs = parse_regions(text)
    granules = {s.name: allocator_class(allocators, s.alloc.name, f"region {s.name}")
                .granule(**s.alloc.params) for s in specs}
    return specs, layout(specs, base, arena_size, granules)


def _named_once(names: list[str]) -> list[str]:
    """EINVAL for a region named twice: trying it again can only fail again, and
    ``@r,r,r,...`` must not make one write cost thousands of tries."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise einval(f"alloc from {clip(','.join(names))}: region {clip(name)} is "
                         "named twice")
        seen.add(name)
    return names


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _runs(chunks: Iterable[Chunk]) -> Iterator[tuple[int, int]]:
    """(start, size) of each run of back-to-back chunks (given in address order):
    one system call per run, not per chunk, when a sticky region comes back."""
    run_start = run_end = None
    for chunk in chunks:
        if chunk.start != run_end:
            if run_start is not None:
                yield run_start, run_end - run_start
            run_start = chunk.start
        run_end = chunk.start + chunk.size
    if run_start is not None:
        yield run_start, run_end - run_start


def _request(dev: str, type: str, size: int, alignment: int) -> str:
    """How log lines and errors name an allocation request (not a closure per
    request: that would cost every allocation its cells)."""
    return f"alloc {dev}/{type} {exact(size)}/{exact(alignment)}"


class Cma:
    """Contiguous memory allocator over named regions of one arena."""

    def __init__(self, regions: str = "", map: str = "", *, base: int = DEFAULT_BASE,
                 arena_size: int | None = None, arena: Arena | None = None,
                 limits: dict[int, int] | None = None):
        if base <= 0 or base % PAGE_SIZE:
            raise einval(f"base {base:#x} must be a positive multiple of the page size")
        self._lock = threading.RLock()
        self._allocators: dict[str, type[Allocator]] = dict(registry())
        if arena is not None and arena_size is None:
            arena_size = arena.size
        specs, starts = plan_regions(regions, base, arena_size, self._allocators)
        self.base = base
        self.arena_size = arena_size if arena_size is not None else (
            max((starts[s.name] + s.size for s in specs), default=base) - base)
        self._regions: dict[str, Region] = {}
        for spec in specs:
            region = Region(spec, starts[spec.name])
            region.attach(self._allocator_class(spec.alloc.name, ""), spec.alloc.params)
            self._regions[spec.name] = region
        self._map = Map(map)
        self._routes: dict[tuple[str, str | None], list[Region]] = {}  # alloc's memo
        self.chunks = ChunkIndex()
        self._next_id = 1
        self.limits: dict[int, int] = dict(limits or {})
        self._held: dict[int, int] = {}
        self.listeners = Listeners()  # durable first, then views (cmad.core.events)
        self._mover = Mover(self.chunks, self.listeners, base, lambda: self.tracer,
                            self._held)
        # The trace hook (cmad.daemon.trace.Tracer) while some trace event is enabled,
        # else None: a disabled event costs one attribute test.
        self.tracer: Tracer | None = None
        self.arena: Arena | None = None
        if arena is not None:
            self.attach_arena(arena)

    def attach_arena(self, arena: Arena) -> None:
        """Put memory behind the bookkeeping; ENOMEM if the arena is too small."""
        if arena.size < self.arena_size:
            raise CmaError(errno.ENOMEM, f"arena of {human(arena.size)} is smaller than the "
                                         f"{human(self.arena_size)} the regions need")
        self.arena = self._mover.arena = arena
        for region in self._regions.values():
            if region.kind == "exclusive":
                arena.populate(region.start - self.base, region.size)
            else:
                self._settle_sticky(region)

    def _settle_sticky(self, region: Region) -> None:
        """A sticky region holds memory for its chunks only."""
        for start, size in _runs(self.chunks_of(region)):
            self.arena.populate(start - self.base, size)
        if region.allocator is not None:
            for start, size in region.allocator.holes():
                self.arena.release(start - self.base, size)

    # -- introspection -------------------------------------------------

    @property
    def regions(self) -> tuple[Region, ...]:
        """All regions in address order."""
        return tuple(sorted(self._regions.values(), key=lambda r: r.start))

    def region(self, name: str) -> Region:
        try:
            return self._regions[name]
        except KeyError:
            raise CmaError(errno.ENOENT, f"no region named {clip(name)}") from None

    @property
    def allocators(self) -> list[str]:
        """Registered allocator names; the first is the default."""
        return [name or "-" for name in self._allocators]

    @property
    def map(self) -> str:
        return self._map.text

    @_locked
    def set_map(self, text: str) -> None:
        """Replace the map; a syntax error raises EINVAL and keeps the old one."""
        self._map = Map(text)
        self._routes = {}
        log.info("map set to %r", self._map.text)

    def held(self, uid: int) -> int:
        return self._held.get(uid, 0)

    # -- allocators ----------------------------------------------------

    def _allocator_class(self, name: str | None, what: str) -> type[Allocator]:
        return allocator_class(self._allocators, name, what)

    @_locked
    def set_allocator(self, region_name: str, text: str) -> None:
        """The region's ``alloc`` attribute: empty means the default allocator; an
        unregistered name is remembered and shown as ``[name]`` until registered."""
        region = self.region(region_name)
        if region.users:
            raise CmaError(errno.EBUSY, f"region {region.name} has {region.users} chunks; "
                                        "its allocator can change only when it has none")
        spec = parse_alloc_spec(text, f"region {region.name}: allocator")
        if spec.kind != "exclusive" or "sticky" in text:
            raise einval(f"region {region.name}: the kind is set by the configuration, "
                         "not the alloc attribute")
        if spec.group is not None:
            raise einval(f"region {region.name}: the group it is shared with is set by the "
                         "configuration, not the alloc attribute")
        old_class, old_spec = type(region.allocator) if region.allocator else None, region.wanted
        self._switch_allocator(region, spec)
        # the journal: a restart brings it back
        self.listeners.allocator(region, functools.partial(self._switch_allocator, region,
                                                           old_spec, old_class))

    def _switch_allocator(self, region: Region, spec: AllocSpec,
                          cls: type[Allocator] | None = None) -> None:
        """Give the (chunkless) region a fresh allocator for ``spec``, or leave it
        pending when ``spec`` names an allocator not registered yet."""
        if cls is None and spec.name is not None and spec.name not in self._allocators:
            region.detach()
            region.wanted = spec
            log.info("region %s: allocator %r is not registered; pending", region.name,
                     spec.name)
            return
        cls = cls or self._allocator_class(spec.name, f"region {region.name}")
        region.attach(cls, spec.params)
        region.wanted = spec

    @_locked
    def register_allocator(self, cls: type[Allocator]) -> None:
        """Register another allocator; regions waiting for its name get it now."""
        self._allocators[cls.name] = cls
        for region in self._regions.values():
            if region.allocator is None and region.wanted.name == cls.name:
                region.attach(cls, region.wanted.params)

    # -- allocation ----------------------------------------------------

    def alloc(self, dev: str, size: int, alignment: int = 0, type: str | None = None, *,
              label: str | None = None, movable: bool = False, transient: bool = False,
              bound: int | None = None, uid: int = 0, pid: int = 0) -> Chunk:
        """Allocate from the regions the map gives (dev, type), tried in order."""
        with self._lock:  # not @_locked: one call less on the hot path
            regions = self._routes.get((dev, type))
            if regions is None:
                regions = self._route(dev, type)
            return self._alloc(regions, size, alignment, dev, type or DEFAULT_TYPE, label,
                               movable, transient, bound, uid, pid)

    def _route(self, dev: str, type: str | None) -> list[Region]:
        """The regions the map gives (dev, type), names checked; remembered (up to
        4096 pairs, until the map changes) when there is at least one."""
        key = (dev, type)
        type = type or DEFAULT_TYPE
        check_name(dev, "device")  # 1 to 64 of [A-Za-z0-9_.-]: no newline in chunkinfo,
        check_name(type, "type")   # no essay in the journal; once per remembered pair
        names = self._map.lookup(dev, type)
        regions = [self._regions[n] for n in dict.fromkeys(names) if n in self._regions]
        if not regions:
            raise CmaError(errno.ENOENT, f"map sends {dev}/{type} to {','.join(names)}, "
                                         "none of which exists")
        if len(self._routes) < 4096:
            self._routes[key] = regions
        return regions

    @_locked
    def alloc_from(self, regions: str | Sequence[str], size: int, alignment: int = 0, *,
                   dev: str = "-", **options) -> Chunk:
        """Allocate from the named regions (the patch's cma_alloc_from); ``dev``
        names the asker where it is not a client's request (``cma_debug``)."""
        names = _named_once([n.strip() for n in (regions.split(",")
                                                 if isinstance(regions, str) else regions)])
        if dev != "-":
            check_name(dev, "device")
        return self._alloc([self.region(n) for n in names], size, alignment,
                           dev, "-", **options)

    def _alloc(self, regions: list[Region], size: int, alignment: int, dev: str, type: str,
               label: str | None = None, movable: bool = False, transient: bool = False,
               bound: int | None = None, uid: int = 0, pid: int = 0) -> Chunk:
        if (size.__class__ is int and 0 < size <= U64_MAX and label is None and bound is None
                and (alignment == 0 or alignment == PAGE_SIZE)):
            # The common request, which _checked would pass unchanged but for rounding.
            size = (size + PAGE_SIZE - 1) & -PAGE_SIZE
            alignment = PAGE_SIZE
        else:
            what = functools.partial(_request, dev, type, size, alignment)
            size, alignment = self._checked(what, size, alignment, bound, label)
        limit = self.limits.get(uid) if self.limits else None
        if limit is not None and self.held(uid) + size > limit:
            raise CmaError(errno.EDQUOT, f"{_request(dev, type, size, alignment)}: uid {uid} "
                                         f"holds {human(self.held(uid))} of its {human(limit)} "
                                         "limit")
        # A bound is kept on the fast path (and by moves) by aligning to the chunk's
        # size rounded up to a power of two; alloc_anywhere keeps it exactly.
        fast = max(alignment, _next_pow2(size)) if bound is not None else alignment
        checks = bound is not None or limit is not None  # what _fits has to look at
        failed: list[Region] = []
        over_limit: list[Region] = []  # had room, but only past the caller's limit
        tracer = self.tracer
        for region in regions:
            if tracer is not None:
                tracer.alloc_start(region, size, alignment)
            allocator = region.allocator
            # size <= region.free, without the property's call
            got = (allocator.alloc_for(size, fast, movable)
                   if allocator is not None and size <= region.size - region.used else None)
            if got is not None and (not checks or self._fits(got, region, bound, limit, uid,
                                                             over_limit, movable)):
                return self._new_chunk(got, region, dev, type, failed, size, label, movable,
                                       transient, bound, uid, pid, fast)
            if region not in over_limit:
                failed.append(region)
        # The slow paths (SLOW_PATHS), each over every region that could not serve.
        for why, serve in self._slow_paths:
            for region in failed:
                if region.allocator is None or region.free < size:
                    continue
                got = serve(region, size, alignment, fast, movable, bound)
                if got is not None and self._fits(got, region, bound, limit, uid, over_limit,
                                                  movable):
                    log.info("%s: served after %s region %s",
                             _request(dev, type, size, alignment), why, region.name)
                    return self._new_chunk(got, region, dev, type,
                                           [r for r in failed if r is not region], size,
                                           label, movable, transient, bound, uid, pid, fast)
        for region in failed:
            self._charge_fail(region, size, alignment)
        raise self._refusal(regions, over_limit, _request(dev, type, size, alignment), uid,
                            limit)

    def _refusal(self, regions: list[Region], over_limit: list[Region], what: str, uid: int,
                 limit: int | None) -> CmaError:
        """EDQUOT where only the caller's limit stood in the way, else ENOMEM naming
        every region tried with its free bytes and its largest free range."""
        if over_limit:
            return CmaError(errno.EDQUOT, f"{what}: uid {uid} holds {human(self.held(uid))} "
                                          f"of its {human(limit)} limit; what "
                                          + ", ".join(r.name for r in over_limit)
                                          + " could give would take it past")
        tried = ", ".join(r.describe() if r.allocator else f"{r.name} (no allocator: "
                          f"{r.alloc_text})" for r in regions)
        why = f"{what}: no room; tried {tried}"
        log.info("%s", why)
        return CmaError(errno.ENOMEM, why)

    def _checked(self, request: Callable[[], str], size: int, alignment: int,
                 bound: int | None, label: str | None) -> tuple[int, int]:
        """The request's size and alignment as the allocators take them; EINVAL or
        EEXIST for a bad one."""
        if not isinstance(size, int) or size <= 0 or size > U64_MAX:
            raise einval(f"{request()}: size must be between 1 and 2^64-1")
        alignment = (PAGE_SIZE if alignment == 0 or alignment == PAGE_SIZE
                     else parse_alignment(alignment, f"{request()}: alignment"))
        size = (size + PAGE_SIZE - 1) & -PAGE_SIZE
        if bound is not None:
            if not is_power_of_two(bound) or bound < PAGE_SIZE or size > bound or bound >= 1 << 63:
                raise einval(f"{request()}: bound {bound:#x} must be a power of two "
                             "no smaller than the page size or the chunk")
        if label is not None:
            check_label(label)
            if self.chunks.by_label(label) is not None:
                raise CmaError(errno.EEXIST, f"{request()}: label {label!r} is taken")
        return size, alignment

    # Each slow path takes (region, size, alignment, fast alignment, movable, bound).

    def _make_room(self, region: Region, size: int, alignment: int, fast: int,
                   movable: bool, bound: int | None) -> tuple[int, int] | None:
        if not region.movable_users:
            return None
        return compaction.make_room(self.chunks, region, self._mover, size, fast, movable)

    @staticmethod
    def _fallback(region: Region, size: int, alignment: int, fast: int,
                  movable: bool, bound: int | None) -> tuple[int, int] | None:
        return region.allocator.fallback(size, fast, movable)

    @staticmethod
    def _anywhere(region: Region, size: int, alignment: int, fast: int,
                  movable: bool, bound: int | None) -> tuple[int, int] | None:
        return region.allocator.alloc_anywhere(size, alignment, movable, bound)

    @property
    def _slow_paths(self) -> tuple[tuple[str, Callable], ...]:
        """SLOW_PATHS as (log words, method)."""
        paths = {"fallback": ("a fallback in", self._fallback),
                 "anywhere": ("taking any free range of", self._anywhere),
                 "compact": ("compacting", self._make_room)}
        return tuple(paths[name] for name in SLOW_PATHS)

    def _fits(self, got: tuple[int, int], region: Region, bound: int | None,
              limit: int | None, uid: int, over_limit: list[Region],
              movable: bool = False) -> bool:
        """Whether the chunk the allocator returned (rounded up to its block) still
        keeps the request's bound and the caller's limit; if not it is given back.
        A region past the limit is skipped like a full one (SPEC 6) and noted in
        ``over_limit``: the next region may still serve within the limit."""
        start, size = got
        if bound is not None and start // bound != (start + size - 1) // bound:
            region.allocator.free_for(start, size, movable)
            return False
        if limit is not None and self.held(uid) + size > limit:
            region.allocator.free_for(start, size, movable)
            if region not in over_limit:
                over_limit.append(region)
                if self.tracer is not None:
                    self.tracer.alloc_finish(region, None, size, PAGE_SIZE, -errno.EDQUOT)
            return False
        return True

    def _charge_fail(self, region: Region, size: int, alignment: int,
                     error: int = errno.ENOMEM) -> None:
        """``region`` was tried for a request and could not serve it."""
        region.alloc_fail += 1
        region.fail_pages += size >> PAGE_SHIFT
        if self.tracer is not None:
            self.tracer.alloc_finish(region, None, size, alignment, -error)

    def _new_chunk(self, got: tuple[int, int], region: Region, dev: str, type: str,
                   failed: list[Region], asked: int, label: str | None, movable: bool,
                   transient: bool, bound: int | None, uid: int, pid: int,
                   alignment: int) -> Chunk:
        """Make, index and commit the chunk ``region`` served (``_index`` and the
        listeners, inline: the hot path); charge the regions that could not."""
        for other in failed:
            self._charge_fail(other, asked, alignment)
        start, size = got
        chunk = Chunk(self._next_id, start, size, region, dev, type, uid, pid, label, None,
                      movable, transient, bound, alignment)  # positional: RECORD order
        self._next_id += 1
        self.chunks.add(chunk)
        region.users += 1
        used = region.used = region.used + size
        region.movable_users += movable
        held = self._held
        held[uid] = held.get(uid, 0) + size
        tracer = self.tracer
        if self.arena is not None or self.listeners:
            try:
                self._tell_alloc(chunk)
            except CmaError as e:
                if tracer is not None:
                    tracer.alloc_finish(region, None, asked, alignment, -e.errno)
                raise
        region.alloc_ok += 1
        region.alloc_pages += size >> PAGE_SHIFT
        if used > region.peak_used:
            region.peak_used = used
        if tracer is not None:
            tracer.alloc_finish(region, chunk, size, alignment, 0)
        return chunk

    @_locked
    def restore(self, id: int, start: int, size: int, region: str, dev: str, type: str,
                **fields) -> Chunk:
        """Put back a chunk recorded before a restart, at exactly its old place.

        Listeners are not told (the journal already has it).  ENOENT if the
        region is gone, EADDRINUSE if the range is not free or not inside it.
        """
        chunk = recovery.restore_one(self._regions, self.chunks.by_label, id, start, size,
                                     region, dev, type, **fields)
        r = chunk.region
        self._next_id = max(self._next_id, id + 1)
        self._index(chunk)
        r.alloc_ok += 1
        r.alloc_pages += size >> PAGE_SHIFT
        r.peak_used = max(r.peak_used, r.used)
        return chunk

    @_locked
    def restore_many(self, rows: Iterable[tuple]) -> int:
        """Put back journalled chunks in bulk (recovery); returns how many.

        ``rows`` are tuples in ``chunks.RECORD`` order, best sorted by start
        (the journal's order).  The result is exactly that of ``restore`` row
        by row, but each region's allocator reserves all its chunks in one
        ``reserve_many`` and the chunk index is built in one go.  If any row
        does not fit, CmaError (EINVAL) names every such row and nothing
        changes.
        """
        plan, restored, problems = recovery.plan_rows(rows, self._regions, self.chunks.by_label)
        recovery.reserve_planned(plan, problems)
        self.chunks.add_many(restored)
        for r, (_, chunks) in plan.items():
            self._next_id = max(self._next_id, recovery.count_restored(r, chunks, self._held))
        return len(restored)

    def skip_ids(self, next_id: int) -> None:
        """Ids below ``next_id`` were handed out before a restart: never again."""
        self._next_id = max(self._next_id, next_id)

    @_locked
    def catch_up(self) -> None:
        """Let listeners retry what they could not record (the journal's deferred
        frees after a full state disk); the daemon's heartbeat calls this."""
        self.listeners.catch_up()

    def _index(self, chunk: Chunk) -> None:
        self.chunks.add(chunk)
        region = chunk.region
        region.users += 1
        region.used += chunk.size
        region.movable_users += chunk.movable
        self._held[chunk.uid] = self._held.get(chunk.uid, 0) + chunk.size

    def _tell_alloc(self, chunk: Chunk) -> None:
        """Zero the chunk's bytes and tell the listeners; undo all if one vetoes
        (the listeners told already hear ``on_free``)."""
        try:
            if self.arena is not None:
                if chunk.region.kind == "sticky":
                    self.arena.populate(chunk.start - self.base, chunk.size)
                self.arena.zero(chunk.start - self.base, chunk.size)  # no bytes of the past
            if self.listeners:
                self.listeners.alloc(chunk)
        except BaseException:
            self._forget(chunk)
            raise

    def _forget(self, chunk: Chunk) -> None:
        self.chunks.remove(chunk)
        region = chunk.region
        start, size, uid = chunk.start, chunk.size, chunk.uid
        region.allocator.free_for(start, size, chunk.movable)
        if self.arena is not None and region.kind == "sticky":
            self.arena.release(start - self.base, size)
        region.users -= 1
        region.used -= size
        region.movable_users -= chunk.movable
        held = self._held
        left = held[uid] - size
        if left:
            held[uid] = left
        else:
            del held[uid]

    # -- moves ---------------------------------------------------------

    @_locked
    def release_head(self, chunk: Chunk, size: int) -> None:
        """Give back the first ``size`` bytes of ``chunk``, which stays, smaller
        and starting ``size`` later: the kernel's ``cma_release`` of a part
        (mm/cma_debug.c frees a list entry's head that way).

        ``size`` must be below the chunk's size and a multiple of its alignment
        and of the allocator's granule (EINVAL otherwise).  The allocator is
        asked through its public entry points: the whole chunk is freed and
        its tail reserved again, as recovery would reserve it.  Listeners hear
        ``on_move`` (the start and size changed; the id and label stay).
        """
        self.check_live(chunk)
        self._mover.release_head(chunk, size)

    @_locked
    def pin(self, chunk: Chunk) -> None:
        """Make a movable chunk pinned for good (its mapping was handed out)."""
        self.check_live(chunk)
        self._mover.pin(chunk)

    @_locked
    def compact(self, region_name: str) -> int:
        """Move the region's movable chunks down now; returns how many moved."""
        moved = 0
        for moved in self.compact_steps(region_name):
            pass
        return moved

    def compact_steps(self, region_name: str) -> Iterator[int]:
        """``compact`` as steps of bounded work (at most one move each), the lock
        held only within a step: a caller may let others in between steps.
        Yields the moves so far."""
        with self._lock:
            region = self.region(region_name)
            if region.allocator is None:
                raise CmaError(errno.ENODEV, f"region {region.name} has no allocator")
            steps = compaction.compact_steps(self.chunks, region, self._mover)
        moved = 0
        while True:
            with self._lock:
                moved = next(steps, None)
            if moved is None:
                break
            yield moved
        log.info("compacted region %s: %d chunks moved", region.name, region.last_compact)

    # -- free ----------------------------------------------------------

    def find(self, key: int | str) -> Chunk:
        """A chunk by start address or by the text the ``free`` file takes
        (`cmad.protocol.parse_free_key`): the %p form, 0x hex, decimal,
        ``id=<n>`` (exactly that chunk, wherever it moved), or a label."""
        if isinstance(key, str):
            parsed = parse_free_key(key)
            if parsed.kind == "id":
                return self._find_id(parsed)
            if parsed.kind == "label":
                chunk = self.chunks.by_label(parsed.value)
                if chunk is None:
                    raise CmaError(errno.ENOENT, f"no chunk labelled {clip(parsed.text)}")
                return chunk
            key = parsed.value
        chunk = self.chunks.get(key)
        if chunk is None:
            inside = self.chunks.holding(key)
            hint = f" (it is inside chunk {inside.name})" if inside else ""
            raise CmaError(errno.ENOENT, f"no chunk starts at {fmt_addr(key)}{hint}")
        return chunk

    def _find_id(self, key: FreeKey) -> Chunk:
        chunk = self.chunks.by_id(key.value)
        if chunk is None:
            raise CmaError(errno.ENOENT, f"no chunk with id {key.text}")
        return chunk

    def free(self, key: int | str, *, uid: int | None = None) -> Chunk:
        """Free a chunk by start or label.  ENOENT (and a warning) if there is none;
        EPERM when ``uid`` is given, not root, and not the chunk's owner."""
        with self._lock:  # not @_locked: one call less on the hot path
            chunk = self.chunks.get(key) if key.__class__ is int else None
            if chunk is None:
                try:
                    chunk = self.find(key)
                except CmaError as e:
                    log.warning("free: %s", e.why, extra={"client": True, "why": e.why})
                    raise
            if uid is not None and uid != 0 and uid != chunk.uid:
                raise CmaError(errno.EPERM, f"free {chunk.name}: owned by uid {chunk.uid}, "
                                            f"not {uid}")
            if self.listeners:
                self.listeners.free(chunk)  # a veto keeps the chunk
            self._forget(chunk)
            region = chunk.region
            region.freed += 1
            region.release_pages += chunk.size >> PAGE_SHIFT
            if self.tracer is not None:
                self.tracer.release(region, chunk, chunk.start, chunk.size)
            if region.users == 0 and region.allocator is not None:
                region.allocator.cleanup()
            return chunk

    # -- queries -------------------------------------------------------

    @_locked
    def info(self, dev: str, type: str | None = None) -> Info:
        names = self._map.lookup(dev, type)
        regions = [self._regions[n] for n in names if n in self._regions]
        if not regions:
            raise CmaError(errno.ENOENT, f"map sends {dev} to {','.join(names)}, none of "
                                         "which exists")
        return Info(min(r.start for r in regions), max(r.end for r in regions),
                    sum(r.size for r in regions), sum(r.free for r in regions), len(regions))

    @_locked
    def stats(self) -> RegionStats:
        """The per-region counters summed; largest_free is the largest over regions."""
        all_stats = [r.stats() for r in self._regions.values()]
        largest = max((s.largest_free for s in all_stats), default=0)
        free = sum(r.free for r in self._regions.values())
        total = {k: sum(getattr(s, k) for s in all_stats) for k in SUMMED_KEYS}
        return RegionStats(largest_free=largest, fragmentation=fragmentation(free, largest),
                           pageblock=max((s.pageblock for s in all_stats), default=0), **total)

    def check_live(self, chunk: Chunk) -> None:
        """ENXIO for a chunk object whose chunk was freed (an old open file)."""
        if self.chunks.get(chunk.start) is not chunk:
            raise CmaError(errno.ENXIO, f"chunk {chunk.name} was freed")

    def data(self, chunk: Chunk, at: int | None = None) -> memoryview:
        """The chunk's bytes (or the same size at ``at``), zero-copy."""
        if self.arena is None:
            raise CmaError(errno.ENODEV, "this Cma does bookkeeping only: no arena")
        return self.arena.view((chunk.start if at is None else at) - self.base, chunk.size)

    def phys(self, chunk: Chunk) -> list[tuple[int, int]]:
        """Physical segments (address, length) behind the chunk (root only)."""
        if self.arena is None:
            raise CmaError(errno.ENODEV, "this Cma does bookkeeping only: no arena")
        return self.arena.phys(chunk.start - self.base, chunk.size)

    def chunks_of(self, region: Region) -> Iterable[Chunk]:
        return self.chunks.in_range(region.start, region.end)

    @_locked
    def _check(self) -> None:
        """Assert every invariant of the core; the property tests call it."""
        prev_end = 0
        for chunk in self.chunks:
            assert chunk.start >= prev_end, f"{chunk} overlaps its predecessor"
            assert chunk.region.start <= chunk.start and chunk.end <= chunk.region.end
            prev_end = chunk.end
        for region in self._regions.values():
            chunks = list(self.chunks_of(region))
            assert region.users == len(chunks)
            assert region.used == sum(c.size for c in chunks)
            if region.allocator is not None:
                region.allocator._check()
                region.allocator.check_chunks((c.start, c.size, c.movable) for c in chunks)
                assert region.allocator.free_bytes == region.free
                for start, size in region.allocator.holes():
                    assert self.chunks.holding(start) is None
                    assert self.chunks.holding(start + size - 1) is None
