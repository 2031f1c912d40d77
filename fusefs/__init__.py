"""fusefs: a generic sysfs-like filesystem on pyfuse3 and trio.

Build a tree of `Dir`, `LazyDir`, `Attr`, `Symlink`, `Stream` and `Bytes`
nodes, hand its root to `Filesystem`, and `serve` it. Nothing here knows
what the tree is for.
"""

from .nodes import (ATTR_SIZE, MAX_STORE, Attr, Bytes, Caller, Dir, File,
                    LazyDir, Node, Stream, Symlink)
from .ops import Filesystem, describe_error
from .serve import Mount, check_mountpoint, mount_options, serve, unseal_mountpoint

__all__ = [
    "ATTR_SIZE", "MAX_STORE", "Attr", "Bytes", "Caller", "Dir", "File",
    "Filesystem", "LazyDir", "Mount", "Node", "Stream", "Symlink", "check_mountpoint",
    "describe_error", "mount_options", "serve", "unseal_mountpoint",
]
