"""The ``cmad`` command: a foreground daemon serving the CMA tree over FUSE.

Start-up (the command line, the mount, the build of the core with its arena
and journal, the tree), serving and signals.  The rest has modules of its own:
the configuration keys (config.py), the checks before the mount and the mount
lock (preflight.py), the arena assembly (assembly.py), the SIGHUP reload
(reload.py) and the offline commands (offline.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import grp
import json
import logging
import os
import signal
import sqlite3
import sys
from functools import partial
from typing import Iterator

from cmad import __version__, privileges
from cmad.core.cma import Cma
from cmad.daemon import ratelimit, service
from cmad.daemon.assembly import (arena_path, check_arena_length, check_journal_matches,
                                  mark_regions, open_arena, remove_stale_arenas,
                                  shared_files, surviving_arena)
from cmad.daemon.config import Config, ConfigError, add_flags, flag_values, load
from cmad.daemon.preflight import layout_problem, mount_lock, mount_unlock, state_dir_problem
from cmad.daemon.reload import Reloader
from cmad.errors import CmaError
from cmad.memory import physmap
from cmad.memory import shared as sharing
from cmad.memory.arena import Arena
from cmad.memory.hugepages import (MEMFD, RUN_DIR, Pool, adopt_old_record, escaped_name,
                                   record_key, sweep)
from cmad.daemon.recovery import recover, restore_allocators
from cmad.store.journal import Journal

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
