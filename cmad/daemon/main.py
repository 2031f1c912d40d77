"""The ``cmad`` command: a foreground daemon serving the CMA tree over FUSE."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import gc
import grp
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from functools import partial
from typing import Iterator

from cmad import __version__

from cmad.memory import physmap

from cmad import privileges

from cmad.daemon import ratelimit

from cmad.daemon import service

from cmad.memory import shared as sharing
from cmad.allocators import registry
from cmad.memory.arena import Arena, remove_own
from cmad.memory.hugepages import (MEMFD, RUN_DIR, Pool, adopt_old_record, escaped_name, fs_type,
                        private_dir, private_mount, record_key, shm_dir, sweep, user_dir)
from cmad.memparse import human
from cmad.core.regions import SHARED_ALIGN, Region
from cmad.core.cma import Cma, plan_regions
from cmad.daemon.config import (LAYOUT, RESTART, Config, ConfigError, add_flags, flag_values,
                                keys_reloaded, load)
from cmad.errors import CmaError
from cmad.store.journal import Journal, recover, restore_allocators

log = logging.getLogger("cmad")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cmad", description="Userspace Contiguous Memory Allocator daemon: serves the "
        "CMA patch's sysfs tree over FUSE, in the foreground, logging to stderr.",
        epilog="Offline commands: 'cmad check --state-dir DIR' verifies a state directory, "
        "'cmad reset --state-dir DIR' forgets it, 'cmad hugepages [--config FILE]' reserves "
        "the hugepages the arena needs.")
    p.add_argument("--version", action="version", version=f"cmad {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file; flags win")
    add_flags(p)  # one per configuration key (config.KEYS)
    return p.parse_args(argv)


# -- the garbage collector ------------------------------------------------
#
# With a million chunks the daemon holds millions of long-lived container
# objects (chunks, their index, tree nodes).  CPython's full collection walks
# all of them: 4.6 s over 8M objects, a stall of every client.  So:
# - no collection during start-up (recovery and the tree create the bulk;
#   collections there were 2/3 of the recovery time at 200k chunks);
# - once serving, everything that exists is frozen (gc.freeze: moved to the
#   permanent generation, never walked again), and after every full
#   collection its survivors are frozen too, so a full collection walks only
#   what survived since the last one: its cost is bounded by the allocation
#   rate, not by the number of chunks.
# The trade: a frozen object that later becomes part of a reference cycle is
# never reclaimed.  Chunks, their index and the tree hold no cycles (freed by
# reference counting as before).


# CMAD_GC=default in the environment keeps CPython's default behaviour, for
# bench/scale.py to measure the difference.
GC_DEFAULT = os.environ.get("CMAD_GC") == "default"


def hold_gc() -> None:
    """No automatic collection until ``settle_gc`` (start-up)."""
    if not GC_DEFAULT:
        gc.disable()


def settle_gc() -> None:
    """Freeze the start-up objects and keep full collections small from now on."""
    if GC_DEFAULT:
        return
    gc.freeze()
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)
    gc.enable()


def _freeze_survivors(phase: str, info: dict) -> None:
    """After a full collection, what is left is long-lived: freeze it."""
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


def group_id(name: str) -> int:
    """The gid of the configured group, or root's (with a warning) if it does not exist."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        log.warning("group %r does not exist: alloc and free are root-only", name)
        return 0


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


def build(config: Config) -> tuple[Cma, Journal | None]:
    """The core with its arena and, with a state directory, its recovered journal."""
    cma = Cma(config.regions, config.map, base=config.base, arena_size=config.arena_size,
              limits=config.limits)
    refuse_sticky_physical(cma, config.contiguous)
    journal = open_journal(config.state_dir) if config.state_dir else None
    kept = journal is not None and journal.count() > 0
    path = config.arena_file or (surviving_arena(journal) if kept else None)
    key = record_key(config.state_dir, config.mountpoint)
    if key is not None:
        adopt_old_records(config, key, path if path and os.path.exists(path) else None)
    sweep()  # dead daemons' pages that no arena holds any more go back first
    pool = Pool(key, config.hugepages, gather_limit=config.gather_limit)
    shared = shared_files(cma)
    if kept:
        check_journal_matches(journal, config, path or arena_path(config), cma.base)
    survived = kept and path is not None and os.path.exists(path)
    if survived:
        check_arena_length(path, journal, cma.arena_size)
    else:
        remove_stale_arenas(config, path)
    arena = open_arena(cma, config, path, pool, journal if survived else None, shared)
    for overlay in arena.overlays:
        next(r for r in cma.regions if r.start - cma.base == overlay.offset).file = overlay.path
    if arena.pool is not None:  # a memfd arena with shared regions: their files hold pages
        arena.pool.held_in(arena.path if arena.named else
                           arena.overlays[0].path if arena.overlays else MEMFD)
    try:
        if journal is not None:  # before the arena: sticky regions keep their chunks' pages
            next_id = journal.next_id()  # before recovery forgets transient chunks
            restore_allocators(cma, journal)
            recover(cma, journal, arena_survived=survived)
            cma.skip_ids(next_id)
        cma.attach_arena(arena)
        mark_regions(cma, arena)
        if journal is not None:
            journal.set(arena_file=arena.path, regions=config.regions, base=cma.base,
                        arena_size=arena.size, arena_layout=physmap.record(arena.layout),
                        shared_files=json.dumps({r.name: r.file for r in cma.regions
                                                 if r.file}, sort_keys=True))
            cma.listeners.append(journal)
        for old in arena.stale:
            if sharing.remove(old):
                log.info("removed %s: its region is no longer shared", old)
    except BaseException:
        if survived:
            arena.close()  # never unlink here: the bytes may be all that is left
        else:
            arena.close(unlink=True)  # a failed start leaves no arena file of its own
        raise
    return cma, journal


def adopt_old_records(config: Config, key: str, arena: str | None) -> None:
    """The per-daemon records of cmad before the ledger, moved into it."""
    old = [os.path.join(RUN_DIR, escaped_name(config.mountpoint) + ".hugepages")]
    if config.state_dir:
        old.append(os.path.join(config.state_dir, "hugepages"))
    for path in old:
        adopt_old_record(path, key, arena)


def surviving_arena(journal: Journal) -> str | None:
    """The journal's arena file if it is still there.  After a reboot it is not
    (/run and the private mounts under it are gone): then the daemon builds a new
    arena where a fresh start would, never at the old path, whose directory may
    now be an unmounted mountpoint on the root disk (/run/cmad/hugetlbfs)."""
    path = journal.get("arena_file")
    return path if path and os.path.exists(path) else None


def open_journal(state_dir: str) -> Journal:
    """The state directory's journal; a daemon holding it is named, not just
    "database is locked"."""
    try:
        return Journal(state_dir)
    except sqlite3.OperationalError as e:
        from cmad.daemon.offline import holders
        running = holders(state_dir)
        if "locked" not in str(e) or not running:
            raise
        raise CmaError(errno.EBUSY, f"state_dir {state_dir} is in use by another daemon: "
                                    f"{', '.join(running)} holds its journal") from None


def refuse_sticky_physical(cma: Cma, contiguous: str) -> None:
    """Sticky regions give pages back and never get the same frame again: not physical."""
    sticky = [r.name for r in cma.regions if r.kind == "sticky"]
    if contiguous == "physical" and sticky:
        raise CmaError(errno.EINVAL, f"contiguous=physical: region {sticky[0]} is sticky; a "
                                     "sticky region gives its pages back and can never get "
                                     "the same physical pages again (drop 'sticky' or use "
                                     "contiguous=auto)")


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
    arena = Arena(cma.arena_size, path=path, backing=config.backing, holes=holes)
    arena.pool = pool
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
    arena = Arena(size, path=path, backing="hugetlb", fd=fd, holes=bool(shared))
    arena.created, arena.pool = path is not None, pool
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


def stop(cma: Cma, journal: Journal | None) -> None:
    """Keep the arena file only while a journal says chunks live in it."""
    service.notify(STOPPING=1)
    keep = journal is not None and len(cma.chunks) > 0
    with privileges.raised():  # the private hugetlbfs mount goes with its last file
        cma.arena.close(unlink=not keep)
    if journal is not None:
        journal.close()
    log.info("stopped with %d chunks%s", len(cma.chunks),
             f"; arena kept at {cma.arena.path}" if keep else "")


def layout(config: Config) -> list[tuple]:
    """What a configuration makes of the regions (EINVAL etc. if it is bad), without
    building allocators (a typo like 1P:bitmap must not allocate a huge bitmap)."""
    specs, starts = plan_regions(config.regions, config.base, config.arena_size, registry())
    return sorted((starts[s.name], s.name, s.size, s.alloc) for s in specs)


class Reloader:
    """SIGHUP: re-read the configuration.  The map and limits take effect; a
    changed region layout is refused (chunks are never dropped by a reload)."""

    def __init__(self, cma: Cma, config: Config, args: argparse.Namespace):
        self.cma, self.config, self.args = cma, config, args

    def __call__(self) -> None:
        try:
            new = load(self.args.config, flag_values(self.args))
            changed_layout = layout(new) != layout(self.config)
        except Exception as e:  # a reload never takes the daemon down
            log.error("reload: %s; keeping the running configuration", getattr(e, "why", e))
            return
        if changed_layout:
            log.error("reload: the region layout changed (%r); refused, the running regions "
                      "stay: restart the daemon to apply it", new.regions)
            for key in keys_reloaded(LAYOUT):
                setattr(new, key, getattr(self.config, key))
        from fusefs import resolve
        new.mountpoint = resolve(new.mountpoint)  # the running one is resolved (main)
        for key in keys_reloaded(RESTART):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload: %s changed; it takes effect at the next start", key)
                setattr(new, key, getattr(self.config, key))
        try:
            self.cma.set_map(new.map)
        except CmaError as e:
            log.error("reload: map: %s; keeping the running map", e.why)
            new.map = self.cma.map
        self.cma.limits = dict(new.limits)
        logging.getLogger().setLevel(new.log_level.upper())
        self.config = new
        log.info("reload: map %r, limits %s", self.cma.map, self.cma.limits or "none")


def physical_facts(cma: Cma, arena: Arena) -> dict[str, object]:
    """Root ``stats`` keys: which regions are physically contiguous, and the pool."""
    physical = [r.name for r in cma.regions if r.contiguous == "physical"]
    return {"physical_regions": ",".join(physical) or "-",
            "hugepages_added": arena.pool.added if arena.pool is not None else 0}


def plant_tree(mount, cma: Cma, config: Config) -> None:
    """Build the tree and hand it to the mount made at start (`start`)."""
    from cmad.daemon.tree import Tree

    arena = cma.arena
    tree = Tree(cma, gid=group_id(config.group), extra_stats={
        "backing": arena.backing, "page_size": 4096, "arena_size": arena.size,
        "base": f"{cma.base:#x}", "arena_file": arena.path, **physical_facts(cma, arena)})
    mount.fs.replace_root(tree.root)


def serve_tree(mount, cma: Cma, config: Config, args: argparse.Namespace) -> None:
    """Drop what serving does not need (privileges.py) and answer requests until
    unmounted."""
    def ready() -> None:
        settle_gc()
        log.info("ready: %s, mounted at %s", service.status(cma), mount.mountpoint)
        service.notify(READY=1, STATUS=service.status(cma))

    privileges.drop(privileges.SERVING)
    mount.serve(on_ready=ready, tasks=[
        partial(service.heartbeat, cma, service.watchdog_interval()),
        partial(service.reload_on_sighup, Reloader(cma, config, args))])


def state_dir_problem(state_dir: str | None) -> str | None:
    """Why *state_dir* cannot hold a journal, found before anything is mounted."""
    if state_dir is None or not os.path.lexists(state_dir):
        return None
    if not os.path.isdir(state_dir):
        return f"state_dir {state_dir} exists and is not a directory"
    from cmad.daemon.offline import holders
    running = holders(state_dir)
    if running:
        return (f"state_dir {state_dir} is in use by another daemon: {', '.join(running)} "
                "holds its journal; one state directory serves one daemon")
    return None


def layout_problem(config: Config) -> str | None:
    """Why the regions cannot be laid out, found before anything is mounted."""
    try:
        layout(config)
    except CmaError as e:
        return e.why
    return None


def mount_lock(mountpoint: str) -> tuple[int, str]:
    """Take the lock of *mountpoint* (resolved), held from the check of the
    mountpoint until the mount stands (`start`): of two daemons started at once
    on one mountpoint, the second fails naming the first, instead of both
    mounting.  A flock on a file in the root-only /run/cmad (the user's own
    directory for a daemon run by another user) that names its holder's pid;
    the kernel drops it with its holder, kill -9 included, and its holder
    deletes it.  Returns (fd, path) for `mount_unlock`."""
    directory = RUN_DIR if os.geteuid() == 0 else user_dir()
    path = os.path.join(private_dir(directory), escaped_name(mountpoint) + ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            os.close(fd)
            raise OSError(errno.EBUSY, f"{mountpoint}: another cmad (pid {holder}) is "
                                       "starting on this mountpoint; not touching it") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else its holder deleted it meanwhile: lock the new one
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, path


def lock_holder(fd: int) -> str:
    """The pid in a lock file someone holds; it writes it just after taking the
    lock, so wait a moment for it."""
    for _ in range(50):
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if holder:
            return holder
        time.sleep(0.01)
    return "?"


def mount_unlock(lock: tuple[int, str]) -> None:
    """The mount stands (or start-up failed): the next daemon sees the mount itself."""
    fd, path = lock
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)


class Interrupted(Exception):
    """SIGTERM or SIGINT while the tree is built: unmount, serve nothing."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM/SIGINT raise Interrupted in the block.  Outside such blocks start()
    keeps them blocked, from before the mount until the serving loop's own
    receiver takes them (fusefs.loop): a death in between would leave the mount
    stale, an ignored signal would keep the daemon running."""
    def interrupt(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def start_failed(e: BaseException) -> int | None:
    """Log why the tree could not be built and return the exit status; None for
    a bug, whose traceback says more than a line could."""
    if isinstance(e, (CmaError, sqlite3.Error)):
        log.error("configuration: %s", getattr(e, "why", e))
        return 2
    if isinstance(e, OSError):
        log.error("start-up: %s", getattr(e, "why", None) or e)
        return 1
    if isinstance(e, Interrupted):
        log.info("%s during start-up: unmounted before serving", e)
        return 0
    return None


def start(config: Config, args: argparse.Namespace, fs, mountpoint: str,
          lock: tuple[int, str] | None = None) -> int:
    """Mount *fs* on *mountpoint* (resolved and checked), then recover and build
    the tree, then serve.

    Mounting comes first (in place of a stale mount, see fusefs.Mount): from
    then on the kernel holds every client request until the tree answers, so
    a client's ``echo L > free`` waits instead of landing in the bare
    directory, however long recovery takes.  SIGTERM/SIGINT end start-up
    cleanly at any point (`interruptible`).
    """
    from fusefs import Mount

    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        mount = Mount(fs, mountpoint, fsname="cmad", privileged=privileges.raised)
    except OSError as e:
        log.error("%s", getattr(e, "why", None) or e)
        return 1
    finally:
        if lock is not None:
            mount_unlock(lock)
    hold_gc()
    try:
        with interruptible():
            cma, journal = build(config)
    except BaseException as e:
        mount.close()
        status = start_failed(e)
        if status is None:
            raise
        return status
    try:
        with interruptible():
            plant_tree(mount, cma, config)
        serve_tree(mount, cma, config, args)
    except Interrupted as e:
        return start_failed(e)
    except OSError as e:
        log.error("%s", getattr(e, "why", None) or e)
        return 1
    finally:
        mount.close()
        stop(cma, journal)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(stream=sys.stderr, format="cmad: %(levelname)s %(message)s",
                        level=logging.INFO)
    ratelimit.install()  # bounded lines, client-caused warnings rate-limited
    if argv and argv[0] in ("check", "reset", "hugepages"):
        from cmad.daemon import offline
        return offline.main(argv)
    args = parse_args(argv)
    try:
        config = load(args.config, flag_values(args))
        logging.getLogger().setLevel(config.log_level.upper())
    except ConfigError as e:
        log.error("%s", e)
        return 2
    problem = state_dir_problem(config.state_dir) or layout_problem(config)
    if problem:
        log.error("configuration: %s", problem)
        return 2
    from fusefs import Dir, Filesystem, check_mountpoint, resolve

    try:
        privileges.pagemap_fd()  # opened while privileged: see privileges.py
    except OSError as e:
        log.warning("%s: phys will not work", e)
    fs = Filesystem(Dir())  # ready before a stale mount goes: then mount at once
    try:  # before anything is touched: another daemon's live mount (and arena) stays
        locked = resolve(config.mountpoint)
        lock = mount_lock(locked)
    except (OSError, CmaError) as e:
        log.error("%s", getattr(e, "why", None) or e)
        return 1
    try:
        mountpoint = check_mountpoint(config.mountpoint)
        if mountpoint != locked:
            raise OSError(errno.EBUSY, f"{config.mountpoint} led to {locked}, then to "
                                       f"{mountpoint}: a symlink changed during start-up")
    except OSError as e:
        mount_unlock(lock)
        log.error("%s", getattr(e, "why", None) or e)
        return 1
    config.mountpoint = mountpoint  # names the arena and the record, whatever path named it
    return start(config, args, fs, mountpoint, lock)


if __name__ == "__main__":
    sys.exit(main())
