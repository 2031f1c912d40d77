"""Reading the mount table (/proc/self/mountinfo), and the mount source that
names its daemon.

`serve` mounts with the source ``<fsname>:<pid>:<start time>``: the next
daemon tells a stale mount from a live one by the mount table alone, never
touching the mount (a call into a FUSE mount whose daemon died can block).
"""

from __future__ import annotations

import os
import re

from .guard import start_time

__all__ = ["mount_entry", "mount_points", "mount_owner", "source_owner"]


def mount_entry(path: str) -> tuple[str, str, int] | None:
    """(source, fstype, device minor) of the topmost mount on *path*, or None."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) >= 5 and len(tail) >= 2 and _unescape(fields[4]) == path:
                    found = (_unescape(tail[1]), tail[0], int(fields[2].split(":")[1]))
    except OSError:
        pass
    return found


def mount_points() -> set[str]:
    """Every mount point in the mount table."""
    try:
        with open("/proc/self/mountinfo") as f:
            return {_unescape(line.split()[4]) for line in f if len(line.split()) > 4}
    except OSError:
        return set()


def mount_owner(pid: int | None = None) -> str:
    """``<pid>:<start time>`` of this process, as the mount source records it."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_time(pid)}"


def source_owner(source: str) -> tuple[int, int | None] | None:
    """(pid, start time) from ``<fsname>:<pid>:<start>``; (pid, None) from the
    ``<fsname>:<pid>`` of daemons before start times were recorded."""
    name, colon, last = source.rpartition(":")
    if not (colon and name and last.isdigit()):
        return None
    older, colon, pid = name.rpartition(":")
    if colon and older and pid.isdigit():
        return int(pid), int(last)
    return int(last), None


def _unescape(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
