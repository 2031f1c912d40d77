"""Arena backing: hugetlb when pages are reserved, a clean fallback when not."""

import errno
import logging
import os

import pytest

from cmad import Arena, CmaError
from cmad.memory.arena import hugepage_size
from util.pool import free_hugepages

M = 1 << 20
def test_fallback_without_hugepages_says_why(caplog):
    if free_hugepages():
        pytest.skip("hugepages are free on this machine; the fallback is not reachable")
    caplog.set_level(logging.INFO)
    arena = Arena(4 * M)
    assert arena.backing in ("thp", "shm")
    assert "hugetlb:" in arena.why and "free hugepages" in caplog.text
    arena.view(0, 4)[:] = b"abcd"
    assert bytes(arena.view(0, 4)) == b"abcd"
    arena.close()


def test_hugetlb_when_pages_are_reserved(hugepages):
    arena = Arena(3 * M)  # rounded up to whole hugepages
    assert arena.backing == "hugetlb" and arena.why == "first choice"
    assert arena.size % hugepage_size() == 0 and arena.size >= 3 * M
    arena.view(arena.size - 1, 1)[:] = b"z"
    assert bytes(arena.view(arena.size - 1, 1)) == b"z"
    arena.close()


def test_hugetlb_demanded_without_pages_is_enomem():
    if free_hugepages():
        pytest.skip("hugepages are free on this machine")
    with pytest.raises(CmaError, match="no backing worked") as e:
        Arena(4 * M, backing="hugetlb")
    assert e.value.errno == errno.ENOMEM


def test_named_file_outlives_the_arena(tmp_path):
    path = "/dev/shm/cmad-test-arena-%d" % os.getpid()
    try:
        a = Arena(2 * M, path=path, backing="shm")
        a.view(M, 5)[:] = b"hello"
        a.close()
        b = Arena(2 * M, path=path)
        assert b.existed and b.path == path
        assert bytes(b.view(M, 5)) == b"hello"
        b.close(unlink=True)
        assert not os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_bad_arguments():
    with pytest.raises(CmaError):
        Arena(M, backing="magic")
    with pytest.raises(CmaError):
        Arena(0)
    arena = Arena(M, backing="shm")
    with pytest.raises(CmaError):
        arena.view(M - 4096, 8192)
    arena.close()


def test_a_planted_arena_file_or_symlink_is_refused():
    path = f"/dev/shm/cmad-test-planted-{os.getpid()}"
    try:
        with open(path, "w"):
            pass
        os.chmod(path, 0o666)
        with pytest.raises(CmaError, match="mode 0600") as e:
            Arena(M, path=path)
        assert e.value.errno == errno.EPERM
        os.unlink(path)
        os.symlink("/tmp/elsewhere", path)
        with pytest.raises(CmaError, match="symlink"):
            Arena(M, path=path)
        assert not os.path.exists("/tmp/elsewhere")
    finally:
        if os.path.lexists(path):
            os.unlink(path)


def test_a_gather_that_cannot_start_leaves_the_pool_lock_free(monkeypatch):
    """build_file took the pool lock and then made its memfd outside the try: an
    EMFILE there kept the machine-wide lock held for the daemon's life."""
    import errno as errnos

    from cmad.memory import physmap

    class FakePool:
        page, added, depth = 2 << 20, 0, 0

        def lock(self):
            self.depth += 1

        def unlock(self):
            self.depth -= 1

        def give_back(self, n):
            pass

    def no_memfd(page):
        raise OSError(errnos.EMFILE, "Too many open files")

    monkeypatch.setattr(physmap, "Gather", no_memfd)
    pool = FakePool()
    with pytest.raises(OSError):
        physmap.build_file(None, 4 << 20, [], pool, strict=False)
    assert pool.depth == 0
