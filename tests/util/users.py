"""Throwaway users (the ``users`` fixture in conftest, root only) and running as one."""

from __future__ import annotations

import subprocess

import pytest


def run(cmd: list[str], check=True) -> None:
    """An admin command; skip the test where it fails (no useradd, no root)."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode:
        pytest.skip(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


def as_user(user: str, script: str) -> subprocess.CompletedProcess:
    """A shell script run as ``user`` with its groups."""
    gid = subprocess.check_output(["id", "-g", user], text=True).strip()
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={gid}", "--init-groups",
                           "sh", "-c", script], capture_output=True, text=True, timeout=30)
