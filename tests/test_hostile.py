"""Hostile input: over a thousand generated writes to every writable file.

After each write the daemon is alive and, when the write was refused, the
state (chunk list, region free bytes, map, allocators) is exactly what it was;
an accepted write is undone so every example starts from the same state.
"""

import errno
import os

from hypothesis import HealthCheck, given, settings, strategies as st

from util.files import alloc, read, write_errno

WRITABLE = ("alloc", "free", "map", "regions/video/alloc", "regions/common/alloc",
            "regions/dma/alloc", "regions/video/compact")
REFUSALS = {errno.EINVAL, errno.ENOENT, errno.ENOMEM, errno.EEXIST, errno.EBUSY}
WORDS = ["camera", "camera/preview", "net", "@video", "@video,common", "@", "@dma,", "*",
         "..", "../x", "a/b", "label=", "label=x", "label=../x", "label=a/b", "label=é",
         "movable", "transient", "bound=", "bound=2M", "0x", "4K", "6M/1M", "4K/3000",
         "18446744073709547520", "0xfffffffffffff000/0x1000", "/", "=", ";", ",", "\0",
         "\n", " ", "bf", "buddy", "bitmap(order_per_bit=99)", "bitmap(", "video=common"]
numbers = st.one_of(st.integers(-(2 ** 70), 2 ** 70).map(str),
                    st.integers(0, 2 ** 66).map(hex),
                    st.integers(0, 2 ** 64).map(lambda n: f"{n}/{n % 7777}"))
words = st.lists(st.one_of(st.sampled_from(WORDS), numbers, st.text(max_size=8)), max_size=6)
payloads = st.one_of(
    words.map(lambda w: " ".join(w).encode("utf-8", "surrogatepass")),
    words.map(lambda w: "".join(w).encode("utf-8", "surrogatepass")),
    st.binary(max_size=80),
    st.sampled_from([b"x" * (1 << 20), b"\xff\xfe\xfd", "camera 4K label=日本".encode(),
                     b"camera 4K\0label=x", b"0000000040000000\0"]),
)


def state(mnt) -> tuple:
    chunks = tuple(sorted(os.listdir(mnt / "chunks")))
    regions = tuple(read(mnt / "regions" / r / f) for r in ("video", "common", "dma")
                    for f in ("free", "alloc", "users"))
    return chunks, regions, read(mnt / "map")


def undo(mnt, base) -> None:
    """Put back what an accepted write changed."""
    chunks, regions, map_text = base
    for name in set(os.listdir(mnt / "chunks")) - set(chunks):
        if len(name) == 16:
            assert write_errno(mnt / "free", name.encode()) == 0
    write_errno(mnt / "map", map_text.encode())
    for i, r in enumerate(("video", "common", "dma")):
        write_errno(mnt / "regions" / r / "alloc", regions[3 * i + 1].encode())


def test_fuzz_every_writable_file(daemon):
    mnt = daemon()
    alloc(mnt, "camera 1M label=keepZ9")
    base = state(mnt)
    seen = {"writes": 0, "refused": 0}

    @settings(max_examples=1200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(target=st.sampled_from(WRITABLE), data=payloads)
    def one(target, data):
        err = write_errno(mnt / target, data)
        seen["writes"] += 1
        if err:
            seen["refused"] += 1
            assert err in REFUSALS, (target, data[:80], errno.errorcode.get(err))
        else:
            undo(mnt, base)
        assert state(mnt) == base, (target, data[:80])

    one()
    assert seen["writes"] >= 1000 and seen["refused"] > 500
    assert daemon.proc.poll() is None
