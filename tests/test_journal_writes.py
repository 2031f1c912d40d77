"""The journal's write path in process: a full state disk, addresses from 2^63 up,
ids never reused across restarts, allocators written at runtime."""

import errno
import logging
import sqlite3

import pytest

from cmad import Cma, CmaError
from cmad.daemon.config import Config
from cmad.daemon.recovery import recover, restore_allocators
from cmad.store.journal import Journal
from cmad.daemon.main import build
from cmad.daemon.offline import check
from util.core import attach

M = 1 << 20
K = 1 << 10
REGIONS = "video=32M:bf;common=16M:buddy;dma=8M:bitmap(order_per_bit=2)"
MAP = "camera=video;*=common"


def full_error() -> sqlite3.OperationalError:
    e = sqlite3.OperationalError("database or disk is full")
    e.sqlite_errorcode = sqlite3.SQLITE_FULL
    return e


class FullDisk:
    """The journal's connection, whose writes fail as SQLite's do on a full disk
    while ``full`` is set (reads still work, as they do there)."""

    def __init__(self, db: sqlite3.Connection):
        self.db, self.full = db, False

    def _check(self, sql: str) -> None:
        if self.full and not sql.lstrip().upper().startswith(("SELECT", "PRAGMA")):
            raise full_error()

    def execute(self, sql, *args):
        self._check(sql)
        return self.db.execute(sql, *args)

    def executemany(self, sql, *args):
        self._check(sql)
        return self.db.executemany(sql, *args)

    def __enter__(self):
        return self.db.__enter__()

    def __exit__(self, *exc):
        return self.db.__exit__(*exc)

    def close(self):
        self.db.close()


def session(state_dir, regions=REGIONS):
    """A Cma whose journal is recovered and listening, as the daemon's build() does."""
    cma = Cma(regions, MAP)
    journal = Journal(str(state_dir))
    next_id = journal.next_id()
    restore_allocators(cma, journal)
    recover(cma, journal, arena_survived=True)
    cma.skip_ids(next_id)
    arena = state_dir / "arena"  # for cmad check: the chunks' bytes are there
    arena.touch()
    journal.set(regions=regions, base=cma.base, arena_file=str(arena))
    attach(cma, journal)
    return cma, journal


def users(cma) -> dict:
    return {r.name: (r.users, r.free) for r in cma.regions}


# -- a full state disk (SPEC 5) -------------------------------------------

def test_full_disk_allocation_is_enospc_and_changes_nothing(tmp_path):
    cma, journal = session(tmp_path)
    journal.db = disk = FullDisk(journal.db)
    cma.alloc("camera", M, label="kept")
    before = users(cma)
    disk.full = True
    with pytest.raises(CmaError) as e:
        cma.alloc("camera", M, label="new")
    assert e.value.errno == errno.ENOSPC, e.value
    assert users(cma) == before and cma.chunks.by_label("new") is None
    cma._check()
    disk.full = False
    assert cma.alloc("camera", M, label="new").label == "new"  # the label was not taken


def test_full_disk_frees_take_effect_and_the_journal_catches_up(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cma, journal = session(tmp_path)
    journal.db = disk = FullDisk(journal.db)
    keep = cma.alloc("camera", M, label="keep")
    a = cma.alloc("camera", M, label="a")
    b = cma.alloc("net", 64 * K, transient=True)
    disk.full = True
    assert cma.free("a").id == a.id  # no EIO: the memory is free now
    cma.free(b.start)  # what a transient chunk's release does
    assert list(cma.chunks) == [keep]
    assert cma.region("video").used == M and cma.region("common").used == 0
    assert sorted(journal.unrecorded) == [a.id, b.id]
    assert caplog.text.count("cannot record the free") == 1  # once per outage
    with pytest.raises(CmaError) as e:  # the freed label's row is still there
        cma.alloc("camera", M, label="a")
    assert e.value.errno == errno.ENOSPC
    cma.catch_up()  # the heartbeat's retry, disk still full
    assert len(journal.unrecorded) == 2
    disk.full = False
    cma.catch_up()
    assert journal.unrecorded == {}
    assert "recorded 2 frees that waited" in caplog.text
    assert [r["id"] for r in journal.records()] == [keep.id]
    journal.close()
    cma2, _ = session(tmp_path)  # a restart after the outage brings back only `keep`
    assert [c.label for c in cma2.chunks] == ["keep"]


def test_full_disk_deferred_free_is_recorded_before_the_next_allocation(tmp_path):
    cma, journal = session(tmp_path)
    journal.db = disk = FullDisk(journal.db)
    a = cma.alloc("camera", M, label="a")
    disk.full = True
    cma.free("a")
    disk.full = False
    again = cma.alloc("camera", M, label="a")  # same start, same label: no UNIQUE clash
    assert again.start == a.start and journal.unrecorded == {}
    assert [r["id"] for r in journal.records()] == [again.id]


def test_full_disk_refuses_an_allocator_change_and_keeps_the_old_one(tmp_path):
    cma, journal = session(tmp_path)
    journal.db = disk = FullDisk(journal.db)
    disk.full = True
    with pytest.raises(CmaError) as e:
        cma.set_allocator("dma", "bf")
    assert e.value.errno == errno.ENOSPC
    assert cma.region("dma").alloc_text == "bitmap"
    assert cma.region("dma").wanted.params == {"order_per_bit": 2}
    disk.full = False
    assert cma.alloc_from("dma", 4 * K).size == 16 * K  # still blocks of four pages


# -- addresses from 2^63 up -------------------------------------------------

def test_base_past_2_63_is_journalled_and_recovered(tmp_path):
    base = 0x8000000000000000
    cma = Cma(REGIONS, MAP, base=base)
    journal = attach(cma, Journal(str(tmp_path)))
    a = cma.alloc("camera", M, label="high", alignment=1 << 63)
    b = cma.alloc_from("video", 4 * K, bound=8 * K)
    cma.free(cma.alloc("net", 64 * K).start)
    assert a.start >= 1 << 63
    journal.close()
    cma2 = Cma(REGIONS, MAP, base=base)
    journal2 = Journal(str(tmp_path))
    assert recover(cma2, journal2, arena_survived=True) == 2
    got = {c.label: (c.start, c.size, c.alignment, c.bound) for c in cma2.chunks}
    assert got == {"high": (a.start, a.size, a.alignment, None),
                   None: (b.start, b.size, b.alignment, b.bound)}
    journal2.on_move(a, a.start)  # an update of a high start is recorded too
    cma2._check()


# -- ids are never reused, also not across restarts ---------------------------

def test_ids_are_never_reused_across_restarts(tmp_path):
    cma, journal = session(tmp_path)
    a = cma.alloc("camera", M)
    b = cma.alloc("camera", M)
    t = cma.alloc("camera", M, transient=True)
    cma.free(b.start)  # the highest live id after recovery is a's
    journal.close()
    cma2, journal2 = session(tmp_path)
    assert cma2.alloc("camera", M).id > max(a.id, b.id, t.id)
    journal2.close()


def test_build_keeps_ids_unique_across_restarts(tmp_path):
    """The daemon's own wiring: main.build twice on one state directory."""
    config = Config(mountpoint=str(tmp_path / "mnt"), state_dir=str(tmp_path / "state"),
                    arena_file=str(tmp_path / "arena"), backing="shm",
                    regions="video=32M:bf;common=16M:buddy;dma=8M:bitmap",
                    map="camera,video=video;*=common")  # no shared region: no file outside tmp
    seen = set()
    for _ in range(3):
        cma, journal = build(config)
        try:
            kept = cma.alloc("camera", 64 * K, label=f"l{len(seen)}")  # keeps the arena
            seen.add(kept.id)
            for _ in range(3):  # freed ids above every live one
                chunk = cma.alloc("camera", 64 * K)
                assert chunk.id not in seen
                seen.add(chunk.id)
                cma.free(chunk.start)
        finally:
            cma.arena.close()
            journal.close()
    assert not any("test_build_keeps_ids" in name for name in _shared_files())


def _shared_files() -> list[str]:
    import os
    return [name for top, _, names in os.walk("/run/cmad-shared") for name in names]


# -- allocators written at runtime (SPEC 5) -------------------------------------

def test_runtime_allocator_comes_back_before_its_chunks(tmp_path):
    cma, journal = session(tmp_path)
    cma.set_allocator("dma", "bf")
    one, two = cma.alloc_from("dma", 4 * K), cma.alloc_from("dma", 4 * K)
    assert two.start == one.start + 4 * K  # inside one bitmap(order_per_bit=2) block
    journal.close()
    cma2, journal2 = session(tmp_path)
    assert cma2.region("dma").alloc_text == "bf"
    assert sorted(c.start for c in cma2.chunks) == [one.start, two.start]
    journal2.close()
    assert check(str(tmp_path)) == [], "cmad check restores it too"


def test_runtime_allocator_of_an_empty_region_comes_back(tmp_path):
    cma, journal = session(tmp_path)
    cma.set_allocator("common", "bitmap(order_per_bit=1)")
    journal.close()
    cma2, journal2 = session(tmp_path)
    assert cma2.region("common").alloc_text == "bitmap"
    assert cma2.region("common").wanted.params == {"order_per_bit": 1}
    cma2.set_allocator("common", "buddy")  # back to the configuration's: nothing kept
    assert journal2.runtime_allocator("common") is None
    journal2.close()


def test_changed_configuration_wins_over_a_runtime_allocator_of_an_empty_region(
        tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cma, journal = session(tmp_path)
    cma.set_allocator("dma", "bf")
    journal.close()
    changed = REGIONS.replace("bitmap(order_per_bit=2)", "buddy")
    cma2, journal2 = session(tmp_path, changed)
    assert cma2.region("dma").alloc_text == "buddy"
    assert "replaces 'bf'" in caplog.text
    assert journal2.runtime_allocator("dma") is None  # dropped: it never comes back
    journal2.close()


def test_runtime_allocator_stays_while_its_chunks_live_under_a_changed_configuration(
        tmp_path, caplog):
    cma, journal = session(tmp_path)
    cma.set_allocator("dma", "bf")
    one, two = cma.alloc_from("dma", 4 * K), cma.alloc_from("dma", 4 * K)
    journal.close()
    changed = REGIONS.replace("bitmap(order_per_bit=2)", "buddy")
    cma2, journal2 = session(tmp_path, changed)  # does not fail
    assert cma2.region("dma").alloc_text == "bf"
    assert "keeping allocator 'bf'" in caplog.text
    cma2.free(one.start)
    cma2.free(two.start)
    journal2.close()
    cma3, journal3 = session(tmp_path, changed)  # empty now: the configuration wins
    assert cma3.region("dma").alloc_text == "buddy"
    journal3.close()


def test_pending_runtime_allocator_stays_pending_after_a_restart(tmp_path):
    cma, journal = session(tmp_path)
    cma.set_allocator("video", "later")
    journal.close()
    cma2, journal2 = session(tmp_path)
    assert cma2.region("video").alloc_text == "[later]"
    journal2.close()


def test_runtime_allocator_of_a_region_the_configuration_dropped_is_forgotten(tmp_path):
    cma, journal = session(tmp_path)
    cma.set_allocator("dma", "bf")
    journal.close()
    _, journal2 = session(tmp_path, "video=32M:bf;common=16M:buddy")
    assert journal2.runtime_allocator_regions() == []
    journal2.close()
    cma3, journal3 = session(tmp_path)  # dma is back as configured, not as written then
    assert cma3.region("dma").alloc_text == "bitmap"
    journal3.close()


def test_writing_back_the_configured_allocator_of_a_sticky_region_drops_the_record(tmp_path):
    regions = "video=32M:bf(sticky);common=16M:buddy"
    cma, journal = session(tmp_path, regions)
    cma.set_allocator("video", "buddy")
    assert journal.runtime_allocator("video") == ("buddy", "bf(sticky)")
    cma.set_allocator("video", "bf")  # the kind is the configuration's, not the write's
    assert journal.runtime_allocator("video") is None
    journal.close()
