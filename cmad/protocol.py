"""The formats cmad and its clients both speak, each written once.

The daemon parses what a client formats and formats what a client parses,
so each format lives here, with its two sides beside each other:

- the request line written to ``alloc`` (`format_request`, `parse_request`):

      <dev>[/<type>] <size>[/<alignment>] [option ...]
      @<region>[,<region>...] <size>[/<alignment>] [option ...]
      option ::= label=<name> | movable | transient | bound=<size>

- the result line read back from ``alloc`` (`format_result`, `parse_result`):
  ``<start> <size> <region> [<label>] id=<id>``;
- a row of the ``chunkinfo`` table (`chunkinfo_row`, `chunk_from_row`);
- the key the ``free`` file takes (`free_key`, `parse_free_key`);
- the per-region stat keys (`STATS`) and the ``key value`` lines of the
  ``stats`` files (`format_keyed`, `parse_keyed`).

A base module: it imports only `cmad.errors` and `cmad.memparse`.  The core,
the daemon and the clients import it; the clients import nothing else of
cmad's.  The rules for the words themselves (which names and labels the core
accepts) stay with the core, which hands them to `parse_request`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

from cmad.errors import einval
from cmad.memparse import fmt_addr, memparse

# -- The request line ----------------------------------------------------------

FLAGS = ("movable", "transient")


@dataclass(frozen=True)
class Request:
    dev: str | None  # None: regions named directly
    type: str | None
    regions: tuple[str, ...]
    size: int
    alignment: int
    options: dict = field(default_factory=dict)


def word(value, what: str) -> str:
    """A request word: the grammar splits on whitespace, so none may hide inside."""
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise einval(f"{what} {text!r} must be one word")
    return text


def device_target(dev: str, type: str | None = None) -> str:
    """The first word of a request through the map: ``<dev>[/<type>]``."""
    return f"{word(dev, 'device')}/{word(type, 'type')}" if type else dev


def regions_target(regions: str | Iterable[str]) -> str:
    """The first word of a request naming regions: ``@<region>[,<region>...]``."""
    return "@" + (regions if isinstance(regions, str) else ",".join(regions))


def format_request(target: str, size, alignment=None, *, label=None, movable=False,
                   transient=False, bound=None) -> str:
    """One request line (sizes as ints or memparse strings)."""
    words = [word(target, "target"), word(size, "size")]
    if alignment:
        words[1] += "/" + word(alignment, "alignment")
    if label is not None:
        words.append("label=" + word(label, "label"))
    if movable:
        words.append("movable")
    if transient:
        words.append("transient")
    if bound:
        words.append("bound=" + word(bound, "bound"))
    return " ".join(words)


#: Checks a name (device, type, region) and says what it names: returns it or
#: raises EINVAL.  The daemon passes the core's rules; the default takes any word.
NameCheck = Callable[[str, str], str]
LabelCheck = Callable[[str], str]


def _any_label(label: str) -> str:
    return word(label, "label")


def parse_request(text: str, check_name: NameCheck = word,
                  check_label: LabelCheck = _any_label) -> Request:
    """A request line as a `Request`; EINVAL saying why for anything else."""
    words = re.split(r"[ \t]+", text.strip(" \t"))  # ASCII blanks only: no U+00A0 tricks
    if len(words) < 2:
        raise einval(f"request {text[:80]!r}: expected '<dev>[/<type>] <size>[/<align>] "
                     "[label=L] [movable] [transient] [bound=B]' or '@<region>,... <size>...'")
    target, amount, *rest = words
    dev = type = None
    regions: tuple[str, ...] = ()
    if target.startswith("@"):
        regions = tuple(check_name(r, "request region") for r in target[1:].split(","))
    else:
        dev, slash, type = target.partition("/")
        check_name(dev, "request device")
        type = check_name(type, "request type") if slash else None
    size_text, slash, align_text = amount.partition("/")
    size = memparse(size_text, "request size")
    if size == 0:
        raise einval("request size is 0")
    alignment = memparse(align_text, "request alignment") if slash else 0
    return Request(dev, type, regions, size, alignment, _options(rest, check_label))


def _options(words: list[str], check_label: LabelCheck) -> dict:
    options: dict = {}
    for item in words:
        key, eq, value = item.partition("=")
        if key in options:
            raise einval(f"request option {key!r} given twice")
        if key in FLAGS and not eq:
            options[key] = True
        elif key == "label" and eq:
            options[key] = check_label(value)
        elif key == "bound" and eq:
            options[key] = memparse(value, "request bound")
        else:
            raise einval(f"request option {item[:80]!r} is unknown (label=, movable, "
                         "transient, bound=)")
    return options


# -- The result line -----------------------------------------------------------


class Result(NamedTuple):
    """What a read of ``alloc`` says of the chunk a request made.  ``id`` is None
    where the daemon gives chunks no identity (an older daemon)."""

    start: int
    size: int
    region: str
    label: str | None
    id: int | None


def format_result(start: int, size: int, region: str, label: str | None, id: int) -> str:
    """``<start> <size> <region-name> [<label>] id=<id>``: the id last, so the
    optional label never shifts it."""
    label = f" {label}" if label else ""
    return f"{fmt_addr(start)} {size} {region}{label} id={id}\n"


def parse_id(words: list[str]) -> int | None:
    """The id of a result line or table row: its last word ``id=<id>``, if any."""
    return int(words[-1][3:]) if words and words[-1].startswith("id=") else None


def parse_result(line: str) -> Result:
    """A result line, with or without its ``id=<id>``; labels never hold '='."""
    start, size, region, *rest = line.split()
    ident = parse_id(rest)
    if ident is not None:
        rest.pop()
    return Result(int(start, 16), int(size), region, rest[0] if rest else None, ident)


# -- The chunkinfo table -------------------------------------------------------

#: A table of all chunks in one file, one line each, by start:
#: ``<start> <size> <region> <dev> <type> <uid> <pid> <created> <movable> <label|-> id=<id>``
#: (movable 0 or 1, "-" for no label); a table without ``id=`` (an older
#: daemon) parses with no id.
CHUNK_TABLE = "chunkinfo"

#: Indexes of the fields of a `CHUNK_TABLE` row split on " ".
(T_START, T_SIZE, T_REGION, T_DEV, T_TYPE, T_UID, T_PID, T_CREATED, T_MOVABLE,
 T_LABEL) = range(10)
NO_LABEL = "-"


class ChunkInfo(NamedTuple):
    """One row of the chunk table (a tuple: a million of them build fast).
    ``id`` is None where the daemon gives chunks no identity."""

    start: int
    size: int
    region: str
    dev: str
    type: str
    uid: int
    pid: int
    label: str | None
    created: str
    movable: bool | None = None
    id: int | None = None

    @property
    def name(self) -> str:
        return fmt_addr(self.start)

    @property
    def end(self) -> int:
        return self.start + self.size


def chunkinfo_row(start: int, size: int, region: str, dev: str, type: str, uid: int, pid: int,
                  created: str, movable: bool, label: str | None, id: int) -> str:
    """One row of the table, newline included (``created`` as ISO 8601 text)."""
    return (f"{fmt_addr(start)} {size} {region} {dev} {type} {uid} {pid} {created} "
            f"{int(movable)} {label or NO_LABEL} id={id}\n")


def chunk_from_row(fields: list[str]) -> ChunkInfo:
    """One row, split on " ", as a `ChunkInfo`."""
    start, size, region, dev, type, uid, pid, created, movable, label, *rest = fields
    ident = parse_id(rest)
    return ChunkInfo(int(start, 16), int(size), region, dev, type, int(uid), int(pid),
                     None if label == NO_LABEL else label, created, movable == "1", ident)


# -- The free key --------------------------------------------------------------

ID_KEY = "id="
ID_DIGITS = 20  # a u64 in decimal
_HEX = frozenset("0123456789abcdefABCDEF")


class FreeKey(NamedTuple):
    """What a ``free`` write names: ``kind`` is ``start`` (whatever chunk starts
    there now), ``id`` (exactly that chunk, wherever it moved) or ``label``.
    ``text`` is the key as written (for an id, its digits), for messages."""

    kind: str
    value: int | str
    text: str


def parse_free_key(key: str) -> FreeKey:
    """The forms ``free`` takes: the %p form (16 hex digits), 0x hex, decimal,
    ``id=<n>``, or else a label.  EINVAL for an id that is not a number."""
    text = key.strip()
    if text.startswith(ID_KEY):
        digits = text[len(ID_KEY):]
        if not (digits.isdigit() and digits.isascii() and len(digits) <= ID_DIGITS):
            raise einval(f"chunk id {digits[:40]!r}: expected a decimal number")
        return FreeKey("id", int(digits), digits)
    if len(text) == 16 and _HEX.issuperset(text):
        return FreeKey("start", int(text, 16), text)
    if text[:2].lower() == "0x" and text[2:] and _HEX.issuperset(text[2:]):
        return FreeKey("start", int(text[2:], 16), text)
    if text.isdigit() and text.isascii():
        return FreeKey("start", int(text), text)
    return FreeKey("label", text, text)


def free_key(chunk: int | str | None = None, *, id: int | None = None) -> str:
    """What to write to ``free``: ``id=<id>`` for exactly one chunk, a start
    address (int) in the %p form, or a key already written (a word)."""
    if id is not None:
        return f"{ID_KEY}{id}"
    return fmt_addr(chunk) if isinstance(chunk, int) else word(chunk, "chunk")


# -- Stats ---------------------------------------------------------------------


class StatKey(NamedTuple):
    """One per-region counter: its key in ``stats`` (and the field of the core's
    RegionStats), its Prometheus type, how the root ``stats`` combines the
    regions (``sum``, ``max``, or ``derived`` from the others), and its help."""

    name: str
    kind: str
    total: str
    help: str


#: The per-region stat keys, in the order the ``stats`` files list them.
STATS = (
    StatKey("alloc_ok", "counter", "sum", "Allocations served."),
    StatKey("alloc_fail", "counter", "sum",
            "Allocations this region was tried for and could not serve."),
    StatKey("freed", "counter", "sum", "Chunks freed."),
    StatKey("bytes_allocated", "gauge", "sum", "Bytes held by live chunks."),
    StatKey("largest_free", "gauge", "max", "Largest request that would succeed now, in bytes."),
    StatKey("fragmentation", "gauge", "derived", "1 - largest_free / free."),
    StatKey("peak_used", "gauge", "sum", "Most bytes ever held at once."),
    StatKey("moved", "counter", "sum", "Chunks moved by compaction."),
    StatKey("compactions", "counter", "sum", "Compaction runs."),
    StatKey("pageblock", "gauge", "max",
            "Pageblock size in bytes (grouping by mobility); 0: off."),
    StatKey("blocks_free", "gauge", "sum", "Pageblocks holding no chunk."),
    StatKey("blocks_pinned", "gauge", "sum", "Pageblocks holding pinned chunks only."),
    StatKey("blocks_movable", "gauge", "sum", "Pageblocks holding movable chunks only."),
    StatKey("blocks_mixed", "gauge", "sum", "Pageblocks holding both, after a fallback."),
    StatKey("fallbacks", "counter", "sum",
            "Allocations served from a block of the other mobility."),
)
STAT_KEYS = tuple(k.name for k in STATS)
#: The keys the root ``stats`` sums over regions.
SUMMED_KEYS = tuple(k.name for k in STATS if k.total == "sum")


def stat_text(value) -> str:
    """A counter's value as the ``stats`` and ``metrics`` files write it."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_keyed(pairs: Iterable[tuple[str, object]]) -> str:
    """``key value`` lines (``stats``), values written as given."""
    return "\n".join(f"{key} {value}" for key, value in pairs) + "\n"


def parse_keyed(text: str) -> dict[str, int | float | str]:
    """``key value`` lines (``stats``): numbers become int or float."""
    out: dict[str, int | float | str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        out[key] = _number(value)
    return out


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
