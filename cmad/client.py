"""A client of a running cmad, through its mounted filesystem only.

    from cmad.client import Client
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
- The zero-copy view maps the arena file named by the chunk's ``mmap``
  attribute (``data`` is direct_io and cannot be mapped).  It is mapped on
  first use, so a caller without access to the arena file can still
  allocate and use ``data``.
- Reading one attribute file costs ~0.16 ms (open, read, flush, release:
  each a FUSE request, served one at a time by the daemon), so a listing
  from per-chunk files costs ~1 ms per chunk however it is done.  If the
  daemon publishes a one-file table of all chunks (`CHUNK_TABLE`), it is
  read in one go; otherwise only the files a listing needs are read, by
  several threads (see `Client.chunks`).
- Errors from the daemon come back as `CmaError` (an OSError) with the
  daemon's errno; a missing or dead mount is `NotMounted`.
"""

from __future__ import annotations

import calendar
import errno
import mmap
import os
import time
from dataclasses import dataclass
from typing import Iterable

from .errors import CmaError, einval
from .memparse import fmt_addr

DEFAULT_MOUNTPOINT = "/run/cma"
MOUNTPOINT_ENV = "CMAD_MOUNTPOINT"

#: A table of all chunks in one file, one line each:
#: ``<start> <size> <region> <dev> <type> <uid> <pid> <created> <movable> <label|->``
#: (movable 0 or 1, "-" for no label).  Not published by the daemon yet;
#: used when it is: a prototype listed 10,000 chunks in 40 ms through FUSE,
#: where reading their files takes ~10 s.
CHUNK_TABLE = "chunkinfo"

#: Threads reading per-chunk files when there is no chunk table.  The
#: daemon serves one request at a time, so more only adds overhead.
LIST_WORKERS = 8

_READ_SIZE = 1 << 16


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


def parse_keyed(text: str) -> dict[str, int | float | str]:
    """``key value`` lines (``stats``): numbers become int or float."""
    out: dict[str, int | float | str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        out[key] = _number(value)
    return out


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_created(text: str) -> float:
    """``2026-11-25T06:29:29Z`` -> seconds since the epoch."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


@dataclass(frozen=True)
class RegionInfo:
    """One ``regions/<start>/`` directory."""

    name: str
    start: int
    size: int
    free: int
    users: int
    allocator: str
    kind: str
    stats: dict

    @property
    def used(self) -> int:
        return self.size - self.free

    @property
    def dirname(self) -> str:
        return fmt_addr(self.start)


@dataclass(frozen=True)
class ChunkInfo:
    """One ``chunks/<start>/`` directory.  ``movable`` is None when not read: a
    listing from per-chunk files leaves it out (one read less per chunk)."""

    start: int
    size: int
    region: str
    dev: str
    type: str
    uid: int
    pid: int
    label: str | None
    created: str
    movable: bool | None = None

    @property
    def name(self) -> str:
        return fmt_addr(self.start)

    @property
    def end(self) -> int:
        return self.start + self.size


# -- Buffers -----------------------------------------------------------------


class Buffer:
    """An allocated chunk, with a zero-copy view of its bytes.

    ``view`` is a writable memoryview of the arena's own memory (MAP_SHARED),
    mapped on first use; ``numpy()`` wraps it in an array.  ``free()`` unmaps
    and frees the chunk; it is idempotent, and ``with`` calls it at exit.
    A view or array still alive at ``free()`` makes it fail with BufferError
    (the chunk stays allocated): the memory must not be handed to someone
    else while you can still write to it.

    Copy with memoryviews on both sides, ``memoryview(dst)[:] = buf.view``:
    one memcpy.  ``bytearray[:] = buf.view`` goes through a temporary copy
    in CPython, at a sixth of the speed.
    """

    def __init__(self, client: "Client", start: int, size: int, region: str,
                 label: str | None, handle: int | None = None):
        self.client = client
        self.start = start
        self.size = size
        self.region = region
        self.label = label
        self._handle = handle       # the alloc descriptor of a transient chunk
        self._mmap: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._freed = False

    @property
    def name(self) -> str:
        """The chunk's directory name in chunks/ (its start, %p form)."""
        return fmt_addr(self.start)

    @property
    def path(self) -> str:
        return os.path.join(self.client.mountpoint, "chunks", self.name)

    @property
    def freed(self) -> bool:
        return self._freed

    @property
    def view(self) -> memoryview:
        if self._freed:
            raise ValueError(f"chunk {self.name} was freed")
        if self._view is None:
            self._map()
        return self._view

    def _map(self) -> None:
        try:
            text = read_value(os.path.join(self.path, "mmap"))
        except PermissionError:
            raise PermissionError(
                errno.EACCES, f"cannot map chunk {self.name}: zero-copy mapping is for root "
                f"(the chunk's mmap attribute and the arena file are root-only); uid "
                f"{os.geteuid()} can use {self.path}/data instead") from None
        path, offset, length = text.rsplit(" ", 2)  # the path may hold spaces
        offset, length = int(offset), int(length)
        lead = offset % mmap.ALLOCATIONGRANULARITY
        try:
            fd = os.open(path, os.O_RDWR)
        except PermissionError:
            raise PermissionError(
                errno.EACCES, f"cannot map chunk {self.name}: the arena file {path} is not "
                f"accessible to uid {os.geteuid()}; zero-copy mapping needs read-write access "
                f"to it (run as the daemon's user), or use {self.path}/data instead") from None
        try:
            self._mmap = mmap.mmap(fd, lead + length, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - lead)
        finally:
            os.close(fd)
        self._view = memoryview(self._mmap)[lead:lead + length]

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
                             f"chunk {self.name} has {self.size}")
        return numpy.frombuffer(self.view, dtype, count=count).reshape(shape)

    def _unmap(self) -> None:
        if self._mmap is None:
            return
        busy = BufferError(f"cannot free chunk {self.name}: views of it are still alive "
                           "(arrays or memoryview slices); delete them first")
        try:
            self._view.release()
        except BufferError:
            raise busy from None
        try:
            self._mmap.close()
        except BufferError:  # slices of the view outlived it: keep serving them
            self._view = memoryview(self._mmap)[len(self._mmap) - self.size:]
            raise busy from None
        self._mmap = self._view = None

    def free(self) -> None:
        """Unmap and free the chunk.  A second call does nothing."""
        if self._freed:
            return
        self._unmap()
        self._freed = True
        try:
            self.client.free(self.start)
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
        state = " freed" if self._freed else ""
        label = f" {self.label}" if self.label else ""
        return f"<Buffer {self.name}+{self.size:#x} {self.region}{label}{state}>"


# -- The client --------------------------------------------------------------


def _word(value, what: str) -> str:
    """A request word: the alloc grammar splits on whitespace, so none may hide inside."""
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise einval(f"{what} {text!r} must be one word")
    return text


def request_line(target: str, size, alignment=None, *, label=None, movable=False,
                 transient=False, bound=None) -> str:
    """One line of the alloc grammar (sizes as ints or memparse strings)."""
    words = [_word(target, "target"), _word(size, "size")]
    if alignment:
        words[1] += "/" + _word(alignment, "alignment")
    if label is not None:
        words.append("label=" + _word(label, "label"))
    if movable:
        words.append("movable")
    if transient:
        words.append("transient")
    if bound:
        words.append("bound=" + _word(bound, "bound"))
    return " ".join(words)


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
        target = f"{_word(dev, 'device')}/{_word(type, 'type')}" if type else dev
        return self.request(request_line(target, size, alignment, label=label,
                                         movable=movable, transient=transient, bound=bound))

    def alloc_from(self, regions: str | Iterable[str], size, alignment=None,
                   label: str | None = None, movable: bool = False, transient: bool = False,
                   bound=None) -> Buffer:
        """Allocate from the named regions, tried in order (cma_alloc_from)."""
        names = regions if isinstance(regions, str) else ",".join(regions)
        return self.request(request_line("@" + names, size, alignment, label=label,
                                         movable=movable, transient=transient, bound=bound))

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
            start, size, region, *label, _id = result.split()
            keep = "transient" in line.split()[2:]
            return Buffer(self, int(start, 16), int(size), region, label[0] if label else None,
                          handle=fd if keep else None)
        finally:
            if not keep:
                os.close(fd)

    def free(self, chunk: int | str) -> None:
        """Free a chunk by start address (int, or any form ``free`` takes) or label."""
        what = fmt_addr(chunk) if isinstance(chunk, int) else _word(chunk, "chunk")
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
                          kind=value("kind"), stats=parse_keyed(read_text(f"{d}/stats")))

    def bitmap(self, name: str) -> str:
        """A region's blocks in one string, '#' used and '.' free."""
        return read_text(self.path("regions", name, "bitmap")).replace("\n", "")

    def chunks(self, region: str | None = None) -> list[ChunkInfo]:
        """All live chunks (or those of one region), by start address.

        From the daemon's chunk table if it has one; otherwise from the
        per-chunk files, read by `LIST_WORKERS` threads: the region from the
        regions' ``chunks/`` links, the size and owner uid from ``data``'s
        stat, the label from the label links, and only ``dev``, ``type``,
        ``owner`` and ``created`` read as files.  A chunk freed meanwhile is
        left out.
        """
        table = self._chunk_table()
        if table is None:
            found = self._chunks_from_files(region)
        else:
            found = [c for c in table if region is None or c.region == region]
        return sorted(found, key=lambda c: c.start)

    def _chunk_table(self) -> list[ChunkInfo] | None:
        try:
            text = read_text(self.path(CHUNK_TABLE))
        except FileNotFoundError:
            return None
        return [_table_row(line) for line in text.splitlines() if line]  # "\n" when empty

    def _chunks_from_files(self, region: str | None) -> list[ChunkInfo]:
        labels: dict[str, str] = {}
        names: list[str] = []
        with os.scandir(self.path("chunks")) as it:
            for entry in it:
                if entry.is_symlink():
                    labels[os.readlink(entry.path)] = entry.name
                else:
                    names.append(entry.name)
        region_of = self._region_of_chunks()
        if region is not None:
            names = [n for n in names if region_of.get(n) == region]

        def one(name: str) -> ChunkInfo | None:
            d = self.path("chunks", name)
            try:
                data = os.stat(os.path.join(d, "data"))
                uid, pid = read_value(os.path.join(d, "owner")).split()
                return ChunkInfo(
                    start=int(name, 16), size=data.st_size,
                    region=region_of.get(name) or read_value(os.path.join(d, "region")),
                    dev=read_value(os.path.join(d, "dev")),
                    type=read_value(os.path.join(d, "type")), uid=int(uid), pid=int(pid),
                    label=labels.get(name), created=read_value(os.path.join(d, "created")))
            except FileNotFoundError:
                return None  # freed while we listed

        return [c for c in _parallel(one, names) if c is not None]

    def movable_chunks(self, region: str) -> list[tuple[int, int]] | None:
        """(start, size) of a region's movable chunks, or None if this daemon's
        chunks do not say whether they are movable."""
        table = self._chunk_table()
        if table is not None:
            return [(c.start, c.size) for c in table if c.region == region and c.movable]
        with os.scandir(self.path("regions", region, "chunks")) as it:
            names = [e.name for e in it]
        if not names:
            return []
        if not os.path.exists(self.path("chunks", names[0], "movable")):
            return None

        def one(name: str) -> tuple[int, int] | None:
            d = self.path("chunks", name)
            try:
                if read_value(os.path.join(d, "movable")) != "1":
                    return None
                return int(name, 16), os.stat(os.path.join(d, "data")).st_size
            except FileNotFoundError:
                return None

        return [c for c in _parallel(one, names) if c is not None]

    def _region_of_chunks(self) -> dict[str, str]:
        """chunk dir name -> region name, from the regions' chunks/ links."""
        out = {}
        for d in self.region_dirs():
            name = read_value(self.path("regions", d, "name"))
            with os.scandir(self.path("regions", d, "chunks")) as it:
                for entry in it:
                    out[entry.name] = name
        return out


def _parallel(fn, items: list) -> list:
    """``[fn(x) for x in items]``, by `LIST_WORKERS` threads when there are many:
    the waits for the daemon overlap (os.read releases the GIL)."""
    if len(items) < 2 * LIST_WORKERS:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(LIST_WORKERS) as pool:
        return list(pool.map(fn, items, chunksize=64))


def _table_row(line: str) -> ChunkInfo:
    start, size, region, dev, type, uid, pid, created, movable, label = line.split(" ")
    return ChunkInfo(int(start, 16), int(size), region, dev, type, int(uid), int(pid),
                     None if label == "-" else label, created, movable == "1")


__all__ = ["Buffer", "ChunkInfo", "Client", "CmaError", "NotMounted", "RegionInfo",
           "default_mountpoint", "parse_created", "request_line"]
