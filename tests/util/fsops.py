"""Tier 2 helpers: fusefs operations called directly, no mount.

pyfuse3's RequestContext and SetattrFields cannot be given values from Python, so
simple stand-ins carry the fields the Filesystem reads, and readdir_reply is
replaced by a collector with a fixed capacity.
"""

import os
from types import SimpleNamespace

import pyfuse3
import pytest
from pyfuse3 import FUSEError

ROOT = pyfuse3.ROOT_INODE


def ctx(uid=0, gid=0, pid=4242):
    """A caller as pyfuse3's RequestContext shows it."""
    return SimpleNamespace(uid=uid, gid=gid, pid=pid, umask=0o022)


def fields(**kw):
    """SetattrFields with the given ``update_*`` flags set."""
    base = dict(update_atime=False, update_mtime=False, update_ctime=False,
                update_mode=False, update_uid=False, update_gid=False,
                update_size=False)
    base.update(kw)
    return SimpleNamespace(**base)


class Collector:
    """Stands in for pyfuse3.readdir_reply: takes *capacity* entries per
    readdir call, then answers False."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.taken = []

    def __call__(self, token, name, attr, next_id):
        if len(token) >= self.capacity:
            return False
        token.append((name, attr.st_ino, next_id))
        self.taken.append(name)
        return True


async def list_dir(fs, inode, capacity):
    """A full listing, page by page, as the kernel does it."""
    fh = await fs.opendir(inode, ctx())
    fs.readdir_reply = Collector(capacity)
    entries, start, calls = [], 0, 0
    while True:
        page = []
        await fs.readdir(fh, start, page)
        calls += 1
        if not page:
            break
        entries += page
        start = page[-1][2]
    await fs.releasedir(fh)
    return entries, calls


async def the_rest(fs, fh, start) -> list:
    """The entries of an open directory after token *start*, page by page."""
    rest = []
    while True:
        page = []
        await fs.readdir(fh, start, page)
        if not page:
            return rest
        rest += page
        start = page[-1][2]


async def lookup(fs, path):
    """The inode of a slash-separated path, looked up from the root."""
    inode = ROOT
    for part in path.strip("/").split("/"):
        inode = (await fs.lookup(inode, os.fsencode(part), ctx())).st_ino
    return inode


async def errno_of(coro):
    """The errno of the FUSEError the operation must raise."""
    with pytest.raises(FUSEError) as info:
        await coro
    return info.value.errno


async def read_file(fs, inode) -> bytes:
    fi = await fs.open(inode, os.O_RDONLY, ctx())
    try:
        return await fs.read(fi.fh, 0, 4096)
    finally:
        await fs.release(fi.fh)
