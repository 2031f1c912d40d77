"""Least privilege: the capabilities the daemon keeps while it serves clients.

Start-up needs root's power: mounting (CAP_SYS_ADMIN), clearing a stale
mount, sealing the bare mountpoint (CAP_LINUX_IMMUTABLE), reserving
hugepages, opening /proc/self/pagemap so that it shows frame numbers.
Serving needs almost none of it, and serving is where client input is
parsed.  So once started, the daemon keeps

- CAP_SYS_ADMIN in its permitted and bounding sets only, raised into the
  effective set for the unmount at stop (`raised`), and nothing else;
- an empty effective set while it answers requests: uid 0 still owns its
  journal, arena file and the sysctl files, which need no capability;
- the pagemap file it opened while privileged (`pagemap_fd`): the kernel
  decides whether a read shows frame numbers by the opener's capabilities,
  so `phys` keeps working without CAP_SYS_ADMIN in the effective set.

Capabilities belong to a thread: `drop` runs in the main thread before the
loop starts any other (the invalidator, trio's workers inherit the result).
libc's capget/capset/prctl through ctypes, as no maintained PyPI package
does these three calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from typing import Iterable, Iterator

log = logging.getLogger("cmad")

CAP_SETPCAP = 8
CAP_LINUX_IMMUTABLE = 9
CAP_SYS_ADMIN = 21
SERVING = frozenset({CAP_SYS_ADMIN})   # what the daemon keeps once it serves

_VERSION_3 = 0x20080522
PR_CAPBSET_READ, PR_CAPBSET_DROP = 23, 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4

_pagemap = -1


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _call(name: str, *args) -> int:
    result = getattr(_libc, name)(*args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")
    return result


def _bits(caps: Iterable[int]) -> int:
    return sum(1 << c for c in set(caps))


def _caps(mask: int) -> set[int]:
    return {c for c in range(64) if mask >> c & 1}


def current() -> tuple[set[int], set[int], set[int]]:
    """(effective, permitted, inheritable) of the calling thread."""
    data = (_Data * 2)()
    _call("capget", ctypes.byref(_Header(_VERSION_3, 0)), data)
    return tuple(_caps(getattr(data[0], f) | getattr(data[1], f) << 32)
                 for f in ("effective", "permitted", "inheritable"))


def _set(effective: set[int], permitted: set[int], inheritable: set[int]) -> None:
    data = (_Data * 2)()
    for i in range(2):
        data[i].effective = _bits(effective) >> 32 * i & 0xFFFFFFFF
        data[i].permitted = _bits(permitted) >> 32 * i & 0xFFFFFFFF
        data[i].inheritable = _bits(inheritable) >> 32 * i & 0xFFFFFFFF
    _call("capset", ctypes.byref(_Header(_VERSION_3, 0)), data)


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def bounding() -> set[int]:
    """The calling thread's bounding set."""
    return {c for c in range(last_cap() + 1)
            if _libc.prctl(PR_CAPBSET_READ, ctypes.c_ulong(c), 0, 0, 0) == 1}


def drop(keep: Iterable[int] = SERVING) -> None:
    """Keep only *keep*, in the permitted and bounding sets; empty the effective,
    inheritable and ambient sets.  Irreversible (that is the point)."""
    keep = set(keep)
    effective, permitted, _ = current()
    if CAP_SETPCAP in effective:
        for cap in bounding() - keep:
            _call("prctl", PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0)
    else:  # the unit's CapabilityBoundingSet= has done it, or we run unprivileged
        log.debug("no CAP_SETPCAP: the bounding set stays as given")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _set(set(), permitted & keep, set())
    kept = ", ".join(_NAMES.get(c, str(c)) for c in sorted(permitted & keep))
    log.info("serving with %s", f"{kept} permitted, no capability effective" if kept
             else "no capabilities")


@contextlib.contextmanager
def raised(cap: int = CAP_SYS_ADMIN) -> Iterator[None]:
    """*cap* in the calling thread's effective set for the block, if permitted."""
    effective, permitted, inheritable = current()
    if cap in effective or cap not in permitted:
        yield
        return
    _set(effective | {cap}, permitted, inheritable)
    try:
        yield
    finally:
        _set(effective, permitted, inheritable)


def pagemap_fd() -> int:
    """/proc/self/pagemap, opened once, at start-up while privileged (see above)."""
    global _pagemap
    if _pagemap < 0:
        try:
            _pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno or errno.EIO, f"/proc/self/pagemap: {e.strerror}") from None
    return _pagemap


_NAMES = {CAP_SETPCAP: "CAP_SETPCAP", CAP_LINUX_IMMUTABLE: "CAP_LINUX_IMMUTABLE",
          CAP_SYS_ADMIN: "CAP_SYS_ADMIN"}
