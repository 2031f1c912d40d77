"""fusefs: a generic sysfs-like filesystem on pyfuse3 and trio.

Build a tree of `Dir`, `LazyDir`, `DynamicDir`, `Attr`, `Table`, `Symlink`,
`Stream`, `Pipe` and `Bytes` nodes, hand its root to `Filesystem`, and
`serve` it. Nothing here knows what the tree is for.
"""

from .nodes import (ATTR_SIZE, MAX_STORE, Attr, Bytes, Caller, Dir, DynamicDir, File,
                    LazyDir, Node, Provider, Stream, Symlink, Table)
from .ops import Filesystem, describe_error
from .pipe import Pipe, end_waits
from .serve import Mount, check_mountpoint, mount_options, serve, unseal_mountpoint

__all__ = [
    "ATTR_SIZE", "MAX_STORE", "Attr", "Bytes", "Caller", "Dir", "DynamicDir", "File",
    "Filesystem", "LazyDir", "Mount", "Node", "Pipe", "Provider", "Stream", "Symlink", "Table",
    "check_mountpoint", "describe_error", "end_waits", "mount_options", "serve", "unseal_mountpoint",
]
