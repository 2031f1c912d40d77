"""The map: which regions a (device, type) request may use.

    map-attr  ::= [ rules [ ';' ] ]
    rules     ::= rule [ ';' rules ]
    rule      ::= patterns '=' regions
    patterns  ::= pattern [ ',' patterns ]
    regions   ::= REG-NAME [ ',' regions ]
    pattern   ::= dev-pattern [ '/' TYPE-NAME ] | '/' TYPE-NAME

The first rule with a matching pattern wins.  ``?`` matches one character and
a trailing ``*`` the rest; the whole name must match.  A pattern without a
type part matches any type.  A pattern with an empty device part matches iff
the device part of the last pattern before it in the same rule that has one
matched (as the patch's ``name_matched``); as the first pattern of a rule it
can never match, which the patch's grammar allows and so do we.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from cmad.errors import CmaError, einval
from cmad.core.regions import check_name

DEFAULT_TYPE = "common"
_PATTERN_CHARS = re.compile(r"[A-Za-z0-9_.?*-]*")


def _compile(text: str, what: str) -> re.Pattern[str]:
    if not _PATTERN_CHARS.fullmatch(text):
        raise einval(f"{what} {text!r}: patterns use [A-Za-z0-9_.-] and the wildcards ? and *")
    if "*" in text[:-1]:
        raise einval(f"{what} {text!r}: '*' may only end a pattern")
    body = re.escape(text[:-1] if text.endswith("*") else text).replace(r"\?", ".")
    return re.compile(body + (".*" if text.endswith("*") else ""), re.DOTALL)


@dataclass(frozen=True)
class Pattern:
    dev: re.Pattern[str] | None  # None: the empty device part, "as before"
    type: re.Pattern[str] | None  # None: any type


@dataclass(frozen=True)
class Rule:
    text: str
    patterns: tuple[Pattern, ...]
    regions: tuple[str, ...]

    def matches(self, dev: str, type: str) -> bool:
        name_matched = False
        for p in self.patterns:
            if p.dev is not None:
                name_matched = p.dev.fullmatch(dev) is not None
            if name_matched and (p.type is None or p.type.fullmatch(type) is not None):
                return True
        return False


def _parse_pattern(text: str) -> Pattern:
    dev, slash, type = text.partition("/")
    if slash and not type:
        raise einval(f"map pattern {text!r}: empty type after '/'")
    if not dev and not slash:
        raise einval("map: empty pattern")
    return Pattern(_compile(dev, "map device pattern") if dev else None,
                   _compile(type, "map type pattern") if slash else None)


def _parse_rule(text: str) -> Rule:
    patterns, eq, regions = text.partition("=")
    if not eq:
        raise einval(f"map rule {text!r}: expected PATTERNS=REGIONS")
    if not regions.strip():
        raise einval(f"map rule {text!r}: no regions after '='")
    return Rule(text,
                tuple(_parse_pattern(p.strip()) for p in patterns.split(",")),
                tuple(check_name(r.strip(), f"map rule {text!r}: region")
                      for r in regions.split(",")))


class Map:
    """A parsed, immutable map attribute."""

    def __init__(self, text: str = ""):
        parts = [p.strip() for p in text.strip().split(";")]
        if parts and parts[-1] == "":
            parts.pop()
        self.rules = tuple(_parse_rule(p) for p in parts)
        self.text = ";".join(r.text for r in self.rules)
        self._cache: dict[tuple[str, str], tuple[str, ...]] = {}

    def lookup(self, dev: str, type: str | None = None) -> tuple[str, ...]:
        """The regions of the first matching rule, in order; ENOENT if none matches."""
        type = type or DEFAULT_TYPE
        hit = self._cache.get((dev, type))
        if hit is not None:
            return hit
        for rule in self.rules:
            if rule.matches(dev, type):
                if len(self._cache) < 4096:
                    self._cache[dev, type] = rule.regions
                return rule.regions
        raise CmaError(errno.ENOENT, f"map: no rule matches device {dev!r} type {type!r}")

    def __str__(self) -> str:
        return self.text
