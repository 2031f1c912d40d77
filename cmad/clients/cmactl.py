"""cmactl: the command-line client of cmad, over its mounted filesystem.

In the spirit of the CMA patch's ``cma-test`` tool (``l``, ``a dev/kind
size/align``, ``A regions size/align``, ``f``):

    cmactl regions                      regions: size, use, allocator, fragmentation
    cmactl list                         live chunks: who holds what, since when
    cmactl alloc camera/preview 6M/1M --label frame0
    cmactl alloc @video,common 64K
    cmactl free frame0                  by label or start address
    cmactl map                          each region as a coloured block map
    cmactl top                          live view, refreshed every second
    cmactl trace [--region R] [--errors]   follow the cma trace events until Ctrl-C

It needs only the mountpoint (``--mountpoint``, else ``$CMAD_MOUNTPOINT``,
else /run/cma) and reads it through `cmad.clients.client`, never the daemon's
internals.  rich is imported only to draw (never for ``--json`` or an
error), so those start fast.  Sizes are human (``6.0 MiB``) unless
``--bytes``; colour only on a terminal, never with NO_COLOR.  Errors are
one line, ``cmactl: alloc: Cannot allocate memory (ENOMEM)``, and exit
status 1.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import sys
import time
from typing import Iterable, Iterator, Sequence

from cmad import __version__
from cmad.clients.client import Client, CmaError, NotMounted, RegionInfo, default_mountpoint, \
    errno_name, parse_created
from cmad.clients.cmactl_trace import cmd_trace
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


# -- Output ------------------------------------------------------------------


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


# -- Commands ----------------------------------------------------------------


def compact_table(**options):
    from rich import box
    from rich.table import Table
    return Table(box=box.SIMPLE_HEAD, show_edge=False, padding=0, **options)


def cmd_regions(client: Client, args, out: Out) -> int:
    """A ``contiguous`` column (physical or virtual) where the daemon says."""
    regions = client.regions()
    if args.json:
        out.json([region_json(r) for r in regions])
        return 0
    columns = ["name", "start", "size", "used", "free", "chunks", "alloc", "kind"]
    if any(r.contiguous is not None for r in regions):
        columns.append("contiguous")
    rows = []
    for r in regions:
        frag = r.stats.get("fragmentation", 0.0)
        colour = "red" if frag >= 0.5 else "yellow" if frag > 0 else "green"
        row = [r.name, r.dirname, out.size(r.size), out.size(r.used), out.size(r.free),
               str(r.users), r.allocator, r.kind]
        if len(columns) > 8:
            row.append(r.contiguous or "-")
        rows.append(row + [f"{frag:.1%}", colour])
    columns.append("frag")
    table = compact_table()
    for i, name in enumerate(columns):
        # On a narrow terminal the words may shrink, never the numbers.
        words = name in ("name", "alloc", "kind", "contiguous")
        table.add_column(name, justify="left" if words or name == "start" else "right",
                         no_wrap=True, min_width=None if words else
                         max([len(name)] + [len(row[i]) for row in rows]))
    for *row, colour in rows:
        table.add_row(f"[bold]{row[0]}[/]", *row[1:-1], f"[{colour}]{row[-1]}[/]")
    out.console.print(table)
    return 0


def cmd_list(client: Client, args, out: Out) -> int:
    """Streams: each row is printed as it is parsed from the chunk table."""
    rows = client.chunk_rows(args.region)
    if args.json:
        write_json_array(chunk_json_lines(rows), sys.stdout.write)
        return 0
    grid(out, ["start", "size", "region", "dev/type", "owner", "label", "age"],
         chunk_cells(rows, out, time.time()), right={1, 6},
         styles={0: "cyan", 2: "bold", 5: "green"})
    return 0


def cmd_alloc(client: Client, args, out: Out) -> int:
    size, _, alignment = args.size.partition("/")
    options = dict(label=args.label, movable=args.movable, transient=args.transient,
                   bound=args.bound)
    if args.target.startswith("@"):
        buf = client.alloc_from(args.target[1:], size, alignment or None, **options)
    else:
        dev, _, type = args.target.partition("/")
        buf = client.alloc(dev, size, alignment or None, type=type or None, **options)
    start = buf.name
    if args.json:
        out.json({"start": start, "size": buf.size, "region": buf.region,
                  "label": buf.label, "id": buf.id})
    else:
        label = f" {buf.label}" if buf.label else ""
        ident = f" id={buf.id}" if buf.id is not None else ""
        print(f"{start} {out.size(buf.size)} {buf.region}{label}{ident}")
    return 0


def cmd_free(client: Client, args, out: Out) -> int:
    failed = 0
    for what in args.chunks:
        try:
            client.free(what)
        except CmaError as e:
            report("free", e, what)
            failed = 1
    return failed


#: (glyph on a colour terminal, its style, plain glyph) per cell state, for a
#: map drawn from a region's ``bitmap``.  Glyphs differ too, so the map reads
#: on a terminal with NO_COLOR.
CELLS = {"free": ("░", "bright_black", "."), "used": ("█", "blue", "#"),
         "partial": ("▄", "cyan", "+"), "movable": ("▒", "green", "m")}

#: The same for a map drawn from ``pageblocks``: the plain glyph is the file's.
BLOCK_CELLS = {"free": ("░", "bright_black", "."), "pinned": ("█", "blue", "P"),
               "movable": ("▒", "green", "M"), "mixed": ("▓", "magenta", "X")}
BLOCK_TYPES = {glyph: state for state, (_, _, glyph) in BLOCK_CELLS.items()}


def movable_blocks(client: Client, region: RegionInfo, nblocks: int) -> set[int]:
    """The blocks held by movable chunks."""
    block = region.size // nblocks
    held = set()
    for start, size in client.movable_chunks(region.name):
        first = (start - region.start) // block
        held.update(range(first, first + size // block))
    return held


def map_cells(bitmap: str, ncells: int, movable: set[int] | None) -> list[str]:
    """Each cell covers a run of blocks: free, used, partly used, or all movable."""
    n = len(bitmap)
    out = []
    for i in range(ncells):
        lo, hi = i * n // ncells, (i + 1) * n // ncells
        used = bitmap.count("#", lo, hi)
        if used == 0:
            out.append("free")
        elif movable and all(b in movable for b in range(lo, hi) if bitmap[b] == "#"):
            out.append("movable")
        else:
            out.append("used" if used == hi - lo else "partial")
    return out


def pageblock_cells(blocks: str, ncells: int) -> list[str]:
    """Each cell covers a run of pageblocks: free if all are, else the one type
    its used blocks share, else mixed (an unknown type counts as mixed)."""
    n = len(blocks)
    out = []
    for i in range(ncells):
        kinds = set(blocks[i * n // ncells:(i + 1) * n // ncells]) - {"."}
        if not kinds:
            out.append("free")
        elif len(kinds) == 1:
            out.append(BLOCK_TYPES.get(kinds.pop(), "mixed"))
        else:
            out.append("mixed")
    return out


def region_cells(client: Client, r: RegionInfo, width: int, rows: int):
    """(cells, their glyph table) for one region: by pageblock type where the
    region has a ``pageblocks`` file, else by block from its ``bitmap``;
    None when it has no allocator attached."""
    blocks = client.pageblocks(r.dirname)
    if blocks:
        return pageblock_cells(blocks, min(len(blocks), width * rows)), BLOCK_CELLS
    bitmap = client.bitmap(r.dirname)
    if not bitmap:
        return None
    ncells = min(len(bitmap), width * rows)
    return map_cells(bitmap, ncells, movable_blocks(client, r, len(bitmap))), CELLS


def cmd_map(client: Client, args, out: Out) -> int:
    regions = client.regions()
    if not regions:
        return 0
    namew = max(len(r.name) for r in regions)
    colour = out.colour  # creates the console, which measures the terminal
    width = max(10, out.columns - namew - 6) if args.width is None else max(1, args.width)
    if colour:
        from rich.text import Text
    keys = []
    for r in regions:
        drawn = region_cells(client, r, width, args.rows)
        if drawn is None:
            print(f"{r.name:{namew}} (no allocator attached: {r.allocator or 'default'})")
            continue
        cells, glyphs = drawn
        if glyphs not in keys:
            keys.append(glyphs)
        pct = f"{r.used * 100 // r.size:3d}%" if r.size else "   -"
        for row in range(0, len(cells), width):
            head = (r.name if row == 0 else "").ljust(namew)
            tail = f" {pct}" if row == 0 else ""
            part = cells[row:row + width]
            if colour:
                line = Text().append(head, "bold").append(" ")
                for state, run in itertools.groupby(part):
                    glyph, style, _ = glyphs[state]
                    line.append(glyph * len(list(run)), style)
                out.console.print(line.append(tail), no_wrap=True, overflow="ignore")
            else:
                print(f"{head} {''.join(glyphs[s][2] for s in part)}{tail}")
    for glyphs in keys:
        note = "(a cell: 1+ pageblocks)" if glyphs is BLOCK_CELLS else "(a cell: 1+ blocks)"
        if colour:
            key = Text(" " * namew)
            for state, (glyph, style, _) in glyphs.items():
                key.append(" ").append(glyph, style).append(f" {state} ")
            out.console.print(key.append(note, "dim"), no_wrap=True, overflow="ignore")
        else:
            print(" " * namew + "".join(f" {g[2]} {s} " for s, g in glyphs.items()) + note)
    return 0


def top_table(client: Client, regions: list[RegionInfo], previous: dict, elapsed: float,
              out: Out):
    """One frame of `top`, narrow enough for 80 columns."""
    from rich.console import Group
    from rich.text import Text
    table = compact_table()
    for name in ("region", "used", "use", "chunks", "alloc/s", "fails", "largest", "frag"):
        table.add_column(name, justify="left" if name in ("region", "use") else "right",
                         no_wrap=True)
    for r in regions:
        ok, fail = r.stats.get("alloc_ok", 0), r.stats.get("alloc_fail", 0)
        before = previous.get(r.name)
        rate = f"{(ok - before[0]) / elapsed:.1f}" if before and elapsed > 0 else "-"
        new_fail = fail - before[1] if before else 0
        share = r.used / r.size if r.size else 0.0
        bar = "█" * round(share * 10)
        table.add_row(f"[bold]{r.name}[/]", out.size(r.used),
                      f"[{'red' if share > 0.9 else 'blue'}]{bar:<10}[/]{share:5.0%}",
                      str(r.users), rate, f"[red]{fail}[/]" if new_fail else str(fail),
                      out.size(r.stats.get("largest_free", 0)),
                      f"{r.stats.get('fragmentation', 0.0):.0%}")
    title = Text(f"cmad at {client.mountpoint}  {time.strftime('%H:%M:%S')}", "italic",
                 no_wrap=True, overflow="ellipsis")
    return Group(title, table)


def cmd_top(client: Client, args, out: Out) -> int:
    """Redraws in place on a terminal; elsewhere prints each frame (like top -b)."""
    from rich.live import Live
    console = out.console
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    show = (lambda frame: live.update(frame, refresh=True)) if live else console.print
    previous: dict = {}
    last = None
    done = 0
    try:
        if live:
            live.start()
        while True:
            regions = client.regions()
            now = time.monotonic()
            show(top_table(client, regions, previous, now - last if last else 0.0, out))
            previous = {r.name: (r.stats.get("alloc_ok", 0), r.stats.get("alloc_fail", 0))
                        for r in regions}
            last = now
            done += 1
            if args.iterations and done >= args.iterations:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        if live:
            live.stop()


# -- Command line ------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite a value given before it.
    common.add_argument("--mountpoint", default=argparse.SUPPRESS,
                        help="where cmad is mounted (default $CMAD_MOUNTPOINT or /run/cma)")
    common.add_argument("--bytes", action="store_true", default=argparse.SUPPRESS,
                        help="exact sizes in bytes instead of 6.0 MiB")
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="JSON for scripts")

    p = argparse.ArgumentParser(
        prog="cmactl", parents=[common],
        description="Command-line client of cmad, the userspace Contiguous Memory Allocator, "
        "over its mounted filesystem (in the spirit of the CMA patch's cma-test).")
    p.add_argument("--version", action="version", version=f"cmactl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("regions", parents=[common, listing], help="regions and their use",
                   description="One row per region: name, start, size, used, free, chunks, "
                   "largest free block, allocator, kind, fragmentation.")

    s = sub.add_parser("list", parents=[common, listing], help="live chunks",
                       description="One row per chunk: start, size, region, dev/type, owner "
                       "(uid pid), label, age.")
    s.add_argument("--region", help="only the chunks of this region")

    s = sub.add_parser(
        "alloc", parents=[common, listing], help="allocate a chunk",
        description="Allocate one chunk (cma-test's 'a dev/kind size/align' and "
        "'A regions size/align') and print '<start> <size> <region> [<label>] [id=<id>]'.",
        epilog="A --transient chunk is freed when the alloc file handle that made it closes, "
        "that is as soon as cmactl exits: useful only to test that path.")
    s.add_argument("target", metavar="DEV[/TYPE]|@REGION[,REGION...]",
                   help="a device (and type) looked up in the map, or @regions tried in order")
    s.add_argument("size", metavar="SIZE[/ALIGN]",
                   help="memparse sizes: 4096, 0x1000, 6M; alignment a power of two")
    s.add_argument("--label", help="a name for the chunk, usable instead of its start")
    s.add_argument("--movable", action="store_true",
                   help="the daemon may move the chunk to fight fragmentation")
    s.add_argument("--transient", action="store_true",
                   help="free the chunk when cmactl exits (its alloc handle closes)")
    s.add_argument("--bound", metavar="B", help="never cross a B boundary (e.g. 2M)")

    s = sub.add_parser("free", parents=[common], help="free chunks",
                       description="Free chunks by start address (%%p form, 0x hex or "
                       "decimal: whatever is there now), label, or id=ID (exactly that "
                       "chunk, wherever it moved).")
    s.add_argument("chunks", nargs="+", metavar="START|LABEL|id=ID")

    s = sub.add_parser("map", parents=[common], help="block map of each region",
                       description="Each region as a row of cells, like a disk defragmenter's "
                       "map: used, free, partly used, movable; scaled to the terminal width.")
    s.add_argument("--rows", type=int, default=1, help="rows per region (default 1)")
    s.add_argument("--width", type=int, help="cells per row (default: terminal width)")

    s = sub.add_parser("top", parents=[common], help="live view",
                       description="Per-region use, allocation rate, failures, largest free "
                       "block, refreshed every --interval seconds until Ctrl-C.")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    s.add_argument("--iterations", type=int, default=0, help="stop after N refreshes")

    s = sub.add_parser("trace", parents=[common], help="follow allocations as they happen",
                       description="Follow the kernel's cma trace events (allocation asked, "
                       "got or failed, released, chunk moved) with human sizes, like "
                       "perf trace -e 'cma:*', until Ctrl-C.  Events that are off are "
                       "switched on for the run (root).")
    s.add_argument("--region", help="only the events of this region")
    s.add_argument("--errors", action="store_true", help="only failed allocations")
    s.add_argument("--duration", type=float, default=0, help="stop after SECONDS")
    args = p.parse_args(argv)
    args.mountpoint = getattr(args, "mountpoint", None) or default_mountpoint()
    args.bytes = getattr(args, "bytes", False)
    return args


COMMANDS = {"regions": cmd_regions, "list": cmd_list, "alloc": cmd_alloc, "free": cmd_free,
            "map": cmd_map, "top": cmd_top, "trace": cmd_trace}


def report(command: str, e: OSError, subject: str = "") -> None:
    """One line: the errno's meaning, its name, and cmad's reason when known."""
    hint = HINTS.get((command, e.errno))
    hint = f"; {hint.format(repr(subject))}" if hint else ""
    strerror = os.strerror(e.errno) if e.errno else str(e)
    print(f"cmactl: {command}: {strerror} ({errno_name(e.errno)}){hint}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        client = Client(args.mountpoint)
        return COMMANDS[args.command](client, args, Out(args.bytes))
    except NotMounted as e:
        print(f"cmactl: {e.why}", file=sys.stderr)
    except BrokenPipeError:  # cmactl list | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:
        report(args.command, e)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
