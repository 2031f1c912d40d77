"""Regular files: attributes, tables, streams and byte files.

- An `Attr` is a sysfs attribute: show() and store() callbacks.
- A `Table` is a read-only file of rows rendered per open handle as it is
  read (a cursor by the rows' sort key), so a read costs what it returns
  and a big table never stalls the loop.
- A `Stream` is a transaction file: one object per open file.
- `Bytes` is a byte file over a memoryview, like a block device.
"""

from __future__ import annotations

import errno
from typing import Any, Callable, Iterable, Optional

from .nodes import ATTR_SIZE, MAX_STORE, Caller, File, _Handle, _maybe_await

__all__ = ["Attr", "Bytes", "Stream", "Table"]


class Attr(File):
    """A sysfs attribute.

    ``show() -> str``: called at the first read of each open handle (and
    again when that handle reads from offset 0, as sysfs re-shows after a
    seek to 0); a newline is appended if missing.
    ``store(text, caller)``: called once per write() with the whole buffer
    decoded as UTF-8, one trailing newline stripped; a write of more than
    4096 bytes, a NUL byte or bad UTF-8 is refused with EINVAL.
    Either callback may be a coroutine function.
    """

    __slots__ = ("show", "store")

    def __init__(self, show: Optional[Callable[[], str]] = None,
                 store: Optional[Callable[[str, Caller], None]] = None,
                 mode: Optional[int] = None, uid: int = 0, gid: int = 0):
        if show is None and store is None:
            raise ValueError("an attribute needs show, store or both")
        if mode is None:
            mode = 0o644 if (show and store) else 0o444 if show else 0o200
        super().__init__(mode, uid, gid)
        self.show = show
        self.store = store

    def size(self) -> int:
        return ATTR_SIZE

    def readable(self) -> bool:
        return self.show is not None

    def writable(self) -> bool:
        return self.store is not None

    async def _open(self, caller: Caller, flags: int) -> "_AttrHandle":
        return _AttrHandle(self, caller)

    async def render(self) -> bytes:
        """show()'s output as the bytes a read returns (newline-terminated)."""
        text = await _maybe_await(self.show())
        if not isinstance(text, str):
            raise TypeError(f"show() of {self.path()} returned {type(text).__name__}, not str")
        if not text.endswith("\n"):
            text += "\n"
        return text.encode()

    async def parse_and_store(self, data: bytes, caller: Caller) -> None:
        if len(data) > MAX_STORE:
            raise OSError(errno.EINVAL, f"write of {len(data)} bytes, more than {MAX_STORE}")
        if b"\0" in data:
            raise OSError(errno.EINVAL, "NUL byte in write")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise OSError(errno.EINVAL, f"not UTF-8: {e.reason} at byte {e.start}") from None
        if text.endswith("\n"):
            text = text[:-1]
        await _maybe_await(self.store(text, caller))


class _AttrHandle(_Handle):
    __slots__ = ("snapshot",)

    def __init__(self, node: Attr, caller: Caller):
        super().__init__(node, caller)
        self.snapshot: Optional[bytes] = None

    async def read(self, off: int, size: int) -> bytes:
        if self.snapshot is None or off == 0:
            self.snapshot = await self.node.render()
        return self.snapshot[off:off + size]

    async def write(self, off: int, data: bytes) -> int:
        await self.node.parse_and_store(data, self.caller)
        return len(data)


class Table(File):
    """A read-only table: ``rows(after)`` yields (key, line) in ascending
    key order, keys above *after* (all when None), each line ending in a
    newline; it must not await, so each read sees one state of the rows.

    Each open handle keeps a cursor (the key of the last row rendered) and
    the rest of a row cut by the read size: a read renders only the rows it
    returns (plus one), a read at offset 0 starts again from the first row.
    A row changed while a reader is past it is not shown to that reader; a
    row whose key moves past the cursor may be shown twice (a table read in
    pieces is not a snapshot). st_size is 4096, like an attribute.
    """

    __slots__ = ("rows",)

    def __init__(self, rows: Callable[[Optional[Any]], Iterable[tuple[Any, str]]],
                 mode: int = 0o444, uid: int = 0, gid: int = 0):
        super().__init__(mode, uid, gid)
        self.rows = rows

    def size(self) -> int:
        return ATTR_SIZE

    def readable(self) -> bool:
        return True

    async def _open(self, caller: Caller, flags: int) -> "_TableHandle":
        return _TableHandle(self, caller)


class _TableHandle(_Handle):
    __slots__ = ("cursor", "pending", "pos", "done")

    def __init__(self, node: Table, caller: Caller):
        super().__init__(node, caller)
        self._restart()

    def _restart(self) -> None:
        self.cursor: Any = None
        self.pending = bytearray()
        self.pos = 0
        self.done = False

    async def read(self, off: int, size: int) -> bytes:
        if off == 0:
            self._restart()
        elif off != self.pos:
            raise OSError(errno.EINVAL, f"table read at {off}: reads go on from {self.pos} "
                                        "or start again at 0")
        self._render(size)
        out = bytes(self.pending[:size])
        del self.pending[:size]
        self.pos += len(out)
        return out

    def _render(self, size: int) -> None:
        """Rows after the cursor until *size* bytes are pending (or none are left)."""
        pending = self.pending
        if self.done or len(pending) >= size:
            return
        for key, line in self.node.rows(self.cursor):
            pending += line.encode()
            self.cursor = key
            if len(pending) >= size:
                return
        self.done = True


class Stream(File):
    """A transaction file: ``open(caller) -> handle``, whose ``write(data)``,
    ``read(size) -> bytes`` (b"" when nothing is pending) and ``release()``
    serve that open file. Served with direct_io, so a read right after a
    write on the same descriptor sees the answer without a seek. The
    handle's methods may be coroutine functions.
    """

    __slots__ = ("open",)

    def __init__(self, open: Callable[[Caller], Any], mode: int = 0o660,
                 uid: int = 0, gid: int = 0):
        super().__init__(mode, uid, gid)
        self.open = open

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    async def _open(self, caller: Caller, flags: int) -> "_StreamHandle":
        inner = await _maybe_await(self.open(caller))
        return _StreamHandle(self, caller, inner)


class _StreamHandle(_Handle):
    __slots__ = ("inner",)

    def __init__(self, node: Stream, caller: Caller, inner: Any):
        super().__init__(node, caller)
        self.inner = inner

    async def read(self, off: int, size: int) -> bytes:
        out = await _maybe_await(self.inner.read(size))
        # pyfuse3 would die on a non-buffer, and the kernel refuses a reply
        # longer than the request: check here, inside the error boundary.
        if not isinstance(out, (bytes, bytearray, memoryview)):
            raise TypeError(f"stream read() returned {type(out).__name__}, not bytes")
        if len(out) > size:
            raise ValueError(f"stream read() returned {len(out)} bytes for a read of {size}")
        return out

    async def write(self, off: int, data: bytes) -> int:
        await _maybe_await(self.inner.write(data))
        return len(data)

    async def release(self) -> None:
        await _maybe_await(self.inner.release())


class Bytes(File):
    """A byte file over ``buffer()``, a writable memoryview (e.g. a slice of
    an mmap), fetched at each request. st_size is its length. Like a block
    device: reads at or past the end return b"", a write past the end fails
    with ENOSPC, a write straddling the end is cut short. direct_io, so it
    stays coherent with other mappings of the same memory.
    """

    __slots__ = ("buffer",)

    def __init__(self, buffer: Callable[[], memoryview], mode: int = 0o600,
                 uid: int = 0, gid: int = 0):
        super().__init__(mode, uid, gid)
        self.buffer = buffer

    def size(self) -> int:
        return len(self.buffer())

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    async def _open(self, caller: Caller, flags: int) -> "_BytesHandle":
        return _BytesHandle(self, caller)

    def read_at(self, off: int, size: int):
        view = self.buffer()
        end = min(len(view), off + size)
        if off >= end:
            return b""
        # A memoryview slice: pyfuse3 replies straight from the buffer
        # protocol, so the bytes are copied once, by the kernel.
        return view[off:end]

    def write_at(self, off: int, data: bytes) -> int:
        view = self.buffer()
        n = len(view)
        if off >= n:
            raise OSError(errno.ENOSPC, f"write at {off}, at or past the end ({n})")
        end = min(n, off + len(data))
        if end - off == len(data):
            view[off:end] = data
        else:
            view[off:end] = memoryview(data)[:end - off]
        return end - off


class _BytesHandle(_Handle):
    __slots__ = ()

    async def read(self, off: int, size: int):
        return self.node.read_at(off, size)

    async def write(self, off: int, data: bytes) -> int:
        return self.node.write_at(off, data)
