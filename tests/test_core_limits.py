"""Bounds on what one client request can cost or make the daemon say: names,
numbers, region lists, limits, log lines (issue 10 items 11, 14 and the smaller ones)."""

import errno
import subprocess
import sys

import pytest

from cmad import Cma

from cmad.core import request
from cmad.memparse import memparse
from cmad.daemon.ratelimit import MAX_LINE, ClientLogFilter, TokenBucket
from cmad.core.regions import parse_regions

M = 1 << 20
K = 1 << 10
from util.core import raises as refused
from util.logs import logger_with, restore




# -- numbers and names --------------------------------------------------------

@pytest.mark.parametrize("text", ["9" * 5000, "0" * 5000 + "1", "0x" + "f" * 5000,
                                  "1" * 65 + "K"])
def test_huge_numbers_are_one_short_einval(text):
    e = refused(errno.EINVAL, memparse, text, "request size")
    assert len(e.why) < 200 and "chars" in e.why


def test_huge_number_in_a_request_is_einval(cma):
    e = refused(errno.EINVAL, request.run, cma, "camera " + "9" * 5000)
    assert len(e.why) < 200 and len(cma.chunks) == 0


def test_huge_base_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cmad.daemon.main", "--mountpoint", str(tmp_path),
                        "--base", "9" * 5000], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert len(r.stderr) < 300


@pytest.mark.parametrize("name", [".", "..", "0000000040000000", "00000000deadBEEF",
                                  "x" * 65])
def test_region_names_that_alias_tree_entries_are_einval(name):
    e = refused(errno.EINVAL, parse_regions, f"video=4M;{name}=4M")
    assert "region name" in e.why


def test_region_name_equal_to_another_regions_start_is_refused_by_cma():
    refused(errno.EINVAL, Cma, "a=4M;0000000040000000=4M")


def test_region_name_of_64_characters_is_fine():
    assert parse_regions(f"{'r' * 64}=4M")[0].name == "r" * 64


@pytest.mark.parametrize("text", ["d" * 65 + " 4K", "camera/" + "t" * 65 + " 4K",
                                  "cam\nera 4K", "camera/pre\nview 4K", "@" + "v" * 65 + " 4K"])
def test_request_names_are_bounded_and_single_line(cma, text):
    e = refused(errno.EINVAL, request.run, cma, text)
    assert len(e.why) < 300 and len(cma.chunks) == 0


@pytest.mark.parametrize("dev, type", [("cam\nera", None), ("camera", "a\nb"),
                                       ("d" * 65, None), ("camera", "t" * 65), ("", None)])
def test_core_alloc_refuses_names_no_request_could_carry(cma, dev, type):
    refused(errno.EINVAL, cma.alloc, dev, 4 * K, type=type)
    assert len(cma.chunks) == 0


def test_names_of_64_characters_are_fine(cma):
    chunk = request.run(cma, f"{'d' * 64}/{'t' * 64} 4K")
    assert (chunk.dev, chunk.type) == ("d" * 64, "t" * 64)


# -- the region list of one request (item 11) ---------------------------------------

def test_region_named_twice_is_einval_before_any_try(cma):
    cma.alloc_from("dma", 8 * M)  # dma is full
    text = "@" + ",".join(["dma"] * 2040) + " 64K"
    e = refused(errno.EINVAL, request.run, cma, text)
    assert "named twice" in e.why and len(e.why) < 300
    assert cma.region("dma").alloc_fail == 0
    refused(errno.EINVAL, cma.alloc_from, ["video", "dma", "video"], 4 * K)
    assert len(cma.chunks) == 1


def test_map_naming_a_region_twice_tries_and_charges_it_once():
    cma = Cma("a=1M;b=1M", "x=a,a,b,a")
    cma.alloc_from("a", M)
    cma.alloc_from("b", M)
    refused(errno.ENOMEM, cma.alloc, "x", 4 * K)
    assert [r.alloc_fail for r in cma.regions] == [1, 1]


def test_distinct_regions_are_each_charged_once(cma):
    cma.alloc_from("dma", 8 * M)
    cma.alloc_from("common", 16 * M)
    refused(errno.ENOMEM, request.run, cma, "@dma,common 64K")
    assert cma.region("dma").alloc_fail == 1 and cma.region("common").alloc_fail == 1


# -- a region past the caller's limit is skipped like a full one (SPEC 6) --------------

LIMITED = "blk=16M:bitmap(order_per_bit=9);video=16M:bf;full=1M"


def test_edquot_does_not_stop_the_fallback():
    cma = Cma(LIMITED, "*=blk,video", limits={1000: M})
    chunk = request.run(cma, "@blk,video 1M", uid=1000)  # blk's 2 MiB block is over 1 MiB
    assert chunk.region.name == "video" and chunk.size == M
    assert cma.region("blk").used == 0 and cma.region("blk").alloc_fail == 0
    cma.free(chunk.start)
    assert cma.alloc("dev", M, uid=1000).region.name == "video"  # through the map too
    cma._check()


def test_edquot_when_only_regions_past_the_limit_had_room():
    cma = Cma(LIMITED, "", limits={1000: M})
    cma.alloc_from("full", M)
    e = refused(errno.EDQUOT, request.run, cma, "@full,blk 1M", uid=1000)
    assert "blk" in e.why
    assert cma.region("full").alloc_fail == 1 and cma.region("blk").alloc_fail == 0
    assert cma.region("blk").used == 0 and cma.held(1000) == 0
    refused(errno.ENOMEM, request.run, cma, "@full 1M", uid=1000)
    cma._check()


# -- log lines (item 14) ------------------------------------------------------

def test_refusals_of_long_client_text_make_short_whys(cma):
    for text in ("x" * 4000, "camera 4K label=" + "l" * 4000, "camera 4K " + "o" * 4000,
                 "camera " + "4" * 4000, "@" + "r" * 4000 + " 4K"):
        e = refused(errno.EINVAL, request.run, cma, text)
        assert len(e.why) < 300, e.why
    e = refused(errno.ENOENT, cma.free, "L" * 4000)
    assert len(e.why) < 300


def test_every_line_is_bounded():
    log, handler = logger_with(ClientLogFilter(), "cmad.test.bound")
    try:
        log.info("write %s", "x" * 100_000)
        (line,) = handler.lines
        assert len(line) < MAX_LINE + 40 and line.endswith("chars cut)")
    finally:
        restore(log, handler)


def test_token_bucket_burst_then_refill():
    now = [0.0]
    bucket = TokenBucket(burst=10, interval=5.0, clock=lambda: now[0])
    assert sum(bucket.allow() for _ in range(100)) == 10 and bucket.missed == 90
    now[0] += 0.5  # one token back
    assert bucket.allow() and not bucket.allow()
    now[0] += 60
    assert sum(bucket.allow() for _ in range(100)) == 10


def test_client_warnings_are_rate_limited_per_call_site_with_a_count():
    now = [0.0]
    log, handler = logger_with(ClientLogFilter(clock=lambda: now[0]))

    def refuse():  # one call site, as the fusefs boundary's
        log.warning("setattr inode %d: EPERM: chmod/chown are not supported", 5)

    try:
        for _ in range(1000):
            refuse()
        assert len(handler.lines) == 10
        log.warning("another call site has its own bucket")
        for _ in range(1000):
            log.info("the same at INFO is not a warning: %d", 1)  # not limited here
        assert len(handler.lines) == 1011
        now[0] += 5
        refuse()
        assert handler.lines[-1] == ("setattr inode 5: EPERM: chmod/chown are not supported "
                                     "(990 similar lines suppressed)")
    finally:
        restore(log, handler)


def test_a_refusal_the_core_warned_about_is_one_line(cma):
    log_filter = ClientLogFilter()
    core, handler = logger_with(log_filter, "cmad.core.cma")
    boundary, boundary_handler = logger_with(log_filter, "fusefs")
    try:
        e = refused(errno.ENOENT, cma.free, "nolabel")
        boundary.info("write /free: ENOENT: %s", e.why)  # what fusefs logs next
        boundary.info("write /free: ENOENT: %s", e.why)  # not after a warning: kept
        assert handler.lines == ["free: no chunk labelled 'nolabel'"]
        assert boundary_handler.lines == ["write /free: ENOENT: no chunk labelled 'nolabel'"]
    finally:
        restore(core, handler)
        restore(boundary, boundary_handler)


def test_the_cores_unknown_free_warning_is_rate_limited(cma):
    log, handler = logger_with(ClientLogFilter(), "cmad.core.cma")
    try:
        for i in range(200):
            refused(errno.ENOENT, cma.free, f"nolabel{i}")
        assert len(handler.lines) == 10
    finally:
        restore(log, handler)


# -- configuration mistakes are one line and exit 2, never a traceback ------------------

@pytest.mark.parametrize("args, message", [
    (("--regions", "a=32M;b=32M", "--base", "0xfffffffffe000000"), "past 2^64"),
    (("--state-dir", "FILE"), "is not a directory"),
    (("--regions", "video=4M;..=4M"), "region name '..'"),
])
def test_configuration_mistakes_are_one_line(tmp_path, args, message):
    (tmp_path / "FILE").touch()
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "cmad.daemon.main", "--mountpoint",
                        str(tmp_path / "mnt"), *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
