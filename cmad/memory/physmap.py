"""Physically contiguous regions: gather hugepages, sort them by frame, lay the arena out.

DPDK's legacy memory mode builds IOVA-contiguous segments this way: map the
pages, read their frames from /proc/self/pagemap, sort, and use runs of
physically adjacent pages.  Here:

1. gather: a scratch hugetlb memfd takes G >= N pages (N the arena's); their
   frames are read and sorted into runs;
2. assign: every region (with the regions sharing a hugepage with it) gets
   a run of its own, best fit, largest first; the other arena pages take
   what is left.  Short runs: gather more (up to GATHER_MAX times N) and
   assign again;
3. rebuild: the scratch pages are given back one by one, the unwanted first
   and the wanted in reverse arena order, then the arena file is allocated
   in one fallocate.  The kernel's hugepage free list is last-in first-out,
   so the arena file's page k is the page chosen for arena page k: file
   offsets stay bus offsets (``mmap`` attributes and clients need no
   translation).  The frames are read back and every region's contiguity
   is decided on what the file really holds, never on the plan;
4. the pages gathered and not kept go back to the pool at once.

The physical start of every physical region is recorded (journal meta) and
checked at the next start: a restart after kill -9 finds the same frames
or refuses, naming what changed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import mmap
import os
import time
from array import array
from dataclasses import dataclass, field

from cmad.errors import CmaError
from cmad.memory.hugepages import Pool
from cmad.memparse import human
from cmad.privileges import pagemap_fd

log = logging.getLogger(__name__)

CONTIGUOUS = ("auto", "physical", "virtual")
GATHER_MAX = 4  # gather up to this many times the arena's pages ...
GATHER_FLOOR = 2048  # ... or this many more, whichever is more (within MAX_SHARE)
_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
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


def find_runs(frames: list[int], page: int) -> list[list[int]]:
    """Indices of ``frames`` sorted by frame, cut where two are not adjacent."""
    order = sorted(range(len(frames)), key=frames.__getitem__)
    runs: list[list[int]] = []
    for i in order:
        if runs and frames[runs[-1][-1]] + page == frames[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


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


def read_frames(address: int, count: int, page: int) -> list[int]:
    """Physical address of each of ``count`` pages mapped at ``address``, faulting them in."""
    for i in range(count):
        ctypes.c_char.from_address(address + i * page).value  # noqa: B018 (fault in)
    entries = array("Q")
    fd = pagemap_fd()
    for i in range(count):
        entries.frombytes(os.pread(fd, 8, (address + i * page) // mmap.PAGESIZE * 8))
    out = []
    for i, entry in enumerate(entries):
        pfn = entry & ((1 << 55) - 1)
        if not entry >> 63 or pfn == 0:
            raise CmaError(errno.EACCES, "the kernel hides physical frame numbers "
                                         "(needs CAP_SYS_ADMIN)" if entry >> 63 else
                           f"hugepage {i} is not present")
        out.append(pfn * mmap.PAGESIZE)
    return out


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Gather:
    """A scratch hugetlb memfd holding the pages gathered so far, mapped to read frames."""

    def __init__(self, page: int):
        self.page = page
        self.fd = os.memfd_create("cmad-gather", os.MFD_HUGETLB | os.MFD_CLOEXEC)
        self.count = 0
        self.frames: list[int] = []

    def grow(self, count: int) -> None:
        """Hold ``count`` pages (ENOSPC/ENOMEM if the pool has not that many free)."""
        if count <= self.count:
            return
        os.ftruncate(self.fd, count * self.page)
        try:
            os.posix_fallocate(self.fd, self.count * self.page,
                               (count - self.count) * self.page)
        except OSError:
            os.ftruncate(self.fd, self.count * self.page)  # the part it got goes back
            raise
        mm = mmap.mmap(self.fd, count * self.page, offset=0)
        try:
            base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            self.frames = read_frames(base, count, self.page)
        finally:
            mm.close()
        self.count = count

    def hand_over(self, order: list[int]) -> None:
        """Give every page back, the unwanted first, then ``order`` reversed, so the
        next allocation in the pool takes them in ``order`` (the free list is LIFO)."""
        wanted = set(order)
        for i in [i for i in range(self.count) if i not in wanted] + order[::-1]:
            _fallocate(self.fd, _PUNCH, i * self.page, self.page)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def longest_run(runs: list[list[int]], page: int) -> int:
    return max((len(r) for r in runs), default=0) * page


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


def allocate(fd: int, size: int, pieces: list[tuple[int, int, int]]) -> None:
    """Allocate the arena's pages in arena order: [0, size) of ``fd``, except each
    piece (arena offset, length, descriptor), whose pages go to its own file (a
    shared region's, SPEC 4d) and leave a hole in the arena file.  In one pass
    from low to high, so the LIFO pool hands every file the pages laid out for it."""
    pos = 0
    for offset, length, piece in sorted(pieces):
        if offset > pos:
            os.posix_fallocate(fd, pos, offset - pos)
        os.posix_fallocate(piece, 0, length)
        pos = offset + length
    if size > pos:
        os.posix_fallocate(fd, pos, size - pos)


def empty(pieces: list[tuple[int, int, int]]) -> None:
    """Give back the pages of the pieces' files (a failed or repeated layout)."""
    for _, length, piece in pieces:
        os.ftruncate(piece, 0)
        os.ftruncate(piece, length)


def build_file(path: str | None, size: int, spans: list[Span], pool: Pool, *, strict: bool,
               pieces: list[tuple[int, int, int]] = ()) -> tuple[int, Layout]:
    """Create the hugetlbfs arena file ``path`` (None: a hugetlb memfd) of ``size`` bytes
    laid out for ``spans``; returns its open descriptor and the layout.  ``pieces``:
    (arena offset, length, descriptor) of the shared regions' files (`allocate`).

    ``strict`` (contiguous=physical): CmaError, with the pool as it was and no
    file, when a region that wants a run gets none.  OSError when the pool
    cannot hold the arena at all (the caller falls back to shared memory).
    """
    t0 = time.monotonic()
    page = pool.page
    pages = size // page
    groups = groups_of(spans, page)
    added_before = pool.added
    pool.lock()
    gather = Gather(page)
    try:
        free, why = pool.ensure(pages)
        if free < pages:
            if strict and free:
                gather.grow(free)
            _refuse_all(spans, strict, longest_run(find_runs(gather.frames, page), page),
                        gather.count, why)
            raise OSError(errno.ENOMEM, why)
        cap = max(GATHER_MAX * pages, pages + GATHER_FLOOR)
        gather.grow(min(free, cap) if pool.mode == "free" else pages)
        stopped = ""
        while True:
            runs = find_runs(gather.frames, page)
            order, placed = assign(groups, runs, pages)
            if len(placed) == len(groups) or pool.mode == "free" or gather.count >= cap:
                break
            want = min(2 * gather.count, cap)
            avail, _ = pool.ensure(want - gather.count, partial=True)
            if pool.capped:
                stopped = pool.cap_text()
            want = min(want, gather.count + avail)
            if want <= gather.count:
                break
            try:
                gather.grow(want)
            except OSError as e:  # someone took the pages first: lay out what we have
                log.info("arena: gathering %d hugepages: %s", want, e.strerror)
                break
        longest = longest_run(runs, page)
        if len(placed) == len(groups):
            stopped = ""  # the cap was reached, but the runs were found
        if strict:
            for gi, g in enumerate(groups):
                if gi not in placed:
                    span = next(s for s in spans if s.name in g.names)
                    raise refusal(span, longest, gather.count, stopped=stopped)
        if stopped:
            log.warning("arena: %s", Layout(gathered=gather.count, longest=longest,
                                            stopped=stopped).cut_short())
        gather.hand_over(order)
        fd = (os.memfd_create("cmad-arena", os.MFD_HUGETLB | os.MFD_CLOEXEC) if path is None
              else os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o600))
        try:
            os.ftruncate(fd, size)
            allocate(fd, size, list(pieces))
        except OSError:
            os.close(fd)
            empty(list(pieces))
            if path is not None:
                os.unlink(path)
            raise
        gathered = gather.count
        gather.close()
        pool.give_back(gathered - pages)  # the pages gathered and not kept, at once
        planned = {n for gi in placed for n in groups[gi].names}
        return fd, Layout(gathered=gathered, kept=pages, longest=longest,
                          seconds=time.monotonic() - t0, planned=planned, stopped=stopped)
    except BaseException:
        gather.close()
        pool.give_back(pool.added - added_before)
        raise
    finally:
        pool.unlock()


def _refuse_all(spans: list[Span], strict: bool, longest: int, gathered: int, why: str) -> None:
    if strict:
        for span in spans:
            if span.wants:
                raise refusal(span, longest, gathered, why)


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
