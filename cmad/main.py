"""The ``cmad`` command: a foreground daemon serving the CMA tree over FUSE."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import grp
import logging
import os
import signal
import sqlite3
import sys
from functools import partial
from typing import Iterator

from . import __version__, privileges, ratelimit, service
from .arena import Arena, hugetlbfs_mounts
from .allocators import registry
from .cma import Cma, plan_regions
from .config import Config, ConfigError, load
from .errors import CmaError
from .journal import Journal, recover, restore_allocators

log = logging.getLogger("cmad")

FLAGS = ("regions", "map", "mountpoint", "arena_size", "base", "backing", "arena_file",
         "state_dir", "group", "log_level")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cmad", description="Userspace Contiguous Memory Allocator daemon: serves the "
        "CMA patch's sysfs tree over FUSE, in the foreground, logging to stderr.",
        epilog="Offline commands: 'cmad check --state-dir DIR' verifies a state directory, "
        "'cmad reset --state-dir DIR' forgets it, 'cmad hugepages [--config FILE]' reserves "
        "the hugepages the arena needs.")
    p.add_argument("--version", action="version", version=f"cmad {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file; flags win")
    p.add_argument("--regions", help="regions, cma= grammar (default: %(default)s)")
    p.add_argument("--map", help="map rules, cma.map grammar")
    p.add_argument("--mountpoint", help="where to mount the tree (default /run/cma)")
    p.add_argument("--arena-size", help="arena size (memparse); default: end of the last region")
    p.add_argument("--base", help="bus address of the arena's first byte (default 0x40000000)")
    p.add_argument("--backing", help="auto, hugetlb, thp or shm (default auto)")
    p.add_argument("--arena-file", help="named file behind the arena")
    p.add_argument("--state-dir", help="directory for the journal (persistence)")
    p.add_argument("--group", help="group allowed to alloc and free (default cma)")
    p.add_argument("--log-level", help="debug, info, warning or error (default info)")
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


def arena_path(config: Config) -> str:
    """The arena file: configured, else in the first hugetlbfs mount, else in /dev/shm."""
    if config.arena_file:
        return config.arena_file
    name = "cmad" + os.path.abspath(config.mountpoint).replace("/", "-")
    mounts = hugetlbfs_mounts()
    return os.path.join(mounts[0] if mounts else "/dev/shm", name)


def build(config: Config) -> tuple[Cma, Journal | None]:
    """The core with its arena and, with a state directory, its recovered journal."""
    cma = Cma(config.regions, config.map, base=config.base, arena_size=config.arena_size,
              limits=config.limits)
    journal = Journal(config.state_dir) if config.state_dir else None
    path = config.arena_file or (journal and journal.get("arena_file")) or arena_path(config)
    if journal is not None and journal.count():
        check_journal_matches(journal, config, path, cma.base)
    if journal is None and os.path.lexists(path):
        os.unlink(path)  # a non-persistent daemon starts with a fresh arena
    survived = os.path.exists(path)
    arena = Arena(cma.arena_size, path=path, backing=config.backing,
                  hugetlb_memfd=journal is None)
    try:
        if journal is not None:  # before the arena: sticky regions keep their chunks' pages
            next_id = journal.next_id()  # before recovery forgets transient chunks
            restore_allocators(cma, journal)
            recover(cma, journal, arena_survived=survived)
            cma.skip_ids(next_id)
        cma.attach_arena(arena)
        if journal is not None:
            journal.set(arena_file=arena.path, regions=config.regions, base=cma.base,
                        arena_size=arena.size)
            cma.listeners.append(journal)
    except BaseException:
        arena.close()  # never unlink here: the bytes may be all that is left
        raise
    return cma, journal


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
            new = load(self.args.config, {k: getattr(self.args, k) for k in FLAGS})
            changed_layout = layout(new) != layout(self.config)
        except Exception as e:  # a reload never takes the daemon down
            log.error("reload: %s; keeping the running configuration", getattr(e, "why", e))
            return
        if changed_layout:
            log.error("reload: the region layout changed (%r); refused, the running regions "
                      "stay: restart the daemon to apply it", new.regions)
            new.regions, new.base, new.arena_size = (self.config.regions, self.config.base,
                                                     self.config.arena_size)
        for key in ("mountpoint", "backing", "arena_file", "state_dir", "group"):
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


def plant_tree(mount, cma: Cma, config: Config) -> None:
    """Build the tree and hand it to the mount made at start (`start`)."""
    from .tree import Tree

    arena = cma.arena
    tree = Tree(cma, gid=group_id(config.group), extra_stats={
        "backing": arena.backing, "page_size": 4096, "arena_size": arena.size,
        "base": f"{cma.base:#x}", "arena_file": arena.path})
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
    return None


def layout_problem(config: Config) -> str | None:
    """Why the regions cannot be laid out, found before anything is mounted."""
    try:
        layout(config)
    except CmaError as e:
        return e.why
    return None


class Interrupted(Exception):
    """SIGTERM or SIGINT while the tree is built: unmount, serve nothing."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM/SIGINT raise Interrupted in the block.  Outside such blocks start()
    keeps them blocked, from before the mount until the serving loop's own
    receiver takes them (fusefs.serve): a death in between would leave the mount
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


def start(config: Config, args: argparse.Namespace, fs, mountpoint: str) -> int:
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
        from . import offline
        return offline.main(argv)
    args = parse_args(argv)
    try:
        config = load(args.config, {k: getattr(args, k) for k in FLAGS})
        logging.getLogger().setLevel(config.log_level.upper())
    except ConfigError as e:
        log.error("%s", e)
        return 2
    problem = state_dir_problem(config.state_dir) or layout_problem(config)
    if problem:
        log.error("configuration: %s", problem)
        return 2
    from fusefs import Dir, Filesystem, check_mountpoint

    try:
        privileges.pagemap_fd()  # opened while privileged: see privileges.py
    except OSError as e:
        log.warning("%s: phys will not work", e)
    fs = Filesystem(Dir())  # ready before a stale mount goes: then mount at once
    try:  # before anything is touched: another daemon's live mount (and arena) stays
        mountpoint = check_mountpoint(config.mountpoint)
    except OSError as e:
        log.error("%s", getattr(e, "why", None) or e)
        return 1
    return start(config, args, fs, mountpoint)


if __name__ == "__main__":
    sys.exit(main())
