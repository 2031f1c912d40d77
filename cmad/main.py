"""The ``cmad`` command: a foreground daemon serving the CMA tree over FUSE."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import sqlite3
import sys

from . import __version__
from .arena import Arena, hugetlbfs_mounts
from .cma import Cma
from .config import Config, ConfigError, load
from .errors import CmaError
from .journal import Journal, recover

log = logging.getLogger("cmad")

FLAGS = ("regions", "map", "mountpoint", "arena_size", "base", "backing", "arena_file",
         "state_dir", "group", "log_level")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cmad", description="Userspace Contiguous Memory Allocator daemon: serves the "
        "CMA patch's sysfs tree over FUSE, in the foreground, logging to stderr.")
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
    if journal is None and os.path.exists(path):
        os.unlink(path)  # a non-persistent daemon starts with a fresh arena
    survived = os.path.exists(path)
    arena = Arena(cma.arena_size, path=path, backing=config.backing,
                  hugetlb_memfd=journal is None)
    try:
        cma.attach_arena(arena)
        if journal is not None:
            recover(cma, journal, arena_survived=survived)
            journal.set(arena_file=arena.path, regions=config.regions, base=cma.base,
                        arena_size=arena.size)
            cma.listeners.append(journal)
    except BaseException:
        arena.close()  # never unlink here: the bytes may be all that is left
        raise
    return cma, journal


def stop(cma: Cma, journal: Journal | None) -> None:
    """Keep the arena file only while a journal says chunks live in it."""
    keep = journal is not None and len(cma.chunks) > 0
    cma.arena.close(unlink=not keep)
    if journal is not None:
        journal.close()
    log.info("stopped with %d chunks%s", len(cma.chunks),
             f"; arena kept at {cma.arena.path}" if keep else "")


def serve_tree(cma: Cma, config: Config) -> None:
    from fusefs import Filesystem, check_mountpoint, serve

    from .tree import Tree

    check_mountpoint(config.mountpoint)
    arena = cma.arena
    tree = Tree(cma, gid=group_id(config.group), extra_stats={
        "backing": arena.backing, "page_size": 4096, "arena_size": arena.size,
        "base": f"{cma.base:#x}", "arena_file": arena.path})
    serve(Filesystem(tree.root), config.mountpoint, fsname="cmad",
          on_ready=lambda: log.info("ready: %d regions mounted at %s", len(cma.regions),
                                    config.mountpoint))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(stream=sys.stderr, format="cmad: %(levelname)s %(message)s",
                        level=logging.INFO)
    if argv and argv[0] in ("check", "reset"):
        from . import offline
        return offline.main(argv)
    args = parse_args(argv)
    journal = None
    try:
        config = load(args.config, {k: getattr(args, k) for k in FLAGS})
        logging.getLogger().setLevel(config.log_level.upper())
        cma, journal = build(config)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except (CmaError, sqlite3.Error) as e:
        log.error("configuration: %s", getattr(e, "why", e))
        return 2
    try:
        serve_tree(cma, config)
    except OSError as e:
        log.error("%s", getattr(e, "why", None) or e)
        return 1
    finally:
        stop(cma, journal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
