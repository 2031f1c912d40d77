"""Gathering hugepages for a physical layout, and sorting them by frame into runs.

A scratch hugetlb memfd takes pages from the pool; their frames are read
(`cmad.memory.pagemap`) and sorted into runs of physically adjacent pages.
Handed over, the pages go back to the pool in the order the arena file is to
take them (the kernel's hugepage free list is last-in first-out).
"""

from __future__ import annotations

import ctypes
import mmap
import os

from cmad.memory.pagemap import read_frames

_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def find_runs(frames: list[int], page: int) -> list[list[int]]:
    """Indices of ``frames`` sorted by frame, cut where two are not adjacent."""
    order = sorted(range(len(frames)), key=frames.__getitem__)
    runs: list[list[int]] = []
    for i in order:
        if runs and frames[runs[-1][-1]] + page == frames[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Gather:
    """A scratch hugetlb memfd holding the pages gathered so far, mapped to read frames."""

    def __init__(self, page: int):
        self.page = page
        self.fd = os.memfd_create("cmad-gather", os.MFD_HUGETLB | os.MFD_CLOEXEC)
        self.count = 0
        self.frames: list[int] = []

    def grow(self, count: int) -> None:
        """Hold ``count`` pages (ENOSPC/ENOMEM if the pool has not that many free)."""
        if count <= self.count:
            return
        os.ftruncate(self.fd, count * self.page)
        try:
            os.posix_fallocate(self.fd, self.count * self.page,
                               (count - self.count) * self.page)
        except OSError:
            os.ftruncate(self.fd, self.count * self.page)  # the part it got goes back
            raise
        mm = mmap.mmap(self.fd, count * self.page, offset=0)
        try:
            base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            self.frames = read_frames(base, count, self.page)
        finally:
            mm.close()
        self.count = count

    def hand_over(self, order: list[int]) -> None:
        """Give every page back, the unwanted first, then ``order`` reversed, so the
        next allocation in the pool takes them in ``order`` (the free list is LIFO)."""
        wanted = set(order)
        for i in [i for i in range(self.count) if i not in wanted] + order[::-1]:
            _fallocate(self.fd, _PUNCH, i * self.page, self.page)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def longest_run(runs: list[list[int]], page: int) -> int:
    return max((len(r) for r in runs), default=0) * page
