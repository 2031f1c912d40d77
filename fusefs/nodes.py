"""The nodes of a sysfs-like tree: directories, attributes, symlinks, streams
and byte files.

A tree is built from plain objects and knows nothing of FUSE: the
`Filesystem` (ops.py) serves any tree. Design points:

- Every node gets a unique inode number when it is created (a module
  counter; numbers are never reused, so a stale kernel reference can never
  reach a newer node). The root takes `pyfuse3.ROOT_INODE` when it is handed
  to the Filesystem.
- A `Dir` keeps a dict name -> node for lookups, and for listings a list of
  sequence numbers in the order given (so sorted) with a dict seq -> name:
  each child gets a monotonically increasing sequence number, which is also
  the readdir resume token, so a listing resumes by bisection in O(log n)
  and survives concurrent additions and removals (no entry is listed twice
  or skipped; but a name removed and added again mid-listing is a new entry
  and may be listed again: directories whose names are reused are
  DynamicDirs). A removal leaves a tombstone in the list, swept once they
  are half of it, so add and remove are O(1) amortised.
- A `LazyDir` creates its children on first use, so 100,000 directories do
  not each hold their attribute nodes until someone looks inside.
- A `DynamicDir` stores no children at all: a provider says what a name
  means now and lists names in its own sort order. A child node exists only
  while the kernel holds it (made at LOOKUP or by a readdirplus entry,
  dropped at FORGET), so a million entries cost nothing until looked at and
  a `find` over them is given back once the kernel forgets. Listings resume
  after the provider's sort key of the last entry sent (kept per open
  directory), so a name is never listed twice, whatever changes meanwhile.
- A `Table` is a read-only file of rows rendered per open handle as it is
  read (a cursor by the rows' sort key), so a read costs what it returns
  and a big table never stalls the loop.
- File nodes produce a per-open handle (`_open`); the handle holds the
  `Caller`, because pyfuse3 gives read/write/release no request context.
- Node code reports errors by raising OSError (any subclass, with an
  optional `.why`); the Filesystem turns them into errnos at its boundary.
"""

from __future__ import annotations

import errno
import inspect
import itertools
import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Optional, Protocol, Union

import pyfuse3
from bisect import bisect_right

from .notify import invalidator

__all__ = [
    "Attr", "Bytes", "Caller", "Dir", "DynamicDir", "File", "LazyDir", "Node", "Provider",
    "Stream", "Symlink", "Table",
    "ATTR_SIZE", "MAX_STORE",
]

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


class Dir(Node):
    """A directory: children by name, listed in insertion order."""

    __slots__ = ("_children", "_seq_of", "_name_of", "_seqs", "_next_seq", "_subdirs")

    kind = stat.S_IFDIR

    # Resume tokens 1 and 2 are "." and "..": children start at 3.
    _FIRST_SEQ = 3

    def __init__(self, mode: int = 0o755, uid: int = 0, gid: int = 0):
        super().__init__(mode, uid, gid)
        self._children: dict[str, Node] = {}
        self._seq_of: dict[str, int] = {}
        self._name_of: dict[int, str] = {}          # seq -> name, live entries only
        self._seqs: list[int] = []                  # ascending, with tombstones
        self._next_seq = self._FIRST_SEQ
        self._subdirs = 0

    # Subclasses (LazyDir) fill themselves in here.
    def _ensure(self) -> None:
        pass

    def add(self, name: str, node: Node) -> Node:
        """Add *node* as *name*; returns it. O(log n).

        ValueError if the name is taken or invalid, or the node is already
        in a tree.
        """
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"invalid name {name!r}")
        if node.parent is not None or node is self:
            raise ValueError(f"{node!r} is already in a tree")
        if name in self._children:
            raise ValueError(f"{self.path()} already has an entry {name!r}")
        seq = self._next_seq
        self._next_seq += 1
        self._children[name] = node
        self._seq_of[name] = seq
        self._name_of[seq] = name
        self._seqs.append(seq)
        if isinstance(node, Dir):
            self._subdirs += 1
        node.name = name
        node.parent = self
        node._gone_from = None
        return node

    def remove(self, name: str) -> Node:
        """Remove the entry *name* (KeyError if none) and return its node.

        Tells the kernel to drop its cached entry when a session runs (a
        write() whose store removed entries is answered once that is done,
        see notify.py). The node keeps working for handles still open on
        it. O(log n).
        """
        self._ensure()
        node = self._children.pop(name)
        del self._name_of[self._seq_of.pop(name)]
        if len(self._seqs) > 2 * len(self._name_of) + 16:
            self._seqs = list(self._name_of)  # sweep the tombstones; dict order is seq order
        if isinstance(node, Dir):
            self._subdirs -= 1
        node._gone_from = self
        node.parent = None
        # Only an entry the kernel was given can be cached there (misses
        # are not cached): the common free of a chunk nobody looked at
        # costs nothing. A no-op unless a session runs (tier-2 tests).
        if node.kernel_refs:
            invalidator.entry(self.inode, os.fsencode(name), node.inode)
        return node

    def _lookup(self, name: str) -> Optional[Node]:
        """The child a LOOKUP hands to the kernel."""
        return self.get(name)

    def _child_forgotten(self, node: Node) -> None:
        """The kernel dropped its last reference to the child *node*."""

    def get(self, name: str, default: Optional[Node] = None) -> Optional[Node]:
        self._ensure()
        return self._children.get(name, default)

    def __contains__(self, name: object) -> bool:
        self._ensure()
        return name in self._children

    def __len__(self) -> int:
        self._ensure()
        return len(self._children)

    def names(self) -> list[str]:
        """Child names in listing order."""
        self._ensure()
        return list(self._name_of.values())

    def _entries_after(self, start_id: int):
        """(seq, name, node) of the children listed after token *start_id*."""
        self._ensure()
        seqs, name_of, children = self._seqs, self._name_of, self._children
        i = bisect_right(seqs, start_id)
        while i < len(seqs):
            seq = seqs[i]
            i += 1
            name = name_of.get(seq)
            if name is not None:
                yield seq, name, children[name]

    def nlink(self) -> int:
        return 2 + self._subdirs


class LazyDir(Dir):
    """A Dir whose ``populate(dir)`` is called once, on first use (lookup,
    readdir, get, names, len, `in`, remove), to create its children.

    Adding to it does not populate it. If populate raises, the dir stays as
    populate left it and is not populated again.
    """

    __slots__ = ("_populate",)

    def __init__(self, populate: Callable[["LazyDir"], None], mode: int = 0o755,
                 uid: int = 0, gid: int = 0):
        super().__init__(mode, uid, gid)
        self._populate: Optional[Callable[[LazyDir], None]] = populate

    @property
    def populated(self) -> bool:
        return self._populate is None

    def _ensure(self) -> None:
        populate = self._populate
        if populate is not None:
            self._populate = None
            populate(self)


class Provider(Protocol):
    """What a `DynamicDir` asks about its children. *target* is whatever a
    name means now (an object compared by identity); *key* a sort key."""

    def resolve(self, name: str) -> Optional[object]:
        """The target *name* means now, or None (ENOENT)."""

    def make(self, name: str, target: object) -> Node:
        """A new node for *name*, bound to *target* (not in any tree)."""

    def entries(self, after: Optional[Hashable]) -> Iterable[tuple[Any, str, object]]:
        """(key, name, target) in ascending key order, keys above *after*
        (from the first when None). Consumed without yielding to the loop."""


class DynamicDir(Dir):
    """A directory whose children a `Provider` resolves on demand (see the
    module docstring). The nodes the kernel holds are kept by name with the
    target they were made for: a LOOKUP of a name that now means another
    target makes a new node, so a node always stays bound to its target.
    *dirs* (optional) counts the subdirectories, for st_nlink.
    """

    __slots__ = ("provider", "_dirs", "_held", "_held_peak")

    def __init__(self, provider: Provider, mode: int = 0o755, uid: int = 0, gid: int = 0,
                 dirs: Optional[Callable[[], int]] = None):
        super().__init__(mode, uid, gid)
        self.provider = provider
        self._dirs = dirs
        self._held: dict[str, tuple[object, Node]] = {}
        self._held_peak = 0

    def add(self, name: str, node: Node) -> Node:
        raise TypeError(f"{self.path()}: a DynamicDir's children come from its provider")

    def remove(self, name: str) -> Node:
        raise TypeError(f"{self.path()}: a DynamicDir's children come from its provider")

    def get(self, name: str, default: Optional[Node] = None) -> Optional[Node]:
        """The node *name* means now (the held one if any; else a new one,
        not kept)."""
        target = self.provider.resolve(name)
        if target is None:
            return default
        return self._node_for(name, target)

    def _lookup(self, name: str) -> Optional[Node]:
        target = self.provider.resolve(name)
        if target is None:
            return None
        node = self._node_for(name, target)
        self._hold(name, target, node)
        return node

    def _node_for(self, name: str, target: object) -> Node:
        held = self._held.get(name)
        if held is not None and held[0] is target:
            return held[1]
        node = self.provider.make(name, target)
        if node.parent is not None:
            raise ValueError(f"provider of {self.path()} made {node!r}, already in a tree")
        node.name = name
        node.parent = self
        return node

    def _hold(self, name: str, target: object, node: Node) -> None:
        """The kernel is given *node*: keep it until FORGET."""
        held = self._held
        held[name] = (target, node)
        if len(held) > self._held_peak:
            self._held_peak = len(held)

    def _listing(self, after: Optional[Hashable]) -> Iterator[tuple[Any, str, object, Node]]:
        """(key, name, target, node) after *after*; nodes not held yet."""
        for key, name, target in self.provider.entries(after):
            yield key, name, target, self._node_for(name, target)

    def _child_forgotten(self, node: Node) -> None:
        held = self._held.get(node.name)
        if held is not None and held[1] is node:
            del self._held[node.name]
            self._shrink()

    def _shrink(self) -> None:
        """A dict never gives back its table: copy it once it holds a small
        part of its peak (amortised O(1)), so a `find` is given back whole."""
        held = self._held
        if self._held_peak > 64 and len(held) * 8 < self._held_peak:
            self._held = dict(held)
            self._held_peak = len(held)

    def invalidate(self, name: str) -> None:
        """*name* means something else now (or nothing): the kernel drops
        its entry and, once unused, the node it had (told it is deleted, so
        the kernel does not keep the inode cached). Costs nothing unless
        the kernel holds that name. The node keeps serving open handles."""
        held = self._held.pop(name, None)
        if held is not None and held[1].kernel_refs:
            invalidator.entry(self.inode, os.fsencode(name), held[1].inode)
        self._shrink()

    def held(self) -> int:
        """How many children the kernel holds (what this directory stores)."""
        return len(self._held)

    def names(self) -> list[str]:
        return [name for _, name, _ in self.provider.entries(None)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.provider.resolve(name) is not None

    def __len__(self) -> int:
        return sum(1 for _ in self.provider.entries(None))

    def _entries_after(self, start_id: int):
        raise TypeError("a DynamicDir is listed by sort key, see Filesystem.readdir")

    def nlink(self) -> int:
        # 1: "subdirectories not counted", which find(1) understands.
        return 2 + self._dirs() if self._dirs is not None else 1


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


class Attr(File):
    """A sysfs attribute.

    ``show() -> str``: called at the first read of each open handle (and
    again when that handle reads from offset 0, as sysfs re-shows after a
    seek to 0); a newline is appended if missing.
    ``store(text, caller)``: called once per write() with the whole buffer
    decoded as UTF-8, one trailing newline stripped; a write of more than
    4096 bytes, a NUL byte or bad UTF-8 is refused with EINVAL.
    Either callback may be a coroutine function.
    """

    __slots__ = ("show", "store")

    def __init__(self, show: Optional[Callable[[], str]] = None,
                 store: Optional[Callable[[str, Caller], None]] = None,
                 mode: Optional[int] = None, uid: int = 0, gid: int = 0):
        if show is None and store is None:
            raise ValueError("an attribute needs show, store or both")
        if mode is None:
            mode = 0o644 if (show and store) else 0o444 if show else 0o200
        super().__init__(mode, uid, gid)
        self.show = show
        self.store = store

    def size(self) -> int:
        return ATTR_SIZE

    def readable(self) -> bool:
        return self.show is not None

    def writable(self) -> bool:
        return self.store is not None

    async def _open(self, caller: Caller, flags: int) -> "_AttrHandle":
        return _AttrHandle(self, caller)

    async def render(self) -> bytes:
        """show()'s output as the bytes a read returns (newline-terminated)."""
        text = await _maybe_await(self.show())
        if not isinstance(text, str):
            raise TypeError(f"show() of {self.path()} returned {type(text).__name__}, not str")
        if not text.endswith("\n"):
            text += "\n"
        return text.encode()

    async def parse_and_store(self, data: bytes, caller: Caller) -> None:
        if len(data) > MAX_STORE:
            raise OSError(errno.EINVAL, f"write of {len(data)} bytes, more than {MAX_STORE}")
        if b"\0" in data:
            raise OSError(errno.EINVAL, "NUL byte in write")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise OSError(errno.EINVAL, f"not UTF-8: {e.reason} at byte {e.start}") from None
        if text.endswith("\n"):
            text = text[:-1]
        await _maybe_await(self.store(text, caller))


class _AttrHandle(_Handle):
    __slots__ = ("snapshot",)

    def __init__(self, node: Attr, caller: Caller):
        super().__init__(node, caller)
        self.snapshot: Optional[bytes] = None

    async def read(self, off: int, size: int) -> bytes:
        if self.snapshot is None or off == 0:
            self.snapshot = await self.node.render()
        return self.snapshot[off:off + size]

    async def write(self, off: int, data: bytes) -> int:
        await self.node.parse_and_store(data, self.caller)
        return len(data)


class Table(File):
    """A read-only table: ``rows(after)`` yields (key, line) in ascending
    key order, keys above *after* (all when None), each line ending in a
    newline; it must not await, so each read sees one state of the rows.

    Each open handle keeps a cursor (the key of the last row rendered) and
    the rest of a row cut by the read size: a read renders only the rows it
    returns (plus one), a read at offset 0 starts again from the first row.
    A row changed while a reader is past it is not shown to that reader; a
    row whose key moves past the cursor may be shown twice (a table read in
    pieces is not a snapshot). st_size is 4096, like an attribute.
    """

    __slots__ = ("rows",)

    def __init__(self, rows: Callable[[Optional[Any]], Iterable[tuple[Any, str]]],
                 mode: int = 0o444, uid: int = 0, gid: int = 0):
        super().__init__(mode, uid, gid)
        self.rows = rows

    def size(self) -> int:
        return ATTR_SIZE

    def readable(self) -> bool:
        return True

    async def _open(self, caller: Caller, flags: int) -> "_TableHandle":
        return _TableHandle(self, caller)


class _TableHandle(_Handle):
    __slots__ = ("cursor", "pending", "pos", "done")

    def __init__(self, node: Table, caller: Caller):
        super().__init__(node, caller)
        self._restart()

    def _restart(self) -> None:
        self.cursor: Any = None
        self.pending = bytearray()
        self.pos = 0
        self.done = False

    async def read(self, off: int, size: int) -> bytes:
        if off == 0:
            self._restart()
        elif off != self.pos:
            raise OSError(errno.EINVAL, f"table read at {off}: reads go on from {self.pos} "
                                        "or start again at 0")
        self._render(size)
        out = bytes(self.pending[:size])
        del self.pending[:size]
        self.pos += len(out)
        return out

    def _render(self, size: int) -> None:
        """Rows after the cursor until *size* bytes are pending (or none are left)."""
        pending = self.pending
        if self.done or len(pending) >= size:
            return
        for key, line in self.node.rows(self.cursor):
            pending += line.encode()
            self.cursor = key
            if len(pending) >= size:
                return
        self.done = True


class Stream(File):
    """A transaction file: ``open(caller) -> handle``, whose ``write(data)``,
    ``read(size) -> bytes`` (b"" when nothing is pending) and ``release()``
    serve that open file. Served with direct_io, so a read right after a
    write on the same descriptor sees the answer without a seek. The
    handle's methods may be coroutine functions.
    """

    __slots__ = ("open",)

    def __init__(self, open: Callable[[Caller], Any], mode: int = 0o660,
                 uid: int = 0, gid: int = 0):
        super().__init__(mode, uid, gid)
        self.open = open

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    async def _open(self, caller: Caller, flags: int) -> "_StreamHandle":
        inner = await _maybe_await(self.open(caller))
        return _StreamHandle(self, caller, inner)


class _StreamHandle(_Handle):
    __slots__ = ("inner",)

    def __init__(self, node: Stream, caller: Caller, inner: Any):
        super().__init__(node, caller)
        self.inner = inner

    async def read(self, off: int, size: int) -> bytes:
        out = await _maybe_await(self.inner.read(size))
        # pyfuse3 would die on a non-buffer, and the kernel refuses a reply
        # longer than the request: check here, inside the error boundary.
        if not isinstance(out, (bytes, bytearray, memoryview)):
            raise TypeError(f"stream read() returned {type(out).__name__}, not bytes")
        if len(out) > size:
            raise ValueError(f"stream read() returned {len(out)} bytes for a read of {size}")
        return out

    async def write(self, off: int, data: bytes) -> int:
        await _maybe_await(self.inner.write(data))
        return len(data)

    async def release(self) -> None:
        await _maybe_await(self.inner.release())


class Bytes(File):
    """A byte file over ``buffer()``, a writable memoryview (e.g. a slice of
    an mmap), fetched at each request. st_size is its length. Like a block
    device: reads at or past the end return b"", a write past the end fails
    with ENOSPC, a write straddling the end is cut short. direct_io, so it
    stays coherent with other mappings of the same memory.
    """

    __slots__ = ("buffer",)

    def __init__(self, buffer: Callable[[], memoryview], mode: int = 0o600,
                 uid: int = 0, gid: int = 0):
        super().__init__(mode, uid, gid)
        self.buffer = buffer

    def size(self) -> int:
        return len(self.buffer())

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    async def _open(self, caller: Caller, flags: int) -> "_BytesHandle":
        return _BytesHandle(self, caller)

    def read_at(self, off: int, size: int):
        view = self.buffer()
        end = min(len(view), off + size)
        if off >= end:
            return b""
        # A memoryview slice: pyfuse3 replies straight from the buffer
        # protocol, so the bytes are copied once, by the kernel.
        return view[off:end]

    def write_at(self, off: int, data: bytes) -> int:
        view = self.buffer()
        n = len(view)
        if off >= n:
            raise OSError(errno.ENOSPC, f"write at {off}, at or past the end ({n})")
        end = min(n, off + len(data))
        if end - off == len(data):
            view[off:end] = data
        else:
            view[off:end] = memoryview(data)[:end - off]
        return end - off


class _BytesHandle(_Handle):
    __slots__ = ()

    async def read(self, off: int, size: int):
        return self.node.read_at(off, size)

    async def write(self, off: int, data: bytes) -> int:
        return self.node.write_at(off, data)
