"""Shared by the allocator tests: units, the free space around live chunks (the
gaps between them), and each allocator's model of where a request goes."""

from __future__ import annotations

from cmad.allocators.bitmap import Bitmap
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


def best_fit(holes, size: int, alignment: int) -> int | None:
    """bf's model: smallest hole that fits at the alignment, lowest address on ties."""
    fits = [(n, s) for s, n in holes if align_up(s, alignment) + size <= s + n]
    return align_up(min(fits)[1], alignment) if fits else None


def first_fit(holes, size: int, alignment: int) -> int | None:
    """bitmap's model: the lowest aligned address where size fits in a hole."""
    for s, n in holes:
        at = align_up(s, alignment)
        if at + size <= s + n:
            return at
    return None


def greedy(start: int, size: int) -> list[tuple[int, int]]:
    """buddy's free blocks of a fresh region: largest aligned block that fits, left to right."""
    out = []
    end = start + size
    while start < end:
        block = PAGE_SIZE
        while start % (block * 2) == 0 and start + block * 2 <= end:
            block *= 2
        out.append((start, block))
        start += block
    return out


class Tiny(Bitmap):
    """Superblocks of 4 blocks, runs measured up to 8: every boundary case is near."""

    _super = 4
    _limit = 8


class Odd(Bitmap):
    """Superblocks and runs of 3 blocks: nothing a power of two."""

    _super = 3
    _limit = 3
