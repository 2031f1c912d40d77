"""The kernel's ``cma`` trace events (include/trace/events/cma.h), read through
``kernel/sys/kernel/tracing/trace_pipe`` (SPEC 3a).

Design, and its trade-offs:

- The core calls its trace hook (``Cma.tracer``) at each step of an
  allocation; the hook is this Tracer while some event is enabled and
  ``tracing_on`` is 1, else None, so a disabled event costs the core one
  attribute test and nothing is formatted.
- An enabled event appends one tuple of plain values to a bounded ring
  (``collections.deque(maxlen=...)``): O(1), never a wait, whoever reads or
  does not.  Lines are formatted by the reader, in the reader's request.
- Each open ``trace_pipe`` is a reader with its own position (a sequence
  number).  A reader that falls behind the ring has lost the oldest events
  and is told so with ftrace's own line, ``CPU:0 [LOST n EVENTS]``.  A new
  reader starts after what earlier readers have read (trace_pipe is a
  consuming read in the kernel: a second ``cat`` does not show the same
  events again), so "enable, run, then cat" shows what was buffered.
- A read with nothing to return waits for the next event (``cat`` follows
  the events), unless the file was opened O_NONBLOCK: EAGAIN, as tracefs
  (fusefs.Pipe, which also ends the wait of a reader being killed).
- Who asked: the tree sets ``pid`` before each call into the core (FUSE
  gives the caller's pid at open); the task name comes from /proc, cached.
"""

from __future__ import annotations

import errno
import time
from collections import deque
from typing import TYPE_CHECKING

import trio

from cmad.allocators import PAGE_SHIFT
from cmad.core import events

if TYPE_CHECKING:
    from cmad.core.chunks import Chunk
    from cmad.core.cma import Cma
    from cmad.core.regions import Region

#: The events in the order events/cma/ lists them, with the kernel's TP_printk.
EVENTS = {
    "cma_alloc_busy_retry": "name={} pfn=0x{:x} page={} count={} align={}",
    "cma_alloc_finish": "name={} pfn=0x{:x} page={} count={} align={} errorno={}",
    "cma_alloc_start": "name={} request_count={} available_count={} total_count={} align={}",
    "cma_release": "name={} pfn=0x{:x} page={} count={}",
}
RING_EVENTS = 4096          # ftrace's default per-CPU buffer holds a few thousand such lines
BATCH = 0.02                # seconds a woken reader waits for more events
MAX_READERS = 16            # each waiting reader holds one of pyfuse3's request tasks
NO_PFN = (1 << 64) - 1      # cma_alloc's pfn when nothing was found: -1 as unsigned long
NO_PAGE = "0" * 16
VMEMMAP = 0xffffea0000000000  # x86-64's struct page array: a page= token looks like one
COMM_CACHE = 1024


def page_token(chunk: "Chunk") -> str:
    """The ``page=`` token of a chunk (see _token)."""
    return _token(chunk.id)


def order(alignment: int) -> int:
    """cma_alloc's ``align``: the alignment as a page order."""
    return max((alignment >> PAGE_SHIFT).bit_length() - 1, 0)


def region_name(region: "Region") -> str:
    """A region's name in the kernel's views: its name, else its start address."""
    return region.name or f"{region.start:016x}"


class Tracer(events.Tracer):
    """The ring, the enable switches, and the hook the core calls."""

    def __init__(self, cma: "Cma", *, capacity: int = RING_EVENTS, clock=time.monotonic):
        self.cma = cma
        self.clock = clock
        self.enabled = dict.fromkeys(EVENTS, False)
        self.on = True                      # tracing_on
        self.ring: deque[tuple] = deque(maxlen=capacity)
        self.next_seq = 0                   # sequence number of the next event
        self.consumed = 0                   # where a new reader starts
        self.readers = 0
        self.pid = 0                        # who the core works for now (the tree sets it)
        self._wakeup: trio.Event | None = None
        self._comms: dict[int, str] = {}

    # -- switches ----------------------------------------------------------

    def enable(self, event: str | None, on: bool) -> None:
        """Switch one event (None: all of them) on or off."""
        for name in EVENTS if event is None else (event,):
            self.enabled[name] = on
        self._arm()

    def set_tracing_on(self, on: bool) -> None:
        self.on = on
        self._arm()

    def _arm(self) -> None:
        self.cma.tracer = self if self.on and any(self.enabled.values()) else None

    def system_state(self) -> str:
        """events/cma/enable: 1 all, 0 none, X some (as ftrace shows a system)."""
        states = set(self.enabled.values())
        return "X" if len(states) > 1 else str(int(states.pop()))

    # -- the hook the core calls --------------------------------------------

    # Each records plain values (no formatting: the reader formats, see FORMAT).

    def alloc_start(self, region: "Region", size: int, alignment: int) -> None:
        if self.enabled["cma_alloc_start"]:
            self._emit("cma_alloc_start", (region, size, region.free, alignment))

    def alloc_finish(self, region: "Region", chunk: "Chunk | None", size: int,
                     alignment: int, error: int) -> None:
        if self.enabled["cma_alloc_finish"]:
            self._emit("cma_alloc_finish", (region, None, None, size, alignment, error)
                       if chunk is None else
                       (region, chunk.start, chunk.id, size, alignment, error))

    def release(self, region: "Region", chunk: "Chunk", start: int, size: int) -> None:
        if self.enabled["cma_release"]:
            self._emit("cma_release", (region, start, chunk.id, size))

    def busy_retry(self, chunk: "Chunk", old_start: int) -> None:
        """A chunk moved out of a request's way (or by ``compact``): the range
        that was busy, at its old place."""
        if self.enabled["cma_alloc_busy_retry"]:
            self._emit("cma_alloc_busy_retry", (chunk.region, old_start, chunk.id, chunk.size,
                                                chunk.alignment))

    def _emit(self, event: str, values: tuple) -> None:
        """O(1), never a wait: one tuple into the ring, a waiting reader woken."""
        pid = self.pid
        self.ring.append((self.clock(), pid, self._comms.get(pid) or self.comm(pid), event,
                          values))
        self.next_seq += 1
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    def comm(self, pid: int) -> str:
        """The task name ftrace prints, from /proc (``<...>`` if the task is gone)."""
        comm = self._comms.get(pid)
        if comm is None and pid == 0:
            return "<idle>"             # ftrace's name for pid 0: no one asked
        if comm is None:
            try:
                with open(f"/proc/{pid}/comm", "rb") as f:
                    comm = f.read().decode(errors="replace").strip() or "<...>"
            except OSError:
                comm = "<...>"
            if len(self._comms) >= COMM_CACHE:
                self._comms.clear()
            self._comms[pid] = comm
        return comm

    # -- readers -------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """Sequence number of the oldest event still in the ring."""
        return self.next_seq - len(self.ring)

    def open_reader(self) -> "TraceReader":
        if self.readers >= MAX_READERS:
            raise OSError(errno.EBUSY, f"trace_pipe: {MAX_READERS} readers already")
        self.readers += 1
        return TraceReader(self)

    async def wait(self) -> None:
        """Until the next event (or a reader's release), then BATCH seconds more:
        a reader woken per event would cost each allocation a FUSE round trip
        of its own; this way one read carries the events of a few
        allocations.  The allocation path only sets an event once per batch."""
        if self._wakeup is None:
            self._wakeup = trio.Event()
        await self._wakeup.wait()
        await trio.sleep(BATCH)


def _token(id: int | None) -> str:
    """``page=`` is a struct page pointer in the kernel; here a stable per-chunk
    token in its form: the vmemmap address of a 64-byte entry indexed by the id."""
    return NO_PAGE if id is None else f"{VMEMMAP + (id << 6):016x}"


def _pfn(start: int | None) -> int:
    return NO_PFN if start is None else start >> PAGE_SHIFT


# The values each event recorded, as its TP_printk arguments.
FORMAT = {
    "cma_alloc_start": lambda region, size, free, align: (
        region_name(region), size >> PAGE_SHIFT, free >> PAGE_SHIFT,
        region.size >> PAGE_SHIFT, order(align)),
    "cma_alloc_finish": lambda region, start, id, size, align, error: (
        region_name(region), _pfn(start), _token(id), size >> PAGE_SHIFT, order(align), error),
    "cma_release": lambda region, start, id, size: (
        region_name(region), _pfn(start), _token(id), size >> PAGE_SHIFT),
    "cma_alloc_busy_retry": lambda region, start, id, size, align: (
        region_name(region), _pfn(start), _token(id), size >> PAGE_SHIFT, order(align)),
}


def format_line(record: tuple) -> str:
    """One event as trace_pipe prints it: ftrace's context, then TP_printk."""
    ts, pid, comm, event, values = record
    usec = int(ts * 1e6)
    return (f"{comm[:16]:>16}-{pid:<7} [000] ..... {usec // 1000000:5d}.{usec % 1000000:06d}: "
            f"{event}: {EVENTS[event].format(*FORMAT[event](*values))}\n")


class TraceReader:
    """One open trace_pipe (a fusefs.Pipe source): its position in the ring and
    the rest of a line cut by the read size."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self.pos = tracer.consumed
        self.pending = b""
        self.closed = False

    def take(self, size: int) -> bytes:
        """What is there now, at most ``size`` bytes, whole lines where they fit."""
        tracer = self.tracer
        out = bytearray(self.pending)
        first = tracer.first_seq
        if self.pos < first:
            out += f"CPU:0 [LOST {first - self.pos} EVENTS]\n".encode()
            self.pos = first
        ring = tracer.ring
        while len(out) < size and self.pos < tracer.next_seq:
            out += format_line(ring[self.pos - first]).encode()
            self.pos += 1
        tracer.consumed = max(tracer.consumed, self.pos)
        self.pending = bytes(out[size:])
        return bytes(out[:size])

    @property
    def ended(self) -> bool:
        return self.closed

    async def wait(self) -> None:
        await self.tracer.wait()

    def release(self) -> None:
        """The file was closed: a read still waiting (its process was killed) ends."""
        if not self.closed:
            self.closed = True
            self.tracer.readers -= 1
            self.tracer._wake()
