"""What the core tells others after it changed something, and how a refusal is undone.

A ``Listener`` has every hook, each a no-op by default: a listener overrides
the ones it cares about and the core calls every hook on every listener, no
lookup by name.  Listeners are told in tiers: ``DURABLE`` ones first (the
journal: what a restart brings back), then ``VIEW`` ones (the tree, meters),
each tier in the order it was added.  So the journal has recorded a chunk
before any view shows it, whoever was added first.

``on_alloc``, ``on_free``, ``on_move`` and ``on_allocator`` may veto the
change by raising.  ``Listeners`` is the one place that undoes: the core's
own change is undone (the ``undo`` it passes, or the caller's ``except`` for
an allocation), the listeners already told hear the opposite event, newest
first, and the error goes on to the caller.  ``catch_up`` never vetoes: it
lets a listener retry what it could not record (the journal's deferred
frees); the daemon's heartbeat calls it.

A ``Tracer`` is told of each step of an allocation, as the kernel's ``cma``
trace events; the core holds at most one, and None while no event is on.

This module imports nothing of cmad: anyone may subclass its classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from cmad.core.chunks import Chunk
    from cmad.core.regions import Region

DURABLE, VIEW = 0, 1  # the tiers, told in this order

HOOKS = ("on_alloc", "on_free", "on_move", "on_allocator", "catch_up")


class Listener:
    """Told of every change after the core made it; every hook a no-op here."""

    tier = VIEW

    def on_alloc(self, chunk: Chunk) -> None:
        """A chunk was allocated; raising vetoes it (told ones hear ``on_free``)."""

    def on_free(self, chunk: Chunk) -> None:
        """A chunk is being freed; raising keeps it (told ones hear ``on_alloc``)."""

    def on_move(self, chunk: Chunk, old_start: int) -> None:
        """The chunk's start, movability or (``release_head``) size changed;
        old_start is where it was.  Raising undoes the change (told ones hear
        it move back)."""

    def on_allocator(self, region: Region) -> None:
        """The region's ``alloc`` attribute changed; raising undoes it."""

    def catch_up(self) -> None:
        """Retry what could not be recorded (never vetoes)."""


class _Adopted(Listener):
    """An object with only some of the hooks (a test's or a bench's stand-in):
    its hooks, the defaults for the rest, looked up once when it is added."""

    def __init__(self, obj: object):
        self.obj = obj
        self.tier = getattr(obj, "tier", VIEW)
        for name in HOOKS:
            hook = getattr(obj, name, None)
            if hook is not None:
                setattr(self, name, hook)


def adopt(listener: object) -> Listener:
    return listener if isinstance(listener, Listener) else _Adopted(listener)


def _tier(listener: Listener) -> int:
    return listener.tier


class Listeners(list):
    """The core's listeners, kept in tier order (durable first, stable within a
    tier), with the fan-out of each event and its undo."""

    def __init__(self, listeners: Iterable[object] = ()):
        super().__init__(adopt(x) for x in listeners)
        self.sort(key=_tier)

    def append(self, listener: object) -> None:
        super().append(adopt(listener))
        self.sort(key=_tier)

    def insert(self, index: int, listener: object) -> None:
        super().insert(index, adopt(listener))
        self.sort(key=_tier)

    def extend(self, listeners: Iterable[object]) -> None:
        super().extend(adopt(x) for x in listeners)
        self.sort(key=_tier)

    def __iadd__(self, listeners: Iterable[object]) -> Listeners:
        self.extend(listeners)
        return self

    def __setitem__(self, index, value) -> None:
        super().__setitem__(index, [adopt(x) for x in value] if isinstance(index, slice)
                            else adopt(value))
        self.sort(key=_tier)

    # -- the fan-out ---------------------------------------------------------

    def alloc(self, chunk: Chunk) -> None:
        """on_alloc to each; on a veto the told ones hear on_free and it raises
        (the caller forgets the chunk)."""
        told = 0
        try:
            for listener in self:
                listener.on_alloc(chunk)
                told += 1
        except BaseException:
            for listener in reversed(self[:told]):
                listener.on_free(chunk)
            raise

    def free(self, chunk: Chunk) -> None:
        """on_free to each; on a veto the told ones hear on_alloc and it raises
        (the chunk stays)."""
        told = 0
        try:
            for listener in self:
                listener.on_free(chunk)
                told += 1
        except BaseException:
            for listener in reversed(self[:told]):
                listener.on_alloc(chunk)
            raise

    def move(self, chunk: Chunk, old_start: int, undo: Callable[[], None]) -> None:
        """on_move to each; on a veto ``undo`` puts the chunk back, the told ones
        hear it move back, and it raises."""
        told = 0
        try:
            for listener in self:
                listener.on_move(chunk, old_start)
                told += 1
        except BaseException:
            moved_to = chunk.start
            undo()
            for listener in reversed(self[:told]):
                listener.on_move(chunk, moved_to)
            raise

    def allocator(self, region: Region, undo: Callable[[], None]) -> None:
        """on_allocator to each; on a veto ``undo`` restores the old allocator,
        the told ones hear of it, and it raises."""
        told = 0
        try:
            for listener in self:
                listener.on_allocator(region)
                told += 1
        except BaseException:
            undo()
            for listener in reversed(self[:told]):
                listener.on_allocator(region)
            raise

    def catch_up(self) -> None:
        for listener in self:
            listener.catch_up()


class Tracer:
    """Told of each step of an allocation (the kernel's ``cma`` trace events);
    every hook a no-op here."""

    def alloc_start(self, region: Region, size: int, alignment: int) -> None:
        """A region is tried for a request."""

    def alloc_finish(self, region: Region, chunk: Chunk | None, size: int, alignment: int,
                     error: int) -> None:
        """The region served the request (chunk) or could not (-errno)."""

    def release(self, region: Region, chunk: Chunk, start: int, size: int) -> None:
        """[start, start + size) of the chunk went back to the region."""

    def busy_retry(self, chunk: Chunk, old_start: int) -> None:
        """A chunk moved out of a request's way."""
