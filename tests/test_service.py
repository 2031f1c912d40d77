"""The service: units verify, sd_notify READY/WATCHDOG/STATUS, SIGHUP reload."""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from util.files import alloc, eventually, read

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNITS = ("cmad.service", "cmad-hugepages.service")


def test_units_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    cmad = shutil.which("cmad", path=os.path.dirname(sys.executable))
    for unit in UNITS:  # as `make install` places them, with this tree's cmad
        text = (ROOT / "systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/cmad", cmad))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                        *(str(tmp_path / u) for u in UNITS)],
                       capture_output=True, text=True, timeout=60)
    problems = [line for line in r.stderr.splitlines() if "cmad" in line]
    assert r.returncode == 0 and problems == [], r.stderr


def test_example_config_is_the_embedded_default():
    import tomllib

    from cmad.daemon.config import DEFAULT_MAP, DEFAULT_REGIONS

    example = tomllib.loads((ROOT / "systemd" / "cmad.toml").read_text())
    assert (example["regions"], example["map"]) == (DEFAULT_REGIONS, DEFAULT_MAP)


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield sock, path
    sock.close()


def messages(sock, until, timeout=20.0) -> list[dict]:
    """Datagrams as dicts, until ``until(list)`` is true (bounded)."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        try:
            data = sock.recv(4096).decode()
        except socket.timeout:
            continue
        got.append(dict(line.split("=", 1) for line in data.splitlines()))
    return got


def test_ready_after_mount_then_watchdog_pings(daemon, notify_socket, tmp_path):
    sock, path = notify_socket
    mnt = tmp_path / "mnt"
    seen_mounted = []

    def until(got):
        if got and "READY" in got[-1] and not seen_mounted:
            seen_mounted.append(os.path.ismount(mnt) and (mnt / "allocators").exists())
        return sum("WATCHDOG" in m for m in got) >= 2

    daemon(mountpoint=mnt, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    got = messages(sock, until)
    ready = [m for m in got if m.get("READY") == "1"]
    assert ready and seen_mounted == [True]
    assert "4 regions, 0 chunks" in ready[0]["STATUS"]
    assert sum(m.get("WATCHDOG") == "1" for m in got) >= 2


def test_sighup_takes_the_new_map_and_keeps_chunks(daemon, notify_socket, tmp_path):
    sock, path = notify_socket
    config = tmp_path / "cmad.toml"
    config.write_text('map = "camera=video;*=common"\n')
    mnt = daemon("--config", str(config), env={"NOTIFY_SOCKET": path})
    messages(sock, lambda got: any("READY" in m for m in got))
    alloc(mnt, "camera 2M label=keep")
    config.write_text('map = "*=dma"\n[limits]\n"1000" = "1M"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    got = messages(sock, lambda got: any("READY" in m for m in got))
    assert any(m.get("RELOADING") == "1" for m in got)
    assert read(mnt / "map") == "*=dma\n"
    assert read(mnt / "chunks/keep/region") == "video\n"
    assert alloc(mnt, "camera 4K").split()[2] == "dma"

    config.write_text('regions = "video=8M"\nmap = "*=video"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    assert eventually(lambda: read(mnt / "map") == "*=video\n")
    assert sorted(os.listdir(mnt / "regions")) == sorted(
        ["common", "dma", "gpu", "video", "0000000040000000", "0000000042000000",
         "0000000043000000", "0000000043800000"])
    assert (mnt / "chunks/keep").exists()
    with open(daemon.proc.stderr_path) as f:
        assert "region layout changed" in f.read()


def test_sighup_with_a_broken_config_keeps_everything(daemon, tmp_path):
    config = tmp_path / "cmad.toml"
    config.write_text('map = "camera=video;*=common"\n')
    mnt = daemon("--config", str(config))
    config.write_text('map = "f*x=video"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    stderr = pathlib.Path(daemon.proc.stderr_path)
    assert eventually(lambda: "keeping the running map" in stderr.read_text())
    assert read(mnt / "map") == "camera=video;*=common\n"
    for text in (b"this is not toml", b'map = "x=video" # caf\xe9\n',
                 b'regions = "video=1P:bitmap"\n'):
        before = stderr.read_text().count("keeping the running configuration") + \
            stderr.read_text().count("region layout changed")
        config.write_bytes(text)
        daemon.proc.send_signal(signal.SIGHUP)
        assert eventually(lambda: stderr.read_text().count("keeping the running configuration")
                          + stderr.read_text().count("region layout changed") > before)
        assert daemon.proc.poll() is None
        assert read(mnt / "regions/video/size") == f"{32 << 20}\n"
