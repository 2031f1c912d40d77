"""GPU staging buffers from cmad, as a plain user in the shared region's group.

    python bench/gpu.py [--mountpoint /run/cma] [--device gpu] [--size 256M]
    sudo python bench/gpu.py --user alice     # root: run as alice (a member of G)

Against a running cmad whose map sends ``--device`` to a region shared with
a group (SPEC 4d; ``make run``'s ``gpu`` region), as a member of that group:

1. allocate through the daemon (`cmad.clients.client`), map the chunk, register it
   with ``cudaHostRegister(address, size, 0)``, and check bytes both ways
   (host -> device -> a second host buffer, and device -> the chunk);
2. H2D and D2H GB/s of the cmad chunk, ``cudaHostAlloc`` memory and
   pageable memory side by side: rounds alternate the three, each copy
   timed with CUDA events, medians after warm-up;
3. registration time of the chunk against the same size of 4 KiB-page
   memory (anonymous, ``MADV_NOHUGEPAGE``), medians;
4. time from request to a zeroed, registered 1 GiB buffer (alloc through
   the daemon, map, ``cudaHostRegister``) against ``cudaHostAlloc`` of
   1 GiB plus zeroing it, alternating, medians of 3.

The CUDA runtime is reached through its C library (``libcudart``) with
ctypes, found where cupy, cuda-python or torch install it, or the CUDA
toolkit: the calls are the ones a C program makes.  Without a CUDA device
(or without libcudart) the bench prints why and exits 0: CI never needs a
GPU.  Prints, never asserts (a byte mismatch exits 1).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

M = 1 << 20
G = 1 << 30
H2D, D2H = 1, 2  # cudaMemcpyKind
MADV_NOHUGEPAGE = 15


class Skip(Exception):
    """No CUDA here: the reason is printed and the bench exits 0."""


def find_cudart() -> str:
    """libcudart from the CUDA toolkit or the wheels of cupy, cuda-python or torch."""
    found = ctypes.util.find_library("cudart")
    if found:
        return found
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    patterns = ["nvidia/cuda_runtime/lib/libcudart.so*", "torch/lib/libcudart*.so*",
                "cupy_backends/cuda/libs/libcudart.so*", "cuda/bindings/libcudart.so*"]
    patterns += ["/usr/local/cuda/lib64/libcudart.so*"]
    for pattern in patterns:
        for root in roots if not pattern.startswith("/") else [""]:
            hits = sorted(glob.glob(os.path.join(root, pattern)))
            if hits:
                return hits[-1]
    raise Skip("no libcudart found (install the CUDA toolkit, or cupy, cuda-python or "
               "torch, which ship it)")


class Cuda:
    """The few CUDA runtime calls the bench makes, errors raised with their names."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL(find_cudart())
        except OSError as e:
            raise Skip(f"libcudart cannot be loaded: {e}") from None
        count = ctypes.c_int(0)
        err = self.lib.cudaGetDeviceCount(ctypes.byref(count))
        if err or count.value == 0:
            raise Skip(f"no CUDA device (cudaGetDeviceCount: error {err}, "
                       f"{count.value} devices)")
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.device = "CUDA device 0"
        props = ctypes.create_string_buffer(8192)  # cudaDeviceProp starts with name[256]
        get = (getattr(self.lib, "cudaGetDeviceProperties_v2", None)
               or getattr(self.lib, "cudaGetDeviceProperties", None))
        if get is not None and get(props, 0) == 0:
            self.device = props.raw[:256].split(b"\0")[0].decode(errors="replace") \
                or self.device

    def check(self, err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"{what}: {self.lib.cudaGetErrorString(err).decode()}")

    def host_register(self, address: int, size: int, flags: int = 0) -> None:
        self.check(self.lib.cudaHostRegister(ctypes.c_void_p(address), ctypes.c_size_t(size),
                                             ctypes.c_uint(flags)), "cudaHostRegister")

    def host_unregister(self, address: int) -> None:
        self.check(self.lib.cudaHostUnregister(ctypes.c_void_p(address)), "cudaHostUnregister")

    def host_alloc(self, size: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(size),
                                          ctypes.c_uint(0)), "cudaHostAlloc")
        return ptr.value

    def free_host(self, address: int) -> None:
        self.check(self.lib.cudaFreeHost(ctypes.c_void_p(address)), "cudaFreeHost")

    def malloc(self, size: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(size)), "cudaMalloc")
        return ptr.value

    def free(self, address: int) -> None:
        self.check(self.lib.cudaFree(ctypes.c_void_p(address)), "cudaFree")

    def memcpy(self, dst: int, src: int, size: int, kind: int) -> None:
        self.check(self.lib.cudaMemcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src),
                                       ctypes.c_size_t(size), ctypes.c_int(kind)), "cudaMemcpy")

    def timed_copy(self, dst: int, src: int, size: int, kind: int) -> float:
        """Seconds of one cudaMemcpy, between two CUDA events."""
        start, stop = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.lib.cudaEventCreate(ctypes.byref(start)), "cudaEventCreate")
        self.check(self.lib.cudaEventCreate(ctypes.byref(stop)), "cudaEventCreate")
        try:
            self.check(self.lib.cudaEventRecord(start, None), "cudaEventRecord")
            self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src),
                                                ctypes.c_size_t(size), ctypes.c_int(kind),
                                                None), "cudaMemcpyAsync")
            self.check(self.lib.cudaEventRecord(stop, None), "cudaEventRecord")
            self.check(self.lib.cudaEventSynchronize(stop), "cudaEventSynchronize")
            ms = ctypes.c_float()
            self.check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), start, stop),
                       "cudaEventElapsedTime")
            return ms.value / 1e3
        finally:
            self.lib.cudaEventDestroy(start)
            self.lib.cudaEventDestroy(stop)


def pageable(size: int) -> tuple[mmap.mmap, int]:
    """Anonymous memory on 4 KiB pages (transparent hugepages advised off), touched."""
    mm = mmap.mmap(-1, size)
    try:
        mm.madvise(MADV_NOHUGEPAGE)
    except (OSError, AttributeError):
        pass
    mm.write(b"\0" * size)
    anchor = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(anchor)
    del anchor
    return mm, address


def median_gbps(size: int, seconds: list[float], warmup: int) -> float:
    return size / statistics.median(seconds[warmup:]) / 1e9


def check_bytes(cuda: Cuda, buf, size: int, device: int) -> None:
    """cmad chunk -> device -> cudaHostAlloc memory, and device -> cmad chunk."""
    pattern = os.urandom(M) * (size // M)
    buf.view[:size] = pattern
    other = cuda.host_alloc(size)
    try:
        cuda.memcpy(device, buf.address, size, H2D)
        cuda.memcpy(other, device, size, D2H)
        if ctypes.string_at(other, size) != pattern:
            raise SystemExit("bytes differ: cmad chunk -> device -> host")
        reverse = pattern[::-1]
        ctypes.memmove(other, reverse, size)
        cuda.memcpy(device, other, size, H2D)
        cuda.memcpy(buf.address, device, size, D2H)
        if bytes(buf.view[:size]) != reverse:
            raise SystemExit("bytes differ: host -> device -> cmad chunk")
    finally:
        cuda.free_host(other)
    print(f"bytes checked both ways: {size // M} MiB")


def bandwidth(cuda: Cuda, buf, size: int, device: int, rounds: int, warmup: int) -> None:
    pinned = cuda.host_alloc(size)
    plain, plain_address = pageable(size)
    kinds = {"cmad": buf.address, "cudaHostAlloc": pinned, "pageable": plain_address}
    times = {(k, d): [] for k in kinds for d in (H2D, D2H)}
    try:
        for _ in range(rounds):
            for name, host in kinds.items():  # alternating, so drift hits all alike
                times[name, H2D].append(cuda.timed_copy(device, host, size, H2D))
                times[name, D2H].append(cuda.timed_copy(host, device, size, D2H))
    finally:
        cuda.free_host(pinned)
        plain.close()
    print(f"\ncopies of {size // M} MiB, medians of {rounds - warmup} (CUDA events):")
    print(f"{'memory':>14} {'H2D GB/s':>10} {'D2H GB/s':>10} {'H2D vs pinned':>14}")
    base = median_gbps(size, times["cudaHostAlloc", H2D], warmup)
    for name in kinds:
        h2d = median_gbps(size, times[name, H2D], warmup)
        d2h = median_gbps(size, times[name, D2H], warmup)
        print(f"{name:>14} {h2d:10.2f} {d2h:10.2f} {h2d / base:13.3f}x")


def registration(cuda: Cuda, buf, size: int, rounds: int) -> None:
    plain, plain_address = pageable(size)
    ours, theirs = [], []
    try:
        for _ in range(rounds):
            for address, into in ((buf.address, ours), (plain_address, theirs)):
                t0 = time.perf_counter()
                cuda.host_register(address, size, 0)
                into.append(time.perf_counter() - t0)
                cuda.host_unregister(address)
    finally:
        plain.close()
    print(f"\ncudaHostRegister of {size // M} MiB, medians of {rounds}: cmad chunk "
          f"{statistics.median(ours) * 1e3:.1f} ms, 4 KiB-page memory "
          f"{statistics.median(theirs) * 1e3:.1f} ms")


def ready_buffer(cuda: Cuda, client, device_name: str, size: int, rounds: int) -> None:
    """Request to a zeroed, registered buffer: cmad against cudaHostAlloc + memset."""
    ours, theirs = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        buf = client.alloc(device_name, size)  # the daemon zeroes a new chunk
        cuda.host_register(buf.address, size, 0)
        ours.append(time.perf_counter() - t0)
        cuda.host_unregister(buf.address)
        buf.free()
        t0 = time.perf_counter()
        pinned = cuda.host_alloc(size)
        ctypes.memset(pinned, 0, size)
        theirs.append(time.perf_counter() - t0)
        cuda.free_host(pinned)
    print(f"\nrequest to a zeroed, registered {size // M} MiB buffer, medians of {rounds}: "
          f"cmad {statistics.median(ours) * 1e3:.0f} ms, cudaHostAlloc + memset "
          f"{statistics.median(theirs) * 1e3:.0f} ms")


def as_user(user: str) -> int:
    """Run this bench again as ``user`` (root only): a plain member of the group."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise Skip("--user needs setpriv (util-linux)")
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--user")
    del argv[i:i + 2]
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, ".."))
    return subprocess.call([setpriv, f"--reuid={user}", f"--regid={user}", "--init-groups",
                            sys.executable, os.path.abspath(__file__), *argv], env=env)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mountpoint", default=None, help="cmad's mountpoint (default /run/cma)")
    p.add_argument("--device", default="gpu", help="the device name the map sends to a "
                   "shared region (default gpu)")
    p.add_argument("--size", default="256M", help="chunk size for copies and registration")
    p.add_argument("--big", default="1G", help="size for request-to-registered-buffer")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--user", help="as root: run the bench as this member of the group")
    args = p.parse_args()
    from cmad.memparse import memparse
    size, big = memparse(args.size), memparse(args.big)
    try:
        cuda = Cuda()
        if args.user:
            if os.geteuid() != 0:
                raise Skip("--user is for root")
            return as_user(args.user)
        if os.geteuid() == 0:
            raise Skip("run as a plain member of the shared region's group (or as root "
                       "with --user NAME): this bench shows what such a user can do")
        from cmad.clients.client import Client
        client = Client(args.mountpoint)
    except Skip as e:
        print(f"bench/gpu.py skipped: {e}")
        return 0
    print(f"{cuda.device}; uid {os.geteuid()}, groups {os.getgroups()}")
    try:
        buf = client.alloc(args.device, size, label=f"gpu-bench-{os.getpid()}")
    except OSError as e:
        print(f"bench/gpu.py: alloc {args.device} {args.size}: {e}; the region the map gives "
              f"{args.device} must hold {args.size} and {args.big} (e.g. "
              "gpu=2G:bf(group=G), docs/gpu-staging.md)")
        return 1
    device = cuda.malloc(size)
    try:
        print(f"chunk {buf!r} mapped at {buf.address:#x}, {buf.length} bytes, from "
              f"{open(os.path.join(buf.path, 'mmap')).read().split()[0]}")
        cuda.host_register(buf.address, buf.length, 0)
        try:
            check_bytes(cuda, buf, size, device)
            bandwidth(cuda, buf, size, device, args.rounds, warmup=2)
        finally:
            cuda.host_unregister(buf.address)
        registration(cuda, buf, size, rounds=5)
    finally:
        cuda.free(device)
        buf.free()
    ready_buffer(cuda, client, args.device, big, rounds=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
