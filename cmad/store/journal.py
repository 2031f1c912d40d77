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
import math
import os
import sqlite3
from typing import Callable, Iterator

from cmad.core.chunks import ADDR_FORM, LABEL, RECORD, Chunk, check_label
from cmad.core.cma import Cma
from cmad.core.events import DURABLE, Listener
from cmad.errors import CmaError
from cmad.memparse import fmt_addr
from cmad.core.regions import NAME, NAME_MAX, Region, alloc_spec_text

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


def _u64(value: object) -> object:
    """Back from ``_i64``; anything but a negative int (a tampered row) is left to
    ``check_rows``."""
    return value + (1 << 64) if type(value) is int and value < 0 else value


def _unsigned(row: tuple) -> tuple:
    return tuple(_u64(v) if i in _U64_AT else v for i, v in enumerate(row))
# Addresses from 2^63 up are stored negative (below): the non-negative ones
# first, then those, each by the unique index on start.
_SELECT = f"SELECT {', '.join(FIELDS)} FROM chunks WHERE start {{}} 0 ORDER BY start"
_WRAPPED = ("SELECT count(*) FROM chunks WHERE start < 0 OR size < 0 OR bound < 0 "
            "OR alignment < 0")
BATCH = 65536  # rows fetched, checked and handed on at a time
_TRANSIENT = FIELDS.index("transient")
_U64_AT = tuple(FIELDS.index(f) for f in ("start", "size", "bound", "alignment"))


def _row(chunk: Chunk) -> tuple:
    return (chunk.id, _i64(chunk.start), _i64(chunk.size), chunk.region.name, chunk.dev,
            chunk.type, chunk.uid, chunk.pid, chunk.label, chunk.created, int(chunk.movable),
            int(chunk.transient), _i64(chunk.bound), _i64(chunk.alignment))


def _failure(e: Exception, what: str) -> CmaError:
    """ENOSPC for a full state disk (SQLITE_FULL), else EIO."""
    full = getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return CmaError(errno.ENOSPC if full else errno.EIO, f"journal: cannot record {what}: {e}")


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
_U64 = (1 << 64) - 1
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


_name.what = f"a name (1 to {NAME_MAX} of [A-Za-z0-9_.-])"
_label.what = f"NULL or a label ({LABEL.pattern}, not 16 hex digits)"
_created.what = "a finite time >= 0"

# column -> rule; ``wide`` columns hold a distinct value per row and are
# checked by type and bounds over the whole column, the others value by value
# over their few distinct values.
RULES: dict[str, Callable] = {
    "id": _int(1, _I63), "start": _int(0, _U64, _PAGE), "size": _int(_PAGE, _U64, _PAGE),
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
                    batch = [_unsigned(row) for row in batch]
                check_rows(batch)
                yield batch

    def records(self) -> Iterator[dict]:
        """The rows as dicts, one at a time (``cmad check``, tests)."""
        for row in (row for batch in self.rows() for row in batch):
            record = dict(zip(FIELDS, row))
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
        """One statement, so one atomic commit: the chunk is at old_start or at start
        (with its size: ``Cma.release_head`` moves the start and shrinks it)."""
        try:
            self._record_frees()
            self.db.execute("UPDATE chunks SET start = ?, size = ?, movable = ? WHERE id = ?",
                            (_i64(chunk.start), _i64(chunk.size), int(chunk.movable),
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
