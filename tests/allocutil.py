"""Shared by the allocator tests: the model of free space around live chunks."""

from __future__ import annotations

from cmad.allocators.interface import PAGE_SIZE

K = 1 << 10
M = 1 << 20
P = PAGE_SIZE
BASE = 0x40000000


def complement(start: int, size: int, chunks) -> list[tuple[int, int]]:
    """Free ranges of [start, start + size) around sorted (start, size) chunks, merged."""
    out, pos = [], start
    for c, n in chunks:
        if c > pos:
            out.append((pos, c - pos))
        pos = c + n
    if pos < start + size:
        out.append((pos, start + size - pos))
    return out


def align_up(x: int, alignment: int) -> int:
    return (x + alignment - 1) & -alignment
