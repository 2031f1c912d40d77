"""The physical layout: which regions want a run, the plan, and what the file really holds.

Regions sharing a hugepage form a `Group`; `assign` gives every group a run
of its own (best fit, largest first).  Once the arena file is made, `decide`
reads each region's contiguity from the frames the file really holds, never
from the plan.  The physical start of every physical region is recorded
(journal meta, `record`) and checked at the next start (`verify`): a restart
after kill -9 finds the same frames or refuses, naming what changed.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field

from cmad.errors import CmaError
from cmad.memparse import human

ADVICE = ("reserve hugepages at boot (hugepages=N on the kernel command line), use 1 GiB "
          "pages (hugepagesz=1G), or make the region smaller")


@dataclass
class Group:
    """Regions whose hugepages must lie in one physical run (they share pages)."""

    names: list[str]
    first: int  # arena page index
    count: int


@dataclass
class Span:
    """One region as the layout sees it: where it is and whether it wants a run."""

    name: str
    offset: int
    size: int
    wants: bool  # False for sticky regions and contiguous=virtual


@dataclass
class Layout:
    """What the builder made: per region its physical start (None: virtual)."""

    phys: dict[str, int | None] = field(default_factory=dict)
    gathered: int = 0
    kept: int = 0
    longest: int = 0  # bytes
    seconds: float = 0.0
    why: dict[str, str] = field(default_factory=dict)
    planned: set[str] = field(default_factory=set)  # regions the plan gave a run
    stopped: str = ""  # the cap that ended the search, where not the machine

    def cut_short(self) -> str:
        """The line saying gather_limit, not the machine, ended the search ('' if not)."""
        if not self.stopped:
            return ""
        return (f"gathered {self.gathered:,} pages, stopped at the cap of {self.stopped}; "
                f"longest run {human(self.longest)}; raise gather_limit or reserve at boot")


def groups_of(spans: list[Span], page: int) -> list[Group]:
    """Merge the hugepage spans of the regions that want a run into groups."""
    out: list[Group] = []
    for s in sorted((s for s in spans if s.wants), key=lambda s: s.offset):
        first, end = s.offset // page, -(-(s.offset + s.size) // page)
        if out and first < out[-1].first + out[-1].count:
            g = out[-1]
            g.names.append(s.name)
            g.count = max(g.count, end - g.first)
        else:
            out.append(Group([s.name], first, end - first))
    return out


def assign(groups: list[Group], runs: list[list[int]], pages: int
           ) -> tuple[list[int], set[int]]:
    """Arena page -> gathered page, and the indices of the groups given a run.

    Largest group first, each into the shortest run that holds it (from the
    run's low end); the pages left fill the rest of the arena in frame order.
    """
    free = [list(r) for r in runs]
    order: list[int | None] = [None] * pages
    placed: set[int] = set()
    for gi in sorted(range(len(groups)), key=lambda i: -groups[i].count):
        g = groups[gi]
        fits = [r for r in free if len(r) >= g.count]
        if not fits:
            continue
        run = min(fits, key=len)
        order[g.first:g.first + g.count] = run[:g.count]
        del run[:g.count]
        placed.add(gi)
    rest = iter([i for r in free for i in r])
    return [o if o is not None else next(rest) for o in order], placed


def refusal(span: Span, longest: int, gathered: int, why: str = "", *,
            stopped: str = "") -> CmaError:
    """The one line of contiguous=physical when a region cannot be physical; where
    gather_limit, not the machine, ended the search (``stopped``), it says so."""
    if stopped:
        detail = Layout(gathered=gathered, longest=longest, stopped=stopped).cut_short()
        return CmaError(errno.ENOMEM, f"contiguous=physical: region {span.name} "
                                      f"({human(span.size)}) fits no physical run: {detail}")
    detail = (f"the longest run of physically adjacent hugepages among the {gathered} "
              f"gathered is {human(longest)}" + (f" ({why})" if why else ""))
    return CmaError(errno.ENOMEM, f"contiguous=physical: region {span.name} "
                                  f"({human(span.size)}) fits no physical run: {detail}; "
                                  f"{ADVICE}")


def decide(spans: list[Span], frames: list[int], page: int, layout: Layout) -> None:
    """Each region's physical start from the frames the arena file really holds."""
    for s in spans:
        first, end = s.offset // page, -(-(s.offset + s.size) // page)
        run = all(frames[i] + page == frames[i + 1] for i in range(first, end - 1))
        if s.wants and run:
            layout.phys[s.name] = frames[first] + s.offset % page
        else:
            layout.phys[s.name] = None
            if s.wants:
                layout.why[s.name] = "its pages are not physically adjacent"


def record(layout: Layout | None) -> str:
    """The journal's ``arena_layout``: each region's physical start (null: virtual)."""
    return json.dumps(layout.phys if layout is not None else {}, sort_keys=True)


def parse_record(recorded: str) -> dict[str, int | None]:
    """The journal's ``arena_layout`` read back: region name -> physical start or
    null.  Anything else (edited by hand, a damaged disk) is one CmaError line."""
    try:
        phys = json.loads(recorded)
    except ValueError:
        phys = None
    bad = None
    if not isinstance(phys, dict):
        bad = "not an object of region -> physical start"
    else:
        for name, start in phys.items():
            if start is not None and (type(start) is not int or not 0 <= start < 1 << 64):
                bad = f"region {name!r}: physical start {start!r} is not an address or null"
                break
    if bad:
        raise CmaError(errno.EINVAL, f"journal: arena_layout {recorded[:60]!r}: {bad}; "
                                     "refusing to start (the journal was edited or damaged: "
                                     "fix the row, or 'cmad reset' forgets every chunk)")
    return phys


def verify(recorded: str, spans: list[Span], frames_of, page: int, path: str) -> Layout:
    """The layout of an adopted arena file: the recorded physical starts, checked.

    ``frames_of(first, count)`` reads the file's frames.  CmaError naming the
    region and page whose frame is not the recorded one.
    """
    phys = parse_record(recorded)
    layout = Layout()
    for s in spans:
        start = phys.get(s.name)
        layout.phys[s.name] = start
        if start is None:
            continue
        first, end = s.offset // page, -(-(s.offset + s.size) // page)
        frames = frames_of(first, end - first)
        base = start - s.offset % page
        for k, frame in enumerate(frames):
            if frame != base + k * page:
                raise CmaError(errno.EINVAL, f"arena file {path}: region {s.name} was "
                                             f"physical at {start:#x}, but its hugepage {k} "
                                             f"is now at {frame:#x}, not {base + k * page:#x}: "
                                             "the pages changed under the journalled chunks; "
                                             "refusing to start (run 'cmad reset')")
    return layout
