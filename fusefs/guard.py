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
``python guard.py <daemon-pid> <connection-minor>``.
"""

import os
import signal
import subprocess
import sys
import time

FUSECTL = "/sys/fs/fuse/connections"


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie does not: it may be stuck exiting)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def abort_connection(minor: int) -> bool:
    """Abort FUSE connection *minor* (fusectl): every request waiting on it fails."""
    if not os.path.isdir(FUSECTL):
        return False
    if not os.listdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    try:
        with open(os.path.join(FUSECTL, str(minor), "abort"), "w") as f:
            f.write("1")
        return True
    except OSError:
        return False  # gone already: the kernel aborted it when the daemon's fd closed


def main(pid: int, minor: int, interval: float = 0.2) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the daemon to handle
    while alive(pid):
        time.sleep(interval)
    abort_connection(minor)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
