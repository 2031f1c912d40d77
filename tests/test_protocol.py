"""The wire formats (cmad.protocol): what one side formats, the other parses back."""

import dataclasses
import errno

import pytest

from cmad import Cma
from cmad import protocol
from cmad.clients import client
from cmad.core import request
from cmad.core.regions import RegionStats
from cmad.daemon import metrics
from cmad.daemon.tree import Tree
from cmad.errors import CmaError
from cmad.protocol import ChunkInfo, Request

REGIONS, MAP = "a=16M:bf;b=16M:buddy", "*=a,b"


@pytest.mark.parametrize("args, kwargs, want", [
    (("cam", 4096), {}, Request("cam", None, (), 4096, 0, {})),
    ((protocol.device_target("cam", "video"), "6M", "1M"),
     dict(label="frame0", movable=True, transient=True, bound="512M"),
     Request("cam", "video", (), 6 << 20, 1 << 20,
             dict(label="frame0", movable=True, transient=True, bound=512 << 20))),
    ((protocol.regions_target(["a", "b"]), 1 << 20), dict(bound=1 << 30),
     Request(None, None, ("a", "b"), 1 << 20, 0, dict(bound=1 << 30))),
    ((protocol.regions_target("a"), "0x2000", 8192), dict(label="x"),
     Request(None, None, ("a",), 0x2000, 8192, dict(label="x"))),
])
def test_a_formatted_request_parses_back(args, kwargs, want):
    line = protocol.format_request(*args, **kwargs)
    assert protocol.parse_request(line) == want
    assert request.parse_request(line) == want  # the daemon's, with the core's name rules
    assert client.request_line(*args, **kwargs) == line


def test_the_core_rules_are_stricter_than_one_word():
    line = protocol.format_request("cam", 4096, label="0000000040000000")
    assert protocol.parse_request(line).options["label"] == "0000000040000000"
    with pytest.raises(CmaError) as e:
        request.parse_request(line)  # a label never reads as a start address
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("bad", [dict(target="two words"), dict(size=""),
                                 dict(label="a\tb"), dict(bound="1 M")])
def test_a_request_word_holds_no_blank(bad):
    args = dict(target="cam", size=4096) | bad
    target, size = args.pop("target"), args.pop("size")
    with pytest.raises(CmaError) as e:
        protocol.format_request(target, size, **args)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("label", [None, "frame0"])
def test_a_result_line_parses_back(label):
    cma = Cma(REGIONS, MAP)
    chunk = request.run(cma, protocol.format_request("cam", "64K", label=label))
    line = request.result_line(chunk)
    assert client.parse_result(line) == (chunk.start, chunk.size, "a", label, chunk.id)
    assert protocol.parse_result(line.replace(f" id={chunk.id}", "")).id is None


def test_a_chunkinfo_row_rendered_by_the_daemon_parses_back():
    cma = Cma(REGIONS, MAP)
    made = [request.run(cma, "cam/video 64K label=one movable", uid=7, pid=42),
            request.run(cma, "@b 1M", uid=0, pid=1)]
    rows = [text for _, text in Tree(cma)._chunkinfo_rows(None)]
    assert all(row.endswith("\n") for row in rows)
    parsed = [protocol.chunk_from_row(row.removesuffix("\n").split(" ")) for row in rows]
    assert parsed == [ChunkInfo(c.start, c.size, c.region.name, c.dev, c.type, c.uid, c.pid,
                                c.label, c.created_iso(), c.movable, c.id) for c in made]
    assert parsed[0].label == "one" and parsed[0].movable and parsed[1].label is None
    assert rows[1].split(" ")[protocol.T_LABEL] == protocol.NO_LABEL


def test_free_keys_parse_to_what_they_name():
    parse = protocol.parse_free_key
    assert parse(" 0000000040000000\n") == ("start", 0x40000000, "0000000040000000")
    assert parse("0x40000000").value == parse("1073741824").value == 0x40000000
    assert parse("id=007") == ("id", 7, "007")
    assert parse("frame0") == ("label", "frame0", "frame0")
    assert parse("0x").kind == "label"  # no digits: not an address
    for bad in ("id=", "id=x", "id=-1", "id=" + "1" * 21):
        with pytest.raises(CmaError) as e:
            parse(bad)
        assert e.value.errno == errno.EINVAL


def test_the_clients_free_keys_find_the_chunk():
    cma = Cma(REGIONS, MAP)
    chunk = request.run(cma, "cam 64K label=frame0")
    for key in (protocol.free_key(id=chunk.id), protocol.free_key(chunk.start),
                protocol.free_key("frame0"), protocol.free_key(f"{chunk.start:#x}")):
        assert cma.find(key) is chunk
    with pytest.raises(CmaError) as e:
        protocol.free_key("two words")
    assert e.value.errno == errno.EINVAL


def test_the_stat_keys_are_one_list_everywhere():
    keys = protocol.STAT_KEYS
    assert len(set(keys)) == len(keys)
    assert tuple(f.name for f in dataclasses.fields(RegionStats)) == keys
    assert metrics.STAT_KEYS == keys
    assert {k.total for k in protocol.STATS} == {"sum", "max", "derived"}
    cma = Cma(REGIONS, MAP)
    request.run(cma, "cam 64K")
    request.run(cma, "@b 1M")
    text = metrics.show_stats(cma.stats(), {"arena": 5})
    assert tuple(client.parse_keyed(text)) == keys + ("arena",)
    exposition = metrics.render(cma)
    assert all(f"# TYPE cma_region_{k.name}" in exposition for k in protocol.STATS)


def test_the_root_stats_combine_the_regions_as_the_record_says():
    cma = Cma(REGIONS, MAP)
    request.run(cma, "@a 64K")
    request.run(cma, "@b 1M")
    regions = [r.stats() for r in cma.regions]
    total = cma.stats()
    for key in protocol.STATS:
        values = [getattr(s, key.name) for s in regions]
        if key.total == "sum":
            assert getattr(total, key.name) == sum(values), key.name
        elif key.total == "max":
            assert getattr(total, key.name) == max(values), key.name
    assert total.bytes_allocated == (64 << 10) + (1 << 20)


def test_the_root_stats_leave_out_what_means_something_per_region_only():
    """One chunk in one of two regions made the summed fragmentation read 0.48:
    the root's stats file has no fragmentation line; each region's has."""
    cma = Cma(REGIONS, MAP)
    request.run(cma, "@a 64K")
    root = client.parse_keyed(metrics.show_stats(cma.stats(), root=True))
    assert "fragmentation" not in root and "largest_free" in root
    for region in cma.regions:
        assert "fragmentation" in client.parse_keyed(metrics.show_stats(region.stats()))
