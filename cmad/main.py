"""The ``cmad`` command: a foreground daemon serving the CMA tree over FUSE."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import sys

from . import __version__
from .arena import Arena, hugetlbfs_mounts
from .cma import Cma
from .config import Config, ConfigError, load
from .errors import CmaError

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


def build(config: Config) -> Cma:
    """The core with its arena, from a configuration."""
    cma = Cma(config.regions, config.map, base=config.base, arena_size=config.arena_size,
              limits=config.limits)
    path = arena_path(config)
    if config.state_dir is None and os.path.exists(path):
        os.unlink(path)  # a non-persistent daemon starts with a fresh arena
    arena = Arena(cma.arena_size, path=path, backing=config.backing,
                  hugetlb_memfd=config.state_dir is None)
    cma.attach_arena(arena)
    return cma


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
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="cmad: %(levelname)s %(message)s",
                        level=logging.INFO)
    try:
        config = load(args.config, {k: getattr(args, k) for k in FLAGS})
        logging.getLogger().setLevel(config.log_level.upper())
        cma = build(config)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except CmaError as e:
        log.error("configuration: %s", e.why)
        return 2
    try:
        serve_tree(cma, config)
    except OSError as e:
        log.error("%s", getattr(e, "why", None) or e)
        return 1
    finally:
        cma.arena.close(unlink=config.state_dir is None)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
