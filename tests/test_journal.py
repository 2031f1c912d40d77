"""The journal and recovery in process: what comes back, what is dropped, what refuses."""

import errno
import logging
import os
import pathlib

import pytest

from cmad import Cma, CmaError
from cmad.daemon.recovery import recover
from cmad.store.journal import Journal
from cmad.daemon.offline import check, reset
from util.core import attach

M = 1 << 20
REGIONS = "video=32M:bf;common=16M:buddy;dma=8M:bitmap(order_per_bit=1)"


def started(state_dir, regions=REGIONS):
    cma = Cma(regions, "camera=video;*=common")
    journal = Journal(str(state_dir))
    return cma, journal


def run_session(state_dir):
    cma, journal = started(state_dir)
    recover(cma, journal, arena_survived=True)
    journal.set(regions=REGIONS, base=cma.base, arena_file="/nonexistent")
    attach(cma, journal)
    return cma, journal


def test_recover_restores_every_acknowledged_chunk(tmp_path):
    cma, journal = run_session(tmp_path)
    a = cma.alloc("camera", 3 * M, label="a", uid=1000, pid=42, movable=True)
    b = cma.alloc("net", 5 * M, bound=8 * M)
    c = cma.alloc_from("dma", 12 << 10)
    gone = cma.alloc("camera", M)
    cma.free(gone.start)
    journal.close()  # as after kill -9: nothing but what was committed

    cma2, journal2 = started(tmp_path)
    assert recover(cma2, journal2, arena_survived=True) == 3
    got = {ch.start: ch for ch in cma2.chunks}
    for old in (a, b, c):
        new = got[old.start]
        assert (new.id, new.size, new.region.name, new.dev, new.type, new.uid, new.pid,
                new.label, new.movable, new.bound, new.created) == (
            old.id, old.size, old.region.name, old.dev, old.type, old.uid, old.pid,
            old.label, old.movable, old.bound, old.created)
    assert gone.start not in cma2.chunks
    cma2._check()
    for r in cma2.regions:
        assert r.free == cma.region(r.name).free
    assert cma2.alloc("camera", M).id > max(a.id, b.id, c.id)  # no live id is reused


def test_transient_chunks_are_freed_at_recovery(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cma, journal = run_session(tmp_path)
    keep = cma.alloc("camera", M)
    t = cma.alloc("camera", M, transient=True)
    journal.close()
    cma2, journal2 = started(tmp_path)
    assert recover(cma2, journal2, arena_survived=True) == 1
    assert keep.start in cma2.chunks and t.start not in cma2.chunks
    assert "freed 1 transient" in caplog.text
    assert [r["id"] for r in journal2.records()] == [keep.id]


def test_arena_gone_drops_records_with_a_warning(tmp_path, caplog):
    cma, journal = run_session(tmp_path)
    cma.alloc("camera", M)
    journal.close()
    cma2, journal2 = started(tmp_path)
    assert recover(cma2, journal2, arena_survived=False) == 0
    assert "arena file is gone" in caplog.text and journal2.count() == 0
    assert len(cma2.chunks) == 0


def test_shrunk_region_refuses_and_changes_nothing(tmp_path):
    cma, journal = run_session(tmp_path)
    big = cma.alloc("camera", 20 * M, label="big")
    cma.alloc("camera", M, transient=True)
    journal.close()
    cma2, journal2 = started(tmp_path, regions="video=8M:bf;common=16M:buddy;dma=8M:bitmap")
    with pytest.raises(CmaError, match=f"{big.start:016x}.*not inside region video") as e:
        recover(cma2, journal2, arena_survived=True)
    assert e.value.errno == errno.EINVAL
    assert journal2.count() == 2  # neither the chunk nor the transient one was dropped


def test_missing_region_refuses(tmp_path):
    cma, journal = run_session(tmp_path)
    cma.alloc_from("dma", 8 << 10)
    journal.close()
    cma2, journal2 = started(tmp_path, regions="video=32M;common=16M")
    with pytest.raises(CmaError, match="region 'dma' is gone"):
        recover(cma2, journal2, arena_survived=True)


def test_check_finds_overlap_and_passes_clean_state(tmp_path, capsys):
    cma, journal = run_session(tmp_path)
    a = cma.alloc("camera", 2 * M)
    arena = tmp_path / "arena"
    arena.write_bytes(b"")
    journal.set(arena_file=str(arena))
    journal.close()
    assert check(str(tmp_path)) == []
    assert "ok: 1 chunks" in capsys.readouterr().out
    journal = Journal(str(tmp_path))
    journal.db.execute("INSERT INTO chunks VALUES (99, ?, ?, 'video', 'x', 'common', 0, 0, "
                       "NULL, 0, 0, 0, NULL, 4096)", (a.start + M, 2 * M))
    journal.close()
    problems = check(str(tmp_path))
    assert len(problems) == 1 and "overlaps" in problems[0]
    arena.unlink()
    assert any("gone" in p for p in check(str(tmp_path)))


def test_check_without_journal_and_reset(tmp_path):
    assert "no journal" in check(str(tmp_path))[0]
    cma, journal = run_session(tmp_path)
    arena = pathlib.Path(f"/dev/shm/cmad-test-reset-{os.getpid()}")  # the daemon's own
    arena.write_bytes(b"x")
    arena.chmod(0o600)
    journal.set(arena_file=str(arena))
    journal.close()
    reset(str(tmp_path))
    assert not arena.exists() and not (tmp_path / "journal.db").exists()


def test_reset_never_deletes_a_file_that_is_not_the_daemons_own(tmp_path):
    cma, journal = run_session(tmp_path)
    other = tmp_path / "precious"  # on disk, mode 0644: not an arena file of ours
    other.write_bytes(b"x")
    journal.set(arena_file=str(other))
    journal.close()
    reset(str(tmp_path))
    assert other.read_bytes() == b"x" and not (tmp_path / "journal.db").exists()


def test_journal_failure_vetoes_the_allocation(tmp_path):
    cma, journal = run_session(tmp_path)
    journal.db.execute("DROP TABLE chunks")
    with pytest.raises(CmaError) as e:
        cma.alloc("camera", M)
    assert e.value.errno == errno.EIO and len(cma.chunks) == 0
    cma._check()


def test_the_movable_flag_survives_a_restart_after_a_pin_and_after_a_move(tmp_path):
    cma, journal = run_session(tmp_path)
    pinned = cma.alloc("camera", M, label="pinned", movable=True)
    cma.pin(pinned)
    low = cma.alloc("camera", M)
    mover = cma.alloc("camera", M, label="mover", movable=True)
    cma.free(low.start)
    assert cma.compact("video") == 1 and mover.start == low.start
    journal.close()

    cma2, journal2 = started(tmp_path)
    assert recover(cma2, journal2, arena_survived=True) == 2
    got = {c.label: c for c in cma2.chunks}
    assert got["pinned"].movable is False and got["mover"].movable is True
    assert got["mover"].start == low.start
    assert cma2.region("video").movable_users == 1
    cma2._check()
