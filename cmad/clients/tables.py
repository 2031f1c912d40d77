"""Reading the daemon's tree: attribute files, the region directories' facts
(`RegionInfo`) and the one-file tables (``chunkinfo``), read in large blocks
and parsed line by line as a generator.

Part of the client (`cmad.clients.client` re-exports every name here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator

from cmad.memparse import fmt_addr

_READ_SIZE = 1 << 16
#: Bytes per read of the chunk table: the kernel splits it into FUSE reads
#: of its max_read; fewer, larger reads cost fewer round trips and joins.
TABLE_READ = 1 << 20


def read_text(path: str) -> str:
    """A whole attribute file (one open; ``bitmap`` may exceed a page)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while True:
            data = os.read(fd, _READ_SIZE)
            if not data:
                break
            parts.append(data)
    finally:
        os.close(fd)
    return b"".join(parts).decode()


def read_value(path: str) -> str:
    """One sysfs value: the file without its trailing newline."""
    return read_text(path).removesuffix("\n")


def parse_created(text: str) -> float:
    """``2026-11-25T06:29:29Z`` -> seconds since the epoch.

    datetime.fromisoformat is C (0.3 µs); time.strptime took 54% of a
    listing of a million chunks."""
    return datetime.fromisoformat(text).timestamp()


@dataclass(frozen=True)
class RegionInfo:
    """One ``regions/<start>/`` directory.  ``contiguous`` is ``physical`` or
    ``virtual``, or None where the daemon has no ``contiguous`` file."""

    name: str
    start: int
    size: int
    free: int
    users: int
    allocator: str
    kind: str
    stats: dict
    contiguous: str | None = None

    @property
    def used(self) -> int:
        return self.size - self.free

    @property
    def dirname(self) -> str:
        return fmt_addr(self.start)



def _optional(read, *args):
    """``read(*args)``, or None where the daemon has no such file."""
    try:
        return read(*args)
    except FileNotFoundError:
        return None


def table_lines(path: str) -> Iterator[str]:
    """The lines of a table file (``chunkinfo``), read `TABLE_READ` bytes at a
    time: the file is never held whole.  Empty lines are left out (an empty
    table is one ``\n``); a missing file has no lines."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        rest = b""
        while True:
            data = os.read(fd, TABLE_READ)
            if not data:
                break
            cut = data.rfind(b"\n") + 1
            if not cut:
                rest += data
                continue
            lines = (rest + data[:cut]).decode().split("\n")
            rest = data[cut:]
            lines.pop()  # after the last newline
            yield from filter(None, lines)
        if rest:
            yield rest.decode()
    finally:
        os.close(fd)
