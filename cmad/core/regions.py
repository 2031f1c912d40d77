"""Regions: the ``cma=`` grammar, placement in the arena, and the Region record.

    regions-attr ::= [ regions [ ';' ] ]
    regions      ::= region [ ';' regions ]
    region       ::= REG-NAME '=' size [ '@' start ] [ '/' alignment ]
                     [ ':' ALLOC-NAME [ '(' params ')' ] ]

Regions with ``@start`` are placed first, then the others in the order
written, each at the lowest free arena address that fits.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field

from cmad.allocators import PAGE_SIZE, Allocator
from cmad.allocators.pageblocks import make_allocator
from cmad.errors import CmaError, clip, einval
from cmad.memparse import align_up, fmt_addr, human, is_power_of_two, memparse

NAME_MAX = 64  # as labels: names are file names and log words, never a client's essay
NAME = re.compile(r"[A-Za-z0-9_.-]{1,%d}" % NAME_MAX)
_START_DIR = re.compile(r"[0-9a-fA-F]{16}")
KINDS = ("exclusive", "sticky")
#: A region shared with a group (SPEC 4d) starts and ends on this boundary, so that
#: its hugepages (2 MiB on x86) are its own and its file holds no other region's bytes.
SHARED_ALIGN = 2 << 20

_REGION = re.compile(
    r"(?P<name>[^=]*)=(?P<size>[^@/:]*)(?:@(?P<start>[^/:]*))?"
    r"(?:/(?P<align>[^:]*))?(?::(?P<alloc>.*))?"
)
_ALLOC = re.compile(r"(?P<name>[^()]*)(?:\((?P<params>[^()]*)\))?")


def check_name(name: str, what: str) -> str:
    """Device, type, region and parameter names: ``[A-Za-z0-9_.-]``, 1 to 64 of them
    (fullmatch: no trailing newline slips through, as it would with ``$``)."""
    if not NAME.fullmatch(name):
        raise einval(f"{what} {clip(name)}: names use only [A-Za-z0-9_.-], 1 to "
                     f"{NAME_MAX} of them")
    return name


def check_region_name(name: str, what: str = "region name") -> str:
    """A region name is also an entry of ``regions/`` beside the ``%016x`` start
    directories: ``.``, ``..`` and 16 hex digits would alias one of those."""
    check_name(name, what)
    if name in (".", "..") or _START_DIR.fullmatch(name):
        raise einval(f"{what} {name!r}: '.', '..' and 16 hex digits are names of "
                     "directories in regions/")
    return name


def page_align(size: int) -> int:
    return (size + PAGE_SIZE - 1) & -PAGE_SIZE


def parse_alignment(text: str | int | None, what: str = "alignment") -> int:
    """0 or nothing means the page size; powers of two below it round up to it."""
    value = memparse(text, what) if isinstance(text, str) else (text or 0)
    if value < 0:
        raise einval(f"{what} {value} is negative")
    if value == 0:
        return PAGE_SIZE
    if not is_power_of_two(value):
        raise einval(f"{what} {value:#x} is not a power of two")
    return max(value, PAGE_SIZE)


@dataclass(frozen=True)
class AllocSpec:
    """``ALLOC-NAME [ '(' params ')' ]`` with the core's own word ``sticky`` taken out."""

    name: str | None = None  # None: the default allocator
    params: dict[str, int] = field(default_factory=dict)
    kind: str = "exclusive"
    group: str | None = None  # the group the region is shared with (SPEC 4d), consumed like sticky


def alloc_spec_text(spec: AllocSpec) -> str:
    """The canonical text of a spec (parse_alloc_spec reads it back as the same)."""
    params = ([spec.kind] if spec.kind != "exclusive" else []) + (
        [f"group={spec.group}"] if spec.group else []) + [
        f"{k}={v}" for k, v in sorted(spec.params.items())]
    return (spec.name or "") + (f"({','.join(params)})" if params else "")


def parse_alloc_spec(text: str, what: str = "allocator") -> AllocSpec:
    m = _ALLOC.fullmatch(text.strip())
    if m is None:
        raise einval(f"{what} {text!r}: expected NAME or NAME(params)")
    name, params, kind, group = m["name"].strip(), {}, "exclusive", None
    if name:
        check_name(name, what)
    elif m["params"] is not None:
        raise einval(f"{what} {text!r}: parameters without an allocator name")
    for item in filter(None, (p.strip() for p in (m["params"] or "").split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            if key not in KINDS:
                raise einval(f"{what} {text!r}: parameter {key!r} needs a value")
            kind = key
            continue
        check_name(key, f"{what} parameter")
        if key == "group":
            if group is not None:
                raise einval(f"{what} {text!r}: parameter 'group' given twice")
            group = check_group_name(value.strip(), f"{what}: group")
            continue
        if key in params:
            raise einval(f"{what} {text!r}: parameter {key!r} given twice")
        params[key] = memparse(value.strip(), f"{what} parameter {key}")
    return AllocSpec(name or None, params, kind, group)


def check_group_name(name: str, what: str = "group") -> str:
    """A group a region is shared with names a directory (/run/cmad-shared/<group>):
    the name rules, and never '.' or '..'."""
    check_name(name, what)
    if name in (".", ".."):
        raise einval(f"{what} {name!r} is not a group name")
    return name


@dataclass(frozen=True)
class RegionSpec:
    name: str
    size: int
    start: int | None
    alignment: int
    alloc: AllocSpec


def parse_regions(text: str) -> list[RegionSpec]:
    """Parse a regions attribute; EINVAL names the offending region."""
    specs: list[RegionSpec] = []
    seen: set[str] = set()
    parts = text.strip().split(";")
    if parts and parts[-1].strip() == "":
        parts.pop()  # the optional trailing ';' (or an empty attribute)
    for part in parts:
        spec = _parse_region(part.strip())
        if spec.name in seen:
            raise einval(f"region {spec.name!r} is defined twice")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _parse_region(text: str) -> RegionSpec:
    m = _REGION.fullmatch(text)
    if m is None:
        raise einval(f"region {text!r}: expected NAME=SIZE[@START][/ALIGN][:ALLOC[(PARAMS)]]")
    name = check_region_name(m["name"])
    size = memparse(m["size"], f"region {name}: size")
    if size == 0:
        raise einval(f"region {name}: size is 0")
    start = memparse(m["start"], f"region {name}: start") if m["start"] is not None else None
    alignment = parse_alignment("0" if m["align"] is None else m["align"],
                                f"region {name}: alignment")
    alloc = parse_alloc_spec(m["alloc"], f"region {name}: allocator") if m["alloc"] is not None \
        else AllocSpec()
    if alloc.group is not None:
        if size % SHARED_ALIGN:
            raise einval(f"region {name}: shared with group {alloc.group}, its size "
                         f"{human(size)} must be a multiple of {human(SHARED_ALIGN)} (the "
                         "region's memory is a file of whole hugepages of its own)")
        alignment = max(alignment, SHARED_ALIGN)
    return RegionSpec(name, page_align(size), start, alignment, alloc)


def layout(specs: list[RegionSpec], base: int, arena_size: int | None,
           granules: dict[str, int]) -> dict[str, int]:
    """Place regions: ``@start`` ones first, then the rest lowest-fit in order written.

    ``granules`` gives each region's allocator granule (auto placement honours
    it).  Returns name -> start.  EINVAL for a start outside the arena,
    EADDRINUSE for overlap, ENOMEM when the regions do not fit the arena.
    """
    limit = base + arena_size if arena_size is not None else None
    placed: list[tuple[int, int, str]] = []  # (start, end, name), kept sorted

    def claim(name: str, start: int, size: int) -> None:
        for s, e, other in placed:
            if start < e and s < start + size:
                raise CmaError(errno.EADDRINUSE,
                               f"region {name} [{start:#x}, {start + size:#x}) overlaps "
                               f"region {other} [{s:#x}, {e:#x})")
        if start + size > 1 << 64:
            raise einval(f"region {name} ({human(size)} at {start:#x}) would end past 2^64: "
                         "bus addresses are 64-bit")
        if limit is not None and start + size > limit:
            raise CmaError(errno.ENOMEM,
                           f"region {name} ({human(size)} at {start:#x}) does not fit in the "
                           f"arena of {human(arena_size)} at {base:#x}")
        placed.append((start, start + size, name))
        placed.sort()

    starts: dict[str, int] = {}
    for spec in specs:
        if spec.start is None:
            continue
        start = align_up(spec.start, spec.alignment)
        if start < base:
            raise einval(f"region {spec.name}: start {spec.start:#x} is below the arena "
                         f"base {base:#x}")
        if limit is not None and start >= limit:
            raise einval(f"region {spec.name}: start {spec.start:#x} is past the arena end "
                         f"{limit:#x}")
        claim(spec.name, start, spec.size)
        starts[spec.name] = start
    for spec in specs:
        if spec.start is not None:
            continue
        alignment = max(spec.alignment, granules.get(spec.name, PAGE_SIZE))
        start = align_up(base, alignment)
        for s, e, _ in placed:
            if start + spec.size <= s:
                break
            start = max(start, align_up(e, alignment))
        claim(spec.name, start, spec.size)
        starts[spec.name] = start
    return starts


@dataclass(frozen=True)
class RegionStats:
    """A frozen snapshot of a region's counters, as trio's ``statistics()``.
    Its fields are the stat keys of `cmad.protocol.STATS`, in that order (the
    wire record; tests/test_protocol.py holds the two together)."""

    alloc_ok: int
    alloc_fail: int
    freed: int
    bytes_allocated: int
    largest_free: int
    fragmentation: float
    peak_used: int
    moved: int
    compactions: int
    pageblock: int = 0  # grouping by mobility (SPEC 4b); 0: off
    blocks_free: int = 0
    blocks_pinned: int = 0
    blocks_movable: int = 0
    blocks_mixed: int = 0
    fallbacks: int = 0


def fragmentation(free: int, largest_free: int) -> float:
    return 0.0 if free == 0 else 1.0 - largest_free / free


class Region:
    """A named, contiguous range of the arena with its own allocator."""

    def __init__(self, spec: RegionSpec, start: int):
        self.name = spec.name
        self.start = start
        self.size = spec.size
        self.kind = spec.alloc.kind
        self.group = spec.alloc.group  # shared with this group (SPEC 4d), or None
        self.gid = 0  # the group's gid once the daemon resolved it (0: root only)
        self.file: str | None = None  # the file of a shared region's memory
        self.wanted: AllocSpec = spec.alloc  # what the alloc attribute asked for
        self.configured: AllocSpec = spec.alloc  # what the configuration said
        self.allocator: Allocator | None = None
        self.users = 0
        self.used = 0
        self.movable_users = 0
        self.last_compact = 0  # chunks the latest compact moved
        self.alloc_ok = self.alloc_fail = self.freed = 0
        self.peak_used = self.moved = self.moved_bytes = self.compactions = 0
        # The kernel's sysfs counters (mm/cma_sysfs.c), in 4 KiB pages: pages
        # allocated minus pages released is always the pages in use (SPEC 3a).
        self.alloc_pages = self.fail_pages = self.release_pages = 0
        self.phys: int | None = None  # physical start, where the region lies in one run

    @property
    def contiguous(self) -> str:
        """``physical`` when the region lies in one run of adjacent pages (SPEC 4a)."""
        return "physical" if self.phys is not None else "virtual"

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def free(self) -> int:
        return self.size - self.used

    @property
    def alloc_text(self) -> str:
        """The ``alloc`` attribute: name, "-" if unnamed, "[name]" if pending, "" if default."""
        if self.allocator is not None:
            return self.allocator.name or "-"
        return f"[{self.wanted.name}]" if self.wanted.name else ""

    def attach(self, cls: type[Allocator], params: dict[str, int]) -> None:
        """Put a new allocator in charge; EBUSY while chunks live, EINVAL on bad params."""
        if self.users:
            raise CmaError(errno.EBUSY, f"region {self.name} has {self.users} chunks; "
                                        "its allocator can change only when it has none")
        allocator = make_allocator(cls, self.start, self.size, params)
        self.detach()
        self.allocator = allocator

    def detach(self) -> None:
        if self.users:
            raise CmaError(errno.EBUSY, f"region {self.name} has {self.users} chunks")
        if self.allocator is not None:
            self.allocator.cleanup()
            self.allocator = None

    def largest_free(self) -> int:
        return self.allocator.largest_free() if self.allocator is not None else 0

    def stats(self) -> RegionStats:
        largest = self.largest_free()
        return RegionStats(self.alloc_ok, self.alloc_fail, self.freed, self.used, largest,
                           fragmentation(self.free, largest), self.peak_used, self.moved,
                           self.compactions, **self.pageblock_stats())

    def pageblock_stats(self) -> dict[str, int]:
        """The pageblock keys of stats: O(1), the allocator keeps the counts."""
        allocator = self.allocator
        if allocator is None or not allocator.pageblock:
            return {}
        free, pinned, movable, mixed = allocator.block_counts()
        return dict(pageblock=allocator.pageblock, blocks_free=free, blocks_pinned=pinned,
                    blocks_movable=movable, blocks_mixed=mixed, fallbacks=allocator.fallbacks)

    def pageblocks(self) -> str:
        """The ``pageblocks`` file: one character per block, '.' free, 'P' pinned,
        'M' movable, 'X' mixed, 64 per line; empty when grouping is off."""
        return self.allocator.picture() if self.allocator is not None else ""

    def describe(self) -> str:
        """For log lines: name, free bytes and largest hole."""
        return (f"{self.name} (free {human(self.free)}, largest hole "
                f"{human(self.largest_free())})")

    def __repr__(self) -> str:
        return f"<Region {self.name} {fmt_addr(self.start)}+{self.size:#x} {self.alloc_text}>"
