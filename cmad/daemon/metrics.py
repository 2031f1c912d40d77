"""The ``stats`` and ``metrics`` files: per-region counters as text."""

from __future__ import annotations

from cmad.core.cma import Cma
from cmad.core.regions import RegionStats

STAT_KEYS = ("alloc_ok", "alloc_fail", "freed", "bytes_allocated", "largest_free",
             "fragmentation", "peak_used", "moved", "compactions", "pageblock", "blocks_free",
             "blocks_pinned", "blocks_movable", "blocks_mixed", "fallbacks")

# name, type, help; the value is the RegionStats field of the same key.
_METRICS = (
    ("alloc_ok", "counter", "Allocations served."),
    ("alloc_fail", "counter", "Allocations this region was tried for and could not serve."),
    ("freed", "counter", "Chunks freed."),
    ("bytes_allocated", "gauge", "Bytes held by live chunks."),
    ("largest_free", "gauge", "Largest request that would succeed now, in bytes."),
    ("fragmentation", "gauge", "1 - largest_free / free."),
    ("peak_used", "gauge", "Most bytes ever held at once."),
    ("moved", "counter", "Chunks moved by compaction."),
    ("compactions", "counter", "Compaction runs."),
    ("pageblock", "gauge", "Pageblock size in bytes (grouping by mobility); 0: off."),
    ("blocks_free", "gauge", "Pageblocks holding no chunk."),
    ("blocks_pinned", "gauge", "Pageblocks holding pinned chunks only."),
    ("blocks_movable", "gauge", "Pageblocks holding movable chunks only."),
    ("blocks_mixed", "gauge", "Pageblocks holding both, after a fallback."),
    ("fallbacks", "counter", "Allocations served from a block of the other mobility."),
)


def show_stats(stats: RegionStats, extra: dict[str, object] | None = None) -> str:
    lines = [f"{key} {_fmt(getattr(stats, key))}" for key in STAT_KEYS]
    lines += [f"{key} {value}" for key, value in (extra or {}).items()]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(cma: Cma) -> str:
    """Prometheus text exposition format 0.0.4."""
    regions = [(r, r.stats()) for r in cma.regions]
    out = []
    for key, kind, help in _METRICS:
        name = f"cma_region_{key}" + ("_total" if kind == "counter" else "")
        out += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        out += [f'{name}{{region="{_label(r.name)}"}} {_fmt(getattr(s, key))}'
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
