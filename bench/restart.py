"""Restart window: a writer loops ``echo x > mnt/free`` and ``> mnt/alloc`` while
the daemon (with a journal of CHUNKS chunks) is killed -9 and restarted RESTARTS
times.  A live daemon refuses both writes ('x' is no chunk and no request), so
every write that succeeds is a false success: it landed in the bare directory.

Prints, per 100 restarts, the false successes and the writer's refusals by
errno (ENOTCONN: the stale mount; EPERM: the sealed bare directory; EINVAL,
ENOENT: the daemon's answer), and the files left in the bare directory.
Counts, not times: nothing to pin.  Never asserts.

    python bench/restart.py [RESTARTS] [CHUNKS]
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from util.daemon import RESTART_WRITER, Daemons  # noqa: E402
from util.mount import unseal  # noqa: E402
from test_daemon import alloc  # noqa: E402


def main(restarts: int = 100, chunks: int = 200) -> None:
    with tempfile.TemporaryDirectory(prefix="cmad-restart-") as tmp, \
            contextlib.ExitStack() as stack:
        tmp_path = pathlib.Path(tmp)
        stack.callback(unseal, str(tmp_path / "mnt1"))
        daemons = Daemons(tmp_path, stack)
        args = ("--state-dir", str(tmp_path / "state"))
        mnt = daemons(*args)
        for i in range(chunks):
            alloc(mnt, f"@dma 4K label=c{i}")
        stop = tmp_path / "stop"
        writer = subprocess.Popen([sys.executable, "-c", RESTART_WRITER, str(mnt), str(stop)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(restarts):
                daemons.crash_and_restart(mnt, *args)
        finally:
            stop.touch()
            counts = json.loads(writer.communicate(timeout=60)[0])
        daemons.proc.send_signal(signal.SIGTERM)
        daemons.proc.wait(timeout=30)
        left = sorted(os.listdir(mnt))
    per100 = {k: round(v * 100 / restarts) for k, v in sorted(counts.items())}
    print(f"{restarts} kill -9 restarts with {chunks} journalled chunks")
    print(f"false successes per 100 restarts: {per100.pop('ok', 0)}")
    print(f"refusals per 100 restarts: {per100}")
    print(f"files left in the bare mountpoint: {left or 'none'}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
