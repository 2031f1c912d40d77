"""fusefs: a generic sysfs-like filesystem on pyfuse3 and trio.

Build a tree of `Dir`, `LazyDir`, `DynamicDir`, `Attr`, `Table`, `Symlink`,
`Stream`, `Pipe` and `Bytes` nodes, hand its root to `Filesystem`, and
`serve` it. Nothing here knows what the tree is for.
"""

from .dirs import Dir, DynamicDir, LazyDir, Provider
from .files import Attr, Bytes, Stream, Table
from .mount import Mount, check_mountpoint, mount_options
from .nodes import ATTR_SIZE, MAX_STORE, Caller, File, Node, Symlink
from .notify import Invalidator
from .ops import Filesystem, describe_error
from .paths import resolve
from .pipe import Pipe, end_waits
from .sealing import unseal_mountpoint
from .serve import serve

__all__ = [
    "ATTR_SIZE", "MAX_STORE", "Attr", "Bytes", "Caller", "Dir", "DynamicDir", "File",
    "Filesystem", "Invalidator", "LazyDir", "Mount", "Node", "Pipe", "Provider", "Stream",
    "Symlink", "Table", "check_mountpoint", "describe_error", "end_waits", "mount_options",
    "resolve", "serve", "unseal_mountpoint",
]
