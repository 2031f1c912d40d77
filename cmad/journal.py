"""The journal: every allocation and free, durable before the client hears of it.

SQLite in WAL mode with ``synchronous=NORMAL``: a commit is an append to the
WAL, which survives a crash of the daemon (kill -9) but not a power loss.
That is the right trade here, because the arena's bytes (tmpfs or hugetlbfs)
do not survive a power loss either; ``FULL`` costs an fsync per alloc and per
free.  ``locking_mode=EXCLUSIVE`` keeps the lock for the daemon's life: no
second daemon can share the state directory, and the hot path skips the
per-transaction file locking.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
from typing import Iterator

from .chunks import Chunk
from .cma import Cma
from .errors import CmaError
from .memparse import fmt_addr
from .regions import Region, alloc_spec_text

log = logging.getLogger(__name__)

JOURNAL = "journal.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, start INTEGER NOT NULL UNIQUE, size INTEGER NOT NULL,
    region TEXT NOT NULL, dev TEXT NOT NULL, type TEXT NOT NULL,
    uid INTEGER NOT NULL, pid INTEGER NOT NULL, label TEXT UNIQUE, created REAL NOT NULL,
    movable INTEGER NOT NULL, transient INTEGER NOT NULL, bound INTEGER,
    alignment INTEGER NOT NULL);
"""
FIELDS = ("id", "start", "size", "region", "dev", "type", "uid", "pid", "label", "created",
          "movable", "transient", "bound", "alignment")
U64_FIELDS = ("start", "size", "bound", "alignment")
# Ids are reserved in the meta table a batch at a time, so the hot path writes
# the next id once per ID_BATCH allocations, and a restart never hands out an
# id a chunk had before (ids are never dense, only unique).
ID_BATCH = 1024
ALLOC_KEY = "alloc."  # meta key prefix: a region's alloc attribute written at runtime


def _i64(value: int | None) -> int | None:
    """A 64-bit unsigned value as SQLite's signed INTEGER (two's complement), so
    addresses from 2^63 up (``--base 0x8000000000000000``) fit; smaller values
    are stored as they are, so older journals read the same."""
    return value - (1 << 64) if value is not None and value >= 1 << 63 else value


def _u64(value: int | None) -> int | None:
    return value + (1 << 64) if value is not None and value < 0 else value


def _row(chunk: Chunk) -> tuple:
    return (chunk.id, _i64(chunk.start), _i64(chunk.size), chunk.region.name, chunk.dev,
            chunk.type, chunk.uid, chunk.pid, chunk.label, chunk.created, int(chunk.movable),
            int(chunk.transient), _i64(chunk.bound), _i64(chunk.alignment))


def _failure(e: Exception, what: str) -> CmaError:
    """ENOSPC for a full state disk (SQLITE_FULL), else EIO."""
    full = getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return CmaError(errno.ENOSPC if full else errno.EIO, f"journal: cannot record {what}: {e}")


class Journal:
    """A Cma listener that records chunks in ``<state_dir>/journal.db``."""

    def __init__(self, state_dir: str, *, readonly: bool = False):
        self.path = os.path.join(state_dir, JOURNAL)
        self.readonly = readonly
        # Frees that took effect in memory but could not be recorded yet (a full
        # state disk): id -> chunk name.  Recorded before any other write.
        self.unrecorded: dict[int, str] = {}
        self._outage = False
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                      isolation_level=None)
        else:
            if os.path.lexists(state_dir) and not os.path.isdir(state_dir):
                raise CmaError(errno.ENOTDIR, f"state_dir {state_dir} is not a directory")
            try:
                os.makedirs(state_dir, mode=0o700, exist_ok=True)
            except OSError as e:  # a dangling link, no permission, a file on the way
                raise CmaError(e.errno or errno.EIO,
                               f"state_dir {state_dir}: {e.strerror}") from None
            self.db = sqlite3.connect(self.path, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.db.executescript(_SCHEMA)
        self._ids_reserved = 0 if readonly else int(self.get("next_id") or 0)

    # -- meta ------------------------------------------------------------

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set(self, **values: object) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [(k, str(v)) for k, v in values.items()])

    def next_id(self) -> int:
        """No chunk ever had this id or a higher one: the reserved batch, or past
        the highest recorded id for a journal older than the reservation."""
        top = self.db.execute("SELECT max(id) FROM chunks").fetchone()[0]
        return max(int(self.get("next_id") or 0), (top or 0) + 1)

    # -- runtime allocator changes (SPEC 5: journalled, restored at start) ----

    def on_allocator(self, region: Region) -> None:
        """Record the region's allocator when it differs from the configuration's,
        with the configuration it overrode (which decides at the next start)."""
        wanted, configured = region.wanted, region.configured
        key = ALLOC_KEY + region.name
        try:
            if (wanted.name, wanted.params) == (configured.name, configured.params):
                self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self.set(**{key: json.dumps({"alloc": alloc_spec_text(wanted),
                                             "configured": alloc_spec_text(configured)})})
        except sqlite3.Error as e:
            raise _failure(e, f"the allocator of region {region.name}") from e

    def runtime_allocator(self, region: str) -> tuple[str, str] | None:
        """(allocator written at runtime, the configured one it overrode), if any."""
        value = self.get(ALLOC_KEY + region)
        if value is None:
            return None
        try:
            saved = json.loads(value)
            return str(saved["alloc"]), str(saved["configured"])
        except (ValueError, KeyError, TypeError):
            log.warning("journal: unreadable allocator record for region %s: %.80r; ignored",
                        region, value)
            return None

    def runtime_allocator_regions(self) -> list[str]:
        return [key[len(ALLOC_KEY):] for (key,) in self.db.execute(
            "SELECT key FROM meta WHERE substr(key, 1, ?) = ?", (len(ALLOC_KEY), ALLOC_KEY))]

    def forget_allocator(self, region: str) -> None:
        self.db.execute("DELETE FROM meta WHERE key = ?", (ALLOC_KEY + region,))

    # -- chunks ----------------------------------------------------------

    def records(self) -> Iterator[dict]:
        """Every recorded chunk in address order (addresses from 2^63 up are stored
        negative: they sort after the others)."""
        for row in self.db.execute(f"SELECT {', '.join(FIELDS)} FROM chunks "
                                   "ORDER BY start < 0, start"):
            record = dict(zip(FIELDS, row))
            for key in U64_FIELDS:
                record[key] = _u64(record[key])
            record["movable"] = bool(record["movable"])
            record["transient"] = bool(record["transient"])
            yield record

    def count(self, region: str | None = None) -> int:
        """Recorded chunks, or those of one region that recovery keeps (not transient)."""
        if region is None:
            return self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return self.db.execute("SELECT count(*) FROM chunks WHERE region = ? AND "
                               "transient = 0", (region,)).fetchone()[0]

    def on_alloc(self, chunk: Chunk) -> None:
        try:
            self._record_frees()  # a freed chunk's start or label may be taken again
            if chunk.id >= self._ids_reserved:
                self.set(next_id=chunk.id + ID_BATCH)
                self._ids_reserved = chunk.id + ID_BATCH
            self.db.execute(f"INSERT INTO chunks VALUES ({', '.join('?' * len(FIELDS))})",
                            _row(chunk))
        except (sqlite3.Error, OverflowError) as e:
            raise _failure(e, f"chunk {chunk.name}") from e

    def on_free(self, chunk: Chunk) -> None:
        """Never refuses: a free takes effect in memory even when the state disk is
        full, and its delete waits in ``unrecorded`` until ``catch_up`` records it."""
        self.unrecorded[chunk.id] = chunk.name
        try:
            self._record_frees()
        except (sqlite3.Error, OverflowError) as e:
            if not self._outage:  # once per outage, not once per free
                log.warning("journal: cannot record the free of chunk %s (%s): freed in "
                            "memory; the journal catches up when it can be written",
                            chunk.name, e)
            self._outage = True

    def on_move(self, chunk: Chunk, old_start: int) -> None:
        """One statement, so one atomic commit: the chunk is at old_start or at start."""
        try:
            self._record_frees()
            self.db.execute("UPDATE chunks SET start = ?, movable = ? WHERE id = ?",
                            (_i64(chunk.start), int(chunk.movable), chunk.id))
        except (sqlite3.Error, OverflowError) as e:
            raise _failure(e, f"the move of chunk {chunk.name}") from e

    def _record_frees(self) -> None:
        """Delete the rows of the frees not recorded yet, all or none."""
        if not self.unrecorded:
            return
        ids = list(self.unrecorded)
        if len(ids) == 1:
            self.db.execute("DELETE FROM chunks WHERE id = ?", (ids[0],))
        else:
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i in ids])
        for i in ids:
            del self.unrecorded[i]
        if self._outage:
            self._outage = False
            log.info("journal: recorded %d frees that waited for the state disk", len(ids))

    def catch_up(self) -> int:
        """Retry the frees not recorded yet (the heartbeat calls this); how many
        are still waiting."""
        try:
            self._record_frees()
        except (sqlite3.Error, OverflowError):
            pass
        return len(self.unrecorded)

    def forget(self, ids: list[int]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i in ids])

    def close(self) -> None:
        self.db.close()


def restore_allocators(cma: Cma, journal: Journal) -> None:
    """Give back the allocators written to regions' ``alloc`` files at runtime,
    before the chunks they made are recovered (SPEC 5: a restart never fails
    because of them).

    The configuration wins where it changed that region's allocator since the
    write (the administrator's later word), unless the region has journalled
    chunks: those were made by the runtime allocator and could not be put back
    by another, so it stays, with a warning, until a start finds the region empty.
    """
    names = {region.name for region in cma.regions}
    for gone in set(journal.runtime_allocator_regions()) - names:
        if not journal.readonly:  # a region the configuration no longer has
            journal.forget_allocator(gone)
    for region in cma.regions:
        saved = journal.runtime_allocator(region.name)
        if saved is None:
            continue
        runtime, configured_then = saved
        configured = alloc_spec_text(region.configured)
        if configured != configured_then:
            chunks = journal.count(region.name)
            if not chunks:
                log.info("region %s: the configuration's allocator %r replaces %r, written "
                         "to its alloc file at runtime", region.name, configured, runtime)
                if not journal.readonly:
                    journal.forget_allocator(region.name)
                continue
            log.warning("region %s: keeping allocator %r, written to its alloc file at "
                        "runtime, for its %d journalled chunks; the configuration's %r "
                        "applies at a start that finds the region empty", region.name,
                        runtime, chunks, configured)
        try:
            cma.set_allocator(region.name, runtime)
        except CmaError as e:
            log.warning("region %s: cannot restore allocator %r written at runtime (%s); "
                        "the configuration's %r stays", region.name, runtime, e.why,
                        configured)
            continue
        log.info("region %s: allocator %r, written to its alloc file at runtime, restored",
                 region.name, runtime)


def restore_record(cma: Cma, record: dict) -> Chunk:
    """Put one journalled chunk back in ``cma`` (CmaError if it does not fit)."""
    fields = {k: v for k, v in record.items()
              if k not in ("id", "start", "size", "region", "dev", "type")}
    return cma.restore(record["id"], record["start"], record["size"], record["region"],
                       record["dev"], record["type"], **fields)


def recover(cma: Cma, journal: Journal, *, arena_survived: bool) -> int:
    """Put every journalled chunk back in ``cma``; returns how many.

    Transient chunks are freed (their handles died with the daemon).  If the
    arena file is gone (a reboot) the records are dropped with a warning.  If
    any record does not fit the configured regions, nothing is changed and
    CmaError names every such chunk: start-up must stop, not drop them.
    """
    records = list(journal.records())
    if records and not arena_survived:
        log.warning("journal: the arena file is gone (reboot?): dropping %d recorded chunks "
                    "whose bytes are lost", len(records))
        journal.forget([r["id"] for r in records])
        return 0
    transient = [r for r in records if r["transient"]]
    problems = []
    for record in records:
        if record["transient"]:
            continue
        try:
            restore_record(cma, record)
        except CmaError as e:
            problems.append(e.why)
    if problems:
        raise CmaError(errno.EINVAL, "journalled chunks do not fit the configured regions "
                                     "(refusing to start; fix the configuration or run "
                                     "'cmad reset'): " + "; ".join(problems))
    if transient:
        log.info("journal: freed %d transient chunks whose handles died with the daemon: %s",
                 len(transient), " ".join(fmt_addr(r["start"]) for r in transient))
        journal.forget([r["id"] for r in transient])
    log.info("journal: recovered %d chunks", len(records) - len(transient))
    return len(records) - len(transient)
