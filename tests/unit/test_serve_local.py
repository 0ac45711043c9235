"""The local launcher's pure parts: loopback config, environment, HAProxy wrapper, ready line.

The whole launcher (start, ports, stop on each signal) is tests/ops/test_serve_sh.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from halldyll_ray import serve_local
from halldyll_ray.serve_env import SERVE_ENVIRONMENT
from halldyll_ray.serve_local import (
    LocalPorts,
    free_port,
    local_config,
    local_environment,
    ready_line,
    stopped_line,
    write_haproxy_wrapper,
)

ROOT = Path(__file__).resolve().parents[2]
PORTS = LocalPorts(
    http=18000, haproxy_stats=18404, haproxy_metrics=19101, fallback_http=18500, fallback_grpc=19500
)

# The lines Ray 2.60 renders (ray/serve/_private/haproxy_templates.py) that the wrapper edits,
# and one it must leave alone.
RAY_HAPROXY_CONFIG = """global
    stats socket /tmp/x/admin.sock mode 666 level admin expose-fd listeners
frontend prometheus
    bind :19101
frontend http_frontend
    bind 127.0.0.1:18000
backend b
    server r1 127.0.0.1:30000 check
listen stats
  bind *:18404
  stats enable
"""


def test_the_local_config_binds_loopback_and_keeps_the_rest() -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    local = local_config(config, port=18000)
    assert local["http_options"] == {**config["http_options"], "host": "127.0.0.1", "port": 18000}
    assert {k: v for k, v in local.items() if k != "http_options"} == {
        k: v for k, v in config.items() if k != "http_options"
    }
    assert config["http_options"]["host"] == "0.0.0.0"  # the container's and cluster's value


def test_ports_come_from_the_environment_or_are_free() -> None:
    ports = LocalPorts.choose({"HALLDYLL_HTTP_PORT": "18001"}, http_default=8000)
    assert ports.http == 18001
    others = {ports.haproxy_stats, ports.haproxy_metrics, ports.fallback_http}
    assert len(others) == 3 and not others & {8404, 9101, 8500}
    assert LocalPorts.choose({}, http_default=8000).http == 8000
    assert (
        LocalPorts.choose({"RAY_SERVE_HAPROXY_STATS_PORT": "1234"}, http_default=1).haproxy_stats
        == 1234
    )


def test_free_ports_are_outside_the_ephemeral_range_and_bindable() -> None:
    # A port from the kernel's ephemeral range can be taken as the source port of an outgoing
    # connection between the pick and the server's bind (CI saw HAProxy fail that way).
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert all(20000 <= p < min(30000, low) for p in ports), ports
    assert len(set(ports)) > 1  # random, so two test sessions rarely pick the same one
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))  # it was free: the pick keeps nothing bound


def test_a_port_in_use_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        held = sock.getsockname()[1]
        # the only candidate is taken: the kernel's pick instead
        monkeypatch.setattr(serve_local, "_PORT_RANGE", (held, held + 1))
        monkeypatch.setattr(serve_local, "_ephemeral_low", lambda: 65536)
        port = free_port()
        assert port != held
        with socket.socket() as other:
            other.bind(("127.0.0.1", port))


def test_the_environment_is_the_serve_environment_plus_loopback(tmp_path: Path) -> None:
    env = {"RAY_SERVE_HAPROXY_SOCKET_PATH": "/elsewhere/admin.sock"}
    wrapper = tmp_path / "haproxy"
    result = local_environment(env, run_dir=tmp_path, ports=PORTS, haproxy_wrapper=wrapper)
    for name, value in SERVE_ENVIRONMENT.items():
        assert env[name] == value
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # node IP 127.0.0.1
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == "18500"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(wrapper)
    assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == str(tmp_path / "haproxy.cfg")
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == "/elsewhere/admin.sock"  # an operator's
    assert result["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "1"
    without = local_environment({}, run_dir=tmp_path, ports=PORTS, haproxy_wrapper=None)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in without
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in without


def test_the_haproxy_wrapper_binds_stats_and_metrics_to_loopback(tmp_path: Path) -> None:
    fake = tmp_path / "fake-haproxy"
    fake.write_text('#!/bin/sh\necho "ran with: $*"\n')
    fake.chmod(0o700)
    wrapper = write_haproxy_wrapper(tmp_path, binary=str(fake), ports=PORTS)
    assert os.stat(wrapper).st_mode & 0o777 == 0o700
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_HAPROXY_CONFIG)
    done = subprocess.run(
        [str(wrapper), "-db", "-f", str(config), "-dR"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"ran with: -db -f {config} -dR"
    text = config.read_text()
    assert "    bind 127.0.0.1:19101\n" in text
    assert "  bind 127.0.0.1:18404\n" in text
    assert "admin.sock mode 600 level admin" in text
    assert "    bind 127.0.0.1:18000\n" in text and "server r1 127.0.0.1:30000" in text
    assert "*:" not in text and "mode 666" not in text


def test_the_ready_line_names_the_key_file_never_the_key(tmp_path: Path) -> None:
    key_file = tmp_path / "admin_api_key"
    key_file.write_text("hr_secret\n")
    line = ready_line("http://127.0.0.1:8000", key_file=key_file)
    assert "http://127.0.0.1:8000" in line and str(key_file) in line
    assert "http://127.0.0.1:8000/ui" in line  # the dashboard
    assert "hr_secret" not in line
    assert "create-key" in ready_line("http://127.0.0.1:8000", key_file=tmp_path / "missing")
    assert "DATABASE_URL is set" in ready_line("http://127.0.0.1:8000", key_file=None)


def test_the_ready_line_s_key_command_reaches_the_service_s_database(tmp_path: Path) -> None:
    """The hint for a lost key file said `halldyll create-key admin`: typed as written, in a
    shell without the launcher's DATA_DIR and with .venv/bin off the PATH, it finds no command,
    or makes a key in the default folder's database, which the service refuses (401). Now the
    command names DATA_DIR and this environment's `halldyll`."""
    data_dir = tmp_path / "my data"
    line = ready_line("http://127.0.0.1:8000", key_file=data_dir / "admin_api_key")
    installed = Path(sys.executable).with_name("halldyll")
    assert installed.exists()
    assert f"`DATA_DIR='{data_dir}' {installed} create-key admin`" in line
    hint = ready_line("http://127.0.0.1:8000", key_file=None)
    assert f"`{installed} create-user NAME --role admin`" in hint and "DATA_DIR" not in hint


def test_the_last_line_says_the_launcher_stopped_and_where_the_data_stay(tmp_path: Path) -> None:
    """After Ctrl-C the console ended on Ray's `Task ServeController.graceful_shutdown failed
    ... killed by ray.kill` (its normal shutdown), which reads like a failure."""
    line = stopped_line(0, data_dir=tmp_path)
    assert line.startswith("halldyll-ray stopped") and str(tmp_path) in line
    assert stopped_line(0, data_dir=None) == "halldyll-ray stopped."
    failed = stopped_line(1, data_dir=tmp_path)
    assert "stopped" not in failed and "status 1" in failed and str(tmp_path) in failed


@pytest.mark.parametrize("variable", ["HALLDYLL_HTTP_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"])
def test_a_port_another_service_answers_on_stops_the_launcher_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str
) -> None:
    """With the HTTP port taken by another service, the launcher started anyway, and its
    readiness check asked that service: "halldyll-ray is ready" for someone else's server.
    Now nothing starts: exit 2, naming the port and the variable that moves it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", free_port()))
        other.listen()
        taken = other.getsockname()[1]
        monkeypatch.setenv(variable, str(taken))
        if variable != "HALLDYLL_HTTP_PORT":
            monkeypatch.setenv("HALLDYLL_HTTP_PORT", str(free_port()))
        started: list[object] = []
        monkeypatch.setattr(serve_local, "Supervisor", lambda *a, **k: started.append(a))
        assert serve_local.main([str(ROOT / "serve_config.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{taken} already answers" in err and variable in err
    assert started == []


@pytest.mark.parametrize("value", ["http", "0", "70000", "-1"])
def test_a_port_that_is_no_port_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    monkeypatch.setenv("HALLDYLL_HTTP_PORT", value)
    assert serve_local.main([str(ROOT / "serve_config.yaml")]) == 2
    assert "HALLDYLL_HTTP_PORT" in capsys.readouterr().err
