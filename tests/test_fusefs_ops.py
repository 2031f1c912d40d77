"""Tier 2: fusefs.Filesystem's operations called directly, no mount.

pyfuse3's RequestContext and SetattrFields cannot be given values from
Python, so simple stand-ins carry the fields the Filesystem reads, and
readdir_reply is replaced by a collector with a fixed capacity.
"""

import errno
import logging
import os
import time
import stat
from types import SimpleNamespace

import pytest

from fusefs import (ATTR_SIZE, Attr, Bytes, Caller, Dir, Filesystem, LazyDir,
                    Stream, Symlink)
from util.fsops import ROOT, Collector, ctx, errno_of, fields, list_dir, lookup, the_rest


@pytest.fixture
def tree():
    state = {"rw": "hello", "stored": [], "shows": 0}

    def show_rw():
        state["shows"] += 1
        return state["rw"]

    def store_rw(text, caller):
        state["stored"].append((text, caller))
        state["rw"] = text

    root = Dir()
    root.add("rw", Attr(show_rw, store_rw))
    root.add("ro", Attr(lambda: "read only\n"))
    root.add("wo", Attr(store=lambda text, caller: state["stored"].append((text, caller))))
    root.add("mine", Attr(lambda: "x", uid=1000, gid=100, mode=0o640))
    root.add("link", Symlink("../regions/00000000400000"))
    root.add("dyn", Symlink(lambda: state["rw"]))
    buf = bytearray(b"0123456789")
    root.add("data", Bytes(lambda: memoryview(buf), uid=1000))
    sub = root.add("sub", Dir(mode=0o750, gid=7))
    sub.add("leaf", Attr(lambda: "leaf"))
    return SimpleNamespace(root=root, fs=Filesystem(root), state=state, buf=buf)


# ---- lookup, getattr -------------------------------------------------------

async def test_modes_sizes_and_owners(tree):
    fs = tree.fs
    expect = {
        "rw": (stat.S_IFREG | 0o644, ATTR_SIZE, 0, 0),
        "ro": (stat.S_IFREG | 0o444, ATTR_SIZE, 0, 0),
        "wo": (stat.S_IFREG | 0o200, ATTR_SIZE, 0, 0),
        "mine": (stat.S_IFREG | 0o640, ATTR_SIZE, 1000, 100),
        "link": (stat.S_IFLNK | 0o777, 0, 0, 0),
        "data": (stat.S_IFREG | 0o600, 10, 1000, 0),
        "sub": (stat.S_IFDIR | 0o750, 0, 0, 7),
    }
    for name, (mode, size, uid, gid) in expect.items():
        e = await fs.lookup(ROOT, name.encode(), ctx())
        assert (e.st_mode, e.st_size, e.st_uid, e.st_gid) == (mode, size, uid, gid), name
        again = await fs.getattr(e.st_ino, ctx())
        assert (again.st_ino, again.st_mode, again.st_size) == (e.st_ino, mode, size)
    root = await fs.getattr(ROOT, ctx())
    assert root.st_mode == stat.S_IFDIR | 0o755
    assert root.st_nlink == 3                   # ".", "..", and sub/..


async def test_default_modes():
    assert Attr(lambda: "").mode == 0o444
    assert Attr(lambda: "", lambda t, c: None).mode == 0o644
    assert Attr(store=lambda t, c: None).mode == 0o200
    assert Stream(lambda c: None).mode == 0o660
    assert Bytes(lambda: memoryview(b"")).mode == 0o600
    with pytest.raises(ValueError, match="show, store or both"):
        Attr()


async def test_lookup_misses_and_dots(tree):
    fs = tree.fs
    assert await errno_of(fs.lookup(ROOT, b"nope", ctx())) == errno.ENOENT
    ro = await lookup(fs, "ro")
    assert await errno_of(fs.lookup(ro, b"x", ctx())) == errno.ENOTDIR
    sub = await lookup(fs, "sub")
    assert (await fs.lookup(sub, b".", ctx())).st_ino == sub
    assert (await fs.lookup(sub, b"..", ctx())).st_ino == ROOT
    assert (await fs.lookup(ROOT, b"..", ctx())).st_ino == ROOT


async def test_inodes_are_unique_and_stable(tree):
    fs = tree.fs
    inodes = [await lookup(fs, n) for n in ("rw", "ro", "wo", "sub", "sub/leaf")]
    assert len(set(inodes)) == len(inodes)
    assert ROOT not in inodes
    assert await lookup(fs, "sub/leaf") == inodes[-1]


async def test_symlinks(tree):
    fs = tree.fs
    assert await fs.readlink(await lookup(fs, "link"), ctx()) == b"../regions/00000000400000"
    dyn = await lookup(fs, "dyn")
    assert await fs.readlink(dyn, ctx()) == b"hello"
    tree.state["rw"] = "elsewhere"
    assert await fs.readlink(dyn, ctx()) == b"elsewhere"
    assert await errno_of(fs.readlink(await lookup(fs, "ro"), ctx())) == errno.EINVAL


# ---- readdir ----------------------------------------------------------------

async def test_readdir_pages_through_10000_entries():
    root = Dir()
    big = root.add("big", Dir())
    names = [f"c{i:05d}" for i in range(10_000)]
    for n in names:
        big.add(n, Attr(lambda: ""))
    fs = Filesystem(root)
    inode = await lookup(fs, "big")
    entries, calls = await list_dir(fs, inode, capacity=300)
    listed = [e[0] for e in entries]
    assert listed[:2] == [b".", b".."]
    assert listed[2:] == [n.encode() for n in names]
    assert calls == -(-(10_002) // 300) + 1          # full pages + the empty one
    # Each accepted entry is a lookup for the kernel; "." and ".." are not,
    # and the entry refused at the end of a page is not either.
    assert all(fs.lookup_count(big.get(n).inode) == 1 for n in names)
    assert fs.lookup_count(inode) == 1


async def test_readdir_resumes_across_changes():
    root = Dir()
    d = root.add("d", Dir())
    for i in range(100):
        d.add(f"n{i:03d}", Attr(lambda: ""))
    fs = Filesystem(root)
    inode = await lookup(fs, "d")
    fh = await fs.opendir(inode, ctx())
    fs.readdir_reply = Collector(40)
    first = []
    await fs.readdir(fh, 0, first)
    # Between pages: remove seen and unseen entries, add new ones.
    d.remove("n000")
    d.remove("n050")
    d.add("late", Attr(lambda: ""))
    rest = await the_rest(fs, fh, first[-1][2])
    names = [e[0] for e in first + rest]
    assert len(names) == len(set(names))                 # nothing twice
    expected = {f"n{i:03d}".encode() for i in range(100)} - {b"n050"} | {b".", b"..", b"late"}
    assert set(names) == expected                        # nothing skipped


async def test_readdir_of_a_file_is_enotdir(tree):
    assert await errno_of(tree.fs.opendir(await lookup(tree.fs, "ro"), ctx())) == errno.ENOTDIR


# ---- forget -------------------------------------------------------------------

async def test_forget_drops_inodes_at_zero(tree):
    fs = tree.fs
    leaf = await lookup(fs, "sub/leaf")
    await lookup(fs, "sub/leaf")
    assert fs.lookup_count(leaf) == 2
    await fs.forget([(leaf, 1)])
    assert fs.known(leaf)
    assert (await fs.getattr(leaf, ctx())).st_ino == leaf
    await fs.forget([(leaf, 1)])
    assert not fs.known(leaf)
    assert await errno_of(fs.getattr(leaf, ctx())) == errno.ENOENT
    await fs.forget([(ROOT, 5)])
    assert fs.known(ROOT)
    # Looked up again, the same node comes back under the same number.
    assert await lookup(fs, "sub/leaf") == leaf


async def test_removed_node_lives_until_forgotten(tree):
    fs = tree.fs
    leaf = await lookup(fs, "sub/leaf")
    node = tree.root.get("sub").remove("leaf")
    assert node.path() == "/sub/leaf"
    assert await errno_of(fs.lookup(await lookup(fs, "sub"), b"leaf", ctx())) == errno.ENOENT
    fi = await fs.open(leaf, os.O_RDONLY, ctx())
    assert await fs.read(fi.fh, 0, 100) == b"leaf\n"
    await fs.release(fi.fh)
    await fs.forget([(leaf, 1)])
    assert not fs.known(leaf)


async def test_each_filesystem_tells_its_own_invalidator():
    """The invalidator is the Filesystem's, handed to the directories it gives the
    kernel: a removal in one tree never reaches another's (no process global)."""
    from fusefs import Invalidator
    sent = []

    class Recorder(Invalidator):
        def entry(self, parent_inode, name, deleted=0):
            sent.append((parent_inode, name, deleted))

    root = Dir()
    sub = root.add("sub", Dir())
    sub.add("leaf", Attr(lambda: "x"))
    fs, other = Filesystem(root, invalidator=Recorder()), Filesystem(Dir())
    leaf = await lookup(fs, "sub/leaf")
    assert sub.invalidator is fs.invalidator and fs.invalidator is not other.invalidator
    sub.remove("leaf")
    assert sent == [(sub.inode, b"leaf", leaf)]


async def test_remove_invalidates_only_what_the_kernel_holds(tree, monkeypatch):
    sent = []
    monkeypatch.setattr(tree.fs.invalidator, "entry",
                        lambda parent, name, deleted=0: sent.append((parent, name)))
    fs = tree.fs
    sub = await lookup(fs, "sub")
    leaf = await lookup(fs, "sub/leaf")
    tree.root.add("unseen", Attr(lambda: ""))
    tree.root.remove("unseen")                  # never handed to the kernel
    assert sent == []
    tree.root.get("sub").remove("leaf")
    assert sent == [(sub, b"leaf")]
    await fs.forget([(sub, fs.lookup_count(sub))])   # forgotten: nothing cached
    tree.root.remove("sub")
    assert sent == [(sub, b"leaf")]
    assert fs.known(leaf)                       # until the kernel forgets it


# ---- Dir and LazyDir ------------------------------------------------------------

async def test_dir_add_remove_rules():
    d = Dir()
    a = d.add("a", Attr(lambda: ""))
    with pytest.raises(ValueError, match="already has an entry 'a'"):
        d.add("a", Attr(lambda: ""))
    for bad in ("", ".", "..", "x/y", "n\0l"):
        with pytest.raises(ValueError, match="invalid name"):
            d.add(bad, Attr(lambda: ""))
    with pytest.raises(ValueError, match="already in a tree"):
        Dir().add("again", a)
    assert "a" in d and len(d) == 1 and d.names() == ["a"] and d.get("a") is a
    assert d.remove("a") is a
    assert "a" not in d and d.get("a") is None
    with pytest.raises(KeyError):
        d.remove("a")
    Dir().add("moved", a)       # a removed node may be added again


async def test_lazydir_populates_once_on_first_use():
    calls = []

    def populate(d):
        calls.append(d)
        for i in range(12):
            d.add(f"attr{i}", Attr(lambda: ""))

    root = Dir()
    lazies = [root.add(f"chunk{i}", LazyDir(populate)) for i in range(1000)]
    fs = Filesystem(root)
    entries, _ = await list_dir(fs, ROOT, capacity=10_000)
    assert len(entries) == 1002
    assert calls == []                          # listing the parent populates nothing
    inode = await lookup(fs, "chunk7")
    await fs.getattr(inode, ctx())
    assert calls == []                          # neither does stat
    await fs.lookup(inode, b"attr3", ctx())
    await fs.lookup(inode, b"attr4", ctx())
    entries, _ = await list_dir(fs, inode, capacity=5)
    assert calls == [lazies[7]]
    assert len(entries) == 14
    fresh = await lookup(fs, "chunk8")
    await list_dir(fs, fresh, capacity=100)     # readdir first this time
    assert calls == [lazies[7], lazies[8]] and lazies[8].populated
    assert not lazies[9].populated


# ---- attributes ----------------------------------------------------------------

async def test_attr_show_newline_and_snapshot(tree):
    fs = tree.fs
    rw = await lookup(fs, "rw")
    fi = await fs.open(rw, os.O_RDONLY, ctx())
    assert fi.direct_io
    assert await fs.read(fi.fh, 0, 4096) == b"hello\n"      # newline appended
    tree.state["rw"] = "changed"
    assert await fs.read(fi.fh, 2, 4096) == b"llo\n"        # the snapshot
    assert await fs.read(fi.fh, 6, 4096) == b""
    assert tree.state["shows"] == 1
    assert await fs.read(fi.fh, 0, 4096) == b"changed\n"    # offset 0 re-shows
    await fs.release(fi.fh)
    ro = await lookup(fs, "ro")
    fi = await fs.open(ro, os.O_RDONLY, ctx())
    assert await fs.read(fi.fh, 0, 4096) == b"read only\n"  # no second newline
    await fs.release(fi.fh)
    assert fs.open_handles() == 0


async def test_attr_store_rules(tree):
    fs = tree.fs
    stored = tree.state["stored"]
    fi = await fs.open(await lookup(fs, "rw"), os.O_WRONLY | os.O_TRUNC, ctx(uid=5, gid=6, pid=77))
    assert await fs.write(fi.fh, 0, b"abc\n") == 4
    assert stored[-1] == ("abc", Caller(5, 6, 77))
    assert await fs.write(fi.fh, 0, b"two\n\n") == 5
    assert stored[-1][0] == "two\n"                         # one newline stripped
    assert await fs.write(fi.fh, 0, "ünï\n".encode()) == len("ünï\n".encode())
    assert stored[-1][0] == "ünï"
    assert await fs.write(fi.fh, 0, b"x" * 4096) == 4096
    n = len(stored)
    for bad in (b"\xff\xfe", b"a\0b", b"x" * 4097):
        assert await errno_of(fs.write(fi.fh, 0, bad)) == errno.EINVAL
    assert len(stored) == n                                 # store never called
    await fs.release(fi.fh)


async def test_open_checks_access_even_for_root(tree, caplog):
    fs = tree.fs
    ro, wo, rw = [await lookup(fs, n) for n in ("ro", "wo", "rw")]
    with caplog.at_level(logging.WARNING, logger="fusefs"):
        assert await errno_of(fs.open(ro, os.O_WRONLY, ctx())) == errno.EACCES
        assert await errno_of(fs.open(ro, os.O_RDWR, ctx())) == errno.EACCES
        assert await errno_of(fs.open(wo, os.O_RDONLY, ctx())) == errno.EACCES
        assert await errno_of(fs.open(wo, os.O_RDWR, ctx())) == errno.EACCES
    assert "open /ro: EACCES: read-only file opened for writing" in caplog.text
    assert "open /wo: EACCES: write-only file opened for reading" in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    fi = await fs.open(rw, os.O_RDWR, ctx())
    await fs.release(fi.fh)
    fi = await fs.open(wo, os.O_WRONLY, ctx())
    await fs.release(fi.fh)
    # Mode bits say no, whatever the node could do.
    root = Dir()
    root.add("s", Stream(lambda c: None, mode=0o220))
    root.add("b", Bytes(lambda: memoryview(bytearray(4)), mode=0o444))
    fs2 = Filesystem(root)
    assert await errno_of(fs2.open(await lookup(fs2, "s"), os.O_RDONLY, ctx())) == errno.EACCES
    assert await errno_of(fs2.open(await lookup(fs2, "b"), os.O_WRONLY, ctx())) == errno.EACCES


async def test_setattr_truncate_is_a_noop_and_chmod_chown_eperm(tree):
    fs = tree.fs
    for name in ("rw", "data"):
        inode = await lookup(fs, name)
        before = await fs.getattr(inode, ctx())
        e = await fs.setattr(inode, SimpleNamespace(st_size=0), fields(update_size=True), None, ctx())
        assert e.st_size == before.st_size
    assert tree.buf == bytearray(b"0123456789")
    rw = await lookup(fs, "rw")
    for f in (fields(update_mode=True), fields(update_uid=True), fields(update_gid=True)):
        assert await errno_of(fs.setattr(rw, SimpleNamespace(), f, None, ctx())) == errno.EPERM
    assert await errno_of(fs.setattr(await lookup(fs, "sub"), SimpleNamespace(st_size=0),
                                     fields(update_size=True), None, ctx())) == errno.EISDIR


async def test_namespace_changes_are_refused(tree):
    fs = tree.fs
    assert await errno_of(fs.create(ROOT, b"new", 0o644, os.O_WRONLY, ctx())) == errno.EACCES
    assert await errno_of(fs.mkdir(ROOT, b"d", 0o755, ctx())) == errno.EPERM
    assert await errno_of(fs.unlink(ROOT, b"rw", ctx())) == errno.EPERM
    assert await errno_of(fs.rmdir(ROOT, b"sub", ctx())) == errno.EPERM
    assert await errno_of(fs.rename(ROOT, b"rw", ROOT, b"x", 0, ctx())) == errno.EPERM
    assert "rw" in tree.root and "sub" in tree.root


# ---- streams and bytes -------------------------------------------------------------

class Upper:
    released = []

    def __init__(self, caller):
        self.caller = caller
        self.pending = b""

    def write(self, data):
        self.pending += data.upper()

    def read(self, size):
        out, self.pending = self.pending[:size], self.pending[size:]
        return out

    def release(self):
        Upper.released.append(self.caller)


async def test_stream_write_then_read():
    root = Dir()
    root.add("s", Stream(Upper))
    fs = Filesystem(root)
    inode = await lookup(fs, "s")
    fi = await fs.open(inode, os.O_RDWR, ctx(uid=3, pid=99))
    assert fi.direct_io
    assert await fs.write(fi.fh, 0, b"abc\n") == 4
    assert await fs.write(fi.fh, 4, b"def\n") == 4
    assert await fs.read(fi.fh, 8, 5) == b"ABC\nD"
    assert await fs.read(fi.fh, 13, 100) == b"EF\n"
    assert await fs.read(fi.fh, 16, 100) == b""
    await fs.release(fi.fh)
    assert Upper.released[-1] == Caller(3, 0, 99)
    assert fs.open_handles() == 0


async def test_async_callbacks_are_awaited():
    async def show():
        return "from a coroutine"

    seen = []

    async def store(text, caller):
        seen.append(text)

    root = Dir()
    root.add("a", Attr(show, store))
    fs = Filesystem(root)
    fi = await fs.open(await lookup(fs, "a"), os.O_RDWR, ctx())
    assert await fs.read(fi.fh, 0, 100) == b"from a coroutine\n"
    await fs.write(fi.fh, 0, b"v\n")
    assert seen == ["v"]
    await fs.release(fi.fh)


async def test_bytes_reads_and_writes_like_a_block_device(tree):
    fs = tree.fs
    fi = await fs.open(await lookup(fs, "data"), os.O_RDWR, ctx())
    assert fi.direct_io
    assert bytes(await fs.read(fi.fh, 0, 4)) == b"0123"
    assert bytes(await fs.read(fi.fh, 8, 100)) == b"89"           # cut at the end
    assert bytes(await fs.read(fi.fh, 10, 100)) == b""
    assert bytes(await fs.read(fi.fh, 1 << 40, 100)) == b""
    assert await fs.write(fi.fh, 2, b"ab") == 2
    assert await fs.write(fi.fh, 8, b"XYZW") == 2                 # cut short
    assert tree.buf == bytearray(b"01ab4567XY")
    assert await errno_of(fs.write(fi.fh, 10, b"z")) == errno.ENOSPC
    assert await errno_of(fs.write(fi.fh, 99, b"z")) == errno.ENOSPC
    assert tree.buf == bytearray(b"01ab4567XY")
    await fs.release(fi.fh)


# ---- the error boundary -----------------------------------------------------------

class WhyError(OSError):
    """Shaped like the core's CmaError: errno plus .why."""

    def __init__(self, code, why):
        super().__init__(code, why)
        self.why = why


async def test_oserror_becomes_its_errno_with_one_log_line(caplog):
    def store(text, caller):
        raise WhyError(errno.EBUSY, f"region has users, cannot take {text!r}")

    root = Dir()
    d = root.add("regions", Dir())
    d.add("alloc", Attr(lambda: "", store))
    d.add("plain", Attr(store=lambda t, c: (_ for _ in ()).throw(OSError(errno.ENOMEM, "no room"))))
    d.add("bare", Attr(store=lambda t, c: (_ for _ in ()).throw(OSError("no errno"))))
    fs = Filesystem(root)
    with caplog.at_level(logging.INFO, logger="fusefs"):
        for name, code in (("alloc", errno.EBUSY), ("plain", errno.ENOMEM), ("bare", errno.EIO)):
            fi = await fs.open(await lookup(fs, f"regions/{name}"), os.O_WRONLY, ctx())
            assert await errno_of(fs.write(fi.fh, 0, b"bf\n")) == code
            await fs.release(fi.fh)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["write /regions/alloc: EBUSY: region has users, cannot take 'bf'",
                     "write /regions/plain: ENOMEM: no room",
                     "write /regions/bare: ?: no errno"]
    assert all(r.levelno == logging.INFO for r in caplog.records)


async def test_other_exceptions_become_eio_with_traceback(caplog):
    class Handle:
        def write(self, data):
            pass

        def read(self, size):
            return b""

        def release(self):
            raise KeyError("release bug")

    class Liar(Handle):
        def read(self, size):
            return "text" if size == 1 else b"x" * (size + 1)

        def release(self):
            pass

    root = Dir()
    root.add("liar", Stream(lambda c: Liar()))
    root.add("crash", Attr(store=lambda t, c: 1 // 0))
    root.add("badshow", Attr(lambda: None))
    root.add("s", Stream(lambda c: Handle()))
    root.add("badlink", Symlink(lambda: {}["missing"]))
    fs = Filesystem(root)
    with caplog.at_level(logging.ERROR, logger="fusefs"):
        fi = await fs.open(await lookup(fs, "crash"), os.O_WRONLY, ctx())
        assert await errno_of(fs.write(fi.fh, 0, b"1")) == errno.EIO
        await fs.release(fi.fh)
        fi = await fs.open(await lookup(fs, "badshow"), os.O_RDONLY, ctx())
        assert await errno_of(fs.read(fi.fh, 0, 10)) == errno.EIO
        await fs.release(fi.fh)
        fi = await fs.open(await lookup(fs, "s"), os.O_RDWR, ctx())
        assert await errno_of(fs.release(fi.fh)) == errno.EIO
        assert await errno_of(fs.readlink(await lookup(fs, "badlink"), ctx())) == errno.EIO
        fi = await fs.open(await lookup(fs, "liar"), os.O_RDONLY, ctx())
        assert await errno_of(fs.read(fi.fh, 0, 1)) == errno.EIO
        assert await errno_of(fs.read(fi.fh, 0, 100)) == errno.EIO
        await fs.release(fi.fh)
    assert fs.open_handles() == 0                     # a failed release still closes
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["write /crash: unexpected error, answering EIO",
                    "read /badshow: unexpected error, answering EIO",
                    "release /s: unexpected error, answering EIO",
                    "readlink /badlink: unexpected error, answering EIO",
                    "read /liar: unexpected error, answering EIO",
                    "read /liar: unexpected error, answering EIO"]
    assert "ZeroDivisionError" in caplog.text and "Traceback" in caplog.text
    assert "returned NoneType, not str" in caplog.text
    assert "returned str, not bytes" in caplog.text
    assert "returned 101 bytes for a read of 100" in caplog.text


async def test_unknown_handles_and_inodes(tree):
    fs = tree.fs
    assert await errno_of(fs.read(12345, 0, 10)) == errno.EBADF
    assert await errno_of(fs.getattr(999_999_999, ctx())) == errno.ENOENT


async def test_statfs(tree):
    s = await tree.fs.statfs(ctx())
    assert s.f_namemax == 255 and s.f_bsize == 4096


async def test_paths_for_logs(tree):
    root = tree.root
    assert root.path() == "/"
    assert root.get("sub").get("leaf").path() == "/sub/leaf"
    assert Attr(lambda: "").path() == "/"       # never added: no parent


# ---- util.mount's FUSE gate (no mount needed) ---------------------------------------

def test_require_fuse_skips_or_fails(monkeypatch):
    from util import mount
    monkeypatch.setattr(mount, "fuse_available", lambda: (False, "no /dev/fuse here"))
    monkeypatch.delenv("CMAD_REQUIRE_FUSE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no /dev/fuse here"):
        mount.require_fuse()
    monkeypatch.setenv("CMAD_REQUIRE_FUSE", "1")
    with pytest.raises(pytest.fail.Exception, match="CMAD_REQUIRE_FUSE=1.*no /dev/fuse here"):
        mount.require_fuse()
    monkeypatch.setattr(mount, "fuse_available", lambda: (True, ""))
    mount.require_fuse()                   # available: nothing happens


def test_stale_mount_detection_helpers(tmp_path):
    """check_mountpoint tells a stale mount by the pid in its source, never by
    touching it: a zombie counts as dead (it may be stuck exiting)."""
    import subprocess

    from fusefs.guard import alive as _alive
    from fusefs.mountinfo import mount_entry, source_owner as _source_owner

    assert _source_owner("cmad:1234:99") == (1234, 99)
    assert _source_owner("cmad:1234") == (1234, None)
    assert _source_owner("cmad") is None and _source_owner(":12") is None
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while _alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # exited but not reaped: a zombie
    assert not _alive(child.pid)
    child.wait()
    assert not _alive(child.pid) and _alive(os.getpid())
    assert mount_entry(str(tmp_path)) is None
    source, fstype, minor = mount_entry("/proc")
    assert fstype == "proc" and minor >= 0
