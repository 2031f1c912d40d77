"""The pyfuse3 operations serving a tree of `nodes`.

This module holds only FUSE operations: the tree is passed in. Two rules
shape it:

- One boundary (boundary.py) wraps every handler: whatever a handler
  raises reaches pyfuse3 as a FUSEError, with one log line.
- The kernel's view of inodes is tracked exactly: a node enters the inode
  table when a reply hands it to the kernel (lookup, readdirplus entry) and
  leaves it when `forget` brings its lookup count to zero (a `DynamicDir`
  then lets go of it too). Every lookup is a dict access; nothing scans the
  tree.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from typing import Callable, Optional

import pyfuse3
from pyfuse3 import FUSEError

from .boundary import boundary as _boundary, describe_error
from .dirs import Dir, DirHandle as _DirHandle, DynamicDir
from .nodes import Caller, File, Node, Symlink, _Handle
from .notify import Invalidator

__all__ = ["Filesystem", "describe_error"]

log = logging.getLogger("fusefs")


class Filesystem(pyfuse3.Operations):
    """Serves the tree under *root* (a Dir, which becomes the mount root).

    Entries and attributes may be cached by the kernel for *entry_timeout*
    and *attr_timeout* seconds: `Dir.remove` invalidates the cached entry,
    and nodes are never changed in place except through their callbacks, so
    long timeouts are safe and keep `ls -l` of big directories cheap.
    """

    supports_dot_lookup = True          # lookup answers "." and ".."
    enable_writeback_cache = False
    enable_acl = False

    # Indirection so tests can run readdir without a kernel request.
    readdir_reply = staticmethod(pyfuse3.readdir_reply)

    def __init__(self, root: Dir, *, entry_timeout: float = 300.0,
                 attr_timeout: float = 300.0, invalidator: Optional[Invalidator] = None):
        super().__init__()
        # Drops the kernel's cached entries (notify.py): given to every
        # directory handed to the kernel, started and stopped with the loop.
        self.invalidator = invalidator if invalidator is not None else Invalidator()
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        # inode -> node for the nodes the kernel holds; each node counts
        # its own lookups (node.kernel_refs), which Dir.remove also reads.
        self._inodes: dict[int, Node] = {}
        self._inodes_peak = 1
        self.replace_root(root)
        self._handles: dict[int, _Handle] = {}
        self._dir_handles: dict[int, _DirHandle] = {}
        self._fh_numbers = itertools.count(1)
        self.init_hooks: list[Callable[[], None]] = []   # run at FUSE INIT

    def replace_root(self, root: Dir) -> None:
        """Serve *root* as the mount root.  Only before the loop answers the
        kernel's INIT: a daemon mounts first, on a placeholder, so requests wait
        for it while it builds the tree, then hands the real root over here."""
        if not isinstance(root, Dir):
            raise TypeError(f"root must be a Dir, not {type(root).__name__}")
        if root.parent is not None:
            raise ValueError("root must not be inside another tree")
        if len(self._inodes) > 1:
            raise RuntimeError("the kernel already holds nodes of the old root")
        root.inode = pyfuse3.ROOT_INODE
        root.kernel_refs = 1
        root.invalidator = self.invalidator
        self.root = root
        self._inodes[pyfuse3.ROOT_INODE] = root

    # ---- bookkeeping ----------------------------------------------------

    def known(self, inode: int) -> bool:
        """Whether the kernel currently holds a reference to *inode*."""
        return inode in self._inodes

    def lookup_count(self, inode: int) -> int:
        node = self._inodes.get(inode)
        return node.kernel_refs if node is not None else 0

    def open_handles(self) -> int:
        return len(self._handles)

    def _remember(self, node: Node) -> None:
        """The kernel got a reference to *node* (one more lookup)."""
        inodes = self._inodes
        inodes[node.inode] = node
        if not node.kernel_refs and isinstance(node, Dir):
            node.invalidator = self.invalidator
        node.kernel_refs += 1
        if len(inodes) > self._inodes_peak:
            self._inodes_peak = len(inodes)

    def _shrink_inodes(self) -> None:
        """A dict never gives back its table: copy the inode table once the
        kernel holds a small part of its peak (amortised O(1))."""
        if self._inodes_peak > 64 and len(self._inodes) * 8 < self._inodes_peak:
            self._inodes = dict(self._inodes)
            self._inodes_peak = len(self._inodes)

    def _node(self, inode: int) -> Node:
        try:
            return self._inodes[inode]
        except KeyError:
            # The kernel never names an inode it has forgotten.
            raise FUSEError(errno.ENOENT) from None

    def _dir(self, inode: int) -> Dir:
        node = self._node(inode)
        if not isinstance(node, Dir):
            raise FUSEError(errno.ENOTDIR)
        return node

    def _handle(self, fh: int) -> _Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FUSEError(errno.EBADF) from None

    def _where(self, target: str, args: tuple, opened=None) -> str:
        """The node a failed request was about, for the log line."""
        try:
            if target == "inode":
                node = self._inodes.get(args[0])
                return node.path() if node else f"<inode {args[0]}>"
            if target == "fh":
                handle = opened or self._handles.get(args[0])
                return handle.node.path() if handle else f"<fh {args[0]}>"
            if target == "dir":
                handle = self._dir_handles.get(args[0])
                return handle.node.path() if handle else f"<dir fh {args[0]}>"
            if target == "entry":
                parent = self._inodes.get(args[0])
                base = parent.path().rstrip("/") if parent else f"<inode {args[0]}>"
                return f"{base}/{os.fsdecode(args[1])}"
        except Exception:       # a log line must never fail a request
            pass
        return "/"

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.inode
        e.generation = 0
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = node.kind | node.mode
        e.st_nlink = node.nlink() if isinstance(node, Dir) else 1
        e.st_uid = node.uid
        e.st_gid = node.gid
        size = node.size()
        e.st_size = size
        e.st_blksize = 4096
        e.st_blocks = (size + 511) // 512
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = node.mtime_ns
        return e

    # ---- life cycle -----------------------------------------------------

    def init(self) -> None:
        # Called synchronously, inside the trio loop, while the kernel's
        # INIT request is answered; hooks that wake tasks run after the
        # reply is sent, when the mount is live. Must not raise.
        for hook in self.init_hooks:
            try:
                hook()
            except Exception:
                log.exception("init hook %r failed", hook)

    # ---- names ----------------------------------------------------------

    @_boundary("lookup", "entry")
    async def lookup(self, parent_inode, name, ctx):
        parent = self._dir(parent_inode)
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.parent or parent
        else:
            node = parent._lookup(os.fsdecode(name))
            if node is None:
                raise FUSEError(errno.ENOENT)   # not cached, not logged
        entry = self._entry(node)
        self._remember(node)
        return entry

    async def forget(self, inode_list):
        # No reply goes back, so pyfuse3 catches nothing here, not even
        # FUSEError: whatever happens must stay in this method.
        try:
            inodes = self._inodes
            for inode, n in inode_list:
                node = inodes.get(inode)
                if node is None or inode == pyfuse3.ROOT_INODE:
                    continue
                node.kernel_refs -= n
                if node.kernel_refs <= 0:
                    node.kernel_refs = 0
                    del inodes[inode]
                    if node.parent is not None:
                        node.parent._child_forgotten(node)
            self._shrink_inodes()
        except Exception:
            log.exception("forget %r failed", inode_list[:10])

    @_boundary("getattr")
    async def getattr(self, inode, ctx):
        return self._entry(self._node(inode))

    @_boundary("setattr")
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            # Modes and owners carry the policy; they are the daemon's.
            raise OSError(errno.EPERM, "chmod/chown are not supported")
        if fields.update_size and isinstance(node, Dir):
            raise FUSEError(errno.EISDIR)
        # A size change is accepted and truncates nothing, as in sysfs: this
        # is what O_TRUNC (the shell's ">") and dd's ftruncate send.
        # Time updates (touch) are ignored likewise.
        return self._entry(node)

    @_boundary("readlink")
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        if not isinstance(node, Symlink):
            raise FUSEError(errno.EINVAL)
        return os.fsencode(node.resolve())

    # The tree is the daemon's: nothing is created, linked or removed by
    # clients. The errnos are the ones the VFS gives for a sysfs directory.
    async def create(self, parent_inode, name, mode, flags, ctx):
        raise FUSEError(errno.EACCES)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise FUSEError(errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise FUSEError(errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        raise FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode, name, ctx):
        raise FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new,
                     name_new, flags, ctx):
        raise FUSEError(errno.EPERM)

    # ---- directories ----------------------------------------------------

    @_boundary("opendir")
    async def opendir(self, inode, ctx):
        fh = next(self._fh_numbers)
        self._dir_handles[fh] = _DirHandle(self._dir(inode))
        return fh

    def _dir_handle(self, fh: int) -> _DirHandle:
        try:
            return self._dir_handles[fh]
        except KeyError:
            raise FUSEError(errno.EBADF) from None

    @_boundary("readdir", "dir")
    async def readdir(self, fh, start_id, token):
        # Resume tokens: 1 after ".", 2 after "..", then each child's
        # (see Dir, and _list_dynamic). Stop as soon as the reply is full.
        handle = self._dir_handle(fh)
        d = handle.node
        reply = self.readdir_reply
        if start_id < 1 and not reply(token, b".", self._entry(d), 1):
            return
        if start_id < 2 and not reply(token, b"..", self._entry(d.parent or d), 2):
            return
        if isinstance(d, DynamicDir):
            self._list_dynamic(handle, start_id, token)
            return
        for seq, name, node in d._entries_after(max(start_id, 2)):
            if not reply(token, os.fsencode(name), self._entry(node), seq):
                break
            # readdirplus: the kernel counts every entry it accepted as a
            # lookup ("." and ".." excepted).
            self._remember(node)

    def _list_dynamic(self, handle: _DirHandle, start_id: int, token) -> None:
        """Entries after the sort key behind *start_id*; each sent entry
        gets a token of this open directory, remembered with its key."""
        d = handle.node
        after = handle.key_of(start_id) if start_id > 2 else None
        keys: dict[int, object] = {}
        reply = self.readdir_reply
        for key, name, target, node in d._listing(after):
            number = handle.next_token()
            if not reply(token, os.fsencode(name), self._entry(node), number):
                break
            keys[number] = key
            d._hold(name, target, node)
            self._remember(node)
        handle.remember(keys)

    @_boundary("releasedir", "dir")
    async def releasedir(self, fh):
        self._dir_handles.pop(fh, None)

    # ---- files ----------------------------------------------------------

    @_boundary("open")
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if not isinstance(node, File):
            raise FUSEError(errno.EISDIR if isinstance(node, Dir) else errno.EINVAL)
        access = flags & os.O_ACCMODE
        # default_permissions lets root through any mode bits, so a
        # read-only file must be refused here (sysfs does the same).
        if access in (os.O_WRONLY, os.O_RDWR) and not (node.writable() and node.mode & 0o222):
            raise OSError(errno.EACCES, "read-only file opened for writing")
        if access in (os.O_RDONLY, os.O_RDWR) and not (node.readable() and node.mode & 0o444):
            raise OSError(errno.EACCES, "write-only file opened for reading")
        handle = await node._open(Caller(ctx.uid, ctx.gid, ctx.pid), flags)
        fh = next(self._fh_numbers)
        self._handles[fh] = handle
        # direct_io: every read and write reaches the tree at the offset the
        # caller used, with no page cache in between (streams answer a
        # read right after a write; attribute sizes stay 4096; byte files
        # stay coherent with other mappings).
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @_boundary("read", "fh")
    async def read(self, fh, off, size):
        return await self._handle(fh).read(off, size)

    @_boundary("write", "fh")
    async def write(self, fh, off, buf):
        try:
            return await self._handle(fh).write(off, buf)
        finally:
            # Entries the store removed are gone from the kernel's cache
            # before the writer learns the outcome (see notify.py).
            await self.invalidator.settle()

    # No flush or fsync: pyfuse3 answers ENOSYS, after which the kernel stops
    # sending them (one round trip less per close); nothing here buffers.

    @_boundary("release", "fh")
    async def release(self, fh):
        handle = self._handles.get(fh)
        try:
            if handle is not None:
                await handle.release()
        finally:
            self._handles.pop(fh, None)

    # ---- the filesystem -------------------------------------------------

    @_boundary("statfs", "none")
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._inodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s
