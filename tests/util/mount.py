"""Helpers for tests against a real FUSE mount (any fusefs daemon).

pyfuse3 keeps one session per process, so each mount runs in its own
subprocess:

    from util.mount import mounted           # `fuse`: a fixture in conftest
    pytestmark = pytest.mark.usefixtures("fuse")

    with mounted([sys.executable, "daemon.py", str(mnt)], mnt) as proc:
        ...                                  # always unmounted afterwards

Without FUSE, tests using the `fuse` fixture (or calling `require_fuse`)
skip with the reason; with CMAD_REQUIRE_FUSE=1 in the environment (CI) they
fail instead.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

REQUIRE_ENV = "CMAD_REQUIRE_FUSE"


class MountError(AssertionError):
    """The daemon did not mount (an AssertionError, so pytest reports it as
    a failure with the daemon's stderr)."""


def fuse_available():
    """(True, "") if this process can mount FUSE filesystems, else
    (False, reason)."""
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return False, "fusermount3 is not installed"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        return False, f"pyfuse3 cannot be imported: {e}"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return False, f"cannot open /dev/fuse: {e.strerror}"
    if os.geteuid() != 0:
        try:
            with open("/etc/fuse.conf") as f:
                allowed = any(line.strip() == "user_allow_other" for line in f)
        except OSError:
            allowed = False
        if not allowed:
            return False, "not root and /etc/fuse.conf lacks user_allow_other"
    return True, ""


def require_fuse():
    """Skip the calling test without FUSE, or fail under CMAD_REQUIRE_FUSE=1."""
    ok, why = fuse_available()
    if ok:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"FUSE is required ({REQUIRE_ENV}=1) but unavailable: {why}",
                    pytrace=False)
    pytest.skip(f"FUSE unavailable: {why}")


def is_mounted(path):
    """Whether *path* is a mount point per the mount table (true for a stale
    FUSE mount too, where os.path.ismount fails with ENOTCONN)."""
    from fusefs.mountinfo import mount_entry
    return mount_entry(os.path.abspath(path)) is not None


def daemon_stderr(proc):
    """What the daemon started by `mounted` wrote to stderr so far."""
    path = getattr(proc, "stderr_path", None)
    if path is None:
        return ""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def wait_for_mount(proc, path, timeout=30):
    """Poll until *path* is mounted; fail fast, with the daemon's stderr,
    if the process dies or *timeout* seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise MountError(f"daemon exited with {proc.returncode} before mounting "
                             f"{path}; stderr:\n{daemon_stderr(proc)}")
        if os.path.ismount(path):
            return
        if time.monotonic() > deadline:
            raise MountError(f"{path} not mounted after {timeout}s; stderr:\n"
                             f"{daemon_stderr(proc)}")
        time.sleep(0.02)


def lazy_unmount(path):
    subprocess.run(["fusermount3", "-u", "-z", path], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def cleanup(proc, path, timeout=10):
    """Stop the daemon and make sure *path* is unmounted: SIGTERM and wait,
    SIGKILL if still running, then, if still mounted, abort the FUSE
    connection (so nothing stays blocked on it) and unmount lazily."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
    if is_mounted(path):
        # A daemon killed while the kernel waited on it can hang everyone that
        # touches the mount (itself included): abort the connection first.
        from fusefs.guard import abort_connection
        from fusefs.mountinfo import mount_entry
        mount = mount_entry(os.path.abspath(path))
        if mount is not None and mount[1].startswith("fuse"):
            abort_connection(mount[2])
        lazy_unmount(path)
    proc.wait()
    unseal(path)


def unseal(path):
    """Clear the immutable flag a daemon leaves on its bare mountpoint, so the
    directory can be removed (fusefs.sealing.seal_mountpoint)."""
    from fusefs.sealing import unseal_mountpoint
    if os.path.isdir(path) and not is_mounted(path):
        with contextlib.suppress(OSError):
            unseal_mountpoint(path)


@contextlib.contextmanager
def mounted(argv, mountpoint, env=None, timeout=30):
    """Start the daemon *argv* (which mounts on *mountpoint*), wait for the
    mount, yield the Popen, and always clean up, on failure too.

    *env* entries are added to this process's environment. The daemon's
    stderr goes to a file (`daemon_stderr(proc)` reads it) and is echoed
    to stderr at the end, so a failing test shows it.
    """
    mountpoint = os.fspath(mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    if is_mounted(mountpoint):
        # wait_for_mount could not tell the new mount from the old one.
        raise MountError(f"{mountpoint} is already mounted")
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    errfile = tempfile.NamedTemporaryFile(prefix="daemon-", suffix=".stderr", delete=False)
    proc = subprocess.Popen([os.fspath(a) for a in argv], stdin=subprocess.DEVNULL,
                            stdout=errfile, stderr=errfile, env=full_env)
    proc.stderr_path = errfile.name
    errfile.close()
    try:
        wait_for_mount(proc, mountpoint, timeout)
        yield proc
    finally:
        cleanup(proc, mountpoint)
        text = daemon_stderr(proc)
        if text:
            sys.stderr.write(f"---- stderr of {' '.join(map(str, argv))} ----\n{text}")
        with contextlib.suppress(OSError):
            os.unlink(proc.stderr_path)
