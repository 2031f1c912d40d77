"""Fixtures shared by the test modules: ``daemon`` and ``hugepages``."""

from daemonutil import daemon  # noqa: F401
from test_arena import hugepages  # noqa: F401
