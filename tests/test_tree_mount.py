"""The chunk directories through the kernel: what the kernel holds is all
the daemon keeps, and listings stay sound under churn.

statvfs's f_files is the daemon's inode table (the nodes the kernel holds).
"""

import os
import threading

from util.files import alloc, eventually, write_errno

REGIONS = ("--regions", "r=64M:bf", "--map", "*=r")


def inodes(mnt) -> int:
    return os.statvfs(mnt).f_files


def baseline(mnt) -> int:
    for name in ("alloc", "free", "chunks", "ids"):
        os.stat(mnt / name)
    return inodes(mnt)


def walk(mnt) -> int:
    """stat every file under chunks/ and ids/, as find(1) does."""
    n = 0
    for top in ("chunks", "ids"):
        for dirpath, dirnames, filenames in os.walk(mnt / top):
            for name in filenames + dirnames:
                os.lstat(os.path.join(dirpath, name))
                n += 1
    return n


def test_a_find_over_the_mount_is_given_back_when_the_chunks_go(daemon):
    mnt = daemon(*REGIONS)
    base = baseline(mnt)
    for i in range(200):
        alloc(mnt, f"x 4K label=c{i}")
    assert inodes(mnt) == base                          # nothing looked up, nothing kept
    assert walk(mnt) > 200 * 12
    assert inodes(mnt) > base + 200 * 12
    for i in range(200):
        assert write_errno(mnt / "free", f"c{i}".encode()) == 0
    # Freed names are dropped and their inodes marked deleted: the kernel
    # forgets them at once instead of caching them until memory runs low.
    assert eventually(lambda: inodes(mnt) <= base + 8), inodes(mnt) - base


def test_stat_loops_while_chunks_come_and_go_leave_no_inodes_behind(daemon):
    mnt = daemon(*REGIONS)
    base = baseline(mnt)
    stop = threading.Event()

    def stat_loop(path_of):
        n = 0
        while not stop.is_set():
            n += 1
            try:
                os.stat(path_of(n % 16))
            except OSError:
                pass

    loops = [threading.Thread(target=stat_loop, args=(f,)) for f in (
        lambda i: mnt / "chunks" / f"p{i}" / "size",
        lambda i: mnt / "ids" / str(i + 1) / "label")]
    for t in loops:
        t.start()
    try:
        for n in range(1000):
            alloc(mnt, f"x 4K label=p{n % 16}")
            assert write_errno(mnt / "free", f"p{n % 16}".encode()) == 0
    finally:
        stop.set()
        for t in loops:
            t.join()
    assert eventually(lambda: inodes(mnt) <= base + 8), inodes(mnt) - base


def test_a_listing_never_returns_a_name_twice_while_addresses_are_reused(daemon):
    """Before: 32 in 4,430 listings of chunks/ had a name twice."""
    mnt = daemon(*REGIONS)
    for i in range(600):
        alloc(mnt, f"x 4K label=k{i}")
    stop = threading.Event()

    def churn():
        n = 0
        while not stop.is_set():
            label = f"k{n % 600}"
            n += 1
            write_errno(mnt / "free", label.encode())
            alloc(mnt, f"x 4K label={label}")            # best fit: the same address

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        doubled = 0
        for _ in range(200):
            names = os.listdir(mnt / "chunks")
            doubled += len(names) != len(set(names))
    finally:
        stop.set()
        worker.join()
    assert doubled == 0
    assert len(os.listdir(mnt / "chunks")) == 1200
