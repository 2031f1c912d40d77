"""cmactl's commands: ``regions``, ``list``, ``alloc``, ``free``, ``map`` and
``top`` (``trace`` is `cmad.clients.cmactl_trace`'s).  Each is
``cmd_<name>(client, args, out) -> exit status``.

Part of cmactl (`cmad.clients.cmactl` re-exports every name here).
"""

from __future__ import annotations

import itertools
import sys
import time

from cmad.clients.client import Client, CmaError, RegionInfo
from cmad.clients.cmactl_out import (Out, chunk_cells, chunk_json_lines, compact_table, grid,
                                     region_json, report, write_json_array)


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

