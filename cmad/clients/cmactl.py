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

The code is in four modules: this one (the command line and dispatch),
`cmad.clients.cmactl_out` (output), `cmad.clients.cmactl_cmds` (the
commands) and `cmad.clients.cmactl_trace`; every name is importable from here.
"""

from __future__ import annotations

import argparse
import os
import sys

from cmad import __version__
from cmad.clients.client import (Client, CmaError, NotMounted, RegionInfo,  # noqa: F401
                                 default_mountpoint, errno_name, parse_created)
from cmad.clients.cmactl_cmds import (BLOCK_CELLS, BLOCK_TYPES, CELLS, cmd_alloc,  # noqa: F401
                                      cmd_free, cmd_list, cmd_map, cmd_regions, cmd_top,
                                      map_cells, movable_blocks, pageblock_cells, region_cells,
                                      top_table)
from cmad.clients.cmactl_out import (CACHE_MAX, CHUNK_JSON_MIDDLE, GRID_WINDOW,  # noqa: F401
                                     HINTS, STREAM_BATCH, Out, age, chunk_cells,
                                     chunk_json_lines, compact_table, grid, region_json,
                                     remember, report, write_json_array)
from cmad.clients.cmactl_trace import cmd_trace
from cmad.memparse import human  # noqa: F401
from cmad.protocol import T_CREATED, T_LABEL, T_SIZE, parse_id  # noqa: F401

# -- Command line ------------------------------------------------------------


def arg(*names: str, **options) -> tuple[tuple[str, ...], dict]:
    """One ``add_argument`` call, as data."""
    return names, options


#: The subcommands, in help order: (name, takes --json, add_parser's options,
#: their arguments).  Every one takes --mountpoint and --bytes too.
SUBCOMMANDS = [
    ("regions", True, dict(
        help="regions and their use",
        description="One row per region: name, start, size, used, free, chunks, "
        "largest free block, allocator, kind, fragmentation."), []),
    ("list", True, dict(
        help="live chunks",
        description="One row per chunk: start, size, region, dev/type, owner "
        "(uid pid), label, age."), [
        arg("--region", help="only the chunks of this region")]),
    ("alloc", True, dict(
        help="allocate a chunk",
        description="Allocate one chunk (cma-test's 'a dev/kind size/align' and "
        "'A regions size/align') and print '<start> <size> <region> [<label>] [id=<id>]'.",
        epilog="A --transient chunk is freed when the alloc file handle that made it closes, "
        "that is as soon as cmactl exits: useful only to test that path."), [
        arg("target", metavar="DEV[/TYPE]|@REGION[,REGION...]",
            help="a device (and type) looked up in the map, or @regions tried in order"),
        arg("size", metavar="SIZE[/ALIGN]",
            help="memparse sizes: 4096, 0x1000, 6M; alignment a power of two"),
        arg("--label", help="a name for the chunk, usable instead of its start"),
        arg("--movable", action="store_true",
            help="the daemon may move the chunk to fight fragmentation"),
        arg("--transient", action="store_true",
            help="free the chunk when cmactl exits (its alloc handle closes)"),
        arg("--bound", metavar="B", help="never cross a B boundary (e.g. 2M)")]),
    ("free", False, dict(
        help="free chunks",
        description="Free chunks by start address (%%p form, 0x hex or "
        "decimal: whatever is there now), label, or id=ID (exactly that "
        "chunk, wherever it moved)."), [
        arg("chunks", nargs="+", metavar="START|LABEL|id=ID")]),
    ("map", False, dict(
        help="block map of each region",
        description="Each region as a row of cells, like a disk defragmenter's "
        "map: used, free, partly used, movable; scaled to the terminal width."), [
        arg("--rows", type=int, default=1, help="rows per region (default 1)"),
        arg("--width", type=int, help="cells per row (default: terminal width)")]),
    ("top", False, dict(
        help="live view",
        description="Per-region use, allocation rate, failures, largest free "
        "block, refreshed every --interval seconds until Ctrl-C."), [
        arg("--interval", type=float, default=1.0, help="seconds between refreshes"),
        arg("--iterations", type=int, default=0, help="stop after N refreshes")]),
    ("trace", False, dict(
        help="follow allocations as they happen",
        description="Follow the kernel's cma trace events (allocation asked, "
        "got or failed, released, chunk moved) with human sizes, like "
        "perf trace -e 'cma:*', until Ctrl-C.  Events that are off are "
        "switched on for the run (root)."), [
        arg("--region", help="only the events of this region"),
        arg("--errors", action="store_true", help="only failed allocations"),
        arg("--duration", type=float, default=0, help="stop after SECONDS")]),
]


def shared_options() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parents: options every parser takes, and ``--json`` for listings."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite a value given before it.
    common.add_argument("--mountpoint", default=argparse.SUPPRESS,
                        help="where cmad is mounted (default $CMAD_MOUNTPOINT or /run/cma)")
    common.add_argument("--bytes", action="store_true", default=argparse.SUPPRESS,
                        help="exact sizes in bytes instead of 6.0 MiB")
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="JSON for scripts")
    return common, listing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, its parsers built from `SUBCOMMANDS`."""
    common, listing = shared_options()
    p = argparse.ArgumentParser(
        prog="cmactl", parents=[common],
        description="Command-line client of cmad, the userspace Contiguous Memory Allocator, "
        "over its mounted filesystem (in the spirit of the CMA patch's cma-test).")
    p.add_argument("--version", action="version", version=f"cmactl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, lists, options, arguments in SUBCOMMANDS:
        s = sub.add_parser(name, parents=[common, listing] if lists else [common], **options)
        for names, kwargs in arguments:
            s.add_argument(*names, **kwargs)
    args = p.parse_args(argv)
    args.mountpoint = getattr(args, "mountpoint", None) or default_mountpoint()
    args.bytes = getattr(args, "bytes", False)
    return args


COMMANDS = {"regions": cmd_regions, "list": cmd_list, "alloc": cmd_alloc, "free": cmd_free,
            "map": cmd_map, "top": cmd_top, "trace": cmd_trace}


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
