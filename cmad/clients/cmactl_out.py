"""cmactl's output: sizes, the streamed grid, colour (rich imported only to
draw), the JSON of regions and chunks, and the one-line error report.

Part of cmactl (`cmad.clients.cmactl` re-exports every name here).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import sys
from typing import Iterable, Iterator, Sequence

from cmad.clients.client import RegionInfo, errno_name, parse_created
from cmad.memparse import human
from cmad.protocol import T_CREATED, T_LABEL, T_SIZE, parse_id

#: Why an errno happened, in cmad's terms, per command (the daemon logs the detail).
HINTS = {
    ("alloc", errno.EINVAL): "bad request: DEV[/TYPE] or @REGION[,REGION] then SIZE[/ALIGN]; "
                             "sizes like 4096, 0x1000 or 6M, alignment a power of two",
    ("alloc", errno.ENOENT): "no map rule matches that device, or no such region",
    ("alloc", errno.EEXIST): "that label is taken by a live chunk",
    ("alloc", errno.EDQUOT): "over your per-user limit of bytes held",
    ("alloc", errno.EACCES): "alloc needs root or the daemon's group (default cma)",
    ("free", errno.ENOENT): "no chunk starts at, is labelled or has the id {}",
    ("free", errno.EPERM): "{} belongs to another user",
    ("free", errno.EACCES): "free needs root or the daemon's group (default cma)",
    ("trace", errno.EACCES): "the trace events are root's, as the kernel's tracefs",
    ("trace", errno.EPERM): "the trace events are root's, as the kernel's tracefs",
}


class Out:
    """Where and how to print: sizes exact or human; rich only when needed."""

    def __init__(self, exact: bool):
        self.exact = exact
        self._console = None
        self.columns = 80  # the terminal's width, or $COLUMNS, or 80 for a pipe

    def size(self, n: int) -> str:
        return str(n) if self.exact else human(n)

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console
            console = Console(highlight=False)
            self.columns = console.width
            if not console.is_terminal:
                console.width = max(console.width, 200)  # a pipe: never wrap a row
            self._console = console
        return self._console

    @property
    def colour(self) -> bool:
        return self.console.color_system is not None

    def json(self, value) -> None:
        sys.stdout.write(json.dumps(value, indent=2) + "\n")


#: Rows a table's column widths are measured on before it streams: a longer
#: cell further down overflows its column (as ps does) rather than the whole
#: table being held to measure it.
GRID_WINDOW = 10_000


def grid(out: Out, headers: list[str], rows: Iterable[Sequence[str]], *, right=(),
         styles=None) -> None:
    """An aligned table, streamed: one header line, a rule, then the rows,
    written a window at a time (a rich Table takes ~7 s for 10,000 rows);
    ``styles`` colours columns on a terminal."""
    rows = iter(rows)
    window = list(itertools.islice(rows, GRID_WINDOW))
    widths = [max([len(h)] + [len(r[i]) for r in window]) for i, h in enumerate(headers)]
    last = len(headers) - 1
    fmt = " ".join("{:>%d}" % w if i in right else "{}" if i == last else "{:<%d}" % w
                   for i, w in enumerate(widths)).format
    rule = " ".join("─" * w for w in widths)
    if not out.colour:
        write = sys.stdout.write
        write(fmt(*headers).rstrip() + "\n" + rule + "\n")
        while window:
            write("".join([fmt(*r) + "\n" for r in window]))
            window = list(itertools.islice(rows, GRID_WINDOW))
        return
    from rich.text import Text
    head = Text(no_wrap=True, overflow="ignore")
    head.append(fmt(*headers).rstrip() + "\n", "bold").append(rule + "\n", "dim")
    out.console.print(head, end="", soft_wrap=True)
    styles = styles or {}
    pads = [(lambda c, w=w: c.rjust(w)) if i in right else (lambda c, w=w: c.ljust(w))
            for i, w in enumerate(widths)]
    while window:
        text = Text(no_wrap=True, overflow="ignore")
        for row in window:
            for i, cell in enumerate(row):
                text.append(pads[i](cell) if i < last else cell, styles.get(i))
                text.append(" " if i < last else "\n")
        out.console.print(text, end="", soft_wrap=True)
        window = list(itertools.islice(rows, GRID_WINDOW))


def age(seconds: float) -> str:
    """Largest whole unit: 42s, 5m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, span, limit in (("s", 1, 120), ("m", 60, 120 * 60), ("h", 3600, 48 * 3600)):
        if seconds < limit:
            return f"{seconds // span}{unit}"
    return f"{seconds // 86400}d"


def region_json(r: RegionInfo) -> dict:
    return {"name": r.name, "start": r.dirname, "size": r.size, "used": r.used,
            "free": r.free, "users": r.users, "allocator": r.allocator, "kind": r.kind,
            "contiguous": r.contiguous, "fragmentation": r.stats.get("fragmentation"),
            "largest_free": r.stats.get("largest_free"), "stats": r.stats}


#: The fields of a chunk table row from region to movable, as JSON members.
CHUNK_JSON_MIDDLE = ('"region": %s, "dev": %s, "type": %s, "uid": %d, "pid": %d, '
                     '"created": %s, "movable": %s')

#: Rows per write when streaming.
STREAM_BATCH = 4096

#: Entries a listing's cache of converted texts (sizes, ages, JSON members)
#: holds before it starts over: memory stays bounded on a table of all
#: distinct values, where a cache only costs.
CACHE_MAX = 4096


def remember(cache: dict, key, value):
    """``cache[key] = value``, the cache emptied first when full; returns value."""
    if len(cache) >= CACHE_MAX:
        cache.clear()
    cache[key] = value
    return value


def chunk_json_lines(rows: Iterable[Sequence[str]]) -> Iterator[str]:
    """Chunk table rows as JSON objects (keys as `cmad.clients.client.ChunkInfo`), one
    per row as it is parsed.  Strings go through the C encoder's escaping;
    the members from region to movable repeat over a big table (one process
    allocating in one region within one second), so each distinct run of
    them is rendered once: 3.6x faster than building a ChunkInfo and a dict
    per row for json.dumps (measured on 100,000 rows)."""
    quote = json.encoder.encode_basestring_ascii
    sizes: dict[str, int] = {}
    middles: dict[tuple, str] = {}
    for f in rows:
        size = sizes.get(f[1])
        if size is None:
            size = remember(sizes, f[1], int(f[1]))
        key = (f[2], f[3], f[4], f[5], f[6], f[7], f[8])
        middle = middles.get(key)
        if middle is None:
            middle = remember(middles, key, CHUNK_JSON_MIDDLE % (
                quote(f[2]), quote(f[3]), quote(f[4]), int(f[5]), int(f[6]), quote(f[7]),
                "true" if f[8] == "1" else "false"))
        label = f[T_LABEL]
        ident = parse_id(f[10:])
        yield '{"start": %s, "size": %d, %s, "label": %s, "id": %s}' % (
            quote(f[0]), size, middle, "null" if label == "-" else quote(label),
            "null" if ident is None else ident)


def write_json_array(items: Iterable[str], write) -> None:
    """``[item, ...]``, one item per line, written `STREAM_BATCH` items at a time."""
    items = iter(items)
    batch = list(itertools.islice(items, STREAM_BATCH))
    if not batch:
        write("[]\n")
        return
    write("[\n" + ",\n".join(batch))
    while batch := list(itertools.islice(items, STREAM_BATCH)):
        write(",\n" + ",\n".join(batch))
    write("\n]\n")


def chunk_cells(rows: Iterable[Sequence[str]], out: Out, now: float) -> Iterator[tuple]:
    """Chunk table rows as `cmd_list` cells.  Sizes and ages repeat over a big
    table, so each distinct text is converted once."""
    sizes: dict[str, str] = {}
    ages: dict[str, str] = {}
    for f in rows:
        size = sizes.get(f[T_SIZE])
        if size is None:
            size = remember(sizes, f[T_SIZE], out.size(int(f[T_SIZE])))
        created = ages.get(f[T_CREATED])
        if created is None:
            created = remember(ages, f[T_CREATED], age(now - parse_created(f[T_CREATED])))
        label = f[T_LABEL]
        yield (f[0], size, f[2], f"{f[3]}/{f[4]}", f"{f[5]} {f[6]}",
               "" if label == "-" else label, created)


def compact_table(**options):
    from rich import box
    from rich.table import Table
    return Table(box=box.SIMPLE_HEAD, show_edge=False, padding=0, **options)


def report(command: str, e: OSError, subject: str = "") -> None:
    """One line: the errno's meaning, its name, and cmad's reason when known."""
    hint = HINTS.get((command, e.errno))
    hint = f"; {hint.format(repr(subject))}" if hint else ""
    strerror = os.strerror(e.errno) if e.errno else str(e)
    print(f"cmactl: {command}: {strerror} ({errno_name(e.errno)}){hint}", file=sys.stderr)
