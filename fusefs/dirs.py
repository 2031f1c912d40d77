"""Directories: `Dir`, `LazyDir` and `DynamicDir`.

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
- A directory the Filesystem hands to the kernel is given the Filesystem's
  invalidator (notify.py), to drop the kernel's cached entries it removes.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from bisect import bisect_right
from typing import Any, Callable, Hashable, Iterable, Iterator, Optional, Protocol

from .nodes import Node
from .notify import Invalidator

__all__ = ["Dir", "DirHandle", "DynamicDir", "LazyDir", "Provider"]


class Dir(Node):
    """A directory: children by name, listed in insertion order."""

    __slots__ = ("_children", "_seq_of", "_name_of", "_seqs", "_next_seq", "_subdirs",
                 "invalidator")

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
        # Given by the Filesystem that hands this directory to the kernel.
        self.invalidator: Optional[Invalidator] = None

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
            self._invalidate_entry(name, node)
        return node

    def _invalidate_entry(self, name: str, node: Node) -> None:
        """Tell the kernel to drop the entry *name* it was handed, *node*."""
        if self.invalidator is not None:
            self.invalidator.entry(self.inode, os.fsencode(name), node.inode)

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
            self._invalidate_entry(name, held[1])
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


class DirHandle:
    """One open directory. For a DynamicDir: the sort keys behind the tokens
    of the last two replies, enough for the kernel, which resumes from an
    entry of the last reply (or, when the reader's buffer took none of it,
    of the one before); older tokens (a seekdir back) are EINVAL."""

    __slots__ = ("node", "_tokens", "_keys", "_older")

    def __init__(self, node: Dir):
        self.node = node
        self._tokens = itertools.count(3)
        self._keys: dict[int, object] = {}
        self._older: dict[int, object] = {}

    def next_token(self) -> int:
        return next(self._tokens)

    def key_of(self, token: int) -> object:
        for keys in (self._keys, self._older):
            if token in keys:
                return keys[token]
        raise OSError(errno.EINVAL, f"readdir offset {token} is not from this listing")

    def remember(self, keys: dict[int, object]) -> None:
        if keys:        # an empty reply (the end) may be asked for again
            self._older, self._keys = self._keys, keys
