"""The nodes of a sysfs-like tree: the base every kind shares.

A tree is built from plain objects and knows nothing of FUSE: the
`Filesystem` (ops.py) serves any tree. The kinds live apart: directories
(dirs.py: `Dir`, `LazyDir`, `DynamicDir`), files (files.py: `Attr`, `Table`,
`Stream`, `Bytes`; pipe.py: `Pipe`) and, here, `Symlink`. Design points:

- Every node gets a unique inode number when it is created (a module
  counter; numbers are never reused, so a stale kernel reference can never
  reach a newer node). The root takes `pyfuse3.ROOT_INODE` when it is handed
  to the Filesystem.
- File nodes produce a per-open handle (`_open`); the handle holds the
  `Caller`, because pyfuse3 gives read/write/release no request context.
- Node code reports errors by raising OSError (any subclass, with an
  optional `.why`); the Filesystem turns them into errnos at its boundary.
"""

from __future__ import annotations

import errno
import inspect
import itertools
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import pyfuse3

if TYPE_CHECKING:
    from .dirs import Dir

__all__ = ["Caller", "File", "Node", "Symlink", "ATTR_SIZE", "MAX_STORE"]

#: st_size of every attribute, as sysfs shows it.
ATTR_SIZE = 4096
#: Largest write an attribute accepts (sysfs truncates at PAGE_SIZE; we refuse).
MAX_STORE = 4096

_inode_numbers = itertools.count(pyfuse3.ROOT_INODE + 1)


@dataclass(frozen=True)
class Caller:
    """Who opened a file: taken from the request context at `open`."""
    uid: int
    gid: int
    pid: int


async def _maybe_await(value: Any) -> Any:
    """Callbacks may be plain functions or coroutines; await the latter."""
    if inspect.isawaitable(value):
        return await value
    return value


class Node:
    """Base of all nodes: permission bits, owner, place in the tree."""

    __slots__ = ("mode", "uid", "gid", "name", "parent", "inode", "mtime_ns", "kernel_refs",
                 "_gone_from", "__weakref__")

    kind = 0                # S_IFDIR / S_IFREG / S_IFLNK, set by subclasses

    def __bool__(self) -> bool:
        """A node is always true: without this, ``if node`` on a directory
        would call ``__len__``, which counts a DynamicDir's every entry."""
        return True

    def __init__(self, mode: int, uid: int = 0, gid: int = 0):
        if mode & ~0o7777:
            raise ValueError(f"mode {mode:#o} has bits beyond the permission bits")
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.name: Optional[str] = None
        self.parent: Optional[Dir] = None
        self.inode: int = next(_inode_numbers)
        self.mtime_ns = time.time_ns()
        self.kernel_refs = 0        # lookups the kernel holds (kept by Filesystem)
        self._gone_from: Optional[Dir] = None   # the parent it was removed from

    def path(self) -> str:
        """The node's path from the mount root ("/" for the root), for logs.

        A removed node keeps the path it had when it was removed.
        """
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        gone = node._gone_from
        prefix = "" if gone is None else gone.path().rstrip("/") + "/" + node.name
        if not parts:
            return prefix or "/"
        return prefix + "/" + "/".join(reversed(parts))

    def size(self) -> int:
        """st_size."""
        return 0

    def readable(self) -> bool:
        """Whether an open for reading may succeed at all (mode aside)."""
        return False

    def writable(self) -> bool:
        """Whether an open for writing may succeed at all (mode aside)."""
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path()} ino={self.inode} mode={self.mode:o}>"



class Symlink(Node):
    """A symbolic link; *target* is a str or a zero-argument callable
    returning one (e.g. ``../regions/00000000400000``)."""

    __slots__ = ("target",)

    kind = stat.S_IFLNK

    def __init__(self, target: Union[str, Callable[[], str]], uid: int = 0, gid: int = 0):
        super().__init__(0o777, uid, gid)
        self.target = target

    def resolve(self) -> str:
        target = self.target
        return target() if callable(target) else target


class File(Node):
    """Base of regular files: each open makes a handle (see `_open`)."""

    __slots__ = ()

    kind = stat.S_IFREG

    async def _open(self, caller: Caller, flags: int) -> "_Handle":
        raise NotImplementedError


class _Handle:
    """One open file: what read/write/release need, including the caller."""

    __slots__ = ("node", "caller")

    def __init__(self, node: File, caller: Caller):
        self.node = node
        self.caller = caller

    async def read(self, off: int, size: int):
        raise OSError(errno.EBADF, "not open for reading")

    async def write(self, off: int, data: bytes) -> int:
        raise OSError(errno.EBADF, "not open for writing")

    async def release(self) -> None:
        pass

