"""Mounting a Filesystem and unmounting it: from a checked mountpoint to the
unmount, stale mounts replaced on the way.

`check_mountpoint` finds what is on the mountpoint by the mount table
(mountinfo.py) and refuses a live mount; `Mount` mounts through the kernel's
mount API beneath a stale mount, then detaches that (mountapi.py), so there
is no moment with the bare directory exposed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
from typing import Awaitable, Callable, ContextManager, Iterable, Optional

import pyfuse3

from . import guard, loop, mountapi
from .guard import abort_connection, alive, start_time
from .mountinfo import mount_entry, mount_owner, source_owner
from .ops import Filesystem
from .paths import open_parent, resolve
from .sealing import seal_mountpoint

__all__ = ["Mount", "check_mountpoint", "mount_options"]

log = logging.getLogger("fusefs")


def mount_options(fsname: str = "fusefs", options: Iterable[str] = ()) -> set[str]:
    """The option set `serve` mounts with.

    allow_other + default_permissions: every user sees the tree and the
    kernel enforces the mode bits (root excepted, see Filesystem.open).
    Nothing is needed for big transfers: libfuse 3.14 negotiates
    max_write = max_pages = 1 MiB with this kernel by default, and with
    direct_io a read of 1 MiB is one request (max_read is unlimited).
    """
    opts = set(pyfuse3.default_options)
    # The pid and its start time in the source let the next daemon tell a stale
    # mount from a live one by the mount table alone (see check_mountpoint).
    opts.update(("allow_other", "default_permissions", f"fsname={fsname}:{mount_owner()}"))
    opts.update(options)
    return opts


class Mount:
    """A filesystem mounted on *mountpoint*, from the mount to the unmount.

    From the mount on, the kernel holds every request (the lookup of a
    client's ``echo L > mnt/free`` included) until `serve` answers its INIT:
    a daemon mounts first and builds its tree afterwards, on the root it then
    hands to `Filesystem.replace_root`, so no request reaches the bare
    directory while it starts.  A stale mount that `check_mountpoint` left
    on *mountpoint* is replaced with no moment in between (mountapi.py);
    where the kernel cannot, it is detached just before mounting.
    *privileged* wraps the unmount: a daemon serving without capabilities
    raises the one unmount needs there.
    """

    def __init__(self, fs: Filesystem, mountpoint: str, *, options: Iterable[str] = (),
                 fsname: str = "fusefs",
                 privileged: Callable[[], ContextManager] = contextlib.nullcontext):
        self.fs, self.mountpoint = fs, os.fspath(mountpoint)
        self.privileged, self.served = privileged, False
        opts = mount_options(fsname, options)
        log.debug("mounting %s on %s with %s", fsname, self.mountpoint, ",".join(sorted(opts)))
        fuse = self._replace(self.mountpoint, opts)
        self.own_mount = fuse is not None
        try:
            pyfuse3.init(fs, f"/dev/fd/{fuse}" if self.own_mount else self.mountpoint, opts)
        except RuntimeError as e:
            # libfuse has printed its reason (bad mount point...) on stderr.
            raise OSError(errno.EIO, f"cannot mount on {self.mountpoint}: {e}",
                          self.mountpoint) from e
        mount = mount_entry(self.mountpoint)
        self.minor = mount[2] if mount is not None else None
        self.watchman = _start_guard(self.mountpoint, self.minor)

    @staticmethod
    def _replace(path: str, opts: set[str]) -> int | None:
        """Mount through the kernel's mount API, beneath a stale mount if there is
        one, then detach that: the /dev/fuse descriptor.  None where the kernel
        or the options do not allow it: the stale mount is then detached and
        libfuse mounts."""
        stale = mount_entry(path)
        if stale is not None and not _stale(path, stale[0], stale[1]):
            raise OSError(errno.EBUSY, f"{path} became a live mount point ({stale[0]} type "
                          f"{stale[1]}); not touching it", path)
        fuse, why = None, "options the mount API cannot express"
        if mountapi.supported(opts):
            parent, name = open_parent(path)  # the directory checked is the one mounted on
            try:
                fuse = mountapi.mount_fuse(name, opts, beneath=stale is not None,
                                           dir_fd=parent)
            except OSError as e:
                why = f"mount API: {e.strerror}"
            finally:
                os.close(parent)
        if fuse is None:
            log.log(logging.INFO if stale else logging.DEBUG, "%s: %s; mounting through "
                    "libfuse%s", path, why, ", after detaching the stale mount" if stale else "")
        if stale is not None:
            _lazy_unmount(path)
            if fuse is None:
                seal_mountpoint(path)
        return fuse

    def serve(self, *, on_ready: Optional[Callable[[], None]] = None,
              tasks: Iterable[Callable[[], Awaitable[None]]] = ()) -> None:
        """Answer requests until the filesystem is unmounted or a signal ends the loop.

        *on_ready()* is called once, when the kernel has completed the FUSE
        handshake (the mount is live). *tasks* are async callables run in the
        same nursery as the FUSE loop and cancelled when it ends.
        """
        self.served = True
        loop.run(self.fs, on_ready, tasks)

    def close(self) -> None:
        """Stop the guard and unmount (also when `serve` never ran)."""
        if self.watchman is not None:
            self.watchman.kill()
            self.watchman.wait()
        with self.privileged():
            if not self.fs.invalidator.stop():
                # The invalidation thread waits on a directory lock that a lookup
                # holds while it waits for the loop we just stopped: abort the
                # connection, or the process could never exit.
                mount = mount_entry(self.mountpoint)
                if mount is not None and abort_connection(mount[2]):
                    log.warning("aborted the FUSE connection to free a blocked invalidation")
            if self.own_mount:
                self._unmount_own()
            pyfuse3.close(unmount=not self.own_mount)
        # A start that failed before serving has said why: no second line.
        log.log(logging.INFO if self.served else logging.DEBUG, "unmounted %s", self.mountpoint)

    def _unmount_own(self) -> None:
        mount = mount_entry(self.mountpoint)
        if mount is None or mount[2] != self.minor:
            return  # unmounted already (fusermount3 -u), or covered: leave the rest alone
        try:
            mountapi.detach(self.mountpoint)
        except OSError as e:
            log.error("%s", e)


def _start_guard(mountpoint: str, minor: Optional[int]) -> Optional[subprocess.Popen]:
    """The guard process (guard.py): aborts our connection (fusectl *minor*) if
    we die stuck."""
    if minor is None:
        return None
    try:
        abort = guard.open_abort(minor)
    except OSError as e:
        log.warning("no guard for %s: fusectl: %s", mountpoint, e.strerror)
        return None
    pid = os.getpid()
    try:
        return subprocess.Popen([sys.executable, "-S", guard.__file__, str(pid), str(abort),
                                 str(start_time(pid))], stdin=subprocess.DEVNULL,
                                close_fds=True, pass_fds=(abort,))
    finally:
        os.close(abort)


def check_mountpoint(path: str) -> str:
    """Make *path* usable as a mountpoint and return it resolved, or refuse.

    Every check is made on the path with its symlinks resolved (`resolve`):
    the mount table names real paths, and the kernel mounts on the real one.
    The mount table says what is there without touching the filesystem (a
    call into a FUSE mount whose daemon died while the kernel waited on it
    can block forever; even statvfs):
    - a FUSE mount whose source names its daemon (``serve`` mounts as
      ``<fsname>:<pid>:<start time>``) is stale when that pid is dead, a
      zombie, or now another process (another start time): its connection
      is aborted through fusectl (which frees every process blocked on it,
      including a dying daemon stuck in an entry invalidation), with a log
      line;
    - any other FUSE mount is probed with statvfs: ENOTCONN means stale;
    - a live mount of anything raises OSError(EBUSY) naming it: another
      daemon's mount is never touched;
    - a stale mount is left for `Mount` to replace;
    - a missing directory is created; the bare directory is sealed
      (`seal_mountpoint`), so that nothing lands in it while no daemon serves.
    """
    given = os.fspath(path)
    path = resolve(given, trusted=True)
    shown = path if path == os.path.abspath(given) else f"{given} (= {path})"
    parent, name = open_parent(path, create=True)
    os.close(parent)
    mount = mount_entry(path)
    if mount is not None:
        source, fstype, minor = mount
        if not _stale(path, source, fstype):
            raise OSError(errno.EBUSY, f"{shown} is already a live mount point ({source} "
                          f"type {fstype}); not touching it", path)
        log.warning("%s: stale FUSE mount (%s, its daemon is gone), clearing it", shown, source)
        abort_connection(minor)
        return path  # Mount replaces it
    seal_mountpoint(path)
    return path


def _stale(path: str, source: str, fstype: str) -> bool:
    if not fstype.startswith("fuse"):
        return False
    owner = source_owner(source)
    if owner is not None:
        pid, start = owner
        return not alive(pid, start)
    try:
        os.statvfs(path)
        return False
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        return True


def _lazy_unmount(path: str) -> None:
    """Detach the mount on *path*: umount2 directly (no process to wait for: the
    next mount follows at once), fusermount3 where that is not permitted."""
    try:
        return mountapi.detach(path)
    except OSError:
        pass
    tool = shutil.which("fusermount3")
    argv = [tool, "-u", "-z", path] if tool else ["umount", "-l", path]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(errno.EBUSY, f"cannot clear the stale mount on {path}: "
                      f"{' '.join(argv)}: {done.stderr.strip()}", path)
