"""Kept for bench/ (client, fs, scale, trace, restart), which imports it by this name:
the tests use ``util.mount``.  Remove once bench/ imports ``util.mount``."""

from util.mount import *  # noqa: F401,F403
from util.mount import cleanup, is_mounted, mounted, unseal  # noqa: F401
