"""The kernel's hugepage pool as counters, and the one lock on changing them.

``vm.nr_hugepages`` and /proc/meminfo are read and written here only, and
every read-modify-write of the pool (by any cmad on the machine) happens
under one lock (``/run/cmad/pool.lock``), held until the pages are in an
arena file.  Callers reach these through the module (``kernelpool.read_nr()``)
so a test can stand in for the kernel in one place.
"""

from __future__ import annotations

import fcntl
import logging
import os

from cmad.errors import CmaError
from cmad.memory.rundir import RUN_DIR, private_dir

log = logging.getLogger(__name__)

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def meminfo() -> dict[str, int]:
    """/proc/meminfo as numbers (kB for sizes, counts for HugePages_*)."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def page_size() -> int:
    return meminfo().get("Hugepagesize", 2048) * 1024


def unreserved_free() -> int:
    """Free hugepages nobody has a reservation on."""
    info = meminfo()
    return max(info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0), 0)


def read_nr() -> int:
    with open(NR_HUGEPAGES) as f:
        return int(f.read())


def write_nr(value: int) -> int:
    with open(NR_HUGEPAGES, "w") as f:
        f.write(str(value))
    return read_nr()


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "?"


def boot_time() -> float:
    """When this boot began (``btime`` of /proc/stat), in seconds since the epoch."""
    try:
        with open("/proc/stat") as f:
            return float(next(line.split()[1] for line in f if line.startswith("btime ")))
    except (OSError, StopIteration, ValueError, IndexError):
        return float("inf")  # unknown: nothing counts as this boot's


_lock = {"fd": -1, "depth": 0}


def pool_lock() -> None:
    """Take the machine-wide pool lock (re-entrant within the daemon; root only)."""
    if _lock["depth"] == 0 and os.geteuid() == 0:
        try:
            private_dir(RUN_DIR)
            fd = os.open(os.path.join(RUN_DIR, "pool.lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _lock["fd"] = fd
        except (OSError, CmaError) as e:
            log.warning("hugepages: no pool lock (%s)", getattr(e, "why", e))
    _lock["depth"] += 1


def pool_unlock() -> None:
    _lock["depth"] -= 1
    if _lock["depth"] == 0 and _lock["fd"] >= 0:
        os.close(_lock["fd"])
        _lock["fd"] = -1
