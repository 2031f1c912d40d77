"""/proc/self/pagemap, read in one place: the physical address of pages mapped here.

The arena's ``phys`` files (4 KiB pages, merged into segments) and the
physical layout (one frame per hugepage) both read frames through `physical`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from array import array
from collections.abc import Callable

from cmad.errors import CmaError
from cmad.privileges import pagemap_fd

PRESENT = 1 << 63
PFN = (1 << 55) - 1
HIDDEN = "the kernel hides physical frame numbers (needs CAP_SYS_ADMIN)"


def physical(address: int, count: int, stride: int,
             absent: Callable[[int], CmaError]) -> list[int]:
    """The physical address of each of ``count`` pages mapped at ``address + i * stride``.

    ``absent(i)`` is the error for page i not present (the caller faults the
    pages in first); EACCES where the kernel hides frame numbers (they read as
    0 without CAP_SYS_ADMIN).  Base pages in a row are read in one pread.
    """
    fd = pagemap_fd()
    entries = array("Q")
    if stride == mmap.PAGESIZE:
        entries.frombytes(os.pread(fd, count * 8, address // mmap.PAGESIZE * 8))
    else:
        for i in range(count):
            entries.frombytes(os.pread(fd, 8, (address + i * stride) // mmap.PAGESIZE * 8))
    out = []
    for i, entry in enumerate(entries):
        if not entry & PRESENT:
            raise absent(i)
        pfn = entry & PFN
        if pfn == 0:
            raise CmaError(errno.EACCES, HIDDEN)
        out.append(pfn * mmap.PAGESIZE)
    return out


def read_frames(address: int, count: int, page: int) -> list[int]:
    """Physical address of each of ``count`` pages mapped at ``address``, faulting them in."""
    for i in range(count):
        ctypes.c_char.from_address(address + i * page).value  # noqa: B018 (fault in)
    return physical(address, count, page,
                    lambda i: CmaError(errno.EACCES, f"hugepage {i} is not present"))
