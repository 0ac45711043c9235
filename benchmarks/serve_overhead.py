"""What Ray Serve itself costs per request, in each Serve environment, on a trivial app.

Why: ``halldyll_ray.serve_env`` turns on Ray's throughput-optimized mode and HAProxy for the
product. This script isolates that choice from the product's own code: a FastAPI ingress
with a no-op route (``/noop``) and a route that makes one handle call to a second, no-op
deployment (``/hop``), measured from one HTTP client, p50 over ``--requests`` sequential
requests after a warm-up.

Environments (each in a fresh process, since Serve reads them when it is imported):

* ``default``: Serve's Python proxy, user code on a separate event loop thread, actor calls;
* ``throughput``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (direct ingress, gRPC between
  deployments, one event loop), behind Serve's proxy;
* ``haproxy``: the product's: ``throughput`` plus ``RAY_SERVE_ENABLE_HA_PROXY=1``.

Run from the repository root (about 2 minutes)::

    python benchmarks/serve_overhead.py [--requests 300]

Prints a Markdown table and writes ``benchmarks/results/serve_overhead.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {
    "default": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "0"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


def measure(requests: int) -> dict[str, float]:
    """In this process: start Ray and the trivial app, time the routes, stop."""

    import httpx
    import ray
    from fastapi import FastAPI
    from fastapi.responses import Response
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32)
    class Inner:
        async def __call__(self, value: bytes) -> bytes:
            return value

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32)
    @serve.ingress(api)
    class Outer:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        @api.get("/noop")
        async def noop(self) -> Response:
            return Response(b"{}", media_type="application/json")

        @api.get("/hop")
        async def hop(self) -> Response:
            body = await self.inner.remote(b"{}")  # type: ignore[attr-defined]
            return Response(body, media_type="application/json")

    from halldyll_ray.serve_local import free_port

    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Outer.bind(Inner.bind()), route_prefix="/")
        out: dict[str, float] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for path in ("/noop", "/hop"):
                for _ in range(max(20, requests // 10)):
                    client.get(path).raise_for_status()
                times = []
                for _ in range(requests):
                    started = time.perf_counter()
                    client.get(path).raise_for_status()
                    times.append((time.perf_counter() - started) * 1000)
                out[path] = round(statistics.median(times), 2)
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_overhead.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.requests)))
        return
    rows = []
    for mode, env in MODES.items():
        print(f"{mode} ...", flush=True)
        child = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--requests", str(args.requests)],
            env={**os.environ, **env, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"},
            capture_output=True,
            text=True,
            check=True,
        )
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append({"mode": mode, "env": env, **figures})
    doc = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "requests": args.requests,
        "rows": rows,
    }
    lines = [
        "# Ray Serve overhead on a trivial app (`benchmarks/serve_overhead.py`)",
        "",
        f"Date {doc['date']}; {os.cpu_count()} CPUs, {platform.platform()}; "
        f"Command: `{doc['command']}`. p50 of {args.requests} sequential requests, one client.",
        "",
        "| environment | GET /noop (ingress only) | GET /hop (one handle call) | the hop |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['/noop']} ms | {row['/hop']} ms | "
            f"{row['/hop'] - row['/noop']:.2f} ms |"
        )
    md = "\n".join(lines) + "\n"
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
