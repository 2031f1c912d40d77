"""A small fusefs tree to mount in tests and benchmarks.

    python tests/fusefs_demo.py MOUNTPOINT [--many N] [--big MIB] [--debug]

Tree:
    rw          rw attr (starts "hello")
    ro          ro attr
    wo          write-only attr; the last value written shows in wo_last
    wo_last     ro
    caller      ro: "<uid> <gid> <pid>" of the last writer of rw
    link        -> rw        (fixed target)
    dynlink     -> whatever rw holds (callable target)
    echo        stream: each write is answered with the upper-cased line
    echo_released  ro: how many echo handles were released
    bytes       4 MiB Bytes file over an anonymous mmap
    big         a --big MiB Bytes file (only with --big)
    lazy/       LazyDir with a, b; populations counts its populate calls
    populations ro
    ticks       ro: counted by a task serve() runs beside the FUSE loop
    many/       N attrs (--many, default 20000) named e00000...
    dyn/        entries added/removed through ctl
    ctl         w: "add NAME" / "rm NAME" in dyn/
    fail/
      oserror   w: store raises an OSError (EINVAL) with a .why
      eperm     w: store raises an OSError (EPERM)
      crash     w: store raises RuntimeError (-> EIO, daemon lives on)
      badshow   ro: show raises ZeroDivisionError
"""

import argparse
import errno
import logging
import mmap
import os
import sys

import trio

import fusefs
from fusefs import Attr, Bytes, Dir, LazyDir, Stream, Symlink


class DemoError(OSError):
    """Like the core's error: an errno and a why."""

    def __init__(self, code, why):
        super().__init__(code, why)
        self.why = why


class EchoHandle:
    def __init__(self, caller, released):
        self.caller = caller
        self.released = released
        self.pending = bytearray()

    def write(self, data):
        if not data.strip():
            raise DemoError(errno.EINVAL, "empty request")
        self.pending += data.upper()

    def read(self, size):
        out = bytes(self.pending[:size])
        del self.pending[:size]
        return out

    def release(self):
        self.released()


def build(many=20000, big_mib=0, state=None):
    state = {} if state is None else state
    state.update(rw="hello", wo="", caller="", populations=0, released=0, ticks=0)
    root = Dir()

    def store_rw(text, caller):
        state["rw"] = text
        state["caller"] = f"{caller.uid} {caller.gid} {caller.pid}"

    def store_wo(text, caller):
        state["wo"] = text

    root.add("rw", Attr(lambda: state["rw"], store_rw))
    root.add("ro", Attr(lambda: "read only"))
    root.add("wo", Attr(store=store_wo))
    root.add("wo_last", Attr(lambda: state["wo"]))
    root.add("caller", Attr(lambda: state["caller"]))
    root.add("link", Symlink("rw"))
    root.add("dynlink", Symlink(lambda: state["rw"]))
    def echo_released():
        state["released"] += 1

    root.add("echo", Stream(lambda caller: EchoHandle(caller, echo_released), mode=0o666))
    root.add("echo_released", Attr(lambda: str(state["released"])))

    small = mmap.mmap(-1, 4 << 20)
    root.add("bytes", Bytes(lambda: memoryview(small), mode=0o666))
    if big_mib:
        large = mmap.mmap(-1, big_mib << 20)
        root.add("big", Bytes(lambda: memoryview(large), mode=0o666))

    def populate(d):
        state["populations"] += 1
        d.add("a", Attr(lambda: "a"))
        d.add("b", Attr(lambda: "b"))
    root.add("lazy", LazyDir(populate))
    root.add("populations", Attr(lambda: str(state["populations"])))
    root.add("ticks", Attr(lambda: str(state["ticks"])))

    many_dir = root.add("many", Dir())
    for i in range(many):
        many_dir.add(f"e{i:05d}", Attr(lambda i=i: str(i)))

    dyn = root.add("dyn", Dir())

    def ctl(text, caller):
        verb, _, name = text.partition(" ")
        if verb == "add":
            try:
                dyn.add(name, Attr(lambda: name))
            except ValueError as e:
                raise DemoError(errno.EEXIST, str(e))
        elif verb == "rm":
            if name not in dyn:
                raise DemoError(errno.ENOENT, f"no entry {name!r}")
            dyn.remove(name)
        else:
            raise DemoError(errno.EINVAL, f"unknown verb {verb!r}")
    root.add("ctl", Attr(store=ctl))

    fail = root.add("fail", Dir())

    def oserror(text, caller):
        raise DemoError(errno.EINVAL, f"cannot parse {text!r}")

    def eperm(text, caller):
        raise DemoError(errno.EPERM, "not yours")

    def crash(text, caller):
        raise RuntimeError("a bug in a store")

    fail.add("oserror", Attr(store=oserror))
    fail.add("eperm", Attr(store=eperm))
    fail.add("crash", Attr(store=crash))
    fail.add("badshow", Attr(lambda: str(1 // 0)))
    return root


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mountpoint")
    p.add_argument("--many", type=int, default=20000)
    p.add_argument("--big", type=int, default=0, metavar="MIB")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        fusefs.check_mountpoint(args.mountpoint)
    except OSError as e:
        logging.error("cannot mount: %s", e.strerror)
        return 1
    state = {}
    fs = fusefs.Filesystem(build(args.many, args.big, state))

    async def tick():
        while True:
            state["ticks"] += 1
            await trio.sleep(0.02)

    fusefs.serve(fs, args.mountpoint, fsname="fusefs-demo", tasks=[tick],
                 on_ready=lambda: logging.getLogger("demo").info(
                     "ready on %s (pid %d)", args.mountpoint, os.getpid()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
