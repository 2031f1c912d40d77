"""Daemon configuration: the embedded default, a TOML file, then flags (flags win)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields

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
            setattr(self, key, _convert(key, value))


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


def _convert(key: str, value):
    if key in ("arena_size", "base"):
        return _size(key, value)
    if key == "limits":
        if not isinstance(value, dict):
            raise ConfigError(key, "expected a table of uid = size")
        out = {}
        for uid, size in value.items():
            if not str(uid).isdigit():
                raise ConfigError(key, f"{uid!r} is not a numeric uid")
            out[int(uid)] = _size(f"limits.{uid}", size)
        return out
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    if key == "backing" and value not in BACKINGS:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(BACKINGS)}")
    if key == "hugepages" and value not in MODES:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(MODES)}")
    if key == "contiguous" and value not in CONTIGUOUS:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(CONTIGUOUS)}")
    if key == "gather_limit":
        try:
            parse_gather_limit(value)
        except CmaError as e:
            raise ConfigError(key, e.why) from None
    if key == "log_level" and value.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(key, f"{value!r} is not debug, info, warning or error")
    return value


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
