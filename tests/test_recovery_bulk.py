"""Bulk recovery: the same state as restoring row by row, and tampered rows refused."""

import errno
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmad import Cma, CmaError
from cmad.daemon.recovery import recover, restore_record
from cmad.store.journal import Journal
from cmad.store.rows import BadRow, check_rows
from util.core import attach

K = 4096
REGIONS = ("a=1M:bf;b=1M:buddy;c=1M:bitmap(order_per_bit=1);d=512K:bf(sticky);"
           "g=1M:bf(pageblock=64K);h=1M:buddy(pageblock=128K)")  # g, h grouped by mobility
STARTS = {r.name: r.start for r in Cma(REGIONS).regions}
INSERT = "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def snapshot(cma: Cma) -> dict:
    """Everything recovery builds: chunks, labels, holes, counters, stats."""
    return {
        "chunks": [(c.id, c.start, c.size, c.region.name, c.dev, c.type, c.uid, c.pid, c.label,
                    c.created, c.movable, c.transient, c.bound, c.alignment) for c in cma.chunks],
        "labels": {c.label: c.start for c in cma.chunks if c.label},
        "by_label": {label: cma.chunks.by_label(label).start
                     for label in (c.label for c in cma.chunks) if label},
        "by_id": [(c.id, cma.chunks.by_id(c.id) is c) for c in cma.chunks],
        "ids_after": [c.id for c in cma.chunks.ids_after(0)],
        "regions": {r.name: (list(r.allocator.holes()), r.allocator.free_bytes,
                             r.allocator.largest_free(), r.users, r.used, r.movable_users,
                             r.alloc_ok, r.freed, r.peak_used, r.stats(),
                             grouping(r.allocator)) for r in cma.regions},
        "held": dict(cma._held),
        "next_id": cma._next_id,
    }


def grouping(allocator) -> tuple | None:
    """A grouped allocator's blocks: owners, bytes per type, counts, each type's holes."""
    if not hasattr(allocator, "block_counts"):
        return None
    return (bytes(allocator._owner), [v and list(v) for v in allocator._bytes],
            allocator.block_counts(), list(allocator._pool.holes()),
            [a and list(a.holes()) for a in allocator._typed])


def row_by_row(cma: Cma, journal: Journal) -> list[str]:
    """The reference: restore() per record, as recovery did before it went bulk."""
    problems = []
    for record in journal.records():
        if record["transient"]:
            continue
        try:
            restore_record(cma, record)
        except CmaError as e:
            problems.append(e.why)
    return problems


chunk_rows = st.lists(st.tuples(
    st.sampled_from(["a", "b", "c", "d", "g", "h", "gone"]),
    st.integers(0, 6),                       # gap before, in pages
    st.integers(1, 9),                       # size in pages
    st.sampled_from([None, None, "x", "y", "cam.0", "z_1"]),
    st.booleans(), st.integers(0, 4) .map(lambda n: n == 0),  # movable, transient (1 in 5)
    st.sampled_from([0, 1000, 1001]),
    st.sampled_from([None, 65536]),
    st.integers(-3, 3),                      # nudge: 0 keeps the layout, else may overlap
), max_size=40)


def write_journal(path, rows) -> list[tuple]:
    """Lay the rows out region by region (gaps, sizes), nudged starts may overlap."""
    journal = Journal(str(path))
    cursor = dict(STARTS, gone=STARTS["a"])
    records = []
    for i, (region, gap, pages, label, movable, transient, uid, bound, nudge) in enumerate(rows):
        start = cursor[region] + gap * K
        cursor[region] = start + pages * K
        start = max(0, start + (nudge * K if abs(nudge) == 3 else 0))
        records.append((i + 1, start, pages * K, region, "cam" if uid else "-", "-", uid,
                        100 + i, label, 1.7e9 + i, int(movable), int(transient), bound, K))
    with journal.db:
        journal.db.execute("BEGIN")
        for record in records:
            try:
                journal.db.execute(INSERT, record)
            except Exception:  # a duplicate start or label: the schema says no
                pass
    journal.close()
    return records


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=chunk_rows)
def test_bulk_recovery_equals_row_by_row(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("journal")
    write_journal(path, rows)
    reference, bulk = Cma(REGIONS), Cma(REGIONS)
    journal = Journal(str(path))
    problems = row_by_row(reference, journal)
    journal.close()
    try:
        recover(bulk, Journal(str(path)), arena_survived=True)
    except CmaError as e:
        assert problems, f"bulk refused what row by row restores: {e.why}"
        assert e.errno == errno.EINVAL
        assert snapshot(bulk) == snapshot(Cma(REGIONS)), "a refused recovery changed state"
        return
    assert not problems, f"bulk restored what row by row refuses: {problems}"
    assert snapshot(bulk) == snapshot(reference)
    bulk._check()
    for name in ("a", "b", "c", "d", "g", "h"):  # the allocators answer alike afterwards
        assert next_start(reference, name) == next_start(bulk, name)


def next_start(cma: Cma, region: str) -> int | None:
    try:
        return cma.alloc_from(region, 3 * K).start
    except CmaError:
        return None


def test_bulk_recovery_of_many_chunks_in_one_region(tmp_path):
    cma = Cma("r=64M:bf;s=8M:buddy", "*=r")
    journal = attach(cma, Journal(str(tmp_path)))
    chunks = [cma.alloc("dev", K * (1 + i % 3), label=f"c{i}" if i % 7 == 0 else None)
              for i in range(3000)]
    for chunk in chunks[::5]:
        cma.free(chunk.start)
    cma.alloc_from("s", 64 * K, movable=True)
    journal.close()
    reference, bulk = Cma("r=64M:bf;s=8M:buddy"), Cma("r=64M:bf;s=8M:buddy")
    journal = Journal(str(tmp_path))
    assert row_by_row(reference, journal) == []
    journal.close()
    assert recover(bulk, Journal(str(tmp_path)), arena_survived=True) == len(reference.chunks)
    assert snapshot(bulk) == snapshot(reference)
    bulk._check()


def test_bulk_recovery_refuses_overlaps_and_changes_nothing(tmp_path):
    write_journal(tmp_path, [("a", 0, 4, "x", False, False, 0, None, 0),
                             ("a", 0, 4, None, False, False, 0, None, 0),
                             ("gone", 20, 1, None, False, False, 0, None, 0)])
    journal = Journal(str(tmp_path))
    start = STARTS["a"] + 2 * K  # inside the first chunk
    journal.db.execute(INSERT, (9, start, K, "a", "-", "-", 0, 0, None, 0.0, 0, 0, None, K))
    cma = Cma(REGIONS)
    with pytest.raises(CmaError) as e:
        recover(cma, journal, arena_survived=True)
    assert "do not fit the configured regions" in e.value.why
    assert f"chunk {start:016x}+4 KiB overlaps another chunk" in e.value.why
    assert "region 'gone' is gone" in e.value.why
    assert len(cma.chunks) == 0 and cma.region("a").free == cma.region("a").size
    cma._check()


TAMPERED = [
    ("label", "../x", "label '../x'"),
    ("label", "a/b", "label 'a/b'"),
    ("label", "0123456789abcdef", "label '0123456789abcdef'"),
    ("size", "abc", "size 'abc'"),
    ("start", "0x40000000", "start '0x40000000'"),
    ("uid", "root", "uid 'root'"),
    ("pid", -1, "pid -1"),
    ("dev", "cam\nera", "dev 'cam\\nera'"),
    ("type", "", "type ''"),
    ("region", "a b", "region 'a b'"),
    ("created", "yesterday", "created 'yesterday'"),
    ("movable", 7, "movable 7"),
    ("transient", "yes", "transient 'yes'"),
    ("bound", 12345, "bound 12345"),
    ("alignment", 0, "alignment 0"),
    ("size", 100, "size 100"),
    ("dev", b"cam", "dev b'cam'"),
]


@pytest.mark.parametrize("column,value,shown", TAMPERED, ids=[f"{c}={v!r}" for c, v, _ in TAMPERED])
def test_tampered_row_refuses_start_with_one_line_naming_it(tmp_path, column, value, shown):
    write_journal(tmp_path, [("a", 0, 1, None, False, False, 0, None, 0),
                             ("a", 0, 1, "ok", False, False, 0, None, 0)])
    journal = Journal(str(tmp_path))
    journal.db.execute(f"UPDATE chunks SET {column} = ? WHERE id = 2", (value,))
    cma = Cma(REGIONS)
    with pytest.raises(BadRow) as e:
        recover(cma, journal, arena_survived=True)
    assert e.value.errno == errno.EINVAL
    assert "\n" not in e.value.why and e.value.why.startswith("journal row id=2 ")
    assert shown in e.value.why
    assert len(cma.chunks) == 0 and journal.count() == 2  # nothing restored, nothing dropped


def test_check_rows_passes_what_the_daemon_writes(tmp_path):
    cma = Cma(REGIONS, "*=a")
    journal = attach(cma, Journal(str(tmp_path)))
    cma.alloc("cam", 8 * K, type="preview", label="frame0", movable=True, uid=1000, pid=7)
    cma.alloc_from("c", 16 * K, bound=65536, transient=True)
    cma.alloc_from("b", 4 * K, alignment=64 * K)
    rows = [row for batch in journal.rows() for row in batch]
    assert len(rows) == 3
    check_rows(rows)  # raises on anything it refuses


def test_daemon_refuses_a_tampered_journal_with_one_line(tmp_path):
    state = tmp_path / "state"
    write_journal(state, [("a", 0, 1, None, False, False, 0, None, 0)])
    arena = tmp_path / "arena"
    arena.touch(mode=0o600)
    os.truncate(arena, Cma(REGIONS).arena_size)  # the size the journal says: no other refusal
    journal = Journal(str(state))
    journal.set(arena_file=str(arena), regions=REGIONS, base=Cma(REGIONS).base,
                arena_size=Cma(REGIONS).arena_size)
    journal.db.execute("UPDATE chunks SET label = '../x'")
    journal.close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = subprocess.run([sys.executable, "-m", "cmad.daemon.main", "--mountpoint", str(mnt),
                          "--regions", REGIONS, "--state-dir", str(state),
                          "--arena-file", str(arena), "--contiguous", "virtual"],
                         capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "journal row id=1" in errors[0] and "'../x'" in errors[0]
    assert "Traceback" not in run.stderr


def test_cmad_check_names_a_tampered_row(tmp_path):
    from cmad.daemon.offline import check

    write_journal(tmp_path, [("a", 0, 1, None, False, False, 0, None, 0)])
    journal = Journal(str(tmp_path))
    journal.set(regions=REGIONS, base=Cma(REGIONS).base, arena_file="/nonexistent")
    journal.db.execute("UPDATE chunks SET size = 'big'")
    journal.close()
    problems = check(str(tmp_path))
    assert len(problems) == 1 and problems[0].startswith("journal row id=1 ")
    assert "size 'big'" in problems[0]


def test_bulk_recovery_of_addresses_from_2_63_up(tmp_path):
    regions, base = "lo=64K:bf;hi=1M:bf", 1 << 63
    cma = Cma(regions, "*=hi", base=base)
    journal = attach(cma, Journal(str(tmp_path)))
    made = [cma.alloc("dev", 8 * K, label=f"c{i}") for i in range(5)]
    cma.alloc_from("lo", K)
    journal.close()
    assert all(c.start >= base for c in made)
    reference, bulk = Cma(regions, base=base), Cma(regions, base=base)
    journal = Journal(str(tmp_path))
    assert row_by_row(reference, journal) == []
    journal.close()
    assert recover(bulk, Journal(str(tmp_path)), arena_survived=True) == 6
    assert snapshot(bulk) == snapshot(reference)
    assert [c.start for c in bulk.chunks][1:] == [c.start for c in made]
