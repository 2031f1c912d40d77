"""Chunks: one allocation each, indexed by start address and by label."""

from __future__ import annotations

import errno
import re
import time
from bisect import bisect_left, bisect_right, insort
from itertools import islice
from typing import Iterable, Iterator

from sortedcontainers import SortedList

from cmad.errors import CmaError, clip, einval
from cmad.memparse import fmt_addr
from cmad.core.regions import Region

# A chunk as the journal records it and ``Cma.restore_many`` takes it back: a
# plain tuple in this order (no dict per row: recovery handles millions).
RECORD = ("id", "start", "size", "region", "dev", "type", "uid", "pid", "label", "created",
          "movable", "transient", "bound", "alignment")

LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
ADDR_FORM = re.compile(r"[0-9a-fA-F]{16}")
IDLE = 4096  # adds and removes without an ordered query before the start order is dropped
BATCH = 256  # starts in_range takes from the order at a time


def check_label(label: str) -> str:
    """Labels are file names in chunks/ and never read as a start address."""
    if not LABEL.fullmatch(label) or ADDR_FORM.fullmatch(label):
        raise einval(f"label {clip(label)}: must match [A-Za-z][A-Za-z0-9_.-]{{0,63}} and not be "
                     "16 hex digits")
    return label


class Chunk:
    """One allocation.  ``id`` is its identity: it survives a move, ``start`` does not."""

    __slots__ = ("id", "start", "size", "region", "dev", "type", "uid", "pid", "label",
                 "created", "movable", "transient", "bound", "alignment", "__weakref__")

    def __init__(self, id: int, start: int, size: int, region: Region, dev: str, type: str,
                 uid: int = 0, pid: int = 0, label: str | None = None,
                 created: float | None = None, movable: bool = False,
                 transient: bool = False, bound: int | None = None, alignment: int = 4096):
        """Arguments in RECORD order (region an object), so recovery passes them
        positionally: keyword passing costs measurably per million chunks."""
        self.id = id
        self.start = start
        self.size = size
        self.region = region
        self.dev = dev
        self.type = type
        self.uid = uid
        self.pid = pid
        self.label = label
        self.created = time.time() if created is None else created
        self.movable = movable
        self.transient = transient
        self.bound = bound
        self.alignment = alignment  # what a move must keep

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def name(self) -> str:
        """The directory name in chunks/."""
        return fmt_addr(self.start)

    def created_iso(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))

    def __repr__(self) -> str:
        return f"<Chunk {self.name}+{self.size:#x} {self.region.name} {self.label or ''}>"


class ChunkIndex:
    """All live chunks, by start (sorted: log-time "who holds X") and by label.

    By start: a dict for ``get`` (free, the files), and the starts in order
    (a SortedList) for the ordered queries (``holding``, ``last_before``,
    ``in_range``, iteration: listings, compaction, checks).  The order costs
    two tree updates per alloc+free pair that never ask for it, so it is
    built on demand and kept up to date by adds and removes until
    ``max(IDLE, 4 n)`` of them came without an ordered query (as bf's start
    index): a rebuild, O(n log n), is paid for by at least 4n updates that
    did not need it.
    """

    def __init__(self) -> None:
        self._by_start: dict[int, Chunk] = {}
        # get(start): the chunk that starts there, or None.  The dict's own get,
        # bound once: free asks it on every request.
        self.get = self._by_start.get
        self._starts: SortedList | None = None  # sorted keys of _by_start, while asked for
        self._idle = 0
        self._by_label: dict[str, Chunk] = {}
        # By id: a dict for lookups, and for listings in id order a list of
        # ids, ascending, with tombstones (ids no longer in the dict).  New
        # ids only grow, so an add is an append and a remove a dict delete;
        # tombstones are swept once they are half the list: O(1) amortised,
        # where a sorted dict cost a fifth of an alloc+free pair.
        self._by_id: dict[int, Chunk] = {}
        self._ids: list[int] = []

    def _ordered(self) -> SortedList:
        """The starts in order, built if dropped; an ordered query keeps it alive."""
        starts = self._starts
        if starts is None:
            starts = self._starts = SortedList(self._by_start)
        self._idle = 0
        return starts

    def _touched(self) -> SortedList | None:
        """An add or remove: the start order to keep up to date, if still worth it."""
        starts = self._starts
        if starts is not None:
            self._idle += 1
            if self._idle > IDLE and self._idle > 4 * len(starts):
                self._starts = starts = None
        return starts

    def add(self, chunk: Chunk) -> None:
        if chunk.label is not None:
            if chunk.label in self._by_label:
                raise CmaError(errno.EEXIST, f"label {chunk.label!r} is taken by chunk "
                                             f"{self._by_label[chunk.label].name}")
            self._by_label[chunk.label] = chunk
        start = chunk.start
        by_start = self._by_start
        if self._starts is not None and start not in by_start:
            starts = self._touched()
            if starts is not None:
                starts.add(start)
        by_start[start] = chunk
        id, ids = chunk.id, self._ids
        self._by_id[id] = chunk
        if not ids or id > ids[-1]:  # a new chunk: ids only grow
            ids.append(id)
        else:
            self._old_id(id, ids)

    @staticmethod
    def _old_id(id: int, ids: list[int]) -> None:
        """A chunk indexed again under its id (a move, a restore): keep ``ids`` sorted."""
        i = bisect_left(ids, id)
        if i == len(ids) or ids[i] != id:  # else a tombstone comes back (a move)
            insort(ids, id)

    def add_many(self, chunks: list[Chunk]) -> None:
        """Index chunks sorted by start, none of them indexed yet, labels unique.

        Into an empty index the indexes are built in one go (recovery);
        otherwise one by one.
        """
        if self._by_start:
            for chunk in chunks:
                self.add(chunk)
            return
        self._by_start.update((chunk.start, chunk) for chunk in chunks)  # keeps self.get
        self._starts = None
        self._by_id = {chunk.id: chunk for chunk in chunks}
        self._ids = sorted(self._by_id)
        self._by_label.update((chunk.label, chunk) for chunk in chunks
                              if chunk.label is not None)

    def remove(self, chunk: Chunk) -> None:
        start = chunk.start
        del self._by_start[start]
        if self._starts is not None:
            starts = self._touched()
            if starts is not None:
                starts.remove(start)
        by_id = self._by_id
        del by_id[chunk.id]
        if len(self._ids) > 2 * len(by_id) + 64:
            self._ids = [id for id in self._ids if id in by_id]
        if chunk.label is not None:
            del self._by_label[chunk.label]

    def move(self, chunk: Chunk, new: int) -> None:
        """Re-key a chunk by its new start; its id and label stay indexed."""
        old = chunk.start
        del self._by_start[old]
        chunk.start = new
        self._by_start[new] = chunk
        starts = self._touched()
        if starts is not None:
            starts.remove(old)
            starts.add(new)

    def by_label(self, label: str) -> Chunk | None:
        return self._by_label.get(label)

    def labels(self) -> Iterable[str]:
        return self._by_label.keys()

    def by_id(self, id: int) -> Chunk | None:
        return self._by_id.get(id)

    def ids_after(self, id: int) -> Iterator[Chunk]:
        """Live chunks with an id above ``id``, in id order (O(log n) to start)."""
        i = bisect_right(self._ids, id)
        while True:
            ids = self._ids  # a sweep may replace the list between two yields
            if i >= len(ids):
                return
            key = ids[i]
            i += 1
            chunk = self._by_id.get(key)
            if chunk is not None:
                yield chunk
                if self._ids is not ids:
                    i = bisect_right(self._ids, key)

    def holding(self, addr: int) -> Chunk | None:
        """The chunk whose bytes include ``addr``, in O(log n)."""
        start = next(self._ordered().irange(maximum=addr, reverse=True), None)
        if start is None:
            return None
        chunk = self._by_start[start]
        return chunk if addr < chunk.end else None

    def last_before(self, addr: int) -> Chunk | None:
        """The chunk with the highest start below ``addr``, in O(log n)."""
        start = next(self._ordered().irange(maximum=addr, inclusive=(True, False),
                                            reverse=True), None)
        return None if start is None else self._by_start[start]

    def in_range(self, start: int, end: int) -> Iterator[Chunk]:
        """Chunks starting in [start, end), by start.  Lazy, in batches of BATCH
        starts, each batch taken afresh after the last start yielded: the index
        may change while the caller holds the iterator (a chunk freed by then
        is skipped), which a SortedList's own iterator does not allow."""
        by_start = self._by_start
        inclusive = True
        while True:
            batch = list(islice(self._ordered().irange(start, end, inclusive=(inclusive, False)),
                                BATCH))
            for key in batch:
                chunk = by_start.get(key)
                if chunk is not None:
                    yield chunk
            if len(batch) < BATCH:
                return
            start, inclusive = batch[-1], False

    def __iter__(self) -> Iterator[Chunk]:
        by_start = self._by_start
        return iter([by_start[start] for start in self._ordered()])

    def __len__(self) -> int:
        return len(self._by_start)

    def __contains__(self, start: int) -> bool:
        return start in self._by_start
