"""debugfs ``alloc`` and ``free``: mm/cma_debug.c's test hook, per region.

``echo N > alloc`` takes N pages from the region and keeps them on the
region's list; ``echo N > free`` gives N pages of that list back: from the
most recent entry on, whole entries while N covers them, then the head of
the next one (which stays, smaller: ``Cma.release_head``), and a count past
the list frees what there is.  Where the allocator's granule is more than a
page (the kernel's order_per_bit != 0) a part of an entry is not released:
the walk stops there, as the kernel's does.

The list's entries are chunks with dev ``cma_debug`` (they show in
``chunks/`` like any other), so it is rebuilt from the chunks after a
restart, newest id first; a chunk of the list freed some other way leaves
it (``forget``).
"""

from __future__ import annotations

import errno
import logging
import re

from cmad.allocators import PAGE_SHIFT, PAGE_SIZE
from cmad.core.chunks import Chunk
from cmad.core.cma import Cma
from cmad.errors import CmaError, clip, einval
from cmad.core.regions import Region

log = logging.getLogger(__name__)

DEV = "cma_debug"
# kstrtoull(buf, 0, ...): an optional '+', then 0x hex, leading-0 octal or
# decimal; nothing else (no blank either side: the trailing newline a write
# ends with is gone already).
_NUMBER = re.compile(r"\+?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def kstrtoull(text: str, what: str) -> int:
    """The kernel's number parsing for a write (the trailing newline is gone already)."""
    m = _NUMBER.fullmatch(text)
    if m is None:
        raise einval(f"{what}: {clip(text)} is not a number")
    digits = m[1]
    return int(digits, 16) if digits[1:2] in ("x", "X") else int(digits, 8) \
        if digits[:1] == "0" else int(digits)


class DebugHook:
    """One region's ``cma_mem`` list: chunk id -> chunk, oldest first."""

    def __init__(self, cma: Cma, region: Region):
        self.cma = cma
        self.region = region
        self.entries: dict[int, Chunk] = {
            c.id: c for c in sorted((c for c in cma.chunks_of(region) if c.dev == DEV),
                                    key=lambda c: c.id)}

    def _pages(self, text: str, uid: int, what: str) -> int:
        """The page count of a write; EPERM unless root, EINVAL unless 1..region pages."""
        what = f"debug/cma/{self.region.name}/{what}"
        if uid != 0:
            raise CmaError(errno.EPERM, f"{what}: root only")
        pages = kstrtoull(text, what)
        total = self.region.size >> PAGE_SHIFT
        if not 0 < pages <= total:
            raise einval(f"{what}: {pages} pages; the region has {total}")
        return pages

    def alloc(self, text: str, uid: int, pid: int) -> None:
        """cma_alloc_mem: one entry of N pages, page aligned (align 0)."""
        pages = self._pages(text, uid, "alloc")
        chunk = self.cma.alloc_from([self.region.name], pages << PAGE_SHIFT, dev=DEV,
                                    uid=uid, pid=pid)
        self.entries[chunk.id] = chunk

    def free(self, text: str, uid: int) -> None:
        """cma_free_mem: N pages from the newest entry on."""
        pages = self._pages(text, uid, "free")
        granule = type(self.region.allocator).granule(**self.region.wanted.params) \
            if self.region.allocator is not None else PAGE_SIZE
        while pages and self.entries:
            chunk = self.entries[next(reversed(self.entries))]
            held = chunk.size >> PAGE_SHIFT
            if held <= pages:
                self.cma.free(f"id={chunk.id}")     # forget() drops the entry
                pages -= held
            elif granule == PAGE_SIZE and chunk.alignment == PAGE_SIZE:
                self.cma.release_head(chunk, pages << PAGE_SHIFT)
                pages = 0
            else:
                log.info("debug/cma/%s/free: cannot release part of chunk %s, its blocks are "
                         "%d pages (order_per_bit != 0)", self.region.name, chunk.name,
                         granule >> PAGE_SHIFT)
                break

    def forget(self, chunk: Chunk) -> None:
        """The chunk was freed (here or elsewhere): it leaves the list."""
        self.entries.pop(chunk.id, None)
