"""The kernel's hugepage pool: read as it is, or faked in process."""

from __future__ import annotations

import os

from cmad.memory import kernelpool
from cmad.memory.kernelpool import NR_HUGEPAGES


def free_hugepages() -> int:
    """HugePages_Free from /proc/meminfo (0 where there is none)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


class FakeKernel:
    """nr_hugepages and the free pages, as the kernel keeps them."""

    def __init__(self, monkeypatch, nr: int, free: int):
        self.nr, self.free = nr, free
        monkeypatch.setattr(kernelpool, "read_nr", lambda: self.nr)
        monkeypatch.setattr(kernelpool, "write_nr", self.write)
        monkeypatch.setattr(kernelpool, "unreserved_free", lambda: self.free)
        monkeypatch.setattr(kernelpool, "meminfo", lambda: {"MemAvailable": 1 << 30,
                                                             "Hugepagesize": 2048})
        monkeypatch.setattr(kernelpool, "pool_lock", lambda: None)
        monkeypatch.setattr(kernelpool, "pool_unlock", lambda: None)
        monkeypatch.setattr(os, "geteuid", lambda: 0)

    def write(self, value: int) -> int:
        lower = min(self.nr - value, self.free)  # the kernel frees only free pages
        if value > self.nr:
            self.free += value - self.nr
            self.nr = value
        else:
            self.nr -= lower
            self.free -= lower
        return self.nr


def nr() -> int:
    """The kernel's nr_hugepages now."""
    with open(NR_HUGEPAGES) as f:
        return int(f.read())
