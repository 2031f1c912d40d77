"""The mover: a chunk to a new place, bytes, index and listeners together.

Compaction decides what moves where; the mover does the move.  It knows the
chunk index, the listeners, the arena behind the bytes (None: bookkeeping
only) and how to reach the trace hook; it knows nothing of the facade.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Callable

from cmad.core import faults
from cmad.memparse import fmt_addr, human

if TYPE_CHECKING:
    from cmad.core.chunks import Chunk, ChunkIndex
    from cmad.core.events import Listeners, Tracer
    from cmad.memory.arena import Arena

log = logging.getLogger("cmad.core.cma")  # the log lines moves always had


class Mover:
    """Moves chunks within their region (``move``), as compaction asks."""

    def __init__(self, index: ChunkIndex, listeners: Listeners, base: int,
                 tracer: Callable[[], Tracer | None]):
        self.index = index
        self.listeners = listeners
        self.base = base
        self.tracer = tracer
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
