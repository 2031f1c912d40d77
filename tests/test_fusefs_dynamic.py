"""Tier 2: fusefs.DynamicDir through the Filesystem's operations, no mount.

A DynamicDir stores no children: nodes exist while the kernel holds them.
"""

import errno
import gc
import os
import sys
import weakref

from sortedcontainers import SortedDict

from fusefs import Attr, Dir, DynamicDir, Filesystem, LazyDir, Symlink, Table
from util.fsops import the_rest, ROOT, Collector, ctx, errno_of, list_dir, lookup


class Target:
    """What a name means: compared by identity, like a chunk."""

    def __init__(self, name: str):
        self.name = name


class Names:
    """A provider over a sorted dict name -> Target; sort key = the name."""

    def __init__(self, names=()):
        self.targets = SortedDict((n, Target(n)) for n in names)
        self.made = 0

    def resolve(self, name):
        return self.targets.get(name)

    def make(self, name, target):
        self.made += 1

        def populate(d):
            d.add("who", Attr(lambda: target.name))
            d.add("link", Symlink("../x"))
        return LazyDir(populate)

    def entries(self, after):
        keys = self.targets.irange(minimum=after, inclusive=(False, False)) \
            if after is not None else iter(self.targets)
        for name in keys:
            yield name, name, self.targets[name]

    def rebind(self, name):
        """The name means something else now (freed, and another took it)."""
        self.targets[name] = Target(name + "'")


def setup(names=("a", "b", "c")):
    provider = Names(names)
    root = Dir()
    dyn = root.add("dyn", DynamicDir(provider, dirs=lambda: len(provider.targets)))
    return provider, dyn, Filesystem(root)


async def test_nothing_is_made_until_looked_up_and_forget_drops_it():
    provider, dyn, fs = setup()
    assert provider.made == 0 and dyn.held() == 0
    a = await lookup(fs, "dyn/a")
    assert await lookup(fs, "dyn/a") == a               # held: the same node
    assert provider.made == 1 and dyn.held() == 1 and fs.lookup_count(a) == 2
    await fs.forget([(a, 2)])
    assert dyn.held() == 0 and not fs.known(a)
    assert await lookup(fs, "dyn/a") != a               # a new node, a new number
    assert await errno_of(fs.lookup(await lookup(fs, "dyn"), b"zz", ctx())) == errno.ENOENT
    assert dyn.held() == 1


async def test_a_populated_directory_is_dropped_after_forget():
    provider, dyn, fs = setup()
    a = await lookup(fs, "dyn/a")
    who = await lookup(fs, "dyn/a/who")
    node = weakref.ref(fs._inodes[a])
    assert fs._inodes[a].populated
    fi = await fs.open(who, os.O_RDONLY, ctx())
    await fs.forget([(a, fs.lookup_count(a))])
    gc.collect()
    assert node() is not None                           # its file is still held
    assert await fs.read(fi.fh, 0, 10) == b"a\n"
    await fs.release(fi.fh)
    await fs.forget([(who, 1)])
    gc.collect()
    assert node() is None and dyn.held() == 0


async def test_a_name_that_changed_meaning_gets_a_new_node_and_the_old_keeps_its_target():
    provider, dyn, fs = setup()
    old_who = await lookup(fs, "dyn/a/who")
    old = await lookup(fs, "dyn/a")
    provider.rebind("a")
    new = (await fs.lookup(await lookup(fs, "dyn"), b"a", ctx())).st_ino
    assert new != old
    fi = await fs.open(old_who, os.O_RDONLY, ctx())
    assert await fs.read(fi.fh, 0, 10) == b"a\n"         # bound to what it was made for
    fi = await fs.open(await lookup(fs, "dyn/a/who"), os.O_RDONLY, ctx())
    assert await fs.read(fi.fh, 0, 10) == b"a'\n"
    await fs.forget([(old, 2)])                           # the old node goes, the new stays
    assert dyn.held() == 1 and fs.known(new)


async def test_invalidate_tells_the_kernel_only_about_names_it_holds(monkeypatch):
    sent = []
    provider, dyn, fs = setup()
    monkeypatch.setattr(fs.invalidator, "entry",
                        lambda parent, name, deleted=0: sent.append((parent, name, deleted)))
    a = await lookup(fs, "dyn/a")
    dyn.invalidate("b")                                 # never looked up
    assert sent == []
    dyn.invalidate("a")
    assert sent == [(dyn.inode, b"a", a)] and dyn.held() == 0
    assert fs.known(a)                                  # until the kernel forgets it
    await fs.forget([(a, 1)])
    assert not fs.known(a)


async def test_readdir_pages_in_key_order_and_holds_what_was_sent():
    names = [f"n{i:05d}" for i in range(10_000)]
    provider, dyn, fs = setup(names)
    inode = await lookup(fs, "dyn")
    entries, calls = await list_dir(fs, inode, capacity=300)
    assert [e[0] for e in entries] == [b".", b".."] + [n.encode() for n in names]
    assert calls == -(-(10_002) // 300) + 1
    # Each accepted entry is held once; the one refused at a page end is not.
    assert dyn.held() == len(names)
    assert all(fs.lookup_count(e[1]) == 1 for e in entries[2:])
    assert (await fs.getattr(inode, ctx())).st_nlink == 2 + len(names)
    await fs.forget([(e[1], 1) for e in entries[2:]])
    assert dyn.held() == 0 and len(fs._inodes) == 2     # root and dyn


async def test_a_listing_never_returns_a_name_twice_when_it_changes_meaning():
    """The defect of seq tokens: a name freed and taken again mid-listing
    came back; resuming after the sort key lists it at most once."""
    provider, dyn, fs = setup([f"n{i:03d}" for i in range(100)])
    fh = await fs.opendir(await lookup(fs, "dyn"), ctx())
    fs.readdir_reply = Collector(40)
    first = []
    await fs.readdir(fh, 0, first)
    seen = first[-1][0].decode()
    provider.rebind(seen)                               # freed and another took it
    provider.rebind("n000")
    del provider.targets["n090"]
    provider.targets["n0455"] = Target("late")          # after the cursor: listed
    provider.targets["a"] = Target("early")             # before it: not
    rest = await the_rest(fs, fh, first[-1][2])
    names = [e[0] for e in first + rest]
    assert len(names) == len(set(names))
    assert b"n0455" in names and b"n090" not in names and b"a" not in names
    page = []
    await fs.readdir(fh, rest[-1][2], page)             # the end, asked again
    assert page == []
    assert await errno_of(fs.readdir(fh, first[5][2], [])) == errno.EINVAL  # seekdir back
    await fs.releasedir(fh)


async def test_readdir_resumes_from_the_reply_before_the_last():
    provider, dyn, fs = setup([f"n{i:03d}" for i in range(100)])
    fh = await fs.opendir(await lookup(fs, "dyn"), ctx())
    fs.readdir_reply = Collector(10)
    one, two = [], []
    await fs.readdir(fh, 0, one)
    await fs.readdir(fh, one[-1][2], two)
    again = []
    await fs.readdir(fh, one[-1][2], again)              # the reader took none of `two`
    assert [e[0] for e in again] == [e[0] for e in two]


async def test_lookup_walks_of_many_names_leave_nothing_behind():
    names = [f"n{i:05d}" for i in range(5000)]
    provider, dyn, fs = setup(names)
    await lookup(fs, "dyn")
    before = len(fs._inodes)
    for n in names:
        d = await lookup(fs, f"dyn/{n}")
        who = (await fs.lookup(d, b"who", ctx())).st_ino
        await fs.forget([(who, 1), (d, 1)])
    assert dyn.held() == 0 and len(fs._inodes) == before


async def test_tables_are_given_back_after_a_walk_is_forgotten():
    """A dict keeps its peak size: the inode table and the held names are
    copied once the kernel holds a small part of their peak."""
    names = [f"n{i:05d}" for i in range(5000)]
    provider, dyn, fs = setup(names)
    entries, _ = await list_dir(fs, await lookup(fs, "dyn"), capacity=500)
    peak = sys.getsizeof(fs._inodes), sys.getsizeof(dyn._held)
    await fs.forget([(e[1], 1) for e in entries[2:]])
    assert sys.getsizeof(fs._inodes) * 50 < peak[0]
    assert sys.getsizeof(dyn._held) * 50 < peak[1]


async def test_dynamic_dirs_refuse_add_and_remove():
    provider, dyn, fs = setup()
    for call in (lambda: dyn.add("x", Attr(lambda: "")), lambda: dyn.remove("a")):
        try:
            call()
        except TypeError:
            continue
        raise AssertionError("a DynamicDir took a child")
    assert "a" in dyn and "zz" not in dyn and len(dyn) == 3
    assert dyn.names() == ["a", "b", "c"]
    assert dyn.get("a").path() == "/dyn/a" and dyn.held() == 0


async def test_root_lookup_count_is_kept():
    provider, dyn, fs = setup()
    await fs.forget([(ROOT, 1)])
    assert fs.known(ROOT)


# ---- Table ------------------------------------------------------------------

class Rows:
    """Rows "row <i>\\n" by key i, counting how many were rendered."""

    def __init__(self, n):
        self.keys = SortedDict((i, f"row {i:06d}\n") for i in range(n))
        self.rendered = 0

    def __call__(self, after):
        keys = self.keys.irange(minimum=after, inclusive=(False, False)) \
            if after is not None else iter(self.keys)
        for key in keys:
            self.rendered += 1
            yield key, self.keys[key]


def table(n):
    rows = Rows(n)
    root = Dir()
    root.add("t", Table(rows))
    return rows, Filesystem(root)


async def read_all(fs, fh, size):
    return await read_all_from(fs, fh, 0, size)


async def test_a_table_read_costs_what_it_returns():
    rows, fs = table(10_000)
    fi = await fs.open(await lookup(fs, "t"), os.O_RDONLY, ctx())
    first = await fs.read(fi.fh, 0, 4096)
    assert rows.rendered <= 4096 // 11 + 2                # 11 bytes a row
    whole = first + await read_all_from(fs, fi.fh, len(first), 4096)
    assert whole == "".join(rows.keys.values()).encode()
    assert rows.rendered <= 10_000 + (len(whole) // 4096 + 2)   # each row once, plus one a read
    rows.rendered = 0
    assert await fs.read(fi.fh, 0, 22) == b"row 000000\nrow 000001\n"   # offset 0: again
    assert rows.rendered <= 3
    assert await errno_of(fs.read(fi.fh, 5000, 10)) == errno.EINVAL
    await fs.release(fi.fh)


async def read_all_from(fs, fh, off, size):
    out = b""
    while True:
        piece = await fs.read(fh, off, size)
        if not piece:
            return out
        out += piece
        off += len(piece)


async def test_table_readers_have_their_own_cursors_and_see_changes_ahead():
    rows, fs = table(100)
    inode = await lookup(fs, "t")
    a = await fs.open(inode, os.O_RDONLY, ctx())
    b = await fs.open(inode, os.O_RDONLY, ctx())
    head = await fs.read(a.fh, 0, 110)                    # rows 0..9
    del rows.keys[50]
    rows.keys[200] = "row 000200\n"
    del rows.keys[5]                                      # behind a's cursor: already shown
    rest = await read_all_from(fs, a.fh, len(head), 64)
    text = (head + rest).decode()
    assert "row 000005" in text and "row 000050" not in text and "row 000200" in text
    assert (await read_all(fs, b.fh, 1000)).decode().count("\n") == 99
    assert await read_all(fs, (await fs.open(await lookup(fs, "t"), os.O_RDONLY, ctx())).fh,
                          7) == "".join(rows.keys.values()).encode()
