"""Kept for bench/restart.py, which imports it by this name: the tests use
``util.daemon``.  Remove once bench/ imports ``util.daemon``."""

from util.daemon import RESTART_WRITER, Daemons  # noqa: F401
