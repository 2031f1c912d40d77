"""A client of a running cmad, through its mounted filesystem only.

    from cmad.clients.client import Client
    client = Client()                          # /run/cma, or $CMAD_MOUNTPOINT
    with client.alloc("camera", 6 << 20, alignment=1 << 20, label="frame0") as buf:
        buf.view[:4] = b"RIFF"                 # zero-copy: the arena's own bytes
        frame = buf.numpy("uint16", (1080, 1920))   # if numpy is installed
    # freed here

Design:

- Nothing here imports the daemon (no pyfuse3, trio, tree): the filesystem
  is the whole interface, as it is for a shell.  `cmactl` is built on this
  module.
- An allocation is one request line written to ``alloc`` and its result
  line read back on the same descriptor (the file is a stream).  A
  ``transient`` chunk dies when that descriptor closes, so its `Buffer`
  keeps the descriptor open until `Buffer.free`.
- A `Buffer` reaches only its own chunk (SPEC §4c): it keeps the chunk's
  id from the result line and goes through ``ids/<id>/`` for every path
  (``mmap``, ``data``, attributes) and ``free id=<id>`` to free it.  A
  movable chunk may move until it is mapped, so ``Buffer.start`` re-reads
  ``ids/<id>/start`` while that can happen; once freed behind the Buffer's
  back its files and its free fail with ENOENT, never reaching the chunk
  that now sits at the old address.
- The zero-copy view maps the file named by the chunk's ``mmap``
  attribute (``data`` is direct_io and cannot be mapped): the root-only
  arena file, or for a chunk of a region shared with a group (SPEC 4d)
  that region's own file, which members of the group may map.  It is
  mapped on first use, so a caller without access can still allocate and
  use ``data``.  ``Buffer.address`` and ``Buffer.length`` hand the mapping
  to a device driver (``cudaHostRegister(buf.address, buf.length, 0)``).  Reading ``mmap`` pins a movable chunk (the
  daemon cannot follow a mapping), so the mapping is always of the chunk's
  place at that moment, and final.
- Listings come from the daemon's one-file table of all chunks
  (`CHUNK_TABLE`), read in large blocks and parsed line by line as a
  generator (`Client.chunk_rows`, `Client.iter_chunks`): a million chunks
  never become a million objects unless the caller keeps them.
- Errors from the daemon come back as `CmaError` (an OSError) with the
  daemon's errno; a missing or dead mount is `NotMounted`.

The client is in three modules, all re-exported here: this one (`Client`),
`cmad.clients.buffer` (`Buffer` and its mapping) and `cmad.clients.tables`
(reading attribute files, `RegionInfo`, the chunk table's lines).
"""

from __future__ import annotations

import errno
import os
from typing import Iterable, Iterator

from cmad.clients.buffer import Buffer
from cmad.clients.tables import (_READ_SIZE, TABLE_READ, RegionInfo, _optional,  # noqa: F401
                                 parse_created, read_text, read_value, table_lines)
from cmad.errors import CmaError
from cmad.memparse import fmt_addr  # noqa: F401
from cmad.protocol import (CHUNK_TABLE, T_CREATED, T_DEV, T_LABEL, T_MOVABLE, T_PID,  # noqa: F401
                           T_REGION, T_SIZE, T_START, T_TYPE, T_UID, ChunkInfo, chunk_from_row,
                           device_target, format_request, free_key, parse_id, parse_keyed,
                           parse_result, regions_target)

DEFAULT_MOUNTPOINT = "/run/cma"
MOUNTPOINT_ENV = "CMAD_MOUNTPOINT"

#: The wire formats (the request and result lines, the `CHUNK_TABLE` rows and
#: their ``T_*`` field indexes, the free key, the stats lines) are
#: `cmad.protocol`'s, imported here under the names this module has always
#: had.  10,000 chunks list in 40 ms through the chunk table, where reading
#: their files takes ~10 s.
request_line = format_request


def default_mountpoint() -> str:
    return os.environ.get(MOUNTPOINT_ENV) or DEFAULT_MOUNTPOINT


class NotMounted(CmaError):
    """No live cmad filesystem at the mountpoint (missing, not mounted, or stale)."""


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


class Client:
    """A running cmad, reached through its mountpoint (default /run/cma or
    ``$CMAD_MOUNTPOINT``).  Raises `NotMounted` if nothing serves it."""

    def __init__(self, mountpoint: str | os.PathLike | None = None):
        self.mountpoint = os.fspath(mountpoint) if mountpoint is not None \
            else default_mountpoint()
        self.check()

    def path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)

    def check(self) -> None:
        """NotMounted unless a live cmad tree is at the mountpoint."""
        mnt = self.mountpoint
        try:
            os.statvfs(mnt)  # a stale mount answers ENOTCONN here, not to stat
        except FileNotFoundError:
            raise NotMounted(errno.ENOENT, f"{mnt}: no such directory; is cmad running "
                             "(cmad --mountpoint DIR, or set CMAD_MOUNTPOINT)?") from None
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise NotMounted(e.errno, f"{mnt}: stale mount, its cmad daemon is gone "
                                 "(ENOTCONN); restart cmad") from None
            raise NotMounted(e.errno, f"{mnt}: {e.strerror}") from None
        if not os.path.ismount(mnt) or not os.path.exists(self.path("allocators")):
            raise NotMounted(errno.ENOENT, f"{mnt}: cmad is not mounted there; start cmad "
                             "or pass the right mountpoint")

    # -- allocation ------------------------------------------------------

    def alloc(self, dev: str, size, alignment=None, label: str | None = None,
              type: str | None = None, movable: bool = False, transient: bool = False,
              bound=None) -> Buffer:
        """Allocate for device ``dev`` (and ``type``) through the map.

        Sizes, alignment and bound are bytes (int) or memparse strings
        ("6M").  A ``transient`` chunk is freed when the Buffer is freed or
        collected, or when this process ends, whichever comes first.
        """
        return self.request(format_request(device_target(dev, type), size, alignment,
                                           label=label, movable=movable, transient=transient,
                                           bound=bound))

    def alloc_from(self, regions: str | Iterable[str], size, alignment=None,
                   label: str | None = None, movable: bool = False, transient: bool = False,
                   bound=None) -> Buffer:
        """Allocate from the named regions, tried in order (cma_alloc_from)."""
        return self.request(format_request(regions_target(regions), size, alignment,
                                           label=label, movable=movable, transient=transient,
                                           bound=bound))

    def request(self, line: str) -> Buffer:
        """Write one request line to ``alloc`` and read its result on the same descriptor."""
        fd = self._open("alloc", os.O_RDWR, "alloc")
        keep = False
        try:
            try:
                os.write(fd, line.encode())
                result = os.read(fd, 4096).decode()
            except OSError as e:
                raise CmaError(e.errno, f"alloc {line!r}: {e.strerror}") from None
            if not result:
                raise CmaError(errno.EIO, f"alloc {line!r}: no result line on the alloc file")
            start, size, region, label, ident = parse_result(result)
            options = line.split()[2:]
            keep = "transient" in options
            return Buffer(self, start, size, region, label, handle=fd if keep else None,
                          id=ident, movable="movable" in options)
        finally:
            if not keep:
                os.close(fd)

    def free(self, chunk: "int | str | Buffer") -> None:
        """Free a chunk: a `Buffer`'s own chunk (by its id), or by start address
        (int, or any form ``free`` takes: what is at that address now), label
        or ``id=<id>``."""
        if isinstance(chunk, Buffer):
            what = free_key(chunk._start, id=chunk.id)
        else:
            what = free_key(chunk)
        fd = self._open("free", os.O_WRONLY, "free")
        try:
            os.write(fd, what.encode())
        except OSError as e:
            raise CmaError(e.errno, f"free {what!r}: {e.strerror}") from None
        finally:
            os.close(fd)

    def _open(self, name: str, flags: int, what: str) -> int:
        try:
            return os.open(self.path(name), flags)
        except OSError as e:
            raise CmaError(e.errno, f"{what}: cannot open {self.path(name)}: "
                           f"{e.strerror}") from None

    # -- listings --------------------------------------------------------

    def stats(self) -> dict:
        """The root ``stats``: counters summed over regions, and arena facts."""
        return parse_keyed(read_text(self.path("stats")))

    def region_dirs(self) -> list[str]:
        """``regions/<start>`` names, by address (symlinks by name left out)."""
        with os.scandir(self.path("regions")) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))

    def regions(self) -> list[RegionInfo]:
        return [self.region(d) for d in self.region_dirs()]

    def region(self, name: str) -> RegionInfo:
        """One region, by name or by start (%p form)."""
        d = self.path("regions", name)
        value = lambda attr: read_value(os.path.join(d, attr))  # noqa: E731
        return RegionInfo(name=value("name"), start=int(value("start"), 16),
                          size=int(value("size")), free=int(value("free")),
                          users=int(value("users")), allocator=value("alloc"),
                          kind=value("kind"), stats=parse_keyed(read_text(f"{d}/stats")),
                          contiguous=_optional(value, "contiguous"))

    def bitmap(self, name: str) -> str:
        """A region's blocks in one string, '#' used and '.' free."""
        return read_text(self.path("regions", name, "bitmap")).replace("\n", "")

    def pageblocks(self, name: str) -> str | None:
        """A region's pageblocks in one string (``.`` free, ``P`` pinned, ``M``
        movable, ``X`` mixed), or None where the daemon has no such file."""
        text = _optional(read_text, self.path("regions", name, "pageblocks"))
        return None if text is None else text.replace("\n", "")

    def chunk_rows(self, region: str | None = None) -> Iterator[list[str]]:
        """The chunk table's rows as lists of text fields (indexes ``T_*``), in
        the daemon's order (by start), parsed as they are read: the cheapest
        way through a million chunks.  Empty if the daemon has no table."""
        for line in table_lines(self.path(CHUNK_TABLE)):
            fields = line.split(" ")
            if region is None or fields[T_REGION] == region:
                yield fields

    def iter_chunks(self, region: str | None = None) -> Iterator[ChunkInfo]:
        """All live chunks (or those of one region), by start, one at a time."""
        return map(chunk_from_row, self.chunk_rows(region))

    def chunks(self, region: str | None = None) -> list[ChunkInfo]:
        """All live chunks (or those of one region), by start address."""
        return sorted(self.iter_chunks(region), key=lambda c: c.start)

    def movable_chunks(self, region: str) -> list[tuple[int, int]]:
        """(start, size) of a region's movable chunks."""
        return [(int(f[T_START], 16), int(f[T_SIZE])) for f in self.chunk_rows(region)
                if f[T_MOVABLE] == "1"]


__all__ = ["Buffer", "ChunkInfo", "Client", "CmaError", "NotMounted", "RegionInfo",
           "default_mountpoint", "parse_created", "parse_result", "request_line"]
