"""A read-only file whose reads may wait, like a pipe or tracefs's trace_pipe.

``Pipe(open)``: each open calls ``open(caller) -> source``; the source's
``take(size)`` returns what is there now (at most *size* bytes, b"" for
nothing yet), ``wait()`` (async) returns when there may be more, ``ended``
says the source has nothing more to give (a read then returns b"", the end
of the file) and ``release()`` is called at close.

A read with nothing to return waits, unless the file was opened O_NONBLOCK
(EAGAIN).  A FUSE read, once the daemon has it, is waited out by the
kernel even for a reader killed with SIGKILL (fs/fuse/dev.c,
request_wait_answer), and pyfuse3 does not pass FUSE_INTERRUPT on; and a
graceful stop waits for every request in flight.  So a waiting read wakes
every WAIT_SLICE seconds and answers EINTR when its reader is dying (a
fatal signal pending, or gone) or the daemon is stopping (`end_waits`): a
killed ``cat`` ends, and SIGTERM unmounts, within a slice.  A waiting read
holds one of pyfuse3's request tasks: whoever builds the tree bounds the
readers.  Served with direct_io; st_size 0, as a pipe's.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Callable

import trio

from .nodes import Caller, File, _Handle, _maybe_await

__all__ = ["Pipe", "end_waits"]

WAIT_SLICE = 0.25
SIGKILL_BIT = 1 << (9 - 1)
_stopping = False


def end_waits() -> None:
    """The daemon is stopping: waiting reads answer EINTR at their next slice."""
    global _stopping
    _stopping = True


def dying(pid: int) -> bool:
    """Whether *pid* is gone or has a fatal signal pending (the kernel queues
    SIGKILL to every thread of a process a fatal signal is ending)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & SIGKILL_BIT:
            return True
    return False


class Pipe(File):
    __slots__ = ("open",)

    def __init__(self, open: Callable[[Caller], Any], mode: int = 0o440,
                 uid: int = 0, gid: int = 0):
        super().__init__(mode, uid, gid)
        self.open = open

    def readable(self) -> bool:
        return True

    async def _open(self, caller: Caller, flags: int) -> "_PipeHandle":
        source = await _maybe_await(self.open(caller))
        return _PipeHandle(self, caller, source, bool(flags & os.O_NONBLOCK))


class _PipeHandle(_Handle):
    __slots__ = ("source", "nonblock")

    def __init__(self, node: Pipe, caller: Caller, source: Any, nonblock: bool):
        super().__init__(node, caller)
        self.source = source
        self.nonblock = nonblock

    async def read(self, off: int, size: int) -> bytes:
        source = self.source
        while True:
            out = source.take(size)
            if out or source.ended:
                return out
            if self.nonblock:
                raise OSError(errno.EAGAIN, "nothing to read yet (O_NONBLOCK)")
            if _stopping or dying(self.caller.pid):
                e = OSError(errno.EINTR, "the reader is dying or the daemon stopping")
                e.logged = True         # no one is left to read the answer: no log line
                raise e
            with trio.move_on_after(WAIT_SLICE):
                await source.wait()

    async def release(self) -> None:
        await _maybe_await(self.source.release())
