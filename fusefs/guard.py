"""The guard: a watchman process that aborts a FUSE connection when its daemon dies.

A daemon killed (SIGKILL, the OOM killer) while one of its threads waits in
the kernel to invalidate a directory entry cannot finish exiting: the
invalidation waits for the directory's lock, held by a lookup that waits for
the dead daemon's answer.  Its /dev/fuse descriptor stays open, so the kernel
never aborts the connection, and every process that touches the mount hangs
in uninterruptible sleep, the dying daemon and its restart included.

The guard holds nothing of the mount.  It polls the daemon and, once it is
gone or a zombie, aborts the connection through fusectl, which fails every
waiting request and lets everyone go.  Run as a script (stdlib only, no
package import), so starting it is cheap:
``python guard.py <daemon-pid> <abort-file-fd> [<daemon start time>]``.
"""

import os
import signal
import subprocess
import sys
import time

FUSECTL = "/sys/fs/fuse/connections"


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on: the name may hold spaces and ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When *pid* started, in clock ticks since boot (field 22): with the pid it
    names one process, whatever process holds the pid later."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, start: int | None = None) -> bool:
    """Whether *pid* runs (a zombie does not: it may be stuck exiting) and, given
    *start*, is still the process that started then."""
    fields = _stat_fields(pid)
    if not fields or fields[0] == "Z":
        return False
    return start is None or int(fields[19]) == start


def _abort_file(minor: int) -> str:
    if os.path.isdir(FUSECTL) and not os.listdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    return os.path.join(FUSECTL, str(minor), "abort")


def abort_connection(minor: int) -> bool:
    """Abort FUSE connection *minor* (fusectl): every request waiting on it fails."""
    try:
        with open(_abort_file(minor), "w") as f:
            f.write("1")
        return True
    except OSError:
        return False  # gone already: the kernel aborted it when the daemon's fd closed


def open_abort(minor: int) -> int:
    """A descriptor on connection *minor*'s abort file, for `main` to hold."""
    return os.open(_abort_file(minor), os.O_WRONLY | os.O_CLOEXEC)


def drop_capabilities() -> None:
    """Hold nothing: the guard only reads /proc/<pid>/stat and writes to the abort
    file the daemon opened for it, neither of which needs a capability.  It keeps
    uid 0 so that the daemon, which serves with no capability effective, may
    still signal it at stop.  no_new_privs, an empty bounding set, then empty
    effective, permitted and inheritable sets (libc through ctypes: stdlib only)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_capbset_drop, pr_cap_ambient = 38, 24, 47
    libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0)
    libc.prctl(pr_cap_ambient, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        libc.prctl(pr_capbset_drop, ctypes.c_ulong(cap), 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, self
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: twice, all zero
    libc.capset(header, data)


def main(pid: int, abort: int, start: int | None = None, interval: float = 0.2) -> None:
    """Abort the connection through *abort* once *pid* is gone.

    The daemon opens the abort file right after mounting, while the
    connection is its own, and hands the descriptor over: a connection made
    later with the same minor (the next daemon's, mounted while this guard
    still polls) has another file, and writing to this one once its
    connection is gone does nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the daemon to handle
    drop_capabilities()
    while alive(pid, start):
        time.sleep(interval)
    try:
        os.write(abort, b"1")
    except OSError:
        pass


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
