"""Permissions for real users: two throwaway users, one in the cma group, one not."""

import os
import subprocess


from util.files import alloc, read
from util.users import as_user

M = 1 << 20


def put(user: str, path, text: str) -> str:
    """Write text with dd as user: '' on success, else dd's error message."""
    r = as_user(user, f"printf %s '{text}' | dd of={path} conv=notrunc status=none")
    return r.stderr.strip()


def test_modes_for_real_users(public_tmp, users, daemon):
    group, member, outsider = users
    mnt = daemon("--group", group, mountpoint=public_tmp / "mnt")
    assert put(member, mnt / "alloc", "camera 1M label=mine") == ""
    assert "Permission denied" in put(outsider, mnt / "alloc", "camera 1M label=theirs")
    assert "Permission denied" in as_user(outsider, f"cat {mnt}/alloc").stderr
    for root_only in ("map", "regions/video/alloc"):
        assert "Permission denied" in put(member, mnt / root_only, "x=video")
    assert read(mnt / "map").startswith("camera")  # unchanged
    uid = int(subprocess.check_output(["id", "-u", member]))
    data = os.stat(mnt / "chunks/mine/data")
    assert (data.st_uid, data.st_mode & 0o777) == (uid, 0o600)
    assert as_user(member, f"printf hi | dd of={mnt}/chunks/mine/data conv=notrunc "
                           "status=none").returncode == 0
    assert "Permission denied" in as_user(outsider, f"cat {mnt}/chunks/mine/data").stderr
    assert (mnt / "chunks/mine/data").read_bytes()[:2] == b"hi"  # root reads anything
    assert as_user(outsider, f"cat {mnt}/chunks/mine/size").stdout == f"{M}\n"
    assert "Permission denied" in as_user(member, f"cat {mnt}/chunks/mine/mmap").stderr
    assert as_user(outsider, f"cat {mnt}/regions/video/free").returncode == 0
    owner = read(mnt / "chunks/mine/owner").split()
    assert owner[0] == str(uid)


def test_freeing_another_users_chunk_is_eperm(public_tmp, users, daemon):
    group, member, outsider = users
    mnt = daemon("--group", group, mountpoint=public_tmp / "mnt")
    alloc(mnt, "camera 1M label=roots")
    assert "Operation not permitted" in put(member, mnt / "free", "roots")
    assert (mnt / "chunks/roots").exists()
    assert put(member, mnt / "alloc", "camera 1M label=mine") == ""
    assert put(member, mnt / "free", "mine") == ""
    assert subprocess.run(["sh", "-c", f"echo roots > {mnt}/free"]).returncode == 0


def test_per_uid_limit_is_edquot(public_tmp, users, daemon):
    group, member, outsider = users
    uid = int(subprocess.check_output(["id", "-u", member]))
    config = public_tmp / "cmad.toml"
    config.write_text(f'group = "{group}"\n[limits]\n"{uid}" = "2M"\n')
    mnt = daemon("--config", str(config), mountpoint=public_tmp / "mnt")
    assert put(member, mnt / "alloc", "camera 1M") == ""
    assert "Disk quota exceeded" in put(member, mnt / "alloc", "camera 2M")
    assert put(member, mnt / "alloc", "camera 1M") == ""
    alloc(mnt, "camera 8M")  # root has no limit


def test_missing_group_means_root_only(public_tmp, daemon):
    mnt = daemon("--group", "no-such-group-cmad", mountpoint=public_tmp / "mnt")
    assert os.stat(mnt / "alloc").st_gid == 0
    with open(daemon.proc.stderr_path) as f:
        assert "group 'no-such-group-cmad' does not exist" in f.read()
