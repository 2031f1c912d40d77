"""``cmactl trace``: follow the kernel's ``cma`` trace events with human sizes,
like ``perf trace -e 'cma:*'``, until Ctrl-C.

It reads ``kernel/sys/kernel/tracing/trace_pipe`` under the mount, opened
O_NONBLOCK and polled, so Ctrl-C ends it at once (a FUSE read the daemon
holds is waited out by the kernel; see fusefs/pipe.py).  Events that are
off are switched on for the run and off again at the end (root only, as
tracefs).
"""

from __future__ import annotations

import errno
import os
import re
import time
from typing import Iterator

PAGE = 4096
POLL = 0.1
TRACING = ("kernel", "sys", "kernel", "tracing")
LINE = re.compile(r"\s*(?P<task>.*)-(?P<pid>\d+)\s+\[\d+\]\s+\S+\s+(?P<ts>\d+\.\d+): "
                  r"(?P<event>\w+): (?P<fields>.*)")
LOST = re.compile(r"CPU:\d+ \[LOST (?P<n>\d+) EVENTS\]")


def fields(text: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in text.split() if "=" in word)


def describe(line: str, size) -> tuple[str, dict] | None:
    """(human text, fields) of one trace_pipe line; None if it is not a cma event."""
    lost = LOST.fullmatch(line)
    if lost:
        return f"lost {lost['n']} events (this reader fell behind)", {"lost": lost["n"]}
    m = LINE.fullmatch(line)
    if m is None:
        return None
    f = fields(m["fields"])
    who = f"{m['ts']:>14} {m['task']}-{m['pid']}"
    name, event = f.get("name", "?"), m["event"]
    count = int(f.get("count", f.get("request_count", 0))) * PAGE
    align = PAGE << int(f.get("align", 0))
    at = f"{int(f['pfn'], 16) * PAGE:#x}" if "pfn" in f else ""
    if event == "cma_alloc_start":
        text = (f"asks    {name} {size(count)} align {size(align)}, "
                f"{size(int(f['available_count']) * PAGE)} free")
    elif event == "cma_alloc_finish" and f.get("errorno", "0") == "0":
        text = f"got     {name} {size(count)} at {at}"
    elif event == "cma_alloc_finish":
        err = -int(f["errorno"])
        text = f"FAILED  {name} {size(count)}: {errno.errorcode.get(err, err)}"
    elif event == "cma_release":
        text = f"freed   {name} {size(count)} at {at}"
    elif event == "cma_alloc_busy_retry":
        text = f"moved   {name} {size(count)} from {at}"
    else:
        text = f"{event} {m['fields']}"
    return f"{who} {text}", dict(f, event=event)


def wanted(f: dict, region: str | None, errors: bool) -> bool:
    if "lost" in f:
        return True
    if region is not None and f.get("name") != region:
        return False
    return not errors or (f["event"] == "cma_alloc_finish" and f.get("errorno", "0") != "0")


def lines(fd: int, stop: float | None) -> Iterator[str]:
    """Lines from trace_pipe as they come; polled, so Ctrl-C is never held up."""
    rest = b""
    while stop is None or time.monotonic() < stop:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(POLL)
            continue
        if not data:
            return
        *done, rest = (rest + data).split(b"\n")
        for line in done:
            yield line.decode(errors="replace")


class Switched:
    """The events turned on for the run, turned off again at its end."""

    def __init__(self, tracing: str):
        self.tracing = tracing
        self.turned_on: list[str] = []

    def __enter__(self) -> "Switched":
        events = os.path.join(self.tracing, "events", "cma")
        for event in sorted(os.listdir(events)):
            path = os.path.join(events, event, "enable")
            if os.path.isfile(path) and open(path).read().strip() == "0":
                with open(path, "w") as f:
                    f.write("1")
                self.turned_on.append(path)
        return self

    def __exit__(self, *exc) -> None:
        for path in self.turned_on:
            try:
                with open(path, "w") as f:
                    f.write("0")
            except OSError:
                pass


def cmd_trace(client, args, out) -> int:
    tracing = client.path(*TRACING)
    stop = time.monotonic() + args.duration if args.duration else None
    fd = os.open(os.path.join(tracing, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        with Switched(tracing):
            for line in lines(fd, stop):
                got = describe(line, out.size)
                if got is not None and wanted(got[1], args.region, args.errors):
                    print(got[0], flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        os.close(fd)
    return 0
