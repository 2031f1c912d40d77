"""Fixtures shared by the test modules: ``daemon`` and ``hugepages``."""

import gc
import os
import subprocess
import sys

import pytest

from cmad import Arena
from cmad.memory.hugepages import LEDGER, Ledger, sweep
from daemonutil import daemon  # noqa: F401
from test_arena import hugepages  # noqa: F401



# The tiers (pyproject's markers), by module: the core in process is the rest.
OPS = {"test_fusefs_ops", "test_fusefs_dynamic", "test_tree", "test_kernel_tree", "test_fusefs_pipe"}
MOUNT = {"test_fusefs_mount", "test_tree_mount", "test_daemon", "test_client", "test_cmactl",
         "test_hostile", "test_identity", "test_load", "test_movable_mount", "test_permissions",
         "test_reliability", "test_restart_mount", "test_service", "test_startup",
         "test_hugepages", "test_hardening", "test_kernel_mount", "test_shared"}
SLOW = {"test_load", "test_reliability", "test_restart_mount"}


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier: ``make test-fast`` runs ``not mount and not slow``.
    A test that starts a daemon is of the mount tier wherever it lives."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        fixtures = getattr(item, "fixturenames", ())
        if module in MOUNT or "daemon" in fixtures:
            item.add_marker(pytest.mark.mount)
        elif module in OPS:
            item.add_marker(pytest.mark.ops)
        else:
            item.add_marker(pytest.mark.core)
        if module in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def arena():
    """A 64 MiB arena for in-process cores that move bytes."""
    a = Arena(64 << 20)
    yield a
    a.close()


@pytest.fixture(autouse=True, scope="session")
def unseal_mountpoints(tmp_path_factory):
    """Daemons seal their bare mountpoints (immutable): clear that under the base
    temporary directory at the end, or pytest could never remove it."""
    yield
    from mountutil import is_mounted, unseal
    for top, dirs, _ in os.walk(tmp_path_factory.getbasetemp()):
        dirs[:] = [d for d in dirs if not is_mounted(os.path.join(top, d))]
        for d in dirs:
            unseal(os.path.join(top, d))


@pytest.fixture(autouse=True, scope="session")
def hugepage_records():
    """At the end, the hugepages test daemons recorded and could not give back (a
    client mapping in this process still holds them) go back to the pool: now, or
    from a helper process once this one has exited and its mappings are gone."""
    yield
    gc.collect()
    sweep(TEST_KEYS)
    if any(key.startswith(TEST_KEYS) for key in Ledger(LEDGER).load()):
        subprocess.Popen([sys.executable, "-c", GIVE_BACK_LATER, str(os.getpid()), TEST_KEYS],
                         start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


TEST_KEYS = "cmad-tmp-pytest-"  # the ledger entries of daemons on pytest's directories
GIVE_BACK_LATER = """
import os, sys, time
from cmad.memory.hugepages import sweep
pid, prefix = int(sys.argv[1]), sys.argv[2]
for _ in range(600):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.1)
sweep(prefix)
"""
