"""Fixtures shared by the test modules: ``daemon`` and ``hugepages``."""

import os

import pytest

from daemonutil import daemon  # noqa: F401
from test_arena import hugepages  # noqa: F401


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
