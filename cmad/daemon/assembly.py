"""The arena assembly: the file behind the regions, built fresh or adopted.

A fresh arena is hugetlbfs laid out by frame where the pool allows (physmap),
else shared memory; a surviving one (a journal names chunks in it) is adopted
with its layout checked against the journal.  The regions shared with a group
(SPEC 4d) are files of their own mapped over their places.  Also the arena's
name and where its file may be (offline.py finds it there too).
"""

from __future__ import annotations

import errno
import json
import logging
import os

from cmad.core.cma import Cma
from cmad.core.regions import SHARED_ALIGN, Region
from cmad.daemon.config import Config
from cmad.errors import CmaError
from cmad.memory import physmap
from cmad.memory import shared as sharing
from cmad.memory.arena import Arena, remove_own
from cmad.memory.hugepages import (RUN_DIR, Pool, escaped_name, fs_type, private_mount,
                                   shm_dir, user_dir)
from cmad.memparse import human
from cmad.store.journal import Journal

log = logging.getLogger("cmad")


ATTEMPTS = 3  # layouts tried when another process takes pages in the middle of one


def arena_name(config: Config) -> str:
    """The arena file's name: its mountpoint's and its state directory's."""
    return escaped_name(config.mountpoint, config.state_dir)


def arena_paths(config: Config) -> list[str]:
    """Where this daemon's arena file may be: configured, else its name (unique per
    mountpoint and state directory) in the private hugetlbfs mount, or in the
    shared-memory directory.  Root's are all under the root-only /run/cmad: a
    world-writable directory (/dev/shm) is never searched, so nothing another
    user plants there can matter."""
    if config.arena_file:
        return [config.arena_file]
    name = arena_name(config)
    if os.geteuid() != 0:
        return [os.path.join(user_dir(), name)]
    return [os.path.join(RUN_DIR, "hugetlbfs", name), os.path.join(RUN_DIR, name),
            os.path.join(RUN_DIR, "tmpfs", name)]


def arena_path(config: Config) -> str:
    """The arena file in use (the first candidate that exists), else the preferred one."""
    paths = arena_paths(config)
    return next((p for p in paths if os.path.lexists(p)), paths[0])


def remove_stale_arenas(config: Config, path: str | None) -> None:
    """No journalled chunk lives in an old arena file of ours: delete it (and only if it
    is ours: never a file someone else made at an explicit --arena-file), and the
    old files of its shared regions."""
    for candidate in [path] if path else arena_paths(config):
        if remove_own(candidate):
            log.info("arena: removed the previous arena file %s (no chunk lives in it)",
                     candidate)
    for candidate in sharing.files_of(arena_name(config)):
        if sharing.remove(candidate):
            log.info("arena: removed the previous shared region file %s", candidate)


def shared_files(cma: Cma) -> list[sharing.SharedFile]:
    """The regions shared with a group (SPEC 4d), their gids resolved; EINVAL for
    one that does not lie on whole hugepages of the arena."""
    out = []
    for region in cma.regions:
        if region.group is None:
            continue
        offset = region.start - cma.base
        if offset % SHARED_ALIGN:
            raise CmaError(errno.EINVAL, f"region {region.name} is shared with group "
                                         f"{region.group}, so it must start on a "
                                         f"{human(SHARED_ALIGN)} boundary of the arena, and "
                                         f"it starts {offset:#x} bytes in (set base to a "
                                         f"multiple of {human(SHARED_ALIGN)})")
        region.gid = sharing.group_gid(region.group, region.name)
        out.append(sharing.SharedFile(region.name, region.group, region.gid, offset,
                                      region.size))
    return out


def adopt_shared(arena: Arena, shared: list[sharing.SharedFile], journal: Journal,
                 path: str, name: str) -> None:
    """Map the surviving shared region files over the surviving arena.  A region
    shared then and not now (or the reverse) is refused while journalled chunks
    live in it (their bytes are in the other file); without chunks its old file
    goes, or a new one is made (virtual: the pages are new)."""
    recorded = recorded_shared(journal, path)
    configured = {s.region: s for s in shared}
    busy = sorted(r for r in set(recorded) ^ set(configured) if journal.count(r))
    if busy:
        raise CmaError(errno.EINVAL, f"arena file {path}: region {busy[0]} was "
                                     f"{'' if busy[0] in recorded else 'not '}shared with a "
                                     f"group when its {journal.count(busy[0])} chunks were "
                                     "journalled, and is "
                                     f"{'' if busy[0] in configured else 'not '}now: their "
                                     "bytes are in another file; refusing to start (restore "
                                     "its group= parameter, or free its chunks first, or run "
                                     "'cmad reset')")
    # no longer shared: the old files go once the start succeeded (`build`)
    arena.stale = [old for region, old in recorded.items() if region not in configured]
    for s in shared:
        if s.region in recorded:
            sharing.adopt(s, recorded[s.region])
        else:
            # Its range of the arena file holds no chunk (checked above): its pages
            # go back, so the new file can have them with the pool as it is.
            arena.release(s.offset, s.size)
            sharing.create(s, name, "hugetlb" if arena.backing == "hugetlb" else "shm")
            log.info("region %s is shared with %s from now on: its file is %s", s.region,
                     s.group, s.path)
        try:
            arena.overlay(s.offset, s.size, s.fd, s.path)
        finally:
            s.close()


def recorded_shared(journal: Journal, path: str) -> dict[str, str]:
    """The journal's ``shared_files``: region -> file (none before cmad had them)."""
    try:
        recorded = json.loads(journal.get("shared_files") or "{}")
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise CmaError(errno.EINVAL, f"journal of {path}: shared_files is not an object of "
                                     "region -> file; refusing to start (the journal was "
                                     "edited or damaged: fix the row, or 'cmad reset')")
    return recorded


def spans_of(cma: Cma, contiguous: str) -> list[physmap.Span]:
    return [physmap.Span(r.name, r.start - cma.base, r.size,
                         wants=contiguous != "virtual" and r.kind != "sticky")
            for r in cma.regions]


def open_arena(cma: Cma, config: Config, path: str | None, pool: Pool,
               journal: Journal | None, shared: list[sharing.SharedFile] = ()) -> Arena:
    """Adopt the surviving arena file (``journal`` given), else build a fresh one:
    hugetlbfs laid out by frame where the pool allows, else shared memory.  The
    shared regions' files are mapped over their places (`Arena.overlay`)."""
    spans = spans_of(cma, config.contiguous)
    if journal is not None:
        return adopt_arena(cma, config, path, pool, journal, list(shared), spans)
    strict = config.contiguous == "physical"
    why = "backing is " + config.backing
    if config.backing in ("auto", "hugetlb"):
        try:
            return hugetlb_arena(cma, config, path, pool, spans, strict, list(shared))
        except OSError as e:
            why = e.strerror or str(e)
    if strict:
        span = next(s for s in spans if s.wants)
        raise physmap.refusal(span, 0, 0, why)
    if config.backing == "hugetlb":
        raise CmaError(errno.ENOMEM, f"arena of {human(cma.arena_size)}: hugetlb: {why}")
    return shm_arena(cma, config, path, list(shared), why)


def adopt_arena(cma: Cma, config: Config, path: str | None, pool: Pool, journal: Journal,
                shared: list[sharing.SharedFile], spans: list[physmap.Span]) -> Arena:
    """The surviving arena file and shared files, their layout checked against the journal."""
    holes = bool(shared) or bool(recorded_shared(journal, path))
    arena = Arena(cma.arena_size, path=path, backing=config.backing, holes=holes, pool=pool)
    try:
        adopt_shared(arena, shared, journal, path, arena_name(config))
    except BaseException:
        arena.close()
        raise
    record = journal.get("arena_layout")
    if record:
        physmap.parse_record(record)  # a tampered row: one line, whatever the backing
    if arena.backing == "hugetlb" and record:
        arena.layout = physmap.verify(record, spans, arena.frames, arena.page, path)
    virtual = [s for s in spans if s.wants and (
        arena.layout is None or arena.layout.phys.get(s.name) is None)]
    if config.contiguous == "physical" and virtual:
        arena.close()
        raise CmaError(errno.EINVAL, f"contiguous=physical: region {virtual[0].name} lies "
                                     f"in the surviving arena file {path} without a "
                                     "physical run, and its journalled chunks keep that "
                                     "layout; use contiguous=auto or run 'cmad reset'")
    return arena


def shm_arena(cma: Cma, config: Config, path: str | None,
              shared: list[sharing.SharedFile], why: str) -> Arena:
    """A shared-memory arena (no hugepages to be had: ``why``), shared regions' files beside."""
    private = os.path.join(RUN_DIR, "hugetlbfs")
    if path is not None and os.path.dirname(os.path.abspath(path)) == private:
        raise CmaError(errno.EINVAL, f"arena file {path}: {private} is not mounted, and a "
                                     "shared-memory arena never goes there (it would be a "
                                     "file on the disk under the next hugetlbfs mount)")
    spath = path or os.path.join(shm_dir(), arena_name(config))
    arena = Arena(cma.arena_size, path=spath, backing=config.backing, no_hugetlb=why,
                  holes=bool(shared))
    try:
        for s in shared:
            try:
                sharing.create(s, arena_name(config), "shm")
            except OSError as e:
                raise CmaError(e.errno or errno.EIO, f"region {s.region}: no file for it "
                                                     f"(shared with {s.group}): {e.strerror}")
            try:
                arena.overlay(s.offset, s.size, s.fd, s.path)
            finally:
                s.close()
    except BaseException:
        arena.close(unlink=True)
        for s in shared:
            if s.path:
                sharing.remove(s.path)
        raise
    return arena


def hugetlb_arena(cma: Cma, config: Config, path: str | None, pool: Pool,
                  spans: list[physmap.Span], strict: bool,
                  shared: list[sharing.SharedFile] = ()) -> Arena:
    """A fresh hugetlb arena laid out so that regions lie in physical runs: a file in the
    private hugetlbfs mount when it must outlive the daemon, else a memfd; each
    shared region in a file of its own on its group's hugetlbfs."""
    try:
        for s in shared:
            sharing.create(s, arena_name(config), "hugetlb")  # OSError: shared memory then
        return _hugetlb_arena(cma, config, path, pool, spans, strict, list(shared))
    except BaseException:
        for s in shared:
            s.close()
            if s.path:
                sharing.remove(s.path)
        sharing.release_mounts()
        raise
    finally:
        for s in shared:
            s.close()


def _hugetlb_arena(cma: Cma, config: Config, path: str | None, pool: Pool,
                   spans: list[physmap.Span], strict: bool,
                   shared: list[sharing.SharedFile]) -> Arena:
    if path is None and config.state_dir:
        if os.geteuid() != 0:
            raise OSError(errno.EPERM, "not root: no private hugetlbfs mount")
        path = os.path.join(private_mount("hugetlbfs"), arena_name(config))
    elif path is not None and fs_type(os.path.dirname(path) or ".") != "hugetlbfs":
        raise OSError(errno.EINVAL, f"{path} is not on a hugetlbfs mount")
    size = -(-cma.arena_size // pool.page) * pool.page
    pieces = [(s.offset, s.size, s.fd) for s in shared]
    for attempt in range(1, ATTEMPTS + 1):
        arena = laid_out_arena(path, size, spans, pool, strict and attempt == ATTEMPTS,
                               shared)
        layout = arena.layout
        failed = [s for s in spans if s.wants and layout.phys[s.name] is None]
        if not failed or attempt == ATTEMPTS or not layout.planned & {s.name for s in failed}:
            break
        log.info("arena: another process took hugepages while the arena was laid out "
                 "(%s not physical as planned); again", ", ".join(s.name for s in failed))
        arena.close()  # the pool and the mount stay for the next attempt
        physmap.empty(pieces)
        if path is not None:
            os.unlink(path)
    if strict and failed:
        arena.close(unlink=True)
        raise physmap.refusal(failed[0], layout.longest, layout.gathered,
                              layout.why[failed[0].name], stopped=layout.stopped)
    if failed and layout.stopped:
        for s in failed:
            layout.why[s.name] += f" ({layout.cut_short()})"
    log.info("arena: %d hugepages gathered, %d kept, longest physical run %s, in %.2f s",
             layout.gathered, layout.kept, human(layout.longest), layout.seconds)
    return arena


def laid_out_arena(path: str | None, size: int, spans: list[physmap.Span], pool: Pool,
                   strict: bool, shared: list[sharing.SharedFile] = ()) -> Arena:
    """One attempt: gather, lay out, map, and decide each region on the real frames."""
    pieces = [(s.offset, s.size, s.fd) for s in shared]
    try:
        fd, layout = physmap.build_file(path, size, spans, pool, strict=strict, pieces=pieces)
    except OSError as e:  # another process took pages between the gathering and us
        if e.errno != errno.ENOSPC:
            raise
        log.info("arena: hugetlb: %s; gathering again", e.strerror)
        fd, layout = physmap.build_file(path, size, spans, pool, strict=strict, pieces=pieces)
    arena = Arena(size, path=path, backing="hugetlb", fd=fd, holes=bool(shared), pool=pool,
                  created=path is not None)
    for s in shared:  # before any frame is read: a hole of the arena file never faults in
        arena.overlay(s.offset, s.size, s.fd, s.path)
    try:
        physmap.decide(spans, arena.frames(0, size // pool.page), pool.page, layout)
    except CmaError as e:  # frames hidden: every region is virtual
        layout.phys = {s.name: None for s in spans}
        layout.why = {s.name: e.why for s in spans if s.wants}
    arena.layout = layout
    return arena


def mark_regions(cma: Cma, arena: Arena) -> None:
    """Each region's ``contiguous`` and physical start, logged once per region."""
    layout = arena.layout
    for region in cma.regions:
        phys = layout.phys.get(region.name) if layout is not None else None
        region.phys = phys
        if phys is not None:
            log.info("region %s: physically contiguous, %s at physical %#x", region.name,
                     human(region.size), phys)
        else:
            log.info("region %s: virtual only (%s)", region.name, virtual_reason(
                region, arena, layout))
    physical = sum(r.phys is not None for r in cma.regions)
    log.info("arena: %s-backed, %d of %d regions physically contiguous",
             "hugepage" if arena.backing == "hugetlb" else arena.backing, physical,
             len(cma.regions))


def virtual_reason(region: Region, arena: Arena, layout: physmap.Layout | None) -> str:
    """Why a region is not physical, for its start-up log line."""
    if region.kind == "sticky":
        return "sticky regions give pages back and cannot keep their frames"
    if arena.backing != "hugetlb":
        return f"the arena is {arena.backing}, not hugepages"
    if layout is None or region.name not in layout.phys:
        return "contiguous=virtual" if layout is not None else "no layout recorded"
    return layout.why.get(region.name, "contiguous=virtual")


def surviving_arena(journal: Journal) -> str | None:
    """The journal's arena file if it is still there.  After a reboot it is not
    (/run and the private mounts under it are gone): then the daemon builds a new
    arena where a fresh start would, never at the old path, whose directory may
    now be an unmounted mountpoint on the root disk (/run/cmad/hugetlbfs)."""
    path = journal.get("arena_file")
    return path if path and os.path.exists(path) else None


def check_arena_length(path: str, journal: Journal, size: int) -> None:
    """An arena file shorter than the journal says lost chunk bytes: never zero-fill them."""
    want = max(int(journal.get("arena_size") or 0), size)
    have = os.stat(path).st_size
    if have < want:
        raise CmaError(errno.EINVAL, f"arena file {path} is {have} bytes, shorter than the "
                                     f"{want} the journal recorded (truncated behind the "
                                     f"daemon's back?): {journal.count()} journalled chunks "
                                     "would come back zeroed; refusing to start (run 'cmad "
                                     "reset' to forget them)")


def check_journal_matches(journal: Journal, config: Config, path: str, base: int) -> None:
    """Journalled chunks live at addresses = base + offset in one arena file: a new
    base or another file while the old one exists would lose them silently."""
    old_base, old_path = journal.get("base"), journal.get("arena_file")
    if old_base is not None and int(old_base) != base:
        raise CmaError(errno.EINVAL, f"base changed from {int(old_base):#x} to {base:#x} "
                                     f"under {journal.count()} journalled chunks: refusing to "
                                     "start (restore the base or run 'cmad reset')")
    if old_path and old_path != path and os.path.exists(old_path):
        raise CmaError(errno.EINVAL, f"arena_file changed from {old_path} to {path} under "
                                     f"{journal.count()} journalled chunks whose bytes are in "
                                     f"{old_path}: refusing to start (restore arena_file or "
                                     "run 'cmad reset')")
