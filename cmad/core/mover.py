"""The mover: a live chunk's place or mobility changes, bytes, index and listeners together.

Compaction decides what moves where; the mover does the move (``move``).
Giving back a chunk's head (``release_head``) and pinning it (``pin``) are
changes of the same sort: the listeners hear each as ``on_move`` and may
veto it, and the mover undoes it then.  The mover knows the chunk index,
the listeners, the arena behind the bytes (None: bookkeeping only), the
bytes each uid holds and how to reach the trace hook; it knows nothing of
the facade.
"""

from __future__ import annotations

import errno
import functools
import logging
from typing import TYPE_CHECKING, Callable

from cmad.allocators import PAGE_SHIFT
from cmad.core import faults
from cmad.errors import CmaError, einval
from cmad.memparse import fmt_addr, human

if TYPE_CHECKING:
    from cmad.core.chunks import Chunk, ChunkIndex
    from cmad.core.events import Listeners, Tracer
    from cmad.memory.arena import Arena

log = logging.getLogger(__name__)


class Mover:
    """Moves chunks within their region (``move``), as compaction asks."""

    def __init__(self, index: ChunkIndex, listeners: Listeners, base: int,
                 tracer: Callable[[], Tracer | None], held: dict[int, int]):
        self.index = index
        self.listeners = listeners
        self.base = base
        self.tracer = tracer
        self.held = held  # uid -> bytes its chunks hold
        self.arena: Arena | None = None

    def move(self, chunk: Chunk, new: int) -> None:
        """Move a chunk to ``new``, already claimed from its region's allocator.

        Copy, then commit (journal first), then let go of the old range.  A crash
        before the commit finds the chunk at its old place with its old bytes.
        On any error the move is undone and ``new`` given back.
        """
        region, old, size = chunk.region, chunk.start, chunk.size
        assert new + size <= old or old + size <= new, "a move never overlaps itself"
        arena = self.arena
        try:
            if arena is not None:
                if region.kind == "sticky":
                    arena.populate(new - self.base, size)
                arena.view(new - self.base, size)[:] = arena.view(old - self.base, size)
            faults.point("move-copied")
            self.index.move(chunk, new)
            self.listeners.move(chunk, old, functools.partial(self.index.move, chunk, old))
        except BaseException:
            region.allocator.free_for(new, size, chunk.movable)
            raise
        region.allocator.free_for(old, size, chunk.movable)
        if region.kind == "sticky" and arena is not None:
            arena.release(old - self.base, size)
        region.moved += 1
        region.moved_bytes += size
        tracer = self.tracer()
        if tracer is not None:
            tracer.busy_retry(chunk, old)
        log.info("moved chunk %s -> %s (%s)", fmt_addr(old), fmt_addr(new), human(size))

    def release_head(self, chunk: Chunk, size: int) -> None:
        """Give back the first ``size`` bytes of ``chunk`` (see ``Cma.release_head``)."""
        region = chunk.region
        allocator = region.allocator
        step = max(type(allocator).granule(**region.wanted.params), chunk.alignment)
        if not 0 < size < chunk.size or size % step:
            raise einval(f"release of {size:#x} bytes from the head of chunk {chunk.name} "
                         f"({chunk.size:#x}): must be below its size and a multiple of "
                         f"{step:#x}")
        old, whole, movable = chunk.start, chunk.size, chunk.movable
        allocator.free_for(old, whole, movable)
        if not allocator.reserve_for(old + size, whole - size, movable):
            taken = allocator.reserve_for(old, whole, movable)
            assert taken, "a range just freed can be reserved again"
            raise CmaError(errno.EBUSY, f"chunk {chunk.name}: its tail cannot be kept alone")
        self.index.move(chunk, old + size)
        chunk.size = whole - size

        def undo() -> None:
            self.index.move(chunk, old)
            chunk.size = whole
            allocator.free_for(old + size, whole - size, movable)
            allocator.reserve_for(old, whole, movable)

        self.listeners.move(chunk, old, undo)
        if region.kind == "sticky" and self.arena is not None:
            self.arena.release(old - self.base, size)
        region.used -= size
        self.held[chunk.uid] -= size
        region.release_pages += size >> PAGE_SHIFT
        tracer = self.tracer()
        if tracer is not None:
            tracer.release(region, chunk, old, size)
        log.info("chunk %s: released its first %s; it is now %s at %s", fmt_addr(old),
                 human(size), human(chunk.size), chunk.name)

    def pin(self, chunk: Chunk) -> None:
        """Make a movable chunk pinned for good; a veto leaves it movable."""
        if not chunk.movable:
            return
        _set_movable(chunk, False)
        self.listeners.move(chunk, chunk.start, functools.partial(_set_movable, chunk, True))
        log.info("chunk %s pinned: a zero-copy mapping of it was handed out", chunk.name)


def _set_movable(chunk: Chunk, movable: bool) -> None:
    chunk.movable = movable
    chunk.region.movable_users += 1 if movable else -1
    chunk.region.allocator.retype(chunk.start, chunk.size, movable=movable)
