"""The hugepage pool, its ledger and the private mounts, by the names importers use.

The work is done in modules of one job each; this one only gathers their
names:

- `cmad.memory.kernelpool`: the kernel's counters (vm.nr_hugepages,
  /proc/meminfo) and the machine-wide pool lock;
- `cmad.memory.pool`: `Pool`, one daemon's view (what is free, what it added),
  gather_limit;
- `cmad.memory.ledger`: the ledger ``/run/cmad/hugepages`` of every page any
  cmad added, reconciled with the pool;
- `cmad.memory.rundir`: ``/run/cmad`` and the user directories, arena names;
- `cmad.memory.mounts`: the private hugetlbfs and tmpfs mounts.
"""

from __future__ import annotations

from cmad.memory.kernelpool import (NR_HUGEPAGES, boot_id, boot_time, meminfo, page_size,
                                    pool_lock, pool_unlock, unreserved_free)
from cmad.memory.ledger import (LEDGER, MEMFD, Ledger, adopt_old_record, read_record,
                                record_key, unlink_arena)
from cmad.memory.mounts import fs_type, private_mount, release_mount, shm_dir
from cmad.memory.pool import (GATHER_LIMIT, MAX_SHARE, MODES, Pool, give_back_record,
                              parse_gather_limit, sweep)
from cmad.memory.rundir import RUN_DIR, escaped_name, private_dir, user_dir

__all__ = [
    "GATHER_LIMIT", "LEDGER", "MAX_SHARE", "MEMFD", "MODES", "NR_HUGEPAGES", "RUN_DIR",
    "Ledger", "Pool", "adopt_old_record", "boot_id", "boot_time", "escaped_name", "fs_type",
    "give_back_record", "meminfo", "page_size", "parse_gather_limit", "pool_lock",
    "pool_unlock", "private_dir", "private_mount", "read_record", "record_key",
    "release_mount", "shm_dir", "sweep", "unlink_arena", "unreserved_free", "user_dir",
]
