"""Tier 2: the daemon's tree (cmad.daemon.tree) served by fusefs.Filesystem, no mount.

The chunk directories store nothing: nodes exist while the kernel holds them.
"""

import errno
import gc
import logging
import os

from fusefs import Filesystem, Node
from cmad import Cma
from cmad.memparse import fmt_addr
from cmad.core.request import run
from cmad.daemon.tree import Tree
from util.fsops import the_rest, Collector, ctx, errno_of, list_dir, lookup, read_file

REGIONS, MAP = "r=64M:bf", "*=r"
REGION_LINKS = "regions/0000000040000000/chunks"


def nodes() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Node))


def tree_with(n: int, labelled: bool = True):
    cma = Cma(REGIONS, MAP)
    chunks = [run(cma, "x 4K" + (f" label=l{i}" if labelled else "")) for i in range(n)]
    tree = Tree(cma)
    return cma, tree, Filesystem(tree.root), chunks


def test_a_tree_over_many_chunks_builds_no_node_per_chunk():
    base = nodes()
    empty = tree_with(0)
    per_tree = nodes() - base
    del empty
    base = nodes()
    full = tree_with(2000)
    assert nodes() - base == per_tree                  # not one node per chunk
    assert full[1].chunks.held() == 0


async def test_a_walk_over_every_chunk_is_given_back_once_forgotten():
    cma, tree, fs, chunks = tree_with(300)
    await lookup(fs, "chunks"), await lookup(fs, "ids"), await lookup(fs, REGION_LINKS)
    inodes, before = len(fs._inodes), nodes()
    taken = []
    for c in chunks:
        for path in (f"chunks/{c.name}/size", f"chunks/{c.label}", f"ids/{c.id}/label",
                     f"{REGION_LINKS}/{c.name}"):
            parts = path.split("/")
            inode = await lookup(fs, path)
            taken += [(inode, 1)]
            if len(parts) == 3:
                taken += [(await lookup(fs, "/".join(parts[:2])), 1)]
    assert await read_file(fs, await lookup(fs, f"ids/{chunks[7].id}/label")) == b"l7\n"
    assert len(fs._inodes) > inodes + 4 * len(chunks)
    for inode, _ in list(taken):
        if fs.known(inode):
            await fs.forget([(inode, fs.lookup_count(inode))])
    assert len(fs._inodes) == inodes
    assert tree.chunks.held() == tree.ids.held() == tree.region_chunks["r"].held() == 0
    assert nodes() == before


async def test_names_resolve_by_address_by_label_and_by_id():
    cma, tree, fs, chunks = tree_with(3)
    c = chunks[1]
    link = await lookup(fs, f"chunks/{c.label}")
    assert await fs.readlink(link, ctx()) == f"../ids/{c.id}".encode()
    link = await lookup(fs, f"{REGION_LINKS}/{c.name}")
    assert await fs.readlink(link, ctx()) == f"../../../ids/{c.id}".encode()
    assert await read_file(fs, await lookup(fs, f"chunks/{c.name}/id")) == f"{c.id}\n".encode()
    chunks_dir = await lookup(fs, "chunks")
    for name in (c.name[:-1], c.name + "0", "0x" + c.name[2:], f"{c.start}", "l9"):
        assert await errno_of(fs.lookup(chunks_dir, name.encode(), ctx())) == errno.ENOENT
    ids_dir = await lookup(fs, "ids")
    for name in (f"0{c.id}", f"+{c.id}", "99"):
        assert await errno_of(fs.lookup(ids_dir, name.encode(), ctx())) == errno.ENOENT
    other = run(cma, "@r 4K")
    other_region = await lookup(fs, REGION_LINKS)
    assert (await fs.lookup(other_region, other.name.encode(), ctx())).st_ino


async def test_listings_are_sorted_and_complete():
    cma, tree, fs, chunks = tree_with(50)
    run(cma, "x 4K")                                    # one without a label
    entries, _ = await list_dir(fs, await lookup(fs, "chunks"), capacity=7)
    names = [e[0].decode() for e in entries[2:]]
    starts = sorted(c.name for c in cma.chunks)
    assert names == starts + sorted(c.label for c in chunks)
    entries, _ = await list_dir(fs, await lookup(fs, "ids"), capacity=7)
    assert [int(e[0]) for e in entries[2:]] == sorted(c.id for c in cma.chunks)
    entries, _ = await list_dir(fs, await lookup(fs, REGION_LINKS), capacity=7)
    assert [e[0].decode() for e in entries[2:]] == starts


async def test_a_listing_never_repeats_an_address_freed_and_taken_mid_listing():
    cma, tree, fs, chunks = tree_with(40, labelled=False)
    fh = await fs.opendir(await lookup(fs, "chunks"), ctx())
    fs.readdir_reply = Collector(10)
    first = []
    await fs.readdir(fh, 0, first)
    last = first[-1][0].decode()
    cma.free(last)
    again = run(cma, "x 4K")
    assert again.name == last                           # the same address, another chunk
    rest = await the_rest(fs, fh, first[-1][2])
    names = [e[0] for e in first + rest]
    assert len(names) == len(set(names)) == 42


async def test_free_and_move_invalidate_only_names_the_kernel_holds(monkeypatch):
    sent = []
    cma = Cma("r=320K:bf", "*=r")
    tree = Tree(cma)
    fs = Filesystem(tree.root)
    monkeypatch.setattr(fs.invalidator, "entry",
                        lambda parent, name, deleted=0: sent.append((name.decode(), deleted)))
    run(cma, "x 64K label=pad"), run(cma, "x 64K label=p1")
    victim = run(cma, "x 64K label=victim movable")
    run(cma, "x 64K label=hole"), run(cma, "x 64K label=p2")
    cma.free("pad")                                     # nobody looked: nothing to tell
    assert sent == []
    old = victim.name
    at_old = await lookup(fs, f"chunks/{old}")
    by_id = await lookup(fs, f"ids/{victim.id}")
    label = await lookup(fs, "chunks/victim")
    cma.free("hole")
    other = run(cma, "@r 128K label=other")             # moves the victim, takes its start
    assert other.name == old and victim.name != old
    assert sent == [(old, at_old)]
    assert await read_file(fs, await lookup(fs, f"chunks/{old}/label")) == b"other\n"
    assert await read_file(fs, await lookup(fs, f"ids/{victim.id}/label")) == b"victim\n"
    assert await lookup(fs, "chunks/victim") == label  # the link and ids/<id> stay
    assert await lookup(fs, f"ids/{victim.id}") == by_id
    sent.clear()
    cma.free(f"id={victim.id}")
    assert sorted(sent) == sorted([(f"{victim.id}", by_id), ("victim", label)])
    assert await errno_of(fs.lookup(await lookup(fs, "ids"), str(victim.id).encode(),
                                    ctx())) == errno.ENOENT


async def test_a_freed_chunks_directory_answers_enxio():
    cma, tree, fs, chunks = tree_with(2)
    label = await lookup(fs, f"ids/{chunks[0].id}/label")
    cma.free(chunks[0].start)
    fi = await fs.open(label, os.O_RDONLY, ctx())
    assert await errno_of(fs.read(fi.fh, 0, 100)) == errno.ENXIO
    assert fmt_addr(chunks[1].start) in [e[0].decode() for e in
                                         (await list_dir(fs, await lookup(fs, "chunks"), 5))[0]]


async def test_chunkinfo_renders_only_what_each_read_returns():
    cma, tree, fs, chunks = tree_with(3000)
    node = tree.root.get("chunkinfo")
    rendered = []
    rows = node.rows

    def counting(after):
        for row in rows(after):
            rendered.append(row[0])
            yield row
    node.rows = counting
    inode = await lookup(fs, "chunkinfo")
    fi = await fs.open(inode, os.O_RDONLY, ctx())
    head = await fs.read(fi.fh, 0, 4096)
    assert len(rendered) < 4096 // 40                   # not the 3,000 rows
    rendered.clear()
    assert await fs.read(fi.fh, 0, 4096) == head       # a re-read at 0 starts again
    assert len(rendered) < 4096 // 40
    text, off = b"", 0
    while piece := await fs.read(fi.fh, off, 4096):
        text += piece
        off += len(piece)
    lines = text.decode().splitlines()
    assert len(lines) == 3000 and len(rendered) < 3000 + 3000 * 80 // 4096 + 10
    c = sorted(chunks, key=lambda c: c.start)[5]  # pinned blocks are claimed from the top
    assert lines[5] == f"{c.name} 4096 r x {c.type} 0 0 {c.created_iso()} 0 {c.label} id={c.id}"
    await fs.release(fi.fh)


async def open_alloc(fs):
    fi = await fs.open(await lookup(fs, "alloc"), os.O_RDWR, ctx())
    return fi.fh, fs._handles[fi.fh].inner


async def test_a_long_lived_alloc_handle_forgets_transient_chunks_freed_explicitly():
    cma, tree, fs, _ = tree_with(0)
    fh, handle = await open_alloc(fs)
    for i in range(2000):
        await fs.write(fh, 0, b"x 4K transient")
        line = (await fs.read(fh, 0, 4096)).decode()
        cma.free(line.split()[-1])                      # id=<n>
    assert len(handle.transient) == 0 and len(tree._transient_of) == 0
    await fs.write(fh, 0, b"x 4K transient label=kept")
    await fs.write(fh, 0, b"x 4K label=stays")
    assert len(handle.transient) == 1
    await fs.release(fh)
    assert cma.chunks.by_label("kept") is None and cma.chunks.by_label("stays") is not None
    assert len(tree._transient_of) == 0


async def test_answers_never_read_are_bounded():
    from cmad.daemon.tree import MAX_UNREAD
    cma, tree, fs, _ = tree_with(0)
    fh, handle = await open_alloc(fs)
    lines = []
    for i in range(MAX_UNREAD + 500):
        await fs.write(fh, 0, b"x 4K")
        lines.append(cma.chunks.by_id(max(c.id for c in cma.chunks)))
    assert len(handle.pending) == MAX_UNREAD            # the oldest were dropped
    text = b""
    while piece := await fs.read(fh, 0, 100):          # small reads cut lines
        text += piece
    assert text.decode().splitlines()[0].endswith(f"id={lines[500].id}")
    assert len(text.decode().splitlines()) == MAX_UNREAD and len(handle.pending) == 0
    await fs.release(fh)


async def test_transient_chunks_are_freed_by_id_after_a_move():
    cma = Cma("r=320K:bf", "*=r")
    tree = Tree(cma)
    fs = Filesystem(tree.root)
    run(cma, "x 64K label=pad"), run(cma, "x 64K label=p1")
    fh, handle = await open_alloc(fs)
    await fs.write(fh, 0, b"x 64K movable transient label=t")
    run(cma, "x 64K label=hole"), run(cma, "x 64K label=p2")
    cma.free("pad"), cma.free("hole")
    old = cma.chunks.by_label("t").start
    run(cma, "@r 128K label=other")                     # t moves; other takes its start
    assert cma.chunks.get(old).label == "other"
    await fs.release(fh)
    assert cma.chunks.by_label("t") is None and cma.chunks.by_label("other") is not None


async def test_an_unknown_chunks_free_is_logged_once(caplog):
    cma, tree, fs, chunks = tree_with(1)
    fi = await fs.open(await lookup(fs, "free"), os.O_WRONLY, ctx(uid=1000))
    caplog.set_level(logging.INFO)
    caplog.clear()
    assert await errno_of(fs.write(fi.fh, 0, b"nosuchlabel")) == errno.ENOENT
    assert [r.getMessage() for r in caplog.records if "nosuchlabel" in r.getMessage()] == [
        "free: no chunk labelled 'nosuchlabel'"]
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    caplog.clear()
    assert await errno_of(fs.write(fi.fh, 0, b"l0")) == errno.EPERM   # root's chunk
    assert len([r for r in caplog.records if "owned by uid 0" in r.getMessage()]) == 1


async def test_listing_a_chunk_directory_never_counts_its_siblings():
    """``find`` lists every chunk directory: each listing must cost what the
    directory holds, not a walk over all chunks (a DynamicDir's len)."""
    cma, tree, fs, chunks = tree_with(500, labelled=False)
    cma.data = lambda chunk, at=None: memoryview(bytearray(chunk.size))  # no arena here
    provider = tree.root.get("chunks").provider
    walks = []
    entries = provider.entries

    def counting(after):
        walks.append(after)
        return entries(after)
    provider.entries = counting
    for c in chunks[:20]:
        await list_dir(fs, await lookup(fs, f"chunks/{c.name}"), capacity=64)
    assert walks == []
