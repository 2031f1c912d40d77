"""Mounting and serving a Filesystem: the start-up and shut-down path.

pyfuse3 keeps one session per process, so `serve` runs one mount and
returns once it is unmounted again: after SIGTERM/SIGINT (which call
`pyfuse3.terminate`), after an external `fusermount3 -u`, or after an
error, always through `pyfuse3.close(unmount=True)`.

The pieces live apart: the mount and stale mounts (mount.py), the event loop
(loop.py), the mount table (mountinfo.py), mountpoint paths (paths.py) and
the sealed bare directory (sealing.py).  Their public names are re-exported
here, where they were before.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Iterable, Optional

from .guard import abort_connection
from .mount import Mount, check_mountpoint, mount_options
from .mountinfo import mount_entry
from .ops import Filesystem
from .paths import resolve
from .sealing import seal_mountpoint, unseal_mountpoint

__all__ = ["Mount", "serve", "check_mountpoint", "resolve", "seal_mountpoint",
           "unseal_mountpoint", "mount_options", "mount_entry", "abort_connection"]


def serve(fs: Filesystem, mountpoint: str, *, options: Iterable[str] = (),
          fsname: str = "fusefs", on_ready: Optional[Callable[[], None]] = None,
          tasks: Iterable[Callable[[], Awaitable[None]]] = ()) -> None:
    """Mount *fs* on *mountpoint* and serve it until it is unmounted.

    *on_ready()* is called once, when the kernel has completed the FUSE
    handshake (the mount is live). *tasks* are async callables run in the
    same nursery as the FUSE loop and cancelled when it ends. SIGTERM and
    SIGINT end the loop; the filesystem is unmounted before returning.
    """
    mount = Mount(fs, mountpoint, options=options, fsname=fsname)
    try:
        mount.serve(on_ready=on_ready, tasks=tasks)
    finally:
        mount.close()
