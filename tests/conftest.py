"""The tiers, and the fixtures several test modules share: ``daemon``, ``fuse``,
``cma``, ``arena``, ``hugepages``, ``pool``, ``users``, ``public_tmp``.  Helpers
live in ``util/``; no test module imports from another."""

import contextlib
import gc
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from cmad import Arena, Cma
from cmad.memory.hugepages import LEDGER, NR_HUGEPAGES, Ledger, sweep
from util.core import DEFAULT, MAP
from util.daemon import Daemons
from util.mount import is_mounted, require_fuse, unseal
from util.pool import free_hugepages, nr
from util.users import run

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
def daemon(tmp_path):
    """Start cmad daemons for one test (``daemon(*args)`` returns the mountpoint);
    every one stopped and unmounted after, its arena files and hugepages given back."""
    require_fuse()
    with contextlib.ExitStack() as stack:
        yield Daemons(tmp_path, stack)


@pytest.fixture
def fuse():
    """Fixture form of ``util.mount.require_fuse``."""
    require_fuse()


@pytest.fixture
def cma():
    """The default layout (``util.core.DEFAULT``, ``MAP``) in process, no arena."""
    return Cma(DEFAULT, MAP)


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


@pytest.fixture
def hugepages():
    """Reserve a few hugepages for one test and restore the old count after."""
    try:
        old = nr()
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(old + 4))
    except OSError as e:
        pytest.skip(f"cannot reserve hugepages through {NR_HUGEPAGES}: {e.strerror}")
    try:
        if free_hugepages() < 4:
            pytest.skip("the kernel refused to reserve 4 hugepages (memory too fragmented)")
        yield
    finally:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(old))


@pytest.fixture
def pool(daemon):
    """Root with a writable hugepage pool; the pool restored after the test, also
    when a daemon was killed (its record is given back, then the count restored)."""
    if os.geteuid() != 0:
        pytest.skip("the daemon reserves hugepages only as root")
    try:
        old = nr()
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(old))
    except OSError as e:
        pytest.skip(f"cannot write {NR_HUGEPAGES}: {e.strerror}")
    yield old
    daemon.stack.close()  # every daemon stopped, arena files removed, records given back
    if nr() != old:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(old))


@pytest.fixture
def users():
    """A group and two users, deleted afterwards: (group, member, outsider)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create throwaway users")
    tag = f"{os.getpid() % 100000}"
    group, member, outsider = f"cmag{tag}", f"cmai{tag}", f"cmao{tag}"
    run(["groupadd", group])
    try:
        run(["useradd", "-M", "-N", "-G", group, "-s", "/bin/sh", member])
        run(["useradd", "-M", "-N", "-s", "/bin/sh", outsider])
        yield group, member, outsider
    finally:
        run(["userdel", member], check=False)
        run(["userdel", outsider], check=False)
        run(["groupdel", group], check=False)


@pytest.fixture
def public_tmp():
    """A directory under /tmp that other users can reach (for their mountpoints)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="cmad-perm-", dir="/tmp"))
    path.chmod(0o755)  # other users must reach the mountpoint
    yield path
    shutil.rmtree(path, ignore_errors=True)


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
