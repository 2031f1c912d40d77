"""``cmad check`` and ``cmad reset``: a state directory, with no daemon running."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys

from cmad.memory import shared as sharing
from cmad.memory.arena import remove_own
from cmad.core.cma import Cma
from cmad.memory.hugepages import release_mount, sweep
from cmad.errors import CmaError
from cmad.daemon.recovery import restore_allocators, restore_record
from cmad.store.journal import JOURNAL, Journal
from cmad.store.rows import BadRow
from cmad.memparse import human
from cmad.memory.physmap import parse_record

log = logging.getLogger("cmad")


def holders(state_dir: str) -> list[str]:
    """The processes with the journal open (a daemon running on *state_dir*), as
    ``pid N (command line)``: the offline commands leave a live state alone."""
    journal = os.path.realpath(os.path.join(state_dir, JOURNAL))
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) != os.getpid() and _holds(pid, journal):
            found.append(f"pid {pid} ({_command(pid)})")
    return found


def _holds(pid: str, journal: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target == journal or target.startswith(journal + "-"):
            return True
    return False


def arena_holders(path: str) -> list[str]:
    """The processes that have the arena file *path* open or mapped, as ``pid N
    (command line)``: a live daemon's arena (or a client's mapping of a chunk)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) != os.getpid() and (_holds(pid, path) or _maps(pid, path)):
            found.append(f"pid {pid} ({_command(pid)})")
    return found


def _maps(pid: str, path: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(line.rstrip("\n").endswith(" " + path) for line in f)
    except OSError:
        return False


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    text = " ".join(w.decode(errors="replace") for w in words)
    return text if len(text) <= 120 else text[:117] + "..."


def _locked(path: str) -> str | None:
    """Why the journal at *path* cannot be taken for writing now, or None."""
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")
        db.execute("ROLLBACK")
        return None
    except sqlite3.OperationalError as e:
        return f"its journal is in use ({e})"
    finally:
        db.close()


def check(state_dir: str) -> list[str]:
    """Every problem found in a state directory (none: it is consistent)."""
    if not os.path.exists(os.path.join(state_dir, JOURNAL)):
        return [f"{state_dir}: no journal ({JOURNAL})"]
    running = holders(state_dir)
    if running:
        return [f"a daemon runs on {state_dir}: {', '.join(running)}; 'cmad check' verifies "
                "the state of a stopped daemon"]
    journal = Journal(state_dir, readonly=True)
    try:
        integrity = journal.db.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            return [f"journal integrity: {integrity}"]
        regions, base = journal.get("regions"), journal.get("base")
        if regions is None or base is None:
            return ["journal has no recorded configuration (never started?)"]
        cma = Cma(regions, "", base=int(base))
        restore_allocators(cma, journal)
        problems = []
        try:
            for record in journal.records():
                try:
                    restore_record(cma, record)
                except CmaError as e:
                    problems.append(e.why)
        except BadRow as e:
            return [e.why]
        try:
            cma._check()
        except AssertionError as e:
            problems.append(f"free space does not add up: {e}")
        layout = journal.get("arena_layout")
        if layout is not None:
            try:
                parse_record(layout)
            except CmaError as e:
                problems.append(e.why)
        arena = journal.get("arena_file")
        if len(cma.chunks) and (arena is None or not os.path.exists(arena)):
            problems.append(f"arena file {arena} is gone: {len(cma.chunks)} chunks lost their "
                            "bytes")
        for region, shared in shared_files(journal.get("shared_files"), named=True):
            if journal.count(region) and not os.path.exists(shared):
                problems.append(f"shared region file {shared} is gone: the chunks of region "
                                f"{region} lost their bytes")
        if not problems:
            used = sum(r.used for r in cma.regions)
            print(f"ok: {len(cma.chunks)} chunks, {human(used)} in {len(cma.regions)} regions, "
                  f"arena {arena}")
        return problems
    except sqlite3.OperationalError as e:
        return [f"journal: {e} (is a daemon running on this state directory?)"]
    finally:
        journal.close()


def reset(state_dir: str) -> int:
    """Forget everything: the arena file and the journal; never under a live daemon."""
    path = os.path.join(state_dir, JOURNAL)
    running = holders(state_dir)
    why = (f"a daemon runs on it: {', '.join(running)}; stop it first" if running
           else os.path.exists(path) and _locked(path))
    if why:
        print(f"refusing to reset {state_dir}: {why}", file=sys.stderr)
        return 1
    if os.path.exists(path):
        journal = Journal(state_dir, readonly=True)
        arena = journal.get("arena_file")
        files = shared_files(journal.get("shared_files"))
        journal.close()
        for shared in files:  # first: a memfd arena's pages are recorded as held there
            remove_arena(shared, remove=sharing.remove)
        if arena:
            remove_arena(arena)
    give_back()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    print(f"reset {state_dir}")
    return 0


def shared_files(recorded: str | None, named: bool = False) -> list:
    """The shared region files a journal recorded (SPEC 4d); ``named``: as
    (region, file) pairs."""
    try:
        files = json.loads(recorded or "{}")
    except ValueError:
        return []
    if not isinstance(files, dict):
        return []
    return [(str(r), str(p)) if named else str(p) for r, p in files.items()]


def remove_arena(arena: str, remove=remove_own) -> None:
    """Delete the arena file *arena* (or a shared region's file) if it is the daemon's
    own and nobody holds it."""
    if not os.path.lexists(arena):
        return
    held = arena_holders(arena)
    if held:
        print(f"kept {arena}: in use by {', '.join(held)} (a live daemon's arena, or a "
              "client maps it)", file=sys.stderr)
        return
    try:
        remove(arena)
        print(f"removed {'arena' if remove is remove_own else 'shared region file'} {arena}")
    except CmaError as e:
        print(f"kept {arena}: {e.why}", file=sys.stderr)


def give_back() -> None:
    """Every page a dead daemon added and no arena file holds goes back (the ledger:
    cmad/memory/hugepages.py), and the private hugetlbfs mount if it is empty, and the
    groups' mounts of shared region files."""
    gone = sweep()
    release_mount()
    sharing.release_mounts()
    if gone:
        print(f"gave {gone} hugepages back to the pool")


def reset_mountpoint(mountpoint: str) -> int:
    """``cmad reset --mountpoint M``: the arena of a daemon run on M without a state
    directory (kill -9 leaves it, and its pages), never one a live process holds."""
    from cmad.daemon.config import Config
    from cmad.daemon.assembly import arena_name, arena_paths
    from fusefs import resolve

    config = Config(mountpoint=resolve(mountpoint))
    for shared in sharing.files_of(arena_name(config)):
        remove_arena(shared, remove=sharing.remove)
    for arena in arena_paths(config):
        remove_arena(arena)
    give_back()
    print(f"reset {mountpoint}")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"cmad {argv[0]}")
    if argv[0] == "hugepages":
        p.add_argument("--config", help="the daemon's TOML configuration")
        return hugepages(p.parse_args(argv[1:]).config)
    p.add_argument("--state-dir", required=argv[0] != "reset")
    if argv[0] == "reset":
        p.add_argument("--mountpoint", help="without --state-dir: what a daemon run on "
                       "this mountpoint with no state directory left")
    args = p.parse_args(argv[1:])
    if argv[0] == "reset":
        if args.state_dir:
            return reset(args.state_dir)
        if args.mountpoint:
            return reset_mountpoint(args.mountpoint)
        p.error("reset needs --state-dir DIR or --mountpoint M")
    try:
        problems = check(args.state_dir)
    except (sqlite3.Error, CmaError) as e:
        problems = [str(e)]
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


def hugepages(config_path: str | None) -> int:
    """Reserve the hugepages the configured arena needs (``cmad hugepages``).

    Raises vm.nr_hugepages by what is missing from HugePages_Free; an arena
    file that already exists holds its pages already.  Exit 1 if the kernel
    reserved fewer than asked (memory too fragmented), 0 otherwise.
    """
    from cmad.memory.arena import hugepage_size
    from cmad.daemon.config import load
    from cmad.daemon.assembly import arena_path

    config = load(config_path, {})
    cma = Cma(config.regions, "", base=config.base, arena_size=config.arena_size)
    page = hugepage_size()
    need = -(-cma.arena_size // page)
    if os.path.exists(arena_path(config)):
        print(f"arena file {arena_path(config)} exists: its pages are reserved")
        return 0
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    free = int(meminfo["HugePages_Free"].split()[0])
    with open("/proc/sys/vm/nr_hugepages") as f:
        total = int(f.read())
    if free >= need:
        print(f"{free} free hugepages of {human(page)}: enough for {need}")
        return 0
    with open("/proc/sys/vm/nr_hugepages", "w") as f:
        f.write(str(total + need - free))
    with open("/proc/sys/vm/nr_hugepages") as f:
        got = int(f.read())
    print(f"vm.nr_hugepages {total} -> {got} (wanted {total + need - free}) for an arena of "
          f"{human(cma.arena_size)}")
    return 0 if got >= total + need - free else 1
