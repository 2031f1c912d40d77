"""The floor: a do-nothing pyfuse3 filesystem with cmad's root shape.

``alloc`` answers each write with a fixed result line readable on the same
handle; ``free`` accepts any write.  Plain pyfuse3, no fusefs, no core: what
a FUSE round trip costs in Python on this machine.  Run as
``python bench/nullfs.py MOUNTPOINT``.
"""

import errno
import signal
import stat
import sys

import pyfuse3
import trio

LINE = b"0000000040000000 4096 video\n"
FILES = {b"alloc": 2, b"free": 3}


class NullFS(pyfuse3.Operations):
    def __init__(self):
        super().__init__()
        self.pending = {}
        self.next_fh = 1

    def _attr(self, inode):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (
            stat.S_IFREG | 0o660)
        a.st_nlink = 1
        a.st_size = 0
        a.entry_timeout = a.attr_timeout = 300
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILES[name])

    async def open(self, inode, flags, ctx):
        fh = self.next_fh
        self.next_fh += 1
        self.pending[fh] = b""
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def write(self, fh, off, buf):
        self.pending[fh] += LINE
        return len(buf)

    async def read(self, fh, off, size):
        out, self.pending[fh] = self.pending[fh][:size], self.pending[fh][size:]
        return out

    async def release(self, fh):
        del self.pending[fh]


def main():
    mnt = sys.argv[1]
    pyfuse3.init(NullFS(), mnt, set(pyfuse3.default_options) | {"fsname=nullfs",
                                                                "allow_other"})

    async def run():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    break

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
