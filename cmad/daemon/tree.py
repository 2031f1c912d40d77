"""The tree the daemon publishes: the patch's sysfs layout over the Cma core.

Like the kernel's attribute arrays, each file is one row of a table: a name
and a show (and maybe a store) that calls the core.  The directories of
chunks (`chunks/`, `ids/`, `regions/<start>/chunks/`) store nothing: they
are fusefs DynamicDirs whose providers below read the core's indexes, so a
daemon with a million chunks builds no node for them until the kernel looks
one up.  The tree listens to the core only to tell those directories which
names changed meaning (a free, a move), which costs something only for the
names the kernel holds.
"""

from __future__ import annotations

import errno
import re
import time
from collections import deque
from functools import partial
from typing import Iterator

import trio
from sortedcontainers import SortedList

from fusefs import Attr, Bytes, Caller, Dir, DynamicDir, LazyDir, Node, Stream, Symlink, Table

from cmad.core import request
from cmad.core.chunks import Chunk
from cmad.core.cma import Cma
from cmad.core.events import Listener
from cmad.errors import CmaError, einval
from cmad.daemon.kernelviews import KernelViews
from cmad.memparse import fmt_addr
from cmad.daemon.metrics import render, show_stats
from cmad.protocol import CHUNK_TABLE, chunkinfo_row
from cmad.core.regions import Region
from cmad.daemon.trace import Tracer

MAX_REQUEST = 4096
COMPACT_SLICE = 0.005  # seconds of compaction between letting other clients in
MAX_UNREAD = 256            # result lines an alloc handle keeps unread
START_NAME = re.compile(r"[0-9a-f]{16}")       # only the %p form names a chunk
ID_NAME = re.compile(r"0|[1-9][0-9]{0,19}")
ADDRESS_END = 1 << 65                          # above every chunk start

REGION_ATTRS = {
    "name": lambda r: r.name,
    "start": lambda r: fmt_addr(r.start),
    "size": lambda r: str(r.size),
    "free": lambda r: str(r.free),
    "users": lambda r: str(r.users),
    "kind": lambda r: r.kind,
    "group": lambda r: r.group or "",
    "contiguous": lambda r: r.contiguous,
    "stats": lambda r: show_stats(r.stats()),
    "bitmap": lambda r: region_bitmap(r),
    "pageblocks": lambda r: r.pageblocks(),
}

CHUNK_ATTRS = {
    "id": lambda c: str(c.id),
    "start": lambda c: fmt_addr(c.start),
    "size": lambda c: str(c.size),
    "region": lambda c: c.region.name,
    "dev": lambda c: c.dev,
    "type": lambda c: c.type,
    "owner": lambda c: f"{c.uid} {c.pid}",
    "label": lambda c: c.label or "",
    "created": lambda c: c.created_iso(),
    "movable": lambda c: str(int(c.movable)),
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
    """One open ``alloc`` file: each write one request, reads return the results.

    What it keeps is bounded: the last MAX_UNREAD result lines not read yet
    (older ones are dropped: a client that never reads cannot grow the
    daemon), and its transient chunks by id, which the tree prunes when one
    is freed explicitly.
    """

    def __init__(self, tree: "Tree", caller: Caller):
        self.tree = tree
        self.cma = tree.cma
        self.caller = caller
        self.pending: deque[bytes] = deque(maxlen=MAX_UNREAD)
        self.transient: dict[int, Chunk] = {}

    def write(self, data: bytes) -> None:
        self.tree.tracer.pid = self.caller.pid
        chunk = request.run(self.cma, decode_request(data), uid=self.caller.uid,
                            pid=self.caller.pid)
        self.pending.append(request.result_line(chunk).encode())
        if chunk.transient:
            self.tree.hold_transient(self, chunk)

    def read(self, size: int) -> bytes:
        out = bytearray()
        pending = self.pending
        while pending and len(out) < size:
            line = pending.popleft()
            room = size - len(out)
            if len(line) > room:
                pending.appendleft(line[room:])     # the rest of a line cut by the read size
                line = line[:room]
            out += line
        return bytes(out)

    def release(self) -> None:
        """Transient chunks die with the handle that made them (exactly
        those: by id, wherever they moved)."""
        failed = []
        self.tree.tracer.pid = self.caller.pid
        for chunk in list(self.transient.values()):
            try:
                self.cma.free(f"id={chunk.id}")
            except CmaError as e:       # the others are still freed
                failed.append(e)
        if failed:
            raise failed[0]


class ChunksByStart:
    """``chunks/``: a directory per chunk named by its start (whatever is at
    that address now), then a link per label to ``../ids/<id>``. Listed by
    start, then by label: sort keys (0, start) and (1, label)."""

    def __init__(self, tree: "Tree"):
        self.tree = tree
        self.index = tree.cma.chunks

    def resolve(self, name: str) -> Chunk | None:
        if START_NAME.fullmatch(name):
            return self.index.get(int(name, 16))
        return self.index.by_label(name)

    def make(self, name: str, chunk: Chunk) -> Node:
        if name == chunk.label:
            return Symlink(f"../ids/{chunk.id}")
        return self.tree.chunk_dir(chunk)

    def entries(self, after: tuple | None) -> Iterator[tuple]:
        group, last = after if after is not None else (0, -1)
        if group == 0:
            for chunk in self.index.in_range(last + 1, ADDRESS_END):
                yield (0, chunk.start), chunk.name, chunk
            last = None
        for label in self.tree.labels_after(last):
            yield (1, label), label, self.index.by_label(label)


class ChunksById:
    """``ids/``: a directory per chunk named by its id, wherever it moved."""

    def __init__(self, tree: "Tree"):
        self.tree = tree
        self.index = tree.cma.chunks

    def resolve(self, name: str) -> Chunk | None:
        return self.index.by_id(int(name)) if ID_NAME.fullmatch(name) else None

    def make(self, name: str, chunk: Chunk) -> Node:
        return self.tree.chunk_dir(chunk)

    def entries(self, after: int | None) -> Iterator[tuple]:
        for chunk in self.index.ids_after(-1 if after is None else after):
            yield chunk.id, str(chunk.id), chunk


class RegionLinks:
    """``regions/<start>/chunks/``: a link per chunk of the region, named by
    its start, pointing at ``../../../ids/<id>``."""

    def __init__(self, cma: Cma, region: Region):
        self.index = cma.chunks
        self.region = region

    def resolve(self, name: str) -> Chunk | None:
        if not START_NAME.fullmatch(name):
            return None
        chunk = self.index.get(int(name, 16))
        return chunk if chunk is not None and chunk.region is self.region else None

    def make(self, name: str, chunk: Chunk) -> Node:
        return Symlink(f"../../../ids/{chunk.id}")

    def entries(self, after: int | None) -> Iterator[tuple]:
        first = self.region.start if after is None else after + 1
        for chunk in self.index.in_range(first, self.region.end):
            yield chunk.start, chunk.name, chunk


class Tree(Listener):
    """Builds the fusefs tree for ``cma`` and keeps it in step with it."""

    def __init__(self, cma: Cma, *, gid: int = 0, extra_stats: dict | None = None,
                 tracer: Tracer | None = None):
        self.cma = cma
        self.tracer = tracer or Tracer(cma)
        self.extra_stats = extra_stats or {}
        self.root = root = Dir()
        root.add("map", Attr(lambda: cma.map, lambda text, caller: cma.set_map(text),
                             mode=0o644))
        root.add("allocators", Attr(lambda: " ".join(cma.allocators)))
        self.regions = root.add("regions", Dir())
        self.region_chunks: dict[str, DynamicDir] = {}
        self._labels: SortedList | None = None     # sorted when chunks/ is first listed
        for region in cma.regions:
            self._add_region(region)
        self._transient_of: dict[int, AllocHandle] = {}   # chunk id -> the handle it dies with
        root.add("alloc", Stream(lambda caller: AllocHandle(self, caller), mode=0o660, gid=gid))
        root.add("free", Attr(store=self._store_free, mode=0o220, gid=gid))
        count = partial(len, cma.chunks)
        self.chunks = root.add("chunks", DynamicDir(ChunksByStart(self), dirs=count))
        self.ids = root.add("ids", DynamicDir(ChunksById(self), dirs=count))
        root.add(CHUNK_TABLE, Table(self._chunkinfo_rows))
        root.add("stats", Attr(lambda: show_stats(cma.stats(), self.extra_stats, root=True)))
        root.add("metrics", Attr(lambda: render(cma)))
        self.kernel = KernelViews(cma, self.tracer)
        root.add("kernel", self.kernel.root)
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
        self.region_chunks[region.name] = d.add("chunks", DynamicDir(RegionLinks(self.cma,
                                                                                 region)))
        self.regions.add(region.name, Symlink(fmt_addr(region.start)))

    def _chunkinfo_rows(self, after: int | None) -> Iterator[tuple[int, str]]:
        """Every chunk on one line, like /proc/slabinfo, by start: each reader
        renders only what it reads (fusefs.Table)."""
        first = 0 if after is None else after + 1
        for c in self.cma.chunks.in_range(first, ADDRESS_END):
            yield c.start, chunkinfo_row(c.start, c.size, c.region.name, c.dev, c.type, c.uid,
                                         c.pid, c.created_iso(), c.movable, c.label, c.id)

    def _store_free(self, text: str, caller: Caller) -> None:
        if not text.strip():
            raise einval("free: empty write; expected a start address, id=<id> or a label")
        self.tracer.pid = caller.pid
        try:
            self.cma.free(text, uid=caller.uid)
        except CmaError as e:
            if e.errno in (errno.ENOENT, errno.EINVAL):
                e.logged = True     # Cma.free warned already: "no such chunk" once
            raise

    async def _store_compact(self, region: Region, text: str, caller: Caller) -> None:
        """Compaction runs in steps of bounded work; every COMPACT_SLICE the loop
        serves other clients, so a long compaction stalls nobody."""
        if caller.uid != 0:
            raise CmaError(errno.EPERM, f"compact {region.name}: root only")
        deadline = time.monotonic() + COMPACT_SLICE
        self.tracer.pid = caller.pid
        for _ in self.cma.compact_steps(region.name):
            if time.monotonic() >= deadline:
                await trio.sleep(0)
                self.tracer.pid = caller.pid    # others ran meanwhile
                deadline = time.monotonic() + COMPACT_SLICE

    def labels_after(self, label: str | None) -> Iterator[str]:
        """Labels in sorted order, after ``label`` (all when None)."""
        if self._labels is None:
            self._labels = SortedList(self.cma.chunks.labels())
        if label is None:
            return iter(self._labels)
        return self._labels.irange(minimum=label, inclusive=(False, False))

    def chunk_dir(self, chunk: Chunk) -> LazyDir:
        """A chunk's directory, bound to the chunk (never to its address)."""
        def populate(d: LazyDir) -> None:
            for name, show in CHUNK_ATTRS.items():
                d.add(name, Attr(partial(self._show_live, show, chunk)))
            d.add("data", Bytes(partial(self._data, chunk), mode=0o600, uid=chunk.uid))
            region = chunk.region
            d.add("mmap", Attr(partial(self._mmap, chunk), mode=0o440 if region.file else 0o400,
                               gid=region.gid if region.file else 0))
            d.add("phys", Attr(partial(self._phys, chunk), mode=0o400))
        return LazyDir(populate)

    def _show_live(self, show, chunk: Chunk) -> str:
        """A freed chunk's files answer ENXIO, never what it was."""
        self.cma.check_live(chunk)
        return show(chunk)

    def _data(self, chunk: Chunk) -> memoryview:
        self.cma.check_live(chunk)
        return self.cma.data(chunk)

    def _mmap(self, chunk: Chunk) -> str:
        """Handing out a mapping pins a movable chunk: the daemon cannot follow it.
        Root only (mode 0400), as the arena file is: nobody else could map it; in a
        region shared with a group (SPEC 4d), readable by the group (0440) and
        naming the region's own file and the chunk's offset in it."""
        arena = self.cma.arena
        if arena is None:
            raise CmaError(errno.ENODEV, "no arena behind this daemon")
        self.cma.check_live(chunk)
        self.cma.pin(chunk)
        region = chunk.region
        if region.file:
            return f"{region.file} {chunk.start - region.start} {chunk.size}"
        return f"{arena.path} {chunk.start - self.cma.base} {chunk.size}"

    def _region_phys(self, region: Region) -> str:
        """One line for a physical region; a virtual one's segments (a sticky one's
        chunks only: its holes have no pages)."""
        phys = region.phys
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
        self.cma.check_live(chunk)
        return "".join(f"{fmt_addr(addr)} {length}\n" for addr, length in self.cma.phys(chunk))

    # -- Listener: keep the tree in step with the core ------------------

    def hold_transient(self, handle: AllocHandle, chunk: Chunk) -> None:
        handle.transient[chunk.id] = chunk
        self._transient_of[chunk.id] = handle

    def _drop_transient(self, chunk: Chunk) -> None:
        handle = self._transient_of.pop(chunk.id, None)
        if handle is not None:
            del handle.transient[chunk.id]

    def on_alloc(self, chunk: Chunk) -> None:
        if chunk.label and self._labels is not None:
            self._labels.add(chunk.label)

    def on_free(self, chunk: Chunk) -> None:
        self._drop_transient(chunk)
        self.kernel.on_free(chunk)
        self.chunks.invalidate(chunk.name)
        self.ids.invalidate(str(chunk.id))
        self.region_chunks[chunk.region.name].invalidate(chunk.name)
        if chunk.label:
            self.chunks.invalidate(chunk.label)
            if self._labels is not None:
                self._labels.discard(chunk.label)

    def on_move(self, chunk: Chunk, old_start: int) -> None:
        """Only the address names change meaning; ids/<id> and the label stay."""
        if old_start != chunk.start:
            old = fmt_addr(old_start)
            self.chunks.invalidate(old)
            self.region_chunks[chunk.region.name].invalidate(old)
