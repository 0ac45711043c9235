"""scripts/serve.sh's command, started for real: loopback only, and nothing left after a stop.

Each case starts ``python -m halldyll_ray.serve_local serve_config.yaml`` (what serve.sh runs
after installing) on free ports with a fresh DATA_DIR (the embedded PostgreSQL), waits for
``/readyz`` and the ready line, checks the listeners, sends one signal, and checks that the
launcher returned with every process it started gone (serve run, Ray's GCS, raylet and
workers, HAProxy, the embedded PostgreSQL) and every port free. About 30-40 s per case on two
cores: one start per case.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support import free_port

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::1"}
START_TIMEOUT_S = 240
#: The launcher's own bound: 40 s for serve run, 10 s more, then cleanup.
STOP_TIMEOUT_S = 90
#: How long after /readyz every listener may take to appear (HAProxy reloads its configuration).
LISTEN_TIMEOUT_S = 120


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _name(pid: int) -> str | None:
    """The process's name, or None if it ended meanwhile (Ray starts short-lived children)."""
    try:
        return str(psutil.Process(pid).name())
    except psutil.NoSuchProcess:
        return None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def _postmaster(data_dir: Path) -> int | None:
    pid_file = data_dir / "pgdata" / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[dict[str, object]]:
    """Start the launcher; after the test, kill whatever it left (the test fails first)."""
    ports = {
        "HALLDYLL_HTTP_PORT": free_port(),
        "RAY_SERVE_HAPROXY_STATS_PORT": free_port(),
        "RAY_SERVE_HAPROXY_METRICS_PORT": free_port(),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": free_port(),
    }
    data_dir = tmp_path / "data"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "DATABASE_URL", "REDIS_URL", "DATA_DIR"))
    }
    env.update({name: str(port) for name, port in ports.items()})
    env.update({"DATA_DIR": str(data_dir), "RAY_DEDUP_LOGS": "0"})
    log = tmp_path / "console.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "halldyll_ray.serve_local", "serve_config.yaml"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started: list[int] = []
    info: dict[str, object] = {
        "proc": proc,
        "ports": ports,
        "data_dir": data_dir,
        "log": log,
        "url": f"http://127.0.0.1:{ports['HALLDYLL_HTTP_PORT']}",
        "started": started,
    }
    try:
        yield info
    finally:
        for pid in [proc.pid, *started]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        # Reap the launcher here, so a failed case leaves no running Popen for the next case's
        # garbage collection to warn about (pytest turns that warning into a failure).
        if proc.poll() is None:
            proc.wait(timeout=30)
        postmaster = _postmaster(data_dir)
        if postmaster and _alive(postmaster):
            os.kill(postmaster, signal.SIGKILL)


def _wait_ready(info: dict[str, object]) -> None:
    proc = info["proc"]
    assert isinstance(proc, subprocess.Popen)
    log = info["log"]
    assert isinstance(log, Path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _ready(str(info["url"])):
        assert proc.poll() is None, log.read_text(errors="replace")[-5000:]
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(1)
    # The launcher's ready line: the URL and the key file, never the key.
    data_dir = info["data_dir"]
    assert isinstance(data_dir, Path)
    key = (data_dir / "admin_api_key").read_text().strip()
    deadline = time.monotonic() + 10
    while "is ready at" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "no ready line"
        time.sleep(0.5)
    text = log.read_text(errors="replace")
    (line,) = [line for line in text.splitlines() if "is ready at" in line]
    assert f"{info['url']} " in line and str(data_dir / "admin_api_key") in line
    assert key not in text
    # No replica forked (gRPC logs each fork of a process that runs its threads): the
    # EmbeddedDatabase replica starts PostgreSQL through a new process (storage/embedded.py).
    assert "skipping fork() handlers" not in text


def _console_tail(info: dict[str, object], lines: int = 60) -> str:
    """The launcher's last console lines (serve run, Ray's actors), for a failure message."""
    log = info["log"]
    assert isinstance(log, Path)
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _listeners(pids: set[int]) -> list[tuple[str, int, int]]:
    return [
        (c.laddr.ip, c.laddr.port, c.pid)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


@pytest.mark.parametrize(
    ("signame", "target"), [("TERM", "group"), ("INT", "launcher"), ("HUP", "group")]
)
def test_serve_sh_stops_whole_on_each_signal(
    launch: dict[str, object], signame: str, target: str
) -> None:
    proc = launch["proc"]
    assert isinstance(proc, subprocess.Popen)
    data_dir = launch["data_dir"]
    assert isinstance(data_dir, Path)
    ports = launch["ports"]
    assert isinstance(ports, dict)
    _wait_ready(launch)

    postmaster = _postmaster(data_dir)
    assert postmaster is not None and _alive(postmaster)
    started = launch["started"]
    assert isinstance(started, list)

    # Every listener of the application is on loopback: HAProxy (HTTP, stats, metrics), the
    # fallback proxy, the ingress replica's own HTTP server (30000-31000), PostgreSQL (none).
    # HAProxy can still be loading its full configuration (a reload starts a new process) when
    # /readyz first answers: look again until every port of ours has its listener. A graceful
    # reload starts a new HAProxy (-sf) and the old one exits, so the processes are named in the
    # same look as they are listed, and the look is repeated until it sees HAProxy too.
    ours = {int(port) for port in ports.values()}
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while True:
        names = {p.pid: _name(p.pid) for p in psutil.Process(proc.pid).children(recursive=True)}
        tree = set(names)
        started.extend(sorted(tree - set(started)))
        listeners = _listeners(tree | {postmaster})
        serve_ports = [
            (ip, port) for ip, port, _ in listeners if port in ours or 30000 <= port <= 31000
        ]
        haproxy = {pid for pid, name in names.items() if name == "haproxy"}
        complete = {port for _, port in serve_ports} >= ours and haproxy
        if complete or time.monotonic() > deadline:
            break
        time.sleep(1)
    # What Ray's HAProxy manager said (a failed reload, a restarted actor) is in the console.
    assert haproxy, f"HAProxy is not running: {_console_tail(launch)}"
    assert {port for _, port in serve_ports} >= ours, (listeners, _console_tail(launch))
    assert all(ip in LOOPBACK for ip, _ in serve_ports), serve_ports
    assert not [x for x in listeners if x[2] in haproxy and x[0] not in LOOPBACK], listeners
    assert not [x for x in listeners if x[2] == postmaster], listeners

    sent = time.monotonic()
    if target == "group":
        os.killpg(proc.pid, getattr(signal, f"SIG{signame}"))
    else:
        proc.send_signal(getattr(signal, f"SIG{signame}"))
    assert proc.wait(timeout=STOP_TIMEOUT_S) == 0
    took = time.monotonic() - sent
    log = launch["log"]
    assert isinstance(log, Path)
    console = log.read_text(errors="replace")
    assert "skipping fork() handlers" not in console and "SIGSEGV" not in console
    # The launcher's last word: stopped, and where the data stay (Ray's shutdown lines before
    # it can read like a failure). Among the last lines: a Ray process that ends after the
    # launcher may still write to the same console.
    stopped = f"halldyll-ray stopped; the data stay in {data_dir}, where the next start finds them."
    assert stopped in console.splitlines()[-5:], _console_tail(launch)

    left = [pid for pid in {*started, postmaster} if _alive(pid)]
    assert not left, [(pid, psutil.Process(pid).cmdline()[:3]) for pid in left]
    # Our own ports are free; an ingress replica's port (30000-31000, shared with any other Serve
    # app on this machine) has no listener on loopback any more.
    assert [port for port in ours if not _port_free(port)] == []
    replica_ports = {port for _, port in serve_ports} - ours
    assert not [
        c.laddr
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
        and c.laddr.port in replica_ports
        and c.laddr.ip in LOOPBACK
    ]
    print(f"SIG{signame} to the {target}: stopped in {took:.1f} s")
