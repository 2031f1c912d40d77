"""A mounted tree as a client sees it: read a file, write once, ask ``alloc``, wait
for what FUSE does after ``close()``."""

from __future__ import annotations

import os
import subprocess
import time


def sh(cmd: str, **kw) -> subprocess.CompletedProcess:
    """A shell command line to its end, its output captured."""
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30, **kw)


def read(path) -> str:
    """The whole text of a file."""
    with open(path) as f:
        return f.read()


def read_value(path) -> str:
    """A one-value file's text, its final newline left out."""
    return read(path).removesuffix("\n")


def write_errno(path, data: bytes) -> int:
    """Write once; 0 on success, else the errno."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        return e.errno
    try:
        os.write(fd, data)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def eventually(predicate, timeout: float = 10.0) -> bool:
    """FUSE sends RELEASE after close() returns: wait for its effect, bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def alloc(mnt, text: str) -> str:
    """Write a request to ``mnt/alloc`` and read the result line on the same handle."""
    fd = os.open(mnt / "alloc", os.O_RDWR)
    try:
        os.write(fd, text.encode())
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def chunk_facts(mnt) -> dict:
    """Every chunk directory's files (a symlink's target for a label), data included:
    what must come back unchanged across a restart."""
    facts = {}
    for name in os.listdir(mnt / "chunks"):
        d = mnt / "chunks" / name
        if d.is_symlink():
            facts[name] = os.readlink(d)
            continue
        facts[name] = {f: read(d / f) for f in ("id", "start", "size", "region", "dev", "type",
                                                  "owner", "label", "created")}
        facts[name]["data"] = (d / "data").read_bytes()
    return facts
