"""What a journalled row is and may hold: the columns, the u64 encoding and
the rules ``check_rows`` applies to every row before anything is restored.

The journal is the daemon's own, but a row edited by hand (or a disk that
lies) must stop start-up with one line naming the row, never a traceback
and never a chunk whose label is ``../x`` or whose dev splits chunkinfo.
Refusing (rather than dropping the row) is the rule for every journalled
chunk that does not fit: a dropped row would hand memory a client may still
be using to someone else.
"""

from __future__ import annotations

import errno
import math
from typing import Callable

from cmad.core.chunks import ADDR_FORM, LABEL, RECORD, Chunk, check_label
from cmad.core.regions import NAME, NAME_MAX
from cmad.errors import CmaError
from cmad.memparse import fmt_addr

FIELDS = RECORD
TRANSIENT = FIELDS.index("transient")  # a row's transient flag, by position
_U64_AT = tuple(FIELDS.index(f) for f in ("start", "size", "bound", "alignment"))


# -- u64 columns in SQLite's signed INTEGER ---------------------------------

def i64(value: int | None) -> int | None:
    """A 64-bit unsigned value as SQLite's signed INTEGER (two's complement), so
    addresses from 2^63 up (``--base 0x8000000000000000``) fit; smaller values
    are stored as they are, so older journals read the same."""
    return value - (1 << 64) if value is not None and value >= 1 << 63 else value


def u64(value: object) -> object:
    """Back from ``i64``; anything but a negative int (a tampered row) is left to
    ``check_rows``."""
    return value + (1 << 64) if type(value) is int and value < 0 else value


def unsigned(row: tuple) -> tuple:
    """A row as read, its u64 columns back from ``i64``."""
    return tuple(u64(v) if i in _U64_AT else v for i, v in enumerate(row))


def chunk_row(chunk: Chunk) -> tuple:
    """A chunk as the row the journal writes, in FIELDS order."""
    return (chunk.id, i64(chunk.start), i64(chunk.size), chunk.region.name, chunk.dev,
            chunk.type, chunk.uid, chunk.pid, chunk.label, chunk.created, int(chunk.movable),
            int(chunk.transient), i64(chunk.bound), i64(chunk.alignment))


# -- what a column may hold ---------------------------------------------------

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
