"""Fixtures shared by the test modules: ``daemon`` and ``hugepages``."""

import gc
import glob

import pytest

from cmad.hugepages import give_back_record
from daemonutil import daemon  # noqa: F401
from test_arena import hugepages  # noqa: F401


@pytest.fixture(autouse=True, scope="session")
def hugepage_records():
    """At the end, the hugepages test daemons recorded and could not give back (a
    client still mapped them) go back to the pool."""
    yield
    gc.collect()  # client Buffers still mapping an arena let go of its pages
    for record in glob.glob("/run/cmad/cmad-tmp-pytest-*.hugepages"):
        give_back_record(record)
