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

from cmad.core.chunks import Chunk
from cmad.core.events import DURABLE, Listener
from cmad.core.regions import Region, alloc_spec_text
from cmad.errors import CmaError
from cmad.store.rows import FIELDS, check_rows, chunk_row, i64, unsigned

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
# Ids are reserved in the meta table a batch at a time, so the hot path writes
# the next id once per ID_BATCH allocations, and a restart never hands out an
# id a chunk had before (ids are never dense, only unique).
ID_BATCH = 1024
ALLOC_KEY = "alloc."  # meta key prefix: a region's alloc attribute written at runtime

# Addresses from 2^63 up are stored negative (``rows.i64``): the non-negative
# ones first, then those, each by the unique index on start.
_SELECT = f"SELECT {', '.join(FIELDS)} FROM chunks WHERE start {{}} 0 ORDER BY start"
_WRAPPED = ("SELECT count(*) FROM chunks WHERE start < 0 OR size < 0 OR bound < 0 "
            "OR alignment < 0")
BATCH = 65536  # rows fetched, checked and handed on at a time


def _failure(e: Exception, what: str) -> CmaError:
    """ENOSPC for a full state disk (SQLITE_FULL), else EIO."""
    full = getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return CmaError(errno.ENOSPC if full else errno.EIO, f"journal: cannot record {what}: {e}")


def keep_private(state_dir: str, path: str) -> None:
    """Only the daemon's uid reads the state: the journal holds the physical layout,
    labels and uids.  A state directory others can read (systemd's
    StateDirectory= is 0755 unless told otherwise) is made 0700 with a warning,
    and the journal is created 0600 before SQLite opens it (its -wal and -shm
    files take the journal's mode)."""
    st = os.stat(state_dir)
    if st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"owned by uid {st.st_uid}, not {os.geteuid()}: the "
                                   "journal's directory must be the daemon's own")
    if st.st_mode & 0o077:
        log.warning("state_dir %s: mode %o lets others read the journal; made 0700",
                    state_dir, st.st_mode & 0o777)
        os.chmod(state_dir, 0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    for suffix in ("", "-wal", "-shm"):  # an older daemon's 0644 files
        try:
            fd = os.open(path + suffix, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


class Journal(Listener):
    """A Cma listener that records chunks in ``<state_dir>/journal.db``: durable,
    so it is told before any view and may veto what it cannot record."""

    tier = DURABLE

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
                keep_private(state_dir, self.path)
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

    def rows(self) -> Iterator[list[tuple]]:
        """Every journalled chunk as a tuple in FIELDS order, by start: one query,
        handed out in batches, each checked by ``check_rows``."""
        wrapped = self.db.execute(_WRAPPED).fetchone()[0]
        for sign in (">=", "<"):
            cursor = self.db.execute(_SELECT.format(sign))
            while batch := cursor.fetchmany(BATCH):
                if wrapped:  # only with a base from 2^63 up: converted row by row
                    batch = [unsigned(row) for row in batch]
                check_rows(batch)
                yield batch

    def records(self) -> Iterator[dict]:
        """The rows as dicts, one at a time (``cmad check``, tests)."""
        for row in (row for batch in self.rows() for row in batch):
            record = dict(zip(FIELDS, row))
            record["movable"] = bool(record["movable"])
            record["transient"] = bool(record["transient"])
            yield record

    def ids(self) -> list[int]:
        """The id of every recorded chunk."""
        return [i for (i,) in self.db.execute("SELECT id FROM chunks")]

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
                            chunk_row(chunk))
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
        """One statement, so one atomic commit: the chunk is at old_start or at start
        (with its size: ``Cma.release_head`` moves the start and shrinks it)."""
        try:
            self._record_frees()
            self.db.execute("UPDATE chunks SET start = ?, size = ?, movable = ? WHERE id = ?",
                            (i64(chunk.start), i64(chunk.size), int(chunk.movable),
                             chunk.id))
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
            self.forget(ids)
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
