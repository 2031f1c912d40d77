"""The ``daemon`` fixture: cmad on a temporary mountpoint, always unmounted after."""

from __future__ import annotations

import contextlib
import pathlib
import sys

import pytest

from mountutil import mounted, require_fuse


class Daemons:
    """Start cmad daemons for one test; each call returns its mountpoint."""

    def __init__(self, tmp_path: pathlib.Path, stack: contextlib.ExitStack):
        self.tmp_path = tmp_path
        self.stack = stack
        self.count = 0
        self.proc = None

    def __call__(self, *args: str, env: dict | None = None, mountpoint=None) -> pathlib.Path:
        self.count += 1
        mnt = pathlib.Path(mountpoint or self.tmp_path / f"mnt{self.count}")
        argv = [sys.executable, "-m", "cmad.main", "--mountpoint", str(mnt), *args]
        self.proc = self.stack.enter_context(mounted(argv, mnt, env=env))
        return mnt


@pytest.fixture
def daemon(tmp_path):
    require_fuse()
    with contextlib.ExitStack() as stack:
        yield Daemons(tmp_path, stack)
