"""The ``stats`` and ``metrics`` files: per-region counters as text (the keys, their
types and help are `cmad.protocol.STATS`)."""

from __future__ import annotations

from cmad.core.cma import Cma
from cmad.core.regions import RegionStats
from cmad.protocol import STAT_KEYS, STATS, format_keyed, stat_text

__all__ = ["STAT_KEYS", "render", "show_stats"]


def show_stats(stats: RegionStats, extra: dict[str, object] | None = None,
               root: bool = False) -> str:
    """A ``stats`` file: the `STAT_KEYS` in order, then the daemon's ``extra`` keys.
    The root's (``root``) leaves out what only means something per region
    (``fragmentation``: one region's largest range against all regions' free
    bytes says nothing)."""
    keys = ROOT_KEYS if root else STAT_KEYS
    lines = [(key, stat_text(getattr(stats, key))) for key in keys]
    return format_keyed(lines + list((extra or {}).items()))


ROOT_KEYS = tuple(k.name for k in STATS if k.total != "derived")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(cma: Cma) -> str:
    """Prometheus text exposition format 0.0.4."""
    regions = [(r, r.stats()) for r in cma.regions]
    out = []
    for key, kind, _, help in STATS:
        name = f"cma_region_{key}" + ("_total" if kind == "counter" else "")
        out += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        out += [f'{name}{{region="{_label(r.name)}"}} {stat_text(getattr(s, key))}'
                for r, s in regions]
    for key, help, value in (
            ("size_bytes", "Region size in bytes.", lambda r: r.size),
            ("free_bytes", "Free bytes in the region.", lambda r: r.free),
            ("users", "Live chunks in the region.", lambda r: r.users),
            ("physical", "1 if the region lies in one run of physically adjacent pages.",
             lambda r: int(r.contiguous == "physical"))):
        out += [f"# HELP cma_region_{key} {help}", f"# TYPE cma_region_{key} gauge"]
        out += [f'cma_region_{key}{{region="{_label(r.name)}"}} {value(r)}' for r, _ in regions]
    out += ["# HELP cma_arena_size_bytes Bytes in the arena.",
            "# TYPE cma_arena_size_bytes gauge", f"cma_arena_size_bytes {cma.arena_size}",
            "# HELP cma_chunks Live chunks.", "# TYPE cma_chunks gauge",
            f"cma_chunks {len(cma.chunks)}"]
    return "\n".join(out) + "\n"
