"""The allocator interface and registry, as in the patch's ``struct cma_allocator``.

An allocator manages the free space of one region.  The core guarantees:
sizes are multiples of PAGE_SIZE, alignments are powers of two >= PAGE_SIZE,
and calls for one region are serialised (the Cma lock).  Addresses are bus
addresses (absolute), so natural alignment means alignment of the address.

Subclasses implement ``alloc``, ``free``, ``reserve``, ``holes``,
``largest_free`` and ``_check``; ``free_bytes`` is kept here.  ``reserve_many``
has a generic loop here; an allocator may override it for bulk recovery.
"""

from __future__ import annotations

import errno
from typing import Callable, Iterator

from .errors import CmaError

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class Allocator:
    """Base class.  ``name`` is the registry name; ``params`` the accepted keywords."""

    name: str = "-"
    params: tuple[str, ...] = ()

    def __init__(self, start: int, size: int, **params: int):
        """init(region): manage [start, start + size), all of it free."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise CmaError(errno.EINVAL, f"{self.name}: unknown parameter {sorted(unknown)[0]!r}")
        self.start = start
        self.size = size
        self.free_bytes = size

    @classmethod
    def granule(cls, **params: int) -> int:
        """The smallest unit the allocator hands out; regions are placed aligned to it."""
        return PAGE_SIZE

    def footprint(self, size: int, alignment: int) -> tuple[int, int]:
        """The free window (size, alignment) a request needs: compaction opens one."""
        return size, alignment

    def alloc(self, size: int, alignment: int) -> tuple[int, int] | None:
        """Return (start, size) of a new chunk, or None if no hole fits.

        The returned size may exceed the request where the allocator's
        granule says so (bitmap blocks); it is what ``free`` will be given.
        """
        raise NotImplementedError

    def free(self, start: int, size: int) -> None:
        """Give back a range earlier returned by alloc or reserve."""
        raise NotImplementedError

    def reserve(self, start: int, size: int) -> bool:
        """Claim exactly [start, start + size) if all of it is free (recovery, moves).

        Returns False and changes nothing if any part is in use or the range
        does not suit the allocator's granule.
        """
        raise NotImplementedError

    def reserve_many(self, ranges: list[tuple[int, int]]) -> list[bool]:
        """``reserve`` each (start, size) of ``ranges``, sorted by start (recovery).

        Exactly what a loop of ``reserve`` calls would do, in one call: an
        allocator can override it to rebuild its index once (``bf`` does).
        Returns one success flag per range.
        """
        return [self.reserve(start, size) for start, size in ranges]

    def holes(self) -> Iterator[tuple[int, int]]:
        """Free ranges (start, size) in address order, adjacent ones merged."""
        raise NotImplementedError

    def largest_free(self) -> int:
        """The largest request that would succeed now with page alignment."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """cleanup(region): called when the region has no chunks left."""

    def _check(self) -> None:
        """Assert every invariant of the structure (tests call it after each step)."""
        raise NotImplementedError


Factory = Callable[..., Allocator]

# The built-in allocators in registration order: the first is the default.
BUILTIN = ("bf", "buddy", "bitmap")
_registry: dict[str, type[Allocator]] = {}


def register(cls: type[Allocator]) -> type[Allocator]:
    _registry[cls.name] = cls
    return cls


def registry() -> dict[str, type[Allocator]]:
    """Registered allocators, built-ins first in their fixed order (import order varies)."""
    import importlib

    for name in BUILTIN:  # each module registers its class
        importlib.import_module(f".{name}", __package__)

    ordered = {name: _registry[name] for name in BUILTIN}
    ordered.update(_registry)
    return ordered
