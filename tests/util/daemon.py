"""cmad daemons for one test (the ``daemon`` fixture in conftest): each on a temporary
mountpoint, always unmounted after, their arena files and hugepages given back."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from cmad.daemon.config import Config
from cmad.memory.hugepages import escaped_name, give_back_record, record_key, release_mount
from cmad.daemon.assembly import arena_paths
from cmad.memory.shared import files_of, release_mounts
from util.mount import MountError, cleanup, daemon_stderr, mounted

#: A client writing ``x`` to ``free`` and ``alloc`` in a loop until the file
#: ``argv[2]`` exists; prints a JSON object counting ``ok`` and each failure
#: as ``open:<ERRNO>`` or ``write:<ERRNO>`` (``open:EPERM``: the sealed bare
#: mountpoint).  ``x`` is no chunk and no request, so a live daemon refuses
#: every write: ``ok`` counts false successes only.
RESTART_WRITER = """
import errno, json, os, sys
mnt, stop = sys.argv[1], sys.argv[2]
counts = {}
def count(key):
    counts[key] = counts.get(key, 0) + 1
while not os.path.exists(stop):
    for name in ("free", "alloc"):
        try:
            fd = os.open(os.path.join(mnt, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            count("open:" + errno.errorcode[e.errno])
            continue
        try:
            os.write(fd, b"x\\n")
            count("ok")
        except OSError as e:
            count("write:" + errno.errorcode[e.errno])
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
print(json.dumps(counts))
"""


def ready(mnt: pathlib.Path) -> bool:
    """Mounted by a live daemon (a stale mount answers ENOTCONN) and showing the tree."""
    try:
        os.statvfs(mnt)
        return os.path.ismount(mnt) and (mnt / "allocators").exists()
    except OSError:
        return False


class Daemons:
    """Start cmad daemons for one test; each call returns its mountpoint."""

    def __init__(self, tmp_path: pathlib.Path, stack: contextlib.ExitStack):
        self.tmp_path = tmp_path
        self.stack = stack
        self.count = 0
        self.proc = None
        self.arenas: set[str] = set()
        self.records: set[str] = set()
        self.names: set[str] = set()  # arena names: their shared region files go too
        stack.callback(self.remove_arenas)  # runs last, once every daemon has stopped

    def argv(self, mnt: pathlib.Path, args) -> list[str]:
        state = args[list(args).index("--state-dir") + 1] if "--state-dir" in args else None
        self.arenas.update(arena_paths(Config(mountpoint=str(mnt))))
        self.arenas.update(arena_paths(Config(mountpoint=str(mnt), state_dir=state)))
        self.records.add(record_key(state, str(mnt)) or "")
        self.records.add(record_key(None, str(mnt)) or "")
        self.arenas.add(os.path.join("/run/cmad/hugetlbfs", escaped_name(str(mnt), state)))
        self.names.update({escaped_name(str(mnt), state), escaped_name(str(mnt))})
        if "--contiguous" not in args:  # the layout search only where a test asks for it
            args = (*args, "--contiguous", "virtual")
        return [sys.executable, "-m", "cmad.daemon.main", "--mountpoint", str(mnt), *args]

    def remove_arenas(self) -> None:
        """A persistent daemon keeps its arena file while chunks live: not after a test."""
        for path in self.arenas | {p for name in self.names for p in files_of(name)}:
            if os.path.lexists(path):
                os.unlink(path)
        for record in self.records:  # a killed daemon's hugepages go back to the pool
            give_back_record(record or None)
        release_mount()
        release_mounts()

    def __call__(self, *args: str, env: dict | None = None, mountpoint=None) -> pathlib.Path:
        self.count += 1
        mnt = pathlib.Path(mountpoint or self.tmp_path / f"mnt{self.count}")
        self.proc = self.stack.enter_context(mounted(self.argv(mnt, args), mnt, env=env))
        return mnt

    def crash_and_restart(self, mnt: pathlib.Path, *args: str, timeout: float = 30) -> None:
        """kill -9 the daemon (leaving a stale mount) and start a new one on ``mnt``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        errfile = tempfile.NamedTemporaryFile(prefix="daemon-", suffix=".stderr",
                                              delete=False)
        proc = subprocess.Popen(self.argv(mnt, args), stdin=subprocess.DEVNULL,
                                stdout=errfile, stderr=errfile)
        proc.stderr_path = errfile.name
        errfile.close()
        self.stack.callback(_unlink, errfile.name)  # after the cleanup below (LIFO)
        self.stack.callback(cleanup, proc, os.fspath(mnt))
        self.proc = proc
        deadline = time.monotonic() + timeout
        while not ready(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MountError(f"restart on {mnt} failed: {daemon_stderr(proc)}")
            time.sleep(0.02)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)



def cmad(*args: str) -> subprocess.CompletedProcess:
    """``python -m cmad.daemon.main ARGS`` to its end, its output captured."""
    return subprocess.run([sys.executable, "-m", "cmad.daemon.main", *args], capture_output=True,
                          text=True, timeout=60)


def cmad_check(state) -> subprocess.CompletedProcess:
    """``cmad check`` on a state directory."""
    return cmad("check", "--state-dir", str(state))


def shm_arena(daemon: Daemons, tmp_path) -> tuple[str, str]:
    """An arena file in /dev/shm, removed after the test: these tests are about the
    journal, and must not depend on the hugepages other tests hold."""
    path = f"/dev/shm/cmad-test-{tmp_path.name}-{os.getpid()}"
    daemon.arenas.add(path)
    return "--arena-file", path
