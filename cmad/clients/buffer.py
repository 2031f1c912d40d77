"""A `Buffer`: one allocated chunk, reached by its id, and its zero-copy
mapping (``mmap`` attribute, mapped on first use; see `cmad.clients.client`
for the design).

Part of the client (`cmad.clients.client` re-exports `Buffer`); it reaches
the daemon only through its files and `Client.free`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import TYPE_CHECKING

from cmad.clients.tables import read_text, read_value
from cmad.errors import CmaError
from cmad.memparse import fmt_addr

if TYPE_CHECKING:
    from cmad.clients.client import Client


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
