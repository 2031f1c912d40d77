"""Tier 3: the demo tree (fusefs_demo.py) on a real FUSE mount."""

import errno
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import fusefs
from util.mount import MountError, daemon_stderr, is_mounted, mounted, require_fuse

pytestmark = pytest.mark.usefixtures("fuse")

DEMO = Path(__file__).with_name("fusefs_demo.py")
MANY = 20_000


def demo_argv(mnt, *extra):
    return [sys.executable, str(DEMO), str(mnt), *extra]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo daemon for the module: .path (the mountpoint), .proc."""
    require_fuse()
    path = tmp_path_factory.mktemp("fusefs") / "mnt"
    with mounted(demo_argv(path, "--many", str(MANY)), path) as proc:
        yield SimpleNamespace(path=path, proc=proc)


@pytest.fixture
def mnt(demo):
    return demo.path


@pytest.fixture
def log_of(demo):
    return lambda: daemon_stderr(demo.proc)


def sh(cmd, **kw):
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30, **kw)


def test_ls_shows_modes_and_sysfs_sizes(mnt):
    out = sh(f"ls -l {mnt}").stdout
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line
             for line in out.splitlines()[1:]}
    assert lines["rw"].startswith("-rw-r--r-- ") and " 4096 " in lines["rw"]
    assert lines["ro"].startswith("-r--r--r-- ") and " 4096 " in lines["ro"]
    assert lines["wo"].startswith("--w------- ") and " 4096 " in lines["wo"]
    assert lines["link"].startswith("lrwxrwxrwx ") and lines["link"].endswith("link -> rw")
    assert lines["many"].startswith("drwxr-xr-x ")
    assert " 4194304 " in lines["bytes"]
    st = os.stat(mnt / "ro")
    assert (stat.S_IMODE(st.st_mode), st.st_size, st.st_uid) == (0o444, 4096, 0)
    # Reading a 4096-byte attribute that holds fewer bytes leaves st_size alone.
    (mnt / "ro").read_bytes()
    assert os.stat(mnt / "ro").st_size == 4096


def test_cat_ends_with_newline_and_follows_links(mnt):
    assert sh(f"cat {mnt}/ro").stdout == "read only\n"
    assert sh(f"cat {mnt}/link").stdout == sh(f"cat {mnt}/rw").stdout
    assert os.readlink(mnt / "link") == "rw"


def test_echo_into_rw_attr_and_caller(mnt):
    r = sh(f"echo changed > {mnt}/rw")
    assert r.returncode == 0, r.stderr
    assert (mnt / "rw").read_text() == "changed\n"
    assert os.readlink(mnt / "dynlink") == "changed"
    uid, gid, pid = map(int, (mnt / "caller").read_text().split())
    assert (uid, gid) == (os.getuid(), os.getgid()) and pid > 0
    fd = os.open(mnt / "rw", os.O_WRONLY)
    try:
        assert os.write(fd, b"direct") == 6       # no newline needed
    finally:
        os.close(fd)
    assert (mnt / "rw").read_text() == "direct\n"
    assert (mnt / "caller").read_text().split()[2] == str(os.getpid())


def test_read_only_and_write_only_refuse_even_root(mnt):
    assert os.geteuid() == 0
    for path, flags in ((mnt / "ro", os.O_WRONLY), (mnt / "ro", os.O_RDWR),
                        (mnt / "wo", os.O_RDONLY)):
        with pytest.raises(PermissionError) as info:
            os.open(path, flags)
        assert info.value.errno == errno.EACCES
    r = sh(f"echo x > {mnt}/ro")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = sh(f"cat {mnt}/wo")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert sh(f"echo secret > {mnt}/wo").returncode == 0
    assert (mnt / "wo_last").read_text() == "secret\n"


def test_chmod_chown_create_unlink_refused(mnt):
    for call, code in ((lambda: os.chmod(mnt / "rw", 0o666), errno.EPERM),
                       (lambda: os.chown(mnt / "rw", 1, 1), errno.EPERM),
                       (lambda: open(mnt / "newfile", "w"), errno.EACCES),
                       (lambda: os.unlink(mnt / "rw"), errno.EPERM),
                       (lambda: os.mkdir(mnt / "d"), errno.EPERM)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == code
    assert stat.S_IMODE(os.stat(mnt / "rw").st_mode) == 0o644


def test_stream_answers_on_the_same_fd(mnt):
    fd = os.open(mnt / "echo", os.O_RDWR)
    try:
        assert os.write(fd, b"camera 6M\n") == 10
        assert os.read(fd, 4096) == b"CAMERA 6M\n"      # no seek in between
        assert os.read(fd, 4096) == b""
        os.write(fd, b"a\n")
        os.write(fd, b"b\n")
        assert os.read(fd, 4096) == b"A\nB\n"
        with pytest.raises(OSError) as info:
            os.write(fd, b"\n")                         # the stream's EINVAL
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_dd_bytes_in_and_out(mnt, tmp_path):
    src, back = tmp_path / "src", tmp_path / "back"
    src.write_bytes(os.urandom(4 << 20))
    r = sh(f"dd if={src} of={mnt}/bytes bs=1M status=none")   # O_TRUNC truncates nothing
    assert r.returncode == 0, r.stderr
    assert os.stat(mnt / "bytes").st_size == 4 << 20
    r = sh(f"dd if={mnt}/bytes of={back} bs=1M status=none")
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()


def test_bytes_end_of_device(mnt):
    size = 4 << 20
    fd = os.open(mnt / "bytes", os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x", size)
        assert info.value.errno == errno.ENOSPC
        assert os.pwrite(fd, b"abcd", size - 2) == 2        # cut short
        assert os.pread(fd, 10, size - 2) == b"ab"
        assert os.pread(fd, 10, size) == b""
    finally:
        os.close(fd)
    r = sh(f"printf xyz | dd of={mnt}/bytes bs=1 seek={size} conv=notrunc status=none")
    assert r.returncode != 0 and "No space left on device" in r.stderr


def test_store_errors_and_daemon_survives(mnt, log_of):
    def write(name, data=b"x\n"):
        fd = os.open(mnt / "fail" / name, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as info:
                os.write(fd, data)
            return info.value.errno
        finally:
            os.close(fd)

    assert write("oserror", b"garbage\n") == errno.EINVAL
    assert write("eperm") == errno.EPERM
    assert write("crash") == errno.EIO
    with pytest.raises(OSError) as info:
        (mnt / "fail" / "badshow").read_bytes()
    assert info.value.errno == errno.EIO
    assert write("oserror", b"\xff\n") == errno.EINVAL          # bad UTF-8
    assert write("oserror", b"x" * 8192) == errno.EINVAL         # more than 4096
    # Still serving.
    assert (mnt / "ro").read_text() == "read only\n"
    deadline = time.monotonic() + 5
    while "badshow" not in log_of() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = log_of()
    assert "INFO write /fail/oserror: EINVAL: cannot parse 'garbage'" in log
    assert "WARNING write /fail/eperm: EPERM: not yours" in log
    assert "ERROR write /fail/crash: unexpected error, answering EIO" in log
    assert "RuntimeError: a bug in a store" in log and "Traceback" in log
    assert "INFO write /fail/oserror: EINVAL: write of 8192 bytes, more than 4096" in log


def test_listing_20000_entries(mnt):
    names = os.listdir(mnt / "many")
    assert len(names) == MANY
    assert set(names) == {f"e{i:05d}" for i in range(MANY)}
    assert (mnt / "many" / "e12345").read_text() == "12345\n"


def test_tasks_run_beside_the_fuse_loop(mnt):
    first = int((mnt / "ticks").read_text())
    time.sleep(0.1)
    assert int((mnt / "ticks").read_text()) > first


def test_lazy_dir_populates_on_first_look(mnt):
    assert (mnt / "populations").read_text() == "0\n"
    assert os.path.isdir(mnt / "lazy")
    assert (mnt / "populations").read_text() == "0\n"
    assert sorted(os.listdir(mnt / "lazy")) == ["a", "b"]
    assert (mnt / "lazy" / "a").read_text() == "a\n"
    assert (mnt / "populations").read_text() == "1\n"


def test_removed_entry_is_gone_at_once(mnt):
    ctl = mnt / "ctl"
    for round_ in range(20):
        name = f"n{round_}"
        ctl.write_text(f"add {name}\n")
        assert (mnt / "dyn" / name).read_text() == f"{name}\n"   # now cached
        assert name in os.listdir(mnt / "dyn")
        ctl.write_text(f"rm {name}\n")
        # Entries are cached for minutes, but the write returned only after
        # the kernel dropped this one.
        assert not os.path.exists(mnt / "dyn" / name)
        assert name not in os.listdir(mnt / "dyn")
    with pytest.raises(FileNotFoundError):
        ctl.write_text("rm n0\n")


def test_check_mountpoint_refuses_a_live_mount(mnt):
    with pytest.raises(OSError) as info:
        fusefs.check_mountpoint(mnt)
    assert info.value.errno == errno.EBUSY
    assert str(mnt) in str(info.value) and "fusefs-demo" in str(info.value)
    assert os.path.ismount(mnt)                                  # untouched


def test_second_daemon_refuses_a_live_mount(mnt):
    r = subprocess.run(demo_argv(mnt, "--many", "1"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert re.search(rf"{re.escape(str(mnt))} is already a live mount point "
                     r"\(fusefs-demo:\d+:\d+ type fuse\)", r.stderr)
    assert (mnt / "ro").read_text() == "read only\n"           # still ours


def test_mounted_fails_fast_with_the_daemons_stderr(tmp_path):
    # "exited ... before mounting", not "not mounted after 30s": it did not wait
    with pytest.raises(MountError, match="exited with 3 before mounting(.|\n)*no luck today"):
        with mounted([sys.executable, "-c", "import sys; sys.stderr.write('no luck today'); sys.exit(3)"],
                     tmp_path / "mnt"):
            pass


def test_sigterm_unmounts_cleanly(tmp_path):
    path = tmp_path / "mnt"
    with mounted(demo_argv(path, "--many", "10"), path) as proc:
        assert (path / "ro").read_text() == "read only\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, daemon_stderr(proc)
        assert not is_mounted(path)
        assert "SIGTERM received, unmounting" in daemon_stderr(proc)


def test_stale_mount_is_cleared(tmp_path):
    path = tmp_path / "mnt"
    with mounted(demo_argv(path, "--many", "10"), path) as proc:
        os.stat(path / "ro")
        proc.kill()
        proc.wait(10)
        assert is_mounted(path)
        with pytest.raises(OSError) as info:
            os.statvfs(path)
        assert info.value.errno == errno.ENOTCONN
        assert fusefs.check_mountpoint(path) == str(path)  # stale: left to be replaced
        # A new daemon replaces it in place: one mount, never the bare directory.
        again = subprocess.Popen(demo_argv(path, "--many", "10"), stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while again.poll() is None and time.monotonic() < deadline:
                try:
                    if (path / "ro").read_text() == "read only\n":
                        break
                except OSError as e:
                    assert e.errno == errno.ENOTCONN
                time.sleep(0.02)
            assert (path / "ro").read_text() == "read only\n"
            with open("/proc/self/mountinfo") as f:
                assert sum(line.split()[4] == str(path) for line in f) == 1
        finally:
            again.send_signal(signal.SIGTERM)
            assert again.wait(20) == 0
    assert not is_mounted(path)


def test_check_mountpoint_creates_missing_dir(tmp_path):
    path = tmp_path / "a" / "b"
    fusefs.check_mountpoint(path)
    assert path.is_dir() and not os.path.ismount(path)
