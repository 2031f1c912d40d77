"""Load: 8 clients allocate, write, read and free while the daemon is killed
(-9) and restarted under them.  Afterwards every chunk a client holds an
acknowledgement for is there with its bytes, and ``cmad check`` passes."""

import multiprocessing
import os
import random
import signal
import time

from util.daemon import ready
from util.files import read
from util.daemon import cmad_check

CLIENTS = 8
SECONDS = 6.0


def request(mnt, text: str) -> str:
    fd = os.open(f"{mnt}/alloc", os.O_RDWR)
    try:
        os.write(fd, text.encode())
        return os.read(fd, 4096).decode()
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the answer was read: the chunk is acknowledged


def client(mnt: str, n: int, seconds: float, results) -> None:
    rng = random.Random(n)
    acked: dict[str, tuple[str, bytes]] = {}
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        try:
            if acked and rng.random() < 0.35:
                label = rng.choice(sorted(acked))
                start, payload = acked.pop(label)  # unknown outcome if the free fails
                with open(f"{mnt}/chunks/{start}/data", "rb") as f:
                    assert f.read(len(payload)) == payload, f"{label} lost its bytes"
                fd = os.open(f"{mnt}/free", os.O_WRONLY)
                try:
                    os.write(fd, label.encode())
                finally:
                    os.close(fd)
            else:
                label = f"c{n}n{i}"
                start = request(mnt, f"@video,common {rng.randint(1, 16) * 4}K "
                                     f"label={label}").split()[0]
                payload = rng.randbytes(4096)
                fd = os.open(f"{mnt}/chunks/{start}/data", os.O_WRONLY)
                try:
                    assert os.pwrite(fd, payload, 0) == len(payload)
                finally:
                    os.close(fd)
                acked[label] = (start, payload)
        except OSError:
            time.sleep(0.02)  # the daemon is down or restarting
    results.put((n, acked))


def test_clients_survive_kill9_restarts(daemon, tmp_path):
    state = tmp_path / "state"
    args = ("--state-dir", str(state), "--regions", "video=64M:bf;common=64M:buddy")
    mnt = daemon(*args)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=client, args=(str(mnt), n, SECONDS, results))
             for n in range(CLIENTS)]
    for p in procs:
        p.start()
    restarts = 0
    deadline = time.monotonic() + SECONDS - 1
    while time.monotonic() < deadline:
        time.sleep(1.2)
        daemon.crash_and_restart(mnt, *args)
        restarts += 1
    acked = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert restarts >= 3
    assert ready(mnt)
    total = 0
    for n, chunks in acked.items():
        for label, (start, payload) in chunks.items():
            assert read(mnt / "chunks" / label / "start") == f"{start}\n", label
            with open(mnt / "chunks" / start / "data", "rb") as f:
                assert f.read(len(payload)) == payload, label
            total += 1
    assert total > 0
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    result = cmad_check(state)
    assert result.returncode == 0, result.stderr
