"""Throwaway users (the ``users`` fixture in conftest, root only) and running as one."""

from __future__ import annotations

import os
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


def capabilities(pid: int) -> dict[str, set[int]]:
    """Cap* lines of every thread of *pid*, each as the set of its numbers."""
    sets: dict[str, set[int]] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            for line in f:
                if line.startswith("Cap"):
                    name, mask = line.split(":")
                    caps = {c for c in range(64) if int(mask, 16) >> c & 1}
                    sets.setdefault(name, set()).update(caps)
    return sets
