"""A read-only file whose reads may wait, like a pipe or tracefs's trace_pipe.

``Pipe(open)``: each open calls ``open(caller, nonblock) -> reader`` (nonblock:
the file was opened O_NONBLOCK); the reader's ``read(size)`` returns at most
*size* bytes and may await until it has some (b"" is the end of the file),
and its ``release()`` is called at close.  Either may be a coroutine
function.  A waiting read holds one of pyfuse3's request tasks, so whoever
builds the tree bounds the readers.  Served with direct_io; st_size 0, as a
pipe's.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .nodes import Caller, File, _Handle, _maybe_await

__all__ = ["Pipe"]


class Pipe(File):
    __slots__ = ("open",)

    def __init__(self, open: Callable[[Caller, bool], Any], mode: int = 0o440,
                 uid: int = 0, gid: int = 0):
        super().__init__(mode, uid, gid)
        self.open = open

    def readable(self) -> bool:
        return True

    async def _open(self, caller: Caller, flags: int) -> "_PipeHandle":
        inner = await _maybe_await(self.open(caller, bool(flags & os.O_NONBLOCK)))
        return _PipeHandle(self, caller, inner)


class _PipeHandle(_Handle):
    __slots__ = ("inner",)

    def __init__(self, node: Pipe, caller: Caller, inner: Any):
        super().__init__(node, caller)
        self.inner = inner

    async def read(self, off: int, size: int) -> bytes:
        out = await _maybe_await(self.inner.read(size))
        if not isinstance(out, (bytes, bytearray, memoryview)):
            raise TypeError(f"pipe read() returned {type(out).__name__}, not bytes")
        if len(out) > size:
            raise ValueError(f"pipe read() returned {len(out)} bytes for a read of {size}")
        return out

    async def release(self) -> None:
        await _maybe_await(self.inner.release())
