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
import math
import os
import sqlite3
from typing import Callable, Iterator

from .chunks import ADDR_FORM, LABEL, RECORD, Chunk, check_label
from .cma import Cma
from .errors import CmaError
from .memparse import fmt_addr
from .regions import NAME

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
FIELDS = RECORD
_SELECT = f"SELECT {', '.join(FIELDS)} FROM chunks ORDER BY start"
BATCH = 65536  # rows fetched, checked and handed on at a time
_TRANSIENT = FIELDS.index("transient")


def _row(chunk: Chunk) -> tuple:
    return (chunk.id, chunk.start, chunk.size, chunk.region.name, chunk.dev, chunk.type,
            chunk.uid, chunk.pid, chunk.label, chunk.created, int(chunk.movable),
            int(chunk.transient), chunk.bound, chunk.alignment)


# -- what a journalled row may hold ---------------------------------------
#
# The journal is the daemon's own, but a row edited by hand (or a disk that
# lies) must stop start-up with one line naming the row, never a traceback
# and never a chunk whose label is ``../x`` or whose dev splits chunkinfo.
# Refusing (rather than dropping the row) is the rule for every journalled
# chunk that does not fit: a dropped row would hand memory a client may still
# be using to someone else.

_PAGE = 4096
_I63 = (1 << 63) - 1
_U32 = (1 << 32) - 1


def _int(lo: int, hi: int, multiple: int = 1, *, none: bool = False) -> Callable:
    def ok(v: object) -> bool:
        return (v is None and none) or (type(v) is int and lo <= v <= hi and not v % multiple)
    ok.bounds = (lo, hi, multiple)
    ok.what = (f"an integer in [{lo}, {hi}]" + (f", a multiple of {multiple}" if multiple > 1
                                                 else "") + (" or NULL" if none else ""))
    return ok


def _pow2(*, none: bool = False) -> Callable:
    def ok(v: object) -> bool:
        return (v is None and none) or (type(v) is int and _PAGE <= v <= 1 << 63
                                        and not v & (v - 1))
    ok.what = "a power of two of at least 4096" + (" or NULL" if none else "")
    return ok


def _name(v: object) -> bool:
    return type(v) is str and NAME.fullmatch(v) is not None


def _label(v: object) -> bool:
    if v is None:
        return True
    try:
        return type(v) is str and check_label(v) == v
    except CmaError:
        return False


def _created(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v >= 0


_name.what = "a name of [A-Za-z0-9_.-]"
_label.what = f"NULL or a label ({LABEL.pattern}, not 16 hex digits)"
_created.what = "a finite time >= 0"

# column -> rule; ``wide`` columns hold a distinct value per row and are
# checked by type and bounds over the whole column, the others value by value
# over their few distinct values.
RULES: dict[str, Callable] = {
    "id": _int(1, _I63), "start": _int(0, _I63, _PAGE), "size": _int(_PAGE, _I63, _PAGE),
    "region": _name, "dev": _name, "type": _name, "uid": _int(0, _U32),
    "pid": _int(0, _U32), "label": _label, "created": _created, "movable": _int(0, 1),
    "transient": _int(0, 1), "bound": _pow2(none=True), "alignment": _pow2(),
}
_WIDE = ("id", "start", "pid", "created", "label")


def _column_ok(name: str, values: tuple) -> bool:
    """Whether every value passes RULES[name], without a Python call per value
    where types and bounds over the column say so."""
    rule = RULES[name]
    if name not in _WIDE:
        return all(map(rule, set(values)))
    if name == "label":  # the label rule, over the column: C loops, no call per value
        labels = [v for v in values if v is not None]
        return (set(map(type, labels)) <= {str} and all(map(LABEL.fullmatch, labels))
                and not any(map(ADDR_FORM.fullmatch, labels)))
    types = set(map(type, values))
    if name == "created":
        return types <= {int, float} and all(map(math.isfinite, values)) and min(values) >= 0
    lo, hi, multiple = rule.bounds
    return (types == {int} and lo <= min(values) and max(values) <= hi
            and (multiple == 1 or set(map((multiple - 1).__and__, values)) == {0}))


class BadRow(CmaError):
    """A journal row holding what its column may not."""


def check_rows(rows: list[tuple]) -> None:
    """CmaError (EINVAL) naming the first row with a value its column may not hold."""
    if not rows:
        return
    for name, values in zip(FIELDS, zip(*rows)):
        if _column_ok(name, values):
            continue
        rule, i = RULES[name], FIELDS.index(name)
        row = next(r for r in rows if not rule(r[i]))
        where = f"start {fmt_addr(row[1])}" if type(row[1]) is int else f"start {row[1]!r:.40}"
        raise BadRow(errno.EINVAL, f"journal row id={row[0]!r:.24} ({where}): {name} "
                                     f"{row[i]!r:.60} is not {rule.what}; refusing to start "
                                     "(the journal was edited or damaged: fix the row, or "
                                     "'cmad reset' forgets every chunk)")


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

    def rows(self) -> Iterator[list[tuple]]:
        """Every journalled chunk as a tuple in FIELDS order, by start: one query,
        handed out in batches, each checked by ``check_rows``."""
        cursor = self.db.execute(_SELECT)
        while batch := cursor.fetchmany(BATCH):
            check_rows(batch)
            yield batch

    def records(self) -> Iterator[dict]:
        """The rows as dicts, one at a time (``cmad check``, tests)."""
        for row in (row for batch in self.rows() for row in batch):
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
    """Put every journalled chunk back in ``cma``, in bulk; returns how many.

    Transient chunks are freed (their handles died with the daemon).  If the
    arena file is gone (a reboot) the records are dropped with a warning.  If
    any row holds what its column may not, or does not fit the configured
    regions, nothing is changed and CmaError names it: start-up must stop,
    not drop chunks.
    """
    if not arena_survived:
        ids = [i for (i,) in journal.db.execute("SELECT id FROM chunks")]
        if ids:
            log.warning("journal: the arena file is gone (reboot?): dropping %d recorded "
                        "chunks whose bytes are lost", len(ids))
            journal.forget(ids)
        return 0
    transient: list[tuple] = []

    def kept() -> Iterator[tuple]:
        for batch in journal.rows():
            for row in batch:
                if row[_TRANSIENT]:
                    transient.append(row)
                else:
                    yield row

    try:
        count = cma.restore_many(kept())
    except BadRow:
        raise
    except CmaError as e:
        raise CmaError(errno.EINVAL, "journalled chunks do not fit the configured regions "
                                     "(refusing to start; fix the configuration or run "
                                     "'cmad reset'): " + e.why) from None
    if transient:
        log.info("journal: freed %d transient chunks whose handles died with the daemon: %s",
                 len(transient), " ".join(fmt_addr(r[1]) for r in transient[:20])
                 + (" ..." if len(transient) > 20 else ""))
        journal.forget([r[0] for r in transient])
    log.info("journal: recovered %d chunks", count)
    return count
