"""Daemon configuration: the embedded default, a TOML file, then flags (flags win).

Every key is one row of `KEYS`: its parser, its command-line flag and help, and
what a reload does with it; the command line (main.parse_args), the TOML
loader (`load`) and the reload (reload.Reloader) all read that table.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, field, fields
from typing import Callable

from cmad.memory.arena import BACKINGS
from cmad.errors import CmaError
from cmad.memory.hugepages import GATHER_LIMIT, MODES, parse_gather_limit
from cmad.memory.physmap import CONTIGUOUS
from cmad.memparse import memparse

# gpu: shared with the group cma (SPEC 4d), whose members map its chunks (GPU staging)
DEFAULT_REGIONS = "video=32M:bf;common=16M:buddy;dma=8M:bitmap;gpu=8M:bf(group=cma)"
DEFAULT_MAP = "camera,video=video;gpu=gpu;*=common"


class ConfigError(Exception):
    """One line: which key, what is wrong."""

    def __init__(self, key: str, why: str):
        super().__init__(f"configuration: {key}: {why}")
        self.key = key


@dataclass
class Config:
    regions: str = DEFAULT_REGIONS
    map: str = DEFAULT_MAP
    mountpoint: str = "/run/cma"
    arena_size: int | None = None
    base: int = 0x40000000
    backing: str = "auto"
    arena_file: str | None = None
    state_dir: str | None = None
    group: str = "cma"
    limits: dict[int, int] = field(default_factory=dict)
    log_level: str = "info"
    hugepages: str = "reserve"
    contiguous: str = "auto"
    gather_limit: str = GATHER_LIMIT

    def update(self, values: dict, source: str) -> None:
        known = {f.name for f in fields(self)}
        for key, value in values.items():
            if value is None:
                continue
            key = key.replace("-", "_")
            if key not in known:
                raise ConfigError(key, f"unknown key in {source} (known: {', '.join(sorted(known))})")
            setattr(self, key, KEYS[key].parse(key, value))


def _size(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(key, f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, f"{value} is negative")
        return value
    try:
        return memparse(value.strip(), key)
    except CmaError as e:
        raise ConfigError(key, e.why) from None


def _limits(key: str, value) -> dict[int, int]:
    if not isinstance(value, dict):
        raise ConfigError(key, "expected a table of uid = size")
    out = {}
    for uid, size in value.items():
        if not str(uid).isdigit():
            raise ConfigError(key, f"{uid!r} is not a numeric uid")
        out[int(uid)] = _size(f"limits.{uid}", size)
    return out


def _string(key: str, value) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[str, object], str]:
    def parse(key: str, value) -> str:
        if _string(key, value) not in choices:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}")
        return value
    return parse


def _gather_limit(key: str, value) -> str:
    try:
        parse_gather_limit(_string(key, value))
    except CmaError as e:
        raise ConfigError(key, e.why) from None
    return value


def _log_level(key: str, value) -> str:
    if _string(key, value).lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(key, f"{value!r} is not debug, info, warning or error")
    return value


# What a SIGHUP reload does with a key (reload.py):
LIVE = "live"          # takes effect at once
LAYOUT = "layout"      # part of the region layout: a changed layout is refused
RESTART = "restart"    # kept as it is, with a warning: takes effect at the next start


@dataclass(frozen=True)
class Key:
    """One configuration key: how its value is checked (*parse(key, value)*
    returns it, or raises ConfigError), its ``--flag`` (None: the TOML file
    only) with its help, and what a reload does with it (LIVE, LAYOUT or
    RESTART)."""
    name: str
    parse: Callable[[str, object], object]
    help: str | None
    reload: str

    @property
    def flag(self) -> str | None:
        return None if self.help is None else "--" + self.name.replace("_", "-")


#: Every key, in the order of Config's fields and of ``cmad --help``.
KEYS: dict[str, Key] = {key.name: key for key in (
    Key("regions", _string, "regions, cma= grammar (default: %(default)s)", LAYOUT),
    Key("map", _string, "map rules, cma.map grammar", LIVE),
    Key("mountpoint", _string, "where to mount the tree (default /run/cma)", RESTART),
    Key("arena_size", _size, "arena size (memparse); default: end of the last region", LAYOUT),
    Key("base", _size, "bus address of the arena's first byte (default 0x40000000)", LAYOUT),
    Key("backing", _one_of(BACKINGS), "auto, hugetlb, thp or shm (default auto)", RESTART),
    Key("arena_file", _string, "named file behind the arena", RESTART),
    Key("state_dir", _string, "directory for the journal (persistence)", RESTART),
    Key("group", _string, "group allowed to alloc and free (default cma)", RESTART),
    Key("limits", _limits, None, LIVE),
    Key("log_level", _log_level, "debug, info, warning or error (default info)", LIVE),
    Key("hugepages", _one_of(MODES), "reserve (raise the pool as root when short, the "
        "default) or free (use only pages already free)", RESTART),
    Key("contiguous", _one_of(CONTIGUOUS), "auto (physically contiguous regions where the "
        "hugepages allow, the default), physical (or fail) or virtual", RESTART),
    Key("gather_limit", _gather_limit, "how far the pool may be raised while gathering "
        "hugepages for physical runs: a share of MemAvailable (default 50%%) or a size",
        RESTART),
)}
assert list(KEYS) == [f.name for f in fields(Config)], "KEYS and Config disagree"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A ``--flag`` for every key that has one."""
    for key in KEYS.values():
        if key.flag is not None:
            parser.add_argument(key.flag, help=key.help)


def flag_values(args: argparse.Namespace) -> dict[str, object]:
    """The keys given on the command line (None where a flag was not given)."""
    return {key.name: getattr(args, key.name) for key in KEYS.values() if key.flag is not None}


def keys_reloaded(how: str) -> list[str]:
    """The keys a reload treats *how* (LIVE, LAYOUT or RESTART), in table order."""
    return [key.name for key in KEYS.values() if key.reload == how]


def load(path: str | None, flags: dict) -> Config:
    """The embedded default, overlaid by the TOML file at ``path``, then by ``flags``."""
    config = Config()
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as e:
            raise ConfigError("config", f"{path}: {e.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError("config", f"{path}: {e}") from None
        config.update(values, path)
    config.update(flags, "flags")
    return config
