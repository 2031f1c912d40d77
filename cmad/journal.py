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
import logging
import os
import sqlite3
from typing import Iterator

from .chunks import Chunk
from .cma import Cma
from .errors import CmaError
from .memparse import fmt_addr

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


def _row(chunk: Chunk) -> tuple:
    return (chunk.id, chunk.start, chunk.size, chunk.region.name, chunk.dev, chunk.type,
            chunk.uid, chunk.pid, chunk.label, chunk.created, int(chunk.movable),
            int(chunk.transient), chunk.bound, chunk.alignment)


class Journal:
    """A Cma listener that records chunks in ``<state_dir>/journal.db``."""

    def __init__(self, state_dir: str, *, readonly: bool = False):
        self.path = os.path.join(state_dir, JOURNAL)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                      isolation_level=None)
            return
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.db.executescript(_SCHEMA)

    # -- meta ------------------------------------------------------------

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set(self, **values: object) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [(k, str(v)) for k, v in values.items()])

    # -- chunks ----------------------------------------------------------

    def records(self) -> Iterator[dict]:
        for row in self.db.execute(f"SELECT {', '.join(FIELDS)} FROM chunks ORDER BY start"):
            record = dict(zip(FIELDS, row))
            record["movable"] = bool(record["movable"])
            record["transient"] = bool(record["transient"])
            yield record

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def on_alloc(self, chunk: Chunk) -> None:
        try:
            self.db.execute(f"INSERT INTO chunks VALUES ({', '.join('?' * len(FIELDS))})",
                            _row(chunk))
        except (sqlite3.Error, OverflowError) as e:
            raise CmaError(errno.EIO, f"journal: cannot record chunk {chunk.name}: {e}") from e

    def on_free(self, chunk: Chunk) -> None:
        try:
            self.db.execute("DELETE FROM chunks WHERE id = ?", (chunk.id,))
        except (sqlite3.Error, OverflowError) as e:
            raise CmaError(errno.EIO, f"journal: cannot record free of {chunk.name}: {e}") from e

    def on_move(self, chunk: Chunk, old_start: int) -> None:
        """One statement, so one atomic commit: the chunk is at old_start or at start."""
        try:
            self.db.execute("UPDATE chunks SET start = ?, movable = ? WHERE id = ?",
                            (chunk.start, int(chunk.movable), chunk.id))
        except (sqlite3.Error, OverflowError) as e:
            raise CmaError(errno.EIO, f"journal: cannot record move of {chunk.name}: {e}") from e

    def forget(self, ids: list[int]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i in ids])

    def close(self) -> None:
        self.db.close()


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
