"""The tree the daemon publishes: the patch's sysfs layout over the Cma core.

Like the kernel's attribute arrays, each file is one row of a table: a name
and a show (and maybe a store) that calls the core.  The tree listens to the
core and adds or removes a chunk's directory when the chunk comes or goes.
"""

from __future__ import annotations

import errno
from functools import partial

from fusefs import Attr, Bytes, Caller, Dir, LazyDir, Stream, Symlink

from . import request
from .chunks import Chunk
from .cma import Cma
from .errors import CmaError, einval
from .memparse import fmt_addr
from .metrics import render, show_stats
from .regions import Region

MAX_REQUEST = 4096

REGION_ATTRS = {
    "name": lambda r: r.name,
    "start": lambda r: fmt_addr(r.start),
    "size": lambda r: str(r.size),
    "free": lambda r: str(r.free),
    "users": lambda r: str(r.users),
    "kind": lambda r: r.kind,
    "contiguous": lambda r: getattr(r, "contiguous", "virtual"),
    "stats": lambda r: show_stats(r.stats()),
    "bitmap": lambda r: region_bitmap(r),
}

CHUNK_ATTRS = {
    "start": lambda c: fmt_addr(c.start),
    "size": lambda c: str(c.size),
    "region": lambda c: c.region.name,
    "dev": lambda c: c.dev,
    "type": lambda c: c.type,
    "owner": lambda c: f"{c.uid} {c.pid}",
    "label": lambda c: c.label or "",
    "created": lambda c: c.created_iso(),
}


def region_bitmap(region: Region) -> str:
    """One character per allocator block, '#' used and '.' free, 64 per line."""
    allocator = region.allocator
    if allocator is None:
        return ""
    block = type(allocator).granule(**region.wanted.params)
    cells = bytearray(b"#" * (region.size // block))
    for start, size in allocator.holes():
        first = (start - region.start) // block
        cells[first:first + size // block] = b"." * (size // block)
    return "\n".join(cells[i:i + 64].decode() for i in range(0, len(cells), 64))


def decode_request(data: bytes) -> str:
    """sysfs write rules for the transaction file: one value, trailing newline ignored."""
    if len(data) > MAX_REQUEST:
        raise einval(f"request of {len(data)} bytes, more than {MAX_REQUEST}")
    if b"\0" in data:
        raise einval("NUL byte in request")
    try:
        return data.decode().removesuffix("\n")
    except UnicodeDecodeError as e:
        raise einval(f"request is not UTF-8 ({e.reason} at byte {e.start})") from None


class AllocHandle:
    """One open ``alloc`` file: each write one request, reads return the results."""

    def __init__(self, cma: Cma, caller: Caller):
        self.cma = cma
        self.caller = caller
        self.pending = bytearray()
        self.transient: list[Chunk] = []

    def write(self, data: bytes) -> None:
        chunk = request.run(self.cma, decode_request(data), uid=self.caller.uid,
                            pid=self.caller.pid)
        self.pending += request.result_line(chunk).encode()
        if chunk.transient:
            self.transient.append(chunk)

    def read(self, size: int) -> bytes:
        out = bytes(self.pending[:size])
        del self.pending[:size]
        return out

    def release(self) -> None:
        """Transient chunks die with the handle that made them."""
        for chunk in self.transient:
            if self.cma.chunks.get(chunk.start) is chunk:
                self.cma.free(chunk.start)


class Tree:
    """Builds the fusefs tree for ``cma`` and keeps it in step with it."""

    def __init__(self, cma: Cma, *, gid: int = 0, extra_stats: dict | None = None):
        self.cma = cma
        self.extra_stats = extra_stats or {}
        self.root = root = Dir()
        root.add("map", Attr(lambda: cma.map, lambda text, caller: cma.set_map(text),
                             mode=0o644))
        root.add("allocators", Attr(lambda: " ".join(cma.allocators)))
        self.regions = root.add("regions", Dir())
        self.region_chunks: dict[str, Dir] = {}
        for region in cma.regions:
            self._add_region(region)
        root.add("alloc", Stream(lambda caller: AllocHandle(cma, caller), mode=0o660, gid=gid))
        root.add("free", Attr(store=self._store_free, mode=0o220, gid=gid))
        self.chunks = root.add("chunks", Dir())
        root.add("chunkinfo", Attr(self._chunkinfo))
        root.add("stats", Attr(lambda: show_stats(cma.stats(), self.extra_stats)))
        root.add("metrics", Attr(lambda: render(cma)))
        for chunk in cma.chunks:
            self.on_alloc(chunk)
        cma.listeners.append(self)

    def _add_region(self, region: Region) -> None:
        d = self.regions.add(fmt_addr(region.start), Dir())
        for name, show in REGION_ATTRS.items():
            d.add(name, Attr(partial(show, region)))
        d.add("alloc", Attr(lambda: region.alloc_text,
                            lambda text, caller: self.cma.set_allocator(region.name, text),
                            mode=0o644))
        d.add("compact", Attr(store=partial(self._store_compact, region), mode=0o200))
        d.add("phys", Attr(partial(self._region_phys, region), mode=0o400))
        self.region_chunks[region.name] = d.add("chunks", Dir())
        self.regions.add(region.name, Symlink(fmt_addr(region.start)))

    def _chunkinfo(self) -> str:
        """Every chunk on one line, like /proc/slabinfo: one read lists them all."""
        return "".join(
            f"{fmt_addr(c.start)} {c.size} {c.region.name} {c.dev} {c.type} {c.uid} {c.pid} "
            f"{c.created_iso()} {int(c.movable)} {c.label or '-'}\n" for c in self.cma.chunks)

    def _store_free(self, text: str, caller: Caller) -> None:
        if not text.strip():
            raise einval("free: empty write; expected a start address or a label")
        self.cma.free(text, uid=caller.uid)

    def _store_compact(self, region: Region, text: str, caller: Caller) -> None:
        if caller.uid != 0:
            raise CmaError(errno.EPERM, f"compact {region.name}: root only")
        self.cma.compact(region.name)

    def _chunk_dir(self, chunk: Chunk) -> LazyDir:
        def populate(d: LazyDir) -> None:
            for name, show in CHUNK_ATTRS.items():
                d.add(name, Attr(partial(show, chunk)))
            d.add("data", Bytes(partial(self._data, chunk), mode=0o600, uid=chunk.uid))
            d.add("mmap", Attr(partial(self._mmap, chunk), mode=0o400))
            d.add("movable", Attr(lambda: str(int(chunk.movable))))
            d.add("phys", Attr(partial(self._phys, chunk), mode=0o400))
        return LazyDir(populate)

    def _data(self, chunk: Chunk) -> memoryview:
        self.cma.check_live(chunk)
        return self.cma.data(chunk)

    def _mmap(self, chunk: Chunk) -> str:
        """Handing out a mapping pins a movable chunk: the daemon cannot follow it.
        Root only (mode 0400), as the arena file is: nobody else could map it."""
        arena = self.cma.arena
        if arena is None:
            raise CmaError(errno.ENODEV, "no arena behind this daemon")
        self.cma.pin(chunk)
        return f"{arena.path} {chunk.start - self.cma.base} {chunk.size}"

    def _region_phys(self, region: Region) -> str:
        """One line for a physical region; a virtual one's segments (a sticky one's
        chunks only: its holes have no pages)."""
        phys = getattr(region, "phys", None)
        if phys is not None:
            return f"{fmt_addr(phys)} {region.size}\n"
        ranges = ([(c.start, c.size) for c in self.cma.chunks_of(region)]
                  if region.kind == "sticky" else [(region.start, region.size)])
        arena = self.cma.arena
        if arena is None:
            raise CmaError(errno.ENODEV, "no arena behind this daemon")
        return "".join(f"{fmt_addr(addr)} {length}\n" for start, size in ranges
                       for addr, length in arena.phys(start - self.cma.base, size))

    def _phys(self, chunk: Chunk) -> str:
        return "".join(f"{fmt_addr(addr)} {length}\n" for addr, length in self.cma.phys(chunk))

    # -- Listener: keep the tree in step with the core ------------------

    def on_alloc(self, chunk: Chunk) -> None:
        self.chunks.add(chunk.name, self._chunk_dir(chunk))
        if chunk.label:
            self.chunks.add(chunk.label, Symlink(chunk.name))
        self.region_chunks[chunk.region.name].add(
            chunk.name, Symlink(f"../../../chunks/{chunk.name}"))

    def on_free(self, chunk: Chunk, name: str | None = None) -> None:
        name = name or chunk.name
        self.chunks.remove(name)
        if chunk.label:
            self.chunks.remove(chunk.label)
        self.region_chunks[chunk.region.name].remove(name)

    def on_move(self, chunk: Chunk, old_start: int) -> None:
        """The directory follows the chunk; its label symlink points at the new name."""
        if old_start != chunk.start:
            self.on_free(chunk, fmt_addr(old_start))
            self.on_alloc(chunk)
