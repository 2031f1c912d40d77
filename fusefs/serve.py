"""Mounting and serving a Filesystem: the start-up and shut-down path.

pyfuse3 keeps one session per process, so `serve` runs one mount and
returns once it is unmounted again: after SIGTERM/SIGINT (which call
`pyfuse3.terminate`), after an external `fusermount3 -u`, or after an
error, always through `pyfuse3.close(unmount=True)`.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from typing import Awaitable, Callable, ContextManager, Iterable, Optional

import pyfuse3
import trio

from . import guard, mountapi
from .guard import abort_connection, alive, start_time
from .notify import invalidator
from .ops import Filesystem
from .pipe import end_waits

__all__ = ["Mount", "serve", "check_mountpoint", "resolve", "seal_mountpoint",
           "unseal_mountpoint", "mount_options", "mount_entry", "abort_connection"]

log = logging.getLogger("fusefs")

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602  # <linux/fs.h>, 64-bit
FS_IMMUTABLE_FL = 0x00000010


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


def mount_owner(pid: int | None = None) -> str:
    """``<pid>:<start time>`` of this process, as the mount source records it."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_time(pid)}"


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
        trio.run(_run, self.fs, on_ready, list(tasks))

    def close(self) -> None:
        """Stop the guard and unmount (also when `serve` never ran)."""
        if self.watchman is not None:
            self.watchman.kill()
            self.watchman.wait()
        with self.privileged():
            if not invalidator.stop():
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


async def _run(fs: Filesystem, on_ready, tasks) -> None:
    ready = trio.Event()
    fs.init_hooks.append(ready.set)
    invalidator.start(trio.lowlevel.current_trio_token())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_on_signals)
            for task in tasks:
                nursery.start_soon(task)
            if on_ready is not None:
                nursery.start_soon(_call_when_ready, ready, on_ready)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        fs.init_hooks.remove(ready.set)


async def _call_when_ready(ready: trio.Event, on_ready: Callable[[], None]) -> None:
    await ready.wait()
    on_ready()


async def _terminate_on_signals() -> None:
    # Keeps receiving until the loop ends (this task is then cancelled), so
    # a second signal during shutdown cannot kill us before the unmount.
    terminated = False
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # A daemon may block them while it starts (cmad/main.py): ours from now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
        async for signum in signals:
            name = signal.Signals(signum).name
            if terminated:
                log.info("%s received, already unmounting", name)
                continue
            log.info("%s received, unmounting", name)
            terminated = True
            end_waits()             # a trace_pipe reader must not hold the stop up
            pyfuse3.terminate()


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
    owner = _source_owner(source)
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


def resolve(path: str, *, trusted: bool = False) -> str:
    """*path* absolute with every symlink resolved, like os.path.realpath, but
    never looking into a mount point (a mount point is never a symlink, and a
    dead daemon's mount can block whoever touches it).

    With *trusted*, every symlink followed must be one only we (root, or the
    caller's uid) could have put there (`check_trusted`): else EPERM, the way
    fusermount3 and systemd's mount units refuse user-controlled paths.
    """
    mounts = mount_points()
    pending = [p for p in os.path.join(os.getcwd(), os.fspath(path)).split("/") if p]
    done, links = "/", 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            done = os.path.dirname(done)
            continue
        candidate = os.path.join(done, part)
        target = None if candidate in mounts else _readlink(candidate)
        if target is None:
            done = candidate
            continue
        links += 1
        if links > 40:
            raise OSError(errno.ELOOP, f"{path}: too many levels of symbolic links", path)
        if trusted:
            check_trusted(candidate, os.lstat(candidate), f"{path}: symlink {candidate}")
            check_trusted(done, os.stat(done), f"{path}: {done}, holding symlink {candidate},",
                          lookup=True)
        if target.startswith("/"):
            done = "/"
        pending[:0] = [p for p in target.split("/") if p]
    return done


def trusted_uids() -> set[int]:
    """Who may own what a mountpoint path goes through: root, and the caller."""
    return {0, os.geteuid()}


def check_trusted(path: str, st: os.stat_result, what: str, *, lookup: bool = False) -> None:
    """EPERM unless *st* (of *path*) belongs to a trusted uid and, as a directory a
    name is looked up in (*lookup*), only its owner can change its entries (not
    writable by group or others, or sticky: then each entry is its owner's)."""
    if st.st_uid not in trusted_uids():
        raise _refusal(path, f"{what} belongs to uid {st.st_uid}, not root: a mountpoint "
                             "is refused when another user could change where it leads "
                             "(choose a path only root controls)")
    if lookup and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise _refusal(path, f"{what} is writable by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):o}), not only by root: a mountpoint "
                             "is refused when another user could change where it leads")


def _refusal(path: str, why: str) -> OSError:
    e = OSError(errno.EPERM, why, path)
    e.why = why
    return e


def open_parent(path: str, *, create: bool = False) -> tuple[int, str]:
    """An O_PATH descriptor on the directory holding the resolved *path*, and the
    last component's name, found component by component with no symlink
    followed, every component checked (`check_trusted`); with *create*, missing
    components are made (mode 0755) on the way.  Whatever acts on the
    mountpoint then acts through this descriptor: what was checked is what is
    mounted on, however the path changes meanwhile."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise OSError(errno.EINVAL, "/ cannot be the mountpoint", path)
    mounts = mount_points()
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    done = "/"
    try:
        check_trusted(done, os.fstat(fd), "/", lookup=True)
        for i, part in enumerate(parts):
            here = os.path.join(done, part)
            last = i == len(parts) - 1
            if last and here in mounts:  # never touched: its daemon may be dead
                return fd, part
            try:
                child = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refusal(path, f"{path}: {here} is not a directory (a symlink "
                                         "changed since it was resolved?)") from None
                raise
            try:
                check_trusted(here, os.fstat(child), f"{path}: {here}", lookup=not last)
            except OSError:
                os.close(child)
                raise
            if last:
                os.close(child)
                return fd, part
            os.close(fd)
            fd, done = child, here
    except BaseException:
        os.close(fd)
        raise
    raise AssertionError("unreachable")


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # not a link, or not there (created later, as a directory)
        return None


def seal_mountpoint(path: str) -> bool:
    """Make the bare directory under the mount immutable (FS_IOC_SETFLAGS).

    Without a mount on it, ``echo L > mnt/free`` would create a plain file
    there and exit 0: an immutable directory refuses that, to root too, with
    EPERM, and can still be mounted on.  The flag stays after the daemon
    stops (``chattr -i`` removes it).  Where the filesystem or the missing
    CAP_LINUX_IMMUTABLE does not allow it, a warning says so.
    """
    try:
        fd = _open_checked(path)
    except OSError as e:
        log.warning("%s: cannot open the mountpoint to seal it: %s", path,
                    getattr(e, "why", None) or e.strerror)
        return False
    leftovers = sorted(os.listdir(fd))
    if leftovers:
        log.warning("%s holds %s: while no daemon serves it, writes to these files succeed "
                    "silently; remove them", path, ", ".join(leftovers[:8]) +
                    (", ..." if len(leftovers) > 8 else ""))
    try:
        _set_immutable(fd, True)
        return True
    except OSError as e:
        log.warning("%s: cannot make the mountpoint immutable (%s): while no daemon serves "
                    "it, a write to alloc or free creates a plain file there and succeeds",
                    path, e.strerror)
        return False
    finally:
        os.close(fd)


def unseal_mountpoint(path: str) -> None:
    """Clear the immutable flag `seal_mountpoint` set (so the directory can go)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _set_immutable(fd, False)
    finally:
        os.close(fd)


def _open_checked(path: str) -> int:
    """The mountpoint directory itself, opened through its checked parent with no
    symlink followed (`open_parent`)."""
    parent, name = open_parent(path)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=parent)
    finally:
        os.close(parent)


def _set_immutable(fd: int, on: bool) -> None:
    """Set or clear FS_IMMUTABLE_FL on the open directory *fd*, if it differs."""
    flags = array.array("i", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
    if bool(flags[0] & FS_IMMUTABLE_FL) != on:
        flags[0] ^= FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)


def mount_entry(path: str) -> tuple[str, str, int] | None:
    """(source, fstype, device minor) of the topmost mount on *path*, or None."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) >= 5 and len(tail) >= 2 and _unescape(fields[4]) == path:
                    found = (_unescape(tail[1]), tail[0], int(fields[2].split(":")[1]))
    except OSError:
        pass
    return found


def mount_points() -> set[str]:
    """Every mount point in the mount table."""
    try:
        with open("/proc/self/mountinfo") as f:
            return {_unescape(line.split()[4]) for line in f if len(line.split()) > 4}
    except OSError:
        return set()


def _source_owner(source: str) -> tuple[int, int | None] | None:
    """(pid, start time) from ``<fsname>:<pid>:<start>``; (pid, None) from the
    ``<fsname>:<pid>`` of daemons before start times were recorded."""
    name, colon, last = source.rpartition(":")
    if not (colon and name and last.isdigit()):
        return None
    older, colon, pid = name.rpartition(":")
    if colon and older and pid.isdigit():
        return int(pid), int(last)
    return int(last), None


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


def _unescape(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
