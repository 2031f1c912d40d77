"""A service that survives a reboot and its local users (issue 17): start-up after
a reboot, foreign files, mountpoints through symlinks, the hugepage record, two
daemons at once, state files only root reads."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from test_daemon import alloc, cmad, read

REPO = pathlib.Path(__file__).resolve().parent.parent


def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("root's directories and mounts")


# -- item 1: a reboot (a mount-namespace test: the host's /run is untouched) -------

REBOOT = """
set -u
# What a reboot loses: /run (a tmpfs) and the private hugetlbfs mount under it.
umount -l /run/cmad/hugetlbfs 2>/dev/null
umount -l /run/cmad/tmpfs 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /run || exit 97
{prepare}
"$PY" -m cmad.main --mountpoint "$MNT" --state-dir "$STATE" {args} 2>"$LOG" &
pid=$!
i=0
while [ ! -e "$MNT/allocators" ]; do
    kill -0 $pid 2>/dev/null || break
    i=$((i + 1)); [ $i -gt 600 ] && break
    sleep 0.05
done
[ -e "$MNT/allocators" ] && echo served
grep -o 'arena_file [^ ]*' "$MNT/stats" 2>/dev/null
echo "hugetlbfs-dir: $(stat -f -c %T /run/cmad/hugetlbfs 2>/dev/null) $(ls -A /run/cmad/hugetlbfs 2>/dev/null | tr '\\n' ' ')"
kill -INT $pid 2>/dev/null
wait $pid
echo "status=$?"
"""


def after_reboot(mnt: pathlib.Path, state: pathlib.Path, log: pathlib.Path, args: str,
                 prepare: str = "") -> str:
    """Start cmad in a private mount namespace whose /run is a fresh tmpfs, as
    after a reboot; serve, stop it with SIGINT; its stdout says what it saw."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    script = REBOOT.format(prepare=prepare, args=args)
    env = dict(os.environ, PY=sys.executable, MNT=str(mnt), STATE=str(state), LOG=str(log))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    if r.returncode == 97 or "unshare failed" in r.stderr:
        pytest.skip(f"no private mount namespace here: {r.stderr.strip()}")
    return r.stdout


def stopped_with_a_chunk(daemon, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """A daemon with a state dir, one chunk, stopped cleanly (arena kept)."""
    state = tmp_path / "state"
    mnt = daemon("--regions", "a=8M:bf", "--backing", "shm", "--state-dir", str(state))
    alloc(mnt, "@a 1M label=k")
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(timeout=30) == 0
    return mnt, state


def test_after_a_reboot_the_records_are_dropped_with_a_warning_and_it_serves(daemon,
                                                                            tmp_path):
    root_only()
    mnt, state = stopped_with_a_chunk(daemon, tmp_path)
    log = tmp_path / "reboot.log"
    out = after_reboot(mnt, state, log, "--regions a=8M:bf --backing shm")
    text = log.read_text()
    assert "served" in out and "status=0" in out, text
    assert "arena file is gone" in text and "dropping 1 recorded" in text, text
    assert "Traceback" not in text


def test_after_a_reboot_no_arena_lands_in_an_unmounted_hugetlbfs_directory(daemon,
                                                                           tmp_path):
    root_only()
    mnt, state = stopped_with_a_chunk(daemon, tmp_path)
    gone = "/run/cmad/hugetlbfs/cmad-lost-arena"
    db = sqlite3.connect(state / "journal.db")  # as a hugetlbfs arena had recorded it
    db.execute("UPDATE meta SET value=? WHERE key='arena_file'", (gone,))
    db.commit()
    db.close()
    log = tmp_path / "reboot.log"
    prepare = "mkdir -m 0700 /run/cmad /run/cmad/hugetlbfs"  # there, and nothing mounted on it
    out = after_reboot(mnt, state, log, "--regions a=8M:bf --backing shm", prepare)
    text = log.read_text()
    assert "served" in out and "status=0" in out, text
    line = next(line for line in out.splitlines() if line.startswith("hugetlbfs-dir:"))
    kind, *files = line.split()[1:]
    assert kind == "hugetlbfs" or not files, (line, text)
    arena = next(line for line in out.splitlines() if line.startswith("arena_file"))
    assert not arena.split()[1].startswith("/run/cmad/hugetlbfs/"), arena
