"""The daemon's garbage-collector policy: nothing walked twice once it is long-lived."""

import subprocess
import sys

PROBE = """
import gc
from cmad.daemon.main import hold_gc, settle_gc
hold_gc()
assert not gc.isenabled()
start_up = [[i] for i in range(50000)]          # what recovery and the tree create
settle_gc()
assert gc.isenabled() and gc.get_freeze_count() >= 50000
later = [[i] for i in range(20000)]             # chunks allocated while serving
frozen = gc.get_freeze_count()
gc.collect()                                    # a full collection: survivors frozen
assert gc.get_freeze_count() >= frozen + 20000, (frozen, gc.get_freeze_count())
assert len(gc.get_objects()) < 1000, len(gc.get_objects())
class Cycle:
    def __init__(self):
        self.me = self
for _ in range(1000):
    Cycle()                                     # short-lived cycles are still collected
gc.collect()
assert not [o for o in gc.get_objects() if isinstance(o, Cycle)]
print("ok")
"""


def test_start_up_objects_frozen_and_full_collections_freeze_survivors():
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_cmad_gc_default_keeps_the_collector_as_it_is():
    run = subprocess.run([sys.executable, "-c", "import gc\nfrom cmad.daemon.main import hold_gc, "
                          "settle_gc\nhold_gc()\nassert gc.isenabled()\nsettle_gc()\n"
                          "assert gc.get_freeze_count() == 0\nprint('ok')"],
                         capture_output=True, text=True, timeout=60,
                         env={"CMAD_GC": "default", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
