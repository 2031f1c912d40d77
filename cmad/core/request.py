"""The ``alloc`` file's request grammar, one request per write:

    <dev>[/<type>] <size>[/<alignment>] [option ...]
    @<region>[,<region>...] <size>[/<alignment>] [option ...]
    option ::= label=<name> | movable | transient | bound=<size>
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cmad.core.chunks import Chunk, check_label
from cmad.errors import einval
from cmad.memparse import fmt_addr, memparse
from cmad.core.regions import check_name

FLAGS = ("movable", "transient")


@dataclass(frozen=True)
class Request:
    dev: str | None  # None: regions named directly
    type: str | None
    regions: tuple[str, ...]
    size: int
    alignment: int
    options: dict = field(default_factory=dict)


def parse_request(text: str) -> Request:
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
    return Request(dev, type, regions, size, alignment, _options(rest))


def _options(words: list[str]) -> dict:
    options: dict = {}
    for word in words:
        key, eq, value = word.partition("=")
        if key in options:
            raise einval(f"request option {key!r} given twice")
        if key in FLAGS and not eq:
            options[key] = True
        elif key == "label" and eq:
            options[key] = check_label(value)
        elif key == "bound" and eq:
            options[key] = memparse(value, "request bound")
        else:
            raise einval(f"request option {word[:80]!r} is unknown (label=, movable, transient, "
                         "bound=)")
    return options


def run(cma, text: str, *, uid: int = 0, pid: int = 0) -> Chunk:
    """Parse one request and make it on ``cma``."""
    req = parse_request(text)
    if req.dev is None:
        return cma.alloc_from(req.regions, req.size, req.alignment, uid=uid, pid=pid,
                              **req.options)
    return cma.alloc(req.dev, req.size, req.alignment, req.type, uid=uid, pid=pid,
                     **req.options)


def result_line(chunk: Chunk) -> str:
    """``<start> <size> <region-name> [<label>] id=<id>``, as a read of ``alloc``
    returns it: the id last, so the optional label never shifts it."""
    label = f" {chunk.label}" if chunk.label else ""
    return f"{fmt_addr(chunk.start)} {chunk.size} {chunk.region.name}{label} id={chunk.id}\n"
