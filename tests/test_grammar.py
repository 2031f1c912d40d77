"""memparse and both grammars, exactly as SPEC section 2 writes them."""

import errno

import pytest
from hypothesis import given, strategies as st

from cmad.errors import CmaError
from cmad.core.map import Map
from cmad.memparse import fmt_addr, memparse
from cmad.core.regions import AllocSpec, parse_alloc_spec, parse_alignment, parse_regions


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("42", 42), ("0x2a", 42), ("0X2A", 42), ("052", 42), ("4k", 4096),
    ("4K", 4096), ("6M", 6 << 20), ("6m", 6 << 20), ("1G", 1 << 30), ("2t", 2 << 40),
    ("1P", 1 << 50), ("1e", 1 << 60), ("0x10M", 16 << 20), ("010K", 8 << 10),
])
def test_memparse(text, value):
    assert memparse(text) == value


@pytest.mark.parametrize("text", ["", "0x", "0xg", "08", "1Q", "1MB", "-1", " 1", "1 ",
                                  "M", "16E", "99999999999999999999", "1.5M", "٣"])
def test_memparse_rejects(text):
    with pytest.raises(CmaError, match="size") as e:
        memparse(text)
    assert e.value.errno == errno.EINVAL


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_memparse_round_trips_every_u64(n):
    assert memparse(str(n)) == n
    assert memparse(hex(n)) == n
    assert memparse(oct(n).replace("0o", "0")) == n


def test_fmt_addr_is_the_2010_p_form():
    assert fmt_addr(0x40000000) == "0000000040000000"


@pytest.mark.parametrize("text, value", [(None, 4096), (0, 4096), ("0", 4096), (1, 4096),
                                         (2048, 4096), ("1M", 1 << 20), (8192, 8192)])
def test_alignment_rules(text, value):
    assert parse_alignment(text) == value


@pytest.mark.parametrize("text", ["3000", "6M", "0x3", -4096])
def test_alignment_not_power_of_two_is_einval(text):
    with pytest.raises(CmaError) as e:
        parse_alignment(text)
    assert e.value.errno == errno.EINVAL


def test_regions_full_form():
    (r,) = parse_regions("video=32M@0x40000000/1M:bitmap(sticky,order_per_bit=2)")
    assert (r.name, r.size, r.start, r.alignment) == ("video", 32 << 20, 0x40000000, 1 << 20)
    assert r.alloc == AllocSpec("bitmap", {"order_per_bit": 2}, "sticky")


def test_regions_list_trailing_semicolon_and_rounding():
    specs = parse_regions("a=1;b=5k:buddy;")
    assert [(s.name, s.size, s.alloc.name) for s in specs] == [("a", 4096, None),
                                                               ("b", 8192, "buddy")]
    assert parse_regions("") == []
    with pytest.raises(CmaError):  # the trailing ';' is optional only after a region
        parse_regions(";")


@pytest.mark.parametrize("text, culprit", [
    ("video", "video"), ("=1M", "region name"), ("v=0", "size is 0"), ("v=1X", "size"),
    ("v=1M@", "start"), ("v=1M/", "alignment"), ("v=1M/3000", "alignment"),
    ("v=1M;v=2M", "defined twice"), ("v d=1M", "region name"), ("v=1M:bf(x)", "needs a value"),
    ("v=1M:b f", "allocator"), ("v=1M:(x=1)", "without an allocator"),
    ("v=1M:bf(a=1,a=2)", "given twice"), ("v=1M;;w=1M", "expected NAME"),
    ("v=1M:bf(order=0x)", "parameter order"),
])
def test_regions_errors_name_the_culprit(text, culprit):
    with pytest.raises(CmaError, match=culprit) as e:
        parse_regions(text)
    assert e.value.errno == errno.EINVAL


def test_alloc_spec_empty_means_default():
    assert parse_alloc_spec("") == AllocSpec()


# The worked example of SPEC section 2, with regions r1 r2 r3.
WORKED = "foo/quaz=r1;foo/*=r2;bar=r1,r2;baz?/a,baz?/b=r3"


@pytest.mark.parametrize("dev, type, regions", [
    ("foo", "quaz", ("r1",)), ("foo", "other", ("r2",)), ("bar", "any", ("r1", "r2")),
    ("baz1", "a", ("r3",)), ("baz1", "b", ("r3",)), ("bar", None, ("r1", "r2")),
])
def test_worked_map_example(dev, type, regions):
    assert Map(WORKED).lookup(dev, type) == regions


@pytest.mark.parametrize("dev, type", [("baz12", "a"), ("qux", "common"), ("baz1", "c"),
                                       ("fo", "quaz"), ("foo2", "quaz")])
def test_worked_map_example_no_match(dev, type):
    with pytest.raises(CmaError) as e:
        Map(WORKED).lookup(dev, type)
    assert e.value.errno == errno.ENOENT


def test_patch_style_platform_map():
    """The shape of the patch's Samsung platform maps: per-type firmware regions."""
    m = Map("s5p-mfc5/f=fw;s5p-mfc5/a=b1;s5p-mfc5/b=b2;s5p-fimc*=b2;*=common")
    assert m.lookup("s5p-mfc5", "f") == ("fw",)
    assert m.lookup("s5p-mfc5", "a") == ("b1",)
    assert m.lookup("s5p-fimc0") == ("b2",)
    assert m.lookup("s5p-mfc5", "x") == ("common",)
    assert m.lookup("anything") == ("common",)


def test_empty_device_part_refers_to_the_previous_device():
    m = Map("foo/a,/b,/c=r1;bar,/x=r2")
    assert m.lookup("foo", "c") == ("r1",)
    assert m.lookup("bar", "zzz") == ("r2",)
    with pytest.raises(CmaError):
        m.lookup("foo", "d")
    assert Map("/x=r").rules  # accepted by the grammar, but it can never match
    with pytest.raises(CmaError):
        Map("/x=r").lookup("any", "x")


def test_type_wildcards_and_any_type():
    m = Map("cam/pre?iew=r1;cam/*=r2;*=r3")
    assert m.lookup("cam", "preview") == ("r1",)
    assert m.lookup("cam", "still") == ("r2",)
    assert m.lookup("", "x") == ("r3",)  # trailing * matches nothing too


def test_star_alone_matches_empty_and_any():
    assert Map("a*=r").lookup("a") == ("r",)


@pytest.mark.parametrize("text, culprit", [
    ("foo", "PATTERNS=REGIONS"), ("f*o=r", "may only end"), ("foo=", "no regions"),
    ("foo/=r", "empty type"), ("a b=r", "patterns use"), ("=r", "empty pattern"),
    ("foo=r x", "region"), ("foo=r;;bar=r", "PATTERNS=REGIONS"), ("foo/t*x=r", "may only end"),
])
def test_map_errors_name_the_culprit(text, culprit):
    with pytest.raises(CmaError, match=culprit) as e:
        Map(text)
    assert e.value.errno == errno.EINVAL


@given(st.text(alphabet="ab?*/=,;x", max_size=20), st.text("abx", max_size=4),
       st.text("abx", min_size=1, max_size=3))
def test_map_never_fails_other_than_einval_enoent(text, dev, type):
    try:
        m = Map(text)
    except CmaError as e:
        assert e.errno == errno.EINVAL
        return
    try:
        assert m.lookup(dev, type)
    except CmaError as e:
        assert e.errno == errno.ENOENT
    assert Map(m.text).text == m.text  # the canonical text parses to itself
