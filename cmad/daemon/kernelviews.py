"""The kernel's own views of each region, at the kernel's paths under ``kernel/``
(SPEC 3a), so a script written for a kernel runs with one prefix changed:

    sys/kernel/debug/cma/<name>/     mm/cma_debug.c   (cma-<i> -> <name>)
    sys/kernel/mm/cma/<name>/        mm/cma_sysfs.c
    sys/kernel/tracing/              the ``cma`` trace events (cmad.daemon.trace)

As in the kernel, each file is a row of a table: a name and a show that
prints one value and a newline, or a store that parses one value and calls
the core.  Units are 4 KiB pages, whatever the arena's page size; a pfn is a
bus address >> 12.
"""

from __future__ import annotations

import array
import errno
from functools import partial
from typing import Callable

from fusefs import Attr, Caller, Dir, Pipe, Symlink

from cmad.allocators import PAGE_SHIFT
from cmad.core.cma import Cma
from cmad.daemon.cmadebug import DebugHook, kstrtoull
from cmad.errors import CmaError, einval
from cmad.core.regions import Region
from cmad.daemon.trace import EVENTS, Tracer, region_name


def order_per_bit(region: Region) -> int:
    """The allocator's own block order (bitmap's order_per_bit); 0 for a page."""
    if region.allocator is None:
        return 0
    granule = type(region.allocator).granule(**region.wanted.params)
    return (granule >> PAGE_SHIFT).bit_length() - 1


def holes_in_blocks(region: Region) -> list[tuple[int, int]]:
    """The free ranges as (first block, blocks) of 2^order_per_bit pages."""
    if region.allocator is None:
        return []
    shift = PAGE_SHIFT + order_per_bit(region)
    return [((start - region.start) >> shift, size >> shift)
            for start, size in region.allocator.holes()]


def maxchunk(region: Region) -> int:
    """cma_maxchunk_get: the longest run of free bits, in pages."""
    longest = max((n for _, n in holes_in_blocks(region)), default=0)
    return longest << order_per_bit(region)


def u32_bitmap(region: Region) -> str:
    """debugfs_create_u32_array of the region's bitmap: a bit per block (set:
    in use), bit i in u32 number i // 32, printed as decimals, space separated."""
    bits = region.size >> (PAGE_SHIFT + order_per_bit(region))
    if region.allocator is None:
        return ""
    used = (1 << bits) - 1
    for first, n in holes_in_blocks(region):
        used ^= ((1 << n) - 1) << first
    words = array.array("I", used.to_bytes(((bits + 31) // 32) * 4, "little"))
    return " ".join(map(str, words))


# mm/cma_debug.c: 0444, one value and a newline ("%llu\n"), bitmap a u32 array.
DEBUGFS_SHOW: dict[str, Callable[[Region], object]] = {
    "base_pfn": lambda r: r.start >> PAGE_SHIFT,
    "count": lambda r: r.size >> PAGE_SHIFT,
    "order_per_bit": order_per_bit,
    "used": lambda r: r.used >> PAGE_SHIFT,
    "maxchunk": maxchunk,
    "bitmap": u32_bitmap,
}

# mm/cma_sysfs.c: 0444, "%llu\n" / "%lu\n", in the kernel's attribute order.
SYSFS_SHOW: dict[str, Callable[[Region], object]] = {
    "alloc_pages_success": lambda r: r.alloc_pages,
    "alloc_pages_fail": lambda r: r.fail_pages,
    "release_pages_success": lambda r: r.release_pages,
    "total_pages": lambda r: r.size >> PAGE_SHIFT,
    "available_pages": lambda r: r.free >> PAGE_SHIFT,
}


def _show(fn: Callable[[Region], object], region: Region) -> str:
    return f"{fn(region)}\n"


def _switch(text: str, what: str) -> bool:
    """An ``enable`` or ``tracing_on`` write: 0 or 1 (kstrtoul, base 0), else EINVAL."""
    value = kstrtoull(text, what)
    if value not in (0, 1):
        raise einval(f"{what}: {value}; write 0 or 1")
    return bool(value)


class KernelViews:
    """The ``kernel/`` directory over ``cma``, with the tracer and the debugfs lists."""

    def __init__(self, cma: Cma, tracer: Tracer):
        self.cma = cma
        self.tracer = tracer
        self.hooks = {r.name: DebugHook(cma, r) for r in cma.regions}
        self.root = Dir()
        sys_kernel = self.root.add("sys", Dir()).add("kernel", Dir())
        self._debugfs(sys_kernel.add("debug", Dir()).add("cma", Dir()))
        self._sysfs(sys_kernel.add("mm", Dir()).add("cma", Dir()))
        self._tracing(sys_kernel.add("tracing", Dir()))

    def _debugfs(self, top: Dir) -> None:
        names = set()
        for region in self.cma.regions:
            d = top.add(region_name(region), Dir())
            names.add(region_name(region))
            hook = self.hooks[region.name]
            d.add("alloc", Attr(store=partial(self._store_alloc, hook), mode=0o200))
            d.add("free", Attr(store=partial(self._store_free, hook), mode=0o200))
            for name, fn in DEBUGFS_SHOW.items():
                d.add(name, Attr(partial(_show, fn, region), mode=0o444))
        for i, region in enumerate(self.cma.regions):  # the older kernels' names
            if f"cma-{i}" not in names:
                top.add(f"cma-{i}", Symlink(region_name(region)))

    def _sysfs(self, top: Dir) -> None:
        """One directory per region and nothing else: libmeminfo sums every entry."""
        for region in self.cma.regions:
            d = top.add(region_name(region), Dir())
            for name, fn in SYSFS_SHOW.items():
                d.add(name, Attr(partial(_show, fn, region), mode=0o444))

    def _tracing(self, top: Dir) -> None:
        tracer = self.tracer
        top.add("trace_pipe", Pipe(lambda caller: tracer.open_reader(), mode=0o440))
        top.add("tracing_on", Attr(lambda: str(int(tracer.on)), partial(self._store_on),
                                   mode=0o640))
        cma_events = top.add("events", Dir()).add("cma", Dir())
        cma_events.add("enable", Attr(tracer.system_state, partial(self._store_enable, None),
                                      mode=0o640))
        for event in EVENTS:
            cma_events.add(event, Dir()).add("enable", Attr(
                partial(lambda e: str(int(tracer.enabled[e])), event),
                partial(self._store_enable, event), mode=0o640))

    # -- stores ----------------------------------------------------------

    def _store_alloc(self, hook: DebugHook, text: str, caller: Caller) -> None:
        self.tracer.pid = caller.pid
        hook.alloc(text, caller.uid, caller.pid)

    def _store_free(self, hook: DebugHook, text: str, caller: Caller) -> None:
        self.tracer.pid = caller.pid
        hook.free(text, caller.uid)

    def _store_enable(self, event: str | None, text: str, caller: Caller) -> None:
        _root_only(caller, "events/cma enable")
        self.tracer.enable(event, _switch(text, f"events/cma/{event + '/' if event else ''}enable"))

    def _store_on(self, text: str, caller: Caller) -> None:
        _root_only(caller, "tracing_on")
        self.tracer.set_tracing_on(_switch(text, "tracing_on"))

    def on_free(self, chunk) -> None:
        hook = self.hooks.get(chunk.region.name)
        if hook is not None:
            hook.forget(chunk)


def _root_only(caller: Caller, what: str) -> None:
    if caller.uid != 0:
        raise CmaError(errno.EPERM, f"{what}: root only")
