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
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Iterator

from cmad.errors import CmaError
from cmad.memparse import fmt_addr
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

_READ_SIZE = 1 << 16
#: Bytes per read of the chunk table: the kernel splits it into FUSE reads
#: of its max_read; fewer, larger reads cost fewer round trips and joins.
TABLE_READ = 1 << 20


def default_mountpoint() -> str:
    return os.environ.get(MOUNTPOINT_ENV) or DEFAULT_MOUNTPOINT


class NotMounted(CmaError):
    """No live cmad filesystem at the mountpoint (missing, not mounted, or stale)."""


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


# -- Reading the tree --------------------------------------------------------


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


# -- Buffers -----------------------------------------------------------------


class Buffer:
    """An allocated chunk, with a zero-copy view of its bytes.

    ``view`` is a writable memoryview of the arena's own memory (MAP_SHARED),
    mapped on first use; ``numpy()`` wraps it in an array.  ``free()`` unmaps
    and frees the chunk; it is idempotent, and ``with`` calls it at exit.
    A view or array still alive at ``free()`` makes it fail with BufferError
    (the chunk stays allocated): the memory must not be handed to someone
    else while you can still write to it.

    Identity: the Buffer holds its chunk's ``id`` and reaches it through
    ``ids/<id>/`` (``path``), so a movable chunk moved by compaction is still
    this Buffer's chunk, and a chunk freed behind its back is ENOENT, never
    the chunk now at its old address.  ``start`` is where the chunk is now:
    for a movable chunk not mapped yet it re-reads ``ids/<id>/start`` on
    every access (one FUSE read); mapping pins the chunk, so from then on,
    and for a pinned chunk, it is a plain attribute.  Against a daemon with
    no ids (``id`` None) the Buffer falls back to ``chunks/<start>``, which
    is only right while the chunk does not move.

    Copy with memoryviews on both sides, ``memoryview(dst)[:] = buf.view``:
    one memcpy.  ``bytearray[:] = buf.view`` goes through a temporary copy
    in CPython, at a sixth of the speed.
    """

    def __init__(self, client: "Client", start: int, size: int, region: str,
                 label: str | None, handle: int | None = None, *, id: int | None = None,
                 movable: bool = False):
        self.client = client
        self.id = id
        self.size = size
        self.region = region
        self.label = label
        self._start = start
        self._may_move = movable and id is not None
        self._handle = handle       # the alloc descriptor of a transient chunk
        self._mmap: mmap.mmap | None = None
        self._lead = 0              # where the chunk starts in the mapping
        self._view: memoryview | None = None
        self._freed = False

    @property
    def start(self) -> int:
        """The chunk's start now (see the class docstring); ENOENT once it is gone."""
        if self._may_move and not self._freed:
            self._start = int(self._attr("start"), 16)
        return self._start

    @property
    def name(self) -> str:
        """The chunk's directory name in chunks/ (its start now, %p form)."""
        return fmt_addr(self.start)

    @property
    def path(self) -> str:
        """The chunk's own directory: ``ids/<id>``, which follows it."""
        if self.id is None:
            return os.path.join(self.client.mountpoint, "chunks", fmt_addr(self._start))
        return os.path.join(self.client.mountpoint, "ids", str(self.id))

    @property
    def freed(self) -> bool:
        return self._freed

    def _what(self) -> str:
        return f"chunk id={self.id}" if self.id is not None else f"chunk {fmt_addr(self._start)}"

    def _attr(self, name: str) -> str:
        """One of the chunk's files.  Gone is ENOENT: a fresh lookup of a freed
        chunk's directory fails so, its files once looked up answer ENXIO."""
        try:
            return read_value(os.path.join(self.path, name))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENXIO):
                raise
        raise CmaError(errno.ENOENT, f"{self._what()} is gone: it was freed behind this "
                       "Buffer")

    @property
    def view(self) -> memoryview:
        if self._freed:
            raise ValueError(f"{self._what()} was freed")
        if self._view is None:
            self._map()
        return self._view

    def _map(self) -> None:
        try:
            text = self._attr("mmap")  # pins the chunk where it is now
        except PermissionError:
            raise PermissionError(
                errno.EACCES, f"cannot map {self._what()}: zero-copy mapping is for root, "
                f"and for the group of a region shared with one (group=G in the region's "
                f"parameters); region {self.region} is not shared with a group of uid "
                f"{os.geteuid()}, which can use {self.path}/data instead") from None
        if self._may_move:
            self._start = int(self._attr("start"), 16)  # pinned: final
            self._may_move = False
        path, offset, length = text.rsplit(" ", 2)  # the path may hold spaces
        offset, length = int(offset), int(length)
        try:
            fd = os.open(path, os.O_RDWR)
        except PermissionError:
            raise PermissionError(
                errno.EACCES, f"cannot map {self._what()}: the arena file {path} is not "
                f"accessible to uid {os.geteuid()}; zero-copy mapping needs read-write access "
                f"to it (run as the daemon's user), or use {self.path}/data instead") from None
        try:
            # A hugetlb arena maps only whole huge pages (its st_blksize).
            granule = max(mmap.ALLOCATIONGRANULARITY, os.fstat(fd).st_blksize)
            lead = offset % granule
            span = -(-(lead + length) // granule) * granule
            self._mmap = mmap.mmap(fd, span, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - lead)
        finally:
            os.close(fd)
        self._lead = lead
        self._view = memoryview(self._mmap)[lead:lead + length]

    @property
    def address(self) -> int:
        """The virtual address of the chunk's first byte in this process (mapped on
        first use), for registration with a device driver:
        ``cudaHostRegister(buf.address, buf.length, 0)``.  Valid until `free`."""
        self.view  # noqa: B018 (maps it)
        anchor = ctypes.c_char.from_buffer(self._mmap)
        try:
            return ctypes.addressof(anchor) + self._lead
        finally:
            del anchor  # the export ends here, so free() can unmap

    @property
    def length(self) -> int:
        """The chunk's length in bytes (``size``), as drivers name it."""
        return self.size

    def phys(self) -> list[tuple[int, int]]:
        """The chunk's physical segments (address, length), where the caller may read
        them: ``phys`` is root-only (PermissionError saying so otherwise)."""
        try:
            text = read_text(os.path.join(self.path, "phys"))
        except PermissionError:
            raise PermissionError(errno.EACCES, f"physical segments of {self._what()}: "
                                  f"{self.path}/phys is root-only (physical addresses "
                                  "are not for users; a device driver registers "
                                  "Buffer.address instead)") from None
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENXIO):
                raise CmaError(errno.ENOENT, f"{self._what()} is gone") from None
            raise
        return [(int(a, 16), int(n)) for a, n in (line.split() for line in text.splitlines())]

    def numpy(self, dtype="uint8", shape=None):
        """The chunk as a numpy array sharing its memory (numpy imported here)."""
        try:
            import numpy
        except ImportError:
            raise ImportError("Buffer.numpy() needs numpy, which is not installed "
                              "(pip install numpy); Buffer.view works without it") from None
        dtype = numpy.dtype(dtype)
        if shape is None:
            return numpy.frombuffer(self.view, dtype, count=self.size // dtype.itemsize)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        count = 1
        for n in shape:
            count *= n
        if count * dtype.itemsize > self.size:
            raise ValueError(f"shape {shape} of {dtype} needs {count * dtype.itemsize} bytes; "
                             f"{self._what()} has {self.size}")
        return numpy.frombuffer(self.view, dtype, count=count).reshape(shape)

    def _unmap(self) -> None:
        if self._mmap is None:
            return
        busy = BufferError(f"cannot free {self._what()}: views of it are still alive "
                           "(arrays or memoryview slices); delete them first")
        try:
            self._view.release()
        except BufferError:
            raise busy from None
        try:
            self._mmap.close()
        except BufferError:  # slices of the view outlived it: keep serving them
            self._view = memoryview(self._mmap)[self._lead:self._lead + self.size]
            raise busy from None
        self._mmap = self._view = None

    def free(self) -> None:
        """Unmap and free this Buffer's chunk (``free id=<id>``), wherever it
        is now.  A second call does nothing.  ENOENT if the chunk was freed
        behind the Buffer's back: nothing else is freed."""
        if self._freed:
            return
        self._unmap()
        self._freed = True
        try:
            self.client.free(self)
        except CmaError as e:
            if e.errno != errno.ENOENT:
                raise
            raise CmaError(errno.ENOENT, f"free {self._what()}: it is gone (freed behind "
                           "this Buffer); nothing else was freed") from None
        finally:
            self._close_handle()

    def _close_handle(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            os.close(handle)

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __del__(self) -> None:
        # A transient chunk lives as long as its descriptor: let it go with us.
        try:
            self._close_handle()
        except (OSError, AttributeError):
            pass

    def __repr__(self) -> str:
        """The last known start: a repr reads nothing from the daemon."""
        state = " freed" if self._freed else ""
        label = f" {self.label}" if self.label else ""
        ident = f" id={self.id}" if self.id is not None else ""
        return (f"<Buffer {fmt_addr(self._start)}+{self.size:#x} {self.region}{label}{ident}"
                f"{state}>")


# -- The client --------------------------------------------------------------


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


__all__ = ["Buffer", "ChunkInfo", "Client", "CmaError", "NotMounted", "RegionInfo",
           "default_mountpoint", "parse_created", "parse_result", "request_line"]
