"""The arena: the memory behind the regions, hugepage-backed where the machine allows.

Preference order (each choice is logged with its reason):
  hugetlb  a file on a hugetlbfs mount, or memfd_create(MFD_HUGETLB)
  thp      shared memory (tmpfs file or memfd) with MADV_HUGEPAGE advised
  shm      plain shared memory
With ``path`` the arena is a named file that outlives the process, so a
client can map a chunk through it and a restarted daemon finds its bytes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import stat

from cmad.errors import CmaError
from cmad.memory import pagemap
from cmad.memory.kernelpool import page_size
from cmad.memory.ledger import unlink_arena
from cmad.memory.mounts import fs_type, release_mount
from cmad.memory.pool import Pool
from cmad.memparse import human

log = logging.getLogger(__name__)

BACKINGS = ("auto", "hugetlb", "thp", "shm")
_THP_SHMEM = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def hugepage_size() -> int:
    return page_size()


def _hugepages_free() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _thp_shmem_mode() -> str:
    try:
        with open(_THP_SHMEM) as f:
            text = f.read()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


class Unsafe(CmaError):
    """An arena file someone else could read or swap: never used."""


# Kernel interfaces whose files look regular (/proc/self/mem is a 0600 root file with one
# link): never an arena file.
PSEUDO_FS = ("proc", "sysfs", "devtmpfs", "devpts", "debugfs", "tracefs", "securityfs",
             "cgroup", "cgroup2", "bpf", "configfs", "efivarfs", "pstore", "fusectl", "fuse",
             "binfmt_misc", "mqueue", "autofs", "")


def check_own(path: str, st: os.stat_result) -> None:
    """EPERM unless ``st`` is the daemon's own arena file: a regular file owned by us,
    mode 0600, one link, not on a kernel interface (procfs, sysfs, ...).  Anything
    else is neither used nor deleted."""
    problems = []
    if not stat.S_ISREG(st.st_mode):
        problems.append("not a regular file")
    if st.st_uid != os.geteuid():
        problems.append(f"owned by uid {st.st_uid}")
    if stat.S_IMODE(st.st_mode) != 0o600:
        problems.append(f"mode {stat.S_IMODE(st.st_mode):o}")
    if st.st_nlink != 1:
        problems.append(f"{st.st_nlink} links")
    kind = fs_type(path)
    if kind in PSEUDO_FS:
        problems.append(f"on {kind or 'an unknown filesystem'}, a kernel interface")
    if problems:
        raise Unsafe(errno.EPERM, f"arena file {path} is not the daemon's own ("
                                  f"{', '.join(problems)}; it must be a regular file of uid "
                                  f"{os.geteuid()}, mode 0600, one link, not in /proc, /sys "
                                  "or /dev): refusing to use or delete it")


def remove_own(path: str) -> bool:
    """Delete the daemon's own arena file at ``path``; True if there was one.
    EPERM (and nothing deleted) for any other file, symlink or device."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise Unsafe(errno.EPERM, f"arena file {path}: {e.strerror}") from None
    check_own(path, st)
    unlink_arena(path)
    return True


def open_private(path: str) -> tuple[int, bool]:
    """Open (creating it 0600) the daemon's own file; no symlinks followed.
    Returns (fd, created)."""
    kind = fs_type(os.path.dirname(path) or ".")
    if kind in PSEUDO_FS:
        raise Unsafe(errno.EPERM, f"arena file {path}: the directory is on "
                                  f"{kind or 'an unknown filesystem'}, a kernel interface")
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
    except FileExistsError:
        pass
    except OSError as e:
        raise Unsafe(e.errno, f"arena file {path}: {e.strerror}") from None
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
    except OSError as e:
        raise Unsafe(errno.EPERM, f"arena file {path}: {e.strerror} (a symlink is refused)")
    try:
        check_own(path, os.fstat(fd))
    except Unsafe:
        os.close(fd)
        raise
    return fd, False


MAP_NORESERVE = 0x4000  # Linux; Python's mmap module names it only from 3.12
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]


class Overlay:
    """A file mapped over part of the arena: a shared region's own memory (SPEC 4d)."""

    def __init__(self, offset: int, size: int, fd: int, path: str, page: int):
        self.offset, self.size, self.fd, self.path, self.page = offset, size, fd, path, page

    @property
    def end(self) -> int:
        return self.offset + self.size


class Arena:
    """``size`` bytes of shared memory mapped into the daemon, zero-copy by memoryview.

    Shared regions' files are mapped over their place (`overlay`): the arena
    stays one range of addresses, and a range of a shared region is backed
    by (populated in, punched in) that region's file.

    ``pool``: the hugepage pool the arena's pages came from, given back to when
    the arena is deleted; ``created``: the caller made the file behind ``fd``
    (a failed start removes it)."""

    def __init__(self, size: int, *, path: str | None = None, backing: str = "auto",
                 populate: bool = False, no_hugetlb: str = "",
                 fd: int = -1, holes: bool = False, pool: Pool | None = None,
                 created: bool = False):
        if backing not in BACKINGS:
            raise CmaError(errno.EINVAL, f"backing {backing!r}: expected one of {BACKINGS}")
        if size <= 0:
            raise CmaError(errno.EINVAL, f"arena size {size} must be positive")
        self.size = size
        self.named = path is not None
        self.path = path
        self.existed = path is not None and os.path.exists(path)
        self.fd = fd  # a hugetlb file already laid out (physmap.build_file)
        self.created = False  # ``created``: the caller made ``fd``'s file (set once open)
        self.pool = pool  # the hugepage pool to give back to when the file is deleted
        self.layout = None  # physmap.Layout for a hugetlbfs arena laid out by frame
        self.mm: mmap.mmap | None = None
        self.overlays: list[Overlay] = []
        self.stale: list[str] = []  # shared files of regions no longer shared (main.build)
        # holes: the ranges of shared regions have no pages in the arena file; a
        # hugetlb mapping must not reserve pages for them
        self.holes = holes
        failures = [f"hugetlb: {no_hugetlb}"] if no_hugetlb and backing == "auto" else []
        kinds = ("hugetlb", "thp", "shm") if backing == "auto" else (backing,)
        for kind in kinds[1:] if failures else kinds:
            self.size = size
            try:
                self._open(kind, path, populate)
            except Unsafe:
                self._close_fd()
                raise
            except OSError as e:
                failures.append(f"{kind}: {e.strerror or e}")
                self._close_fd()
                self._unlink_created()
                continue
            self.backing = kind
            self.created = self.created or created
            self.why = "; ".join(failures) or "first choice"
            log.info("arena: %s of %s backed by %s%s at %s", human(self.size),
                     "named file" if self.named else "anonymous memory", kind,
                     f" (after {self.why})" if failures else "", self.path)
            return
        raise CmaError(errno.ENOMEM, f"arena of {human(size)}: no backing worked: "
                                     + "; ".join(failures))

    def _open(self, kind: str, path: str | None, populate: bool) -> None:
        if kind == "hugetlb":
            self.size = -(-self.size // hugepage_size()) * hugepage_size()
            if self.fd < 0 and path is None and _hugepages_free() * hugepage_size() < self.size:
                raise OSError(errno.ENOMEM, f"{_hugepages_free()} free hugepages of "
                                            f"{human(hugepage_size())}, need "
                                            f"{self.size // hugepage_size()}")
            if path is None and self.fd < 0:
                self.fd = os.memfd_create("cmad-arena", os.MFD_HUGETLB | os.MFD_CLOEXEC)
            elif path is not None and fs_type(os.path.dirname(path) or ".") != "hugetlbfs":
                raise OSError(errno.EINVAL, f"{path} is not on a hugetlbfs mount")
        elif path is not None and fs_type(os.path.dirname(path) or ".") == "hugetlbfs":
            raise OSError(errno.EINVAL, f"{path} is on hugetlbfs, which is not {kind}")
        if kind == "thp" and _thp_shmem_mode() not in ("always", "within_size", "advise"):
            raise OSError(errno.ENOTSUP, f"shmem THP is {_thp_shmem_mode()!r} "
                                         f"in {_THP_SHMEM}")
        if self.fd < 0 and path is None:
            self.fd = os.memfd_create("cmad-arena", os.MFD_CLOEXEC)
        elif self.fd < 0:
            self.fd, self.created = open_private(path)
        if os.fstat(self.fd).st_size < self.size:
            os.ftruncate(self.fd, self.size)
        flags = (mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
                 | (MAP_NORESERVE if self.holes else 0))
        self.mm = mmap.mmap(self.fd, self.size, flags=flags)
        if kind == "thp":
            self.mm.madvise(mmap.MADV_HUGEPAGE)
        self.named = path is not None
        self.path = path if path is not None else f"/proc/{os.getpid()}/fd/{self.fd}"
        self.page = hugepage_size() if kind == "hugetlb" else mmap.PAGESIZE

    def overlay(self, offset: int, size: int, fd: int, path: str) -> None:
        """Map the file ``fd`` (``path``) over [offset, offset + size) of the arena.
        Its page size is the arena's (the caller made it on the same kind of memory),
        and the range lies on whole pages of it."""
        self.view(offset, size)  # bounds check
        if offset % self.page or size % self.page:
            raise CmaError(errno.EINVAL, f"shared file {path}: range {offset:#x}+{size:#x} is "
                                         f"not on whole pages of {human(self.page)}")
        flags = mmap.MAP_SHARED | 0x10  # MAP_FIXED: replaces the arena's pages there
        got = _libc.mmap(self._address() + offset, size, mmap.PROT_READ | mmap.PROT_WRITE,
                         flags, fd, 0)
        if got is None or got == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise CmaError(err or errno.ENOMEM, f"shared file {path}: cannot map it over the "
                                                f"arena: {os.strerror(err)}")
        # our own descriptor: the caller's may go, a layout may be tried again
        self.overlays.append(Overlay(offset, size, os.dup(fd), path, self.page))

    def _backing_of(self, offset: int) -> tuple[int, int, int]:
        """(descriptor, its offset for ``offset``, end of that file's range in the arena)."""
        for o in self.overlays:
            if o.offset <= offset < o.end:
                return o.fd, offset - o.offset, o.end
        return self.fd, offset, min((o.offset for o in self.overlays if o.offset > offset),
                                    default=self.size)

    def view(self, offset: int, size: int) -> memoryview:
        """The bytes [offset, offset + size) of the arena, zero-copy."""
        if offset < 0 or offset + size > self.size:
            raise CmaError(errno.EINVAL, f"range {offset:#x}+{size:#x} is outside the arena")
        return memoryview(self.mm)[offset:offset + size]

    def populate(self, offset: int, size: int) -> None:
        """Back [offset, offset + size) with memory now: ENOMEM/ENOSPC here, not SIGBUS later."""
        start, end = self._pages(offset, size, outward=True)
        while end > start:
            fd, at, stop = self._backing_of(start)
            length = min(end, stop) - start
            try:
                os.posix_fallocate(fd, at, length)
            except OSError as e:
                raise CmaError(e.errno, f"arena: cannot back {length:#x} bytes at "
                                        f"{start:#x}: {e.strerror}") from None
            start += length

    def zero(self, offset: int, size: int) -> None:
        """memset the range to 0: a new chunk never shows a freed one's bytes."""
        self.view(offset, size)  # bounds check
        ctypes.memset(self._address() + offset, 0, size)

    def _address(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def release(self, offset: int, size: int) -> int:
        """Give the whole pages inside [offset, offset + size) back to the system
        (MADV_REMOVE punches a hole in the tmpfs/hugetlbfs file).  Returns bytes released."""
        start, end = self._pages(offset, size, outward=False)
        if end > start:
            self.mm.madvise(mmap.MADV_REMOVE, start, end - start)
        return max(end - start, 0)

    def _pages(self, offset: int, size: int, outward: bool) -> tuple[int, int]:
        page = self.page
        if outward:
            return offset // page * page, min(-(-(offset + size) // page) * page, self.size)
        return -(-offset // page) * page, (offset + size) // page * page

    def phys(self, offset: int, size: int) -> list[tuple[int, int]]:
        """Physical segments (address, length) of the range, merged where contiguous.

        Reads /proc/self/pagemap; EACCES where the kernel hides frame numbers
        (they read as 0 without CAP_SYS_ADMIN), EFAULT for pages not present.
        """
        base = self._address()
        self.view(offset, size)  # bounds check
        self.mm[offset:offset + size:mmap.PAGESIZE]  # fault the pages into our page table
        start = (base + offset) // mmap.PAGESIZE * mmap.PAGESIZE
        count = -(-size // mmap.PAGESIZE)
        frames = pagemap.physical(start, count, mmap.PAGESIZE, lambda i: CmaError(
            errno.EFAULT, f"arena page at {offset + i * 4096:#x} is not present"))
        segments: list[list[int]] = []
        for addr in frames:
            if segments and segments[-1][0] + segments[-1][1] == addr:
                segments[-1][1] += mmap.PAGESIZE
            else:
                segments.append([addr, mmap.PAGESIZE])
        return [(a, n) for a, n in segments]

    def frames(self, first: int, count: int) -> list[int]:
        """The physical address of each of ``count`` hugepages from page ``first``."""
        return pagemap.read_frames(self._address() + first * self.page, count, self.page)

    def _unlink_created(self) -> None:
        """A failed start leaves no file it made (a sparse 4 TiB one, say) behind."""
        if self.created and self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.created = False

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self, unlink: bool = False) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view is still exported; the mapping dies with us
                log.debug("arena: mapping still referenced at close")
            self.mm = None
        self._close_fd()
        overlays, self.overlays = self.overlays, []
        for o in overlays:
            os.close(o.fd)
            if unlink:
                from cmad.memory.shared import remove
                try:
                    remove(o.path)
                except CmaError as e:
                    log.warning("%s", e.why)
        if unlink and overlays:
            from cmad.memory.shared import release_mounts
            release_mounts()
        if unlink and self.named:
            try:
                unlink_arena(self.path)
            except FileNotFoundError:
                pass
            release_mount(fs_type(os.path.dirname(self.path)) or "none")
        if unlink and self.pool is not None:  # the arena is gone: so are the pages we added
            self.pool.give_back()
