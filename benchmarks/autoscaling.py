"""Serve autoscaling under a load step, on a multi-node Ray cluster on one machine.

What it runs
    A private PostgreSQL 18 + pgvector (``EmbeddedPostgres`` in ``--data-dir``, database
    re-created each run) and the shared Redis (``--redis-url``, a unique key prefix), one user
    with an API key and ``--memories`` facts. Then a Ray cluster on this machine whose nodes are
    the pods of ``kuberay/rayservice.yaml`` (``halldyll_ray.serve.local_cluster``, CPUs times
    1/3 on pods and replicas alike): the head (no CPU), ``--cpu-pods`` CPU group pods, and the
    GPU group at ``--gpu-pods`` pods as one Ray node (that many logical GPUs and
    ``embedding_gpu``; Embedding runs on the CPU). The application is the RayService's own
    ``serveConfigV2`` (Search 2-8 replicas at 8 ongoing requests each, Embedding 1-4 at 16,
    Ingress 2-8 at 16, queries embedded by Embedding), with one change that keeps the run
    short: ``downscale_delay_s`` ``--downscale-delay-s`` on every deployment (Serve's default,
    which the RayService keeps, is 600 s). ``upscale_delay_s`` stays Serve's 30 s.

    The load step: ``--idle-s`` without load, then ``--clients`` closed-loop clients sending
    uncached searches (a unique query each, so every one is embedded by an Embedding replica)
    for ``--load-s``, then no load until every deployment is back at ``min_replicas`` (or
    ``--observe-s``). Every ``--poll-s`` the script reads Serve's own replica counts
    (``serve.status()``: replicas by state per deployment, Serve's autoscaling decisions as
    they take effect) and counts the searches answered.

Output
    Per deployment: min and max replicas, time from the start of the load to the first scale-up
    decision (a replica beyond the minimum appears, STARTING) and to it RUNNING, peak RUNNING
    replicas, when it was reached, and the time from the end of the load back to the minimum.
    The time series (every poll) goes to ``benchmarks/results/autoscaling.json``, the summary
    to ``.md``, with the machine and the command.

Run from the repository root (about 6 minutes; wrap it in the project's Ray lock)::

    flock /tmp/halldyll-ray.lock .venv/bin/python benchmarks/autoscaling.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
import time
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
APP = "halldyll"
WATCHED = ("Search", "Embedding", "Ingress", "Ingestion", "Context")


def _counts(status: Any) -> dict[str, dict[str, int]]:
    app = status.applications.get(APP)
    if app is None:
        return {}
    return {
        name: {str(state).split(".")[-1]: int(n) for state, n in d.replica_states.items()}
        for name, d in app.deployments.items()
    }


async def _load(
    url: str, key: str, clients: int, texts: Any, stop: asyncio.Event, done: list[float]
) -> dict[str, int]:
    from serve_http import LeanClient

    errors: dict[str, int] = {}

    async def one() -> None:
        client = LeanClient(url, {"Authorization": f"Bearer {key}"})
        try:
            while not stop.is_set():
                try:
                    r = await client.post(
                        "/v1/users/me/search", json={"query": texts.query(), "limit": 5}
                    )
                except (OSError, asyncio.IncompleteReadError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    await client.aclose()
                    await asyncio.sleep(0.2)
                    continue
                if r.status_code == 200:
                    done.append(time.monotonic())
                else:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    await asyncio.sleep(0.2)
        finally:
            await client.aclose()

    await asyncio.gather(*(one() for _ in range(clients)))
    return errors


async def _run(args: argparse.Namespace, url: str, key: str, texts: Any) -> dict[str, Any]:
    from ray import serve

    series: list[dict[str, Any]] = []
    done: list[float] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    phase = "idle"
    load_task: asyncio.Task[dict[str, int]] | None = None
    load_start = load_end = None
    minimums = args.minimums
    last_done = 0

    def back_at_min(counts: dict[str, dict[str, int]]) -> bool:
        return all(
            sum(counts.get(name, {}).values()) == counts.get(name, {}).get("RUNNING", -1)
            and counts[name]["RUNNING"] == n
            for name, n in minimums.items()
        )

    while True:
        now = time.monotonic() - t0
        if phase == "idle" and now >= args.idle_s:
            phase, load_start = "load", now
            load_task = asyncio.create_task(_load(url, key, args.clients, texts, stop, done))
        elif phase == "load" and load_start is not None and now >= load_start + args.load_s:
            phase, load_end = "after", now
            stop.set()
        counts = await asyncio.to_thread(lambda: _counts(serve.status()))
        answered = len(done) - last_done
        last_done = len(done)
        interval = now - series[-1]["t"] if series else 0.0
        series.append(
            {
                "t": round(now, 1),
                "phase": phase,
                "replicas": counts,
                "searches": answered,
                "searches_per_s": round(answered / interval, 1) if interval > 0 else 0.0,
            }
        )
        running = {n: counts.get(n, {}).get("RUNNING", 0) for n in WATCHED}
        per_s = series[-1]["searches_per_s"]
        print(f"  t={now:6.1f}s {phase:5s} searches/s {per_s:6.1f} running {running}", flush=True)
        if phase == "after" and load_end is not None:
            if back_at_min(counts) and now > load_end + 5:
                break
            if now > load_end + args.observe_s:
                break
        await asyncio.sleep(args.poll_s)
    errors = await load_task if load_task is not None else {}
    return {
        "series": series,
        "load_start_s": load_start,
        "load_end_s": load_end,
        "searches": len(done),
        "errors": errors,
    }


def summarise(run: dict[str, Any], bounds: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Per deployment: first scale-up, peak, back to min (seconds from the load's start/end)."""
    start, end = run["load_start_s"], run["load_end_s"]
    out: dict[str, Any] = {}
    for name, (low, high) in bounds.items():
        first_decision = first_running = peak_at = back = None
        peak = 0
        for point in run["series"]:
            counts = point["replicas"].get(name, {})
            total, running = sum(counts.values()), counts.get("RUNNING", 0)
            t = point["t"]
            if t < start:
                continue
            if first_decision is None and total > low:
                first_decision = round(t - start, 1)
            if first_running is None and running > low:
                first_running = round(t - start, 1)
            if running > peak:
                peak, peak_at = running, round(t - start, 1)
            if t >= end and back is None and running == low and total == low:
                back = round(t - end, 1)
            elif t >= end and (running != low or total != low):
                back = None
        if first_decision is None:
            back = None  # never scaled up: nothing to come back from
        out[name] = {
            "min_replicas": low,
            "max_replicas": high,
            "first_scale_up_s": first_decision,
            "first_new_replica_running_s": first_running,
            "peak_running": peak,
            "peak_at_s": peak_at,
            "back_to_min_after_load_s": back,
            "within_bounds": all(
                sum(p["replicas"].get(name, {}).values()) <= high for p in run["series"]
            ),
        }
    return out


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# Serve autoscaling under a load step (multi-node Ray cluster on one machine)",
        "",
        f"- date: {doc['date']}",
        f"- machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['ram_gib']} GiB; Ray {m['ray']}",
        f"- command: `{doc['command']}`",
        f"- cluster: {doc['cluster']}",
        f"- load: {doc['args']['clients']} clients, uncached searches for "
        f"{doc['args']['load_s']} s after {doc['args']['idle_s']} s idle; "
        f"downscale_delay_s {doc['args']['downscale_delay_s']}, upscale_delay_s Serve's 30",
        f"- searches answered: {doc['run']['searches']} "
        f"({doc['run']['searches'] / doc['args']['load_s']:.1f}/s over the step); "
        f"errors {doc['run']['errors'] or 'none'}",
        "",
        "| deployment | min–max | first scale-up | first new replica running | peak running "
        "| peak at | back to min after the load | within bounds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def s(v: Any) -> str:
        return "—" if v is None else f"{v} s"

    for name, r in doc["summary"].items():
        lines.append(
            f"| {name} | {r['min_replicas']}–{r['max_replicas']} | {s(r['first_scale_up_s'])} "
            f"| {s(r['first_new_replica_running_s'])} | {r['peak_running']} "
            f"| {s(r['peak_at_s'])} | {s(r['back_to_min_after_load_s'])} "
            f"| {'yes' if r['within_bounds'] else 'NO'} |"
        )
    lines += [
        "",
        "Times from the start of the load step (scale-up, peak) or from its end (back to min), "
        "read from `serve.status()` every poll; the time series is in the JSON.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--idle-s", type=float, default=5)
    parser.add_argument("--load-s", type=float, default=120)
    parser.add_argument("--observe-s", type=float, default=200)
    parser.add_argument("--poll-s", type=float, default=2)
    parser.add_argument("--downscale-delay-s", type=float, default=60)
    parser.add_argument("--cpu-pods", type=int, default=5)
    parser.add_argument("--gpu-pods", type=int, default=4)
    parser.add_argument("--memories", type=int, default=200)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/hr-bench-autoscaling"))
    parser.add_argument("--database", default="bench_autoscaling")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "autoscaling.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from halldyll_ray import serve_env

    serve_env.apply()
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    from serve_http import Texts, _bootstrap, _fresh_database, machine

    from halldyll_ray import Settings
    from halldyll_ray.serve import local_cluster
    from halldyll_ray.serve_local import free_port
    from halldyll_ray.storage.embedded import EmbeddedPostgres

    for name in (
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    ):
        os.environ.setdefault(name, str(free_port()))
    doc: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", "benchmarks/autoscaling.py", *sys.argv[1:]]),
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    server = EmbeddedPostgres(args.data_dir, database=args.database)
    texts = Texts(args.seed)
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = None
    try:
        print("Starting PostgreSQL, bootstrapping data", flush=True)
        db_url = asyncio.run(_fresh_database(server, args.database, 384))
        env = {
            "DATABASE_URL": db_url,
            "REDIS_URL": args.redis_url,
            "REDIS_KEY_PREFIX": f"bench-as-{uuid.uuid4().hex[:8]}",
            "DB_POOL_SIZE": "3",
        }
        settings = Settings.from_env(**{k.lower(): v for k, v in env.items()})
        boot = asyncio.run(_bootstrap(settings, texts, args.memories))
        doc["bootstrap"] = {k: v for k, v in boot.items() if k != "key"}

        rayservice = local_cluster.load_rayservice()
        scale = 1 / 3
        shapes = local_cluster.node_shapes(rayservice, cpu_scale=scale)
        gpu = shapes["gpu"]

        def node(shape: local_cluster.NodeShape, pods: int = 1) -> dict[str, Any]:
            return {
                "num_cpus": shape.num_cpus * pods,
                "num_gpus": shape.num_gpus * pods,
                "resources": {k: v * pods for k, v in shape.resources.items()},
                "object_store_memory": 100 * 1024 * 1024,
            }

        print("Starting the Ray cluster", flush=True)
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **node(shapes["head"]),
                "gcs_server_port": free_port(),
                "include_dashboard": False,
            },
        )
        cluster.add_node(**node(gpu, args.gpu_pods))
        for _ in range(args.cpu_pods):
            cluster.add_node(**node(shapes["cpu"]))
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        doc["cluster"] = (
            f"head (0 CPU) + {args.cpu_pods} CPU pods ({shapes['cpu'].num_cpus:g} logical CPU "
            f"each) + the GPU group's {args.gpu_pods} pods as one node "
            f"({gpu.num_gpus * args.gpu_pods:g} logical GPUs, embedding_gpu {args.gpu_pods}, "
            "0 CPU); replicas' num_cpus x 1/3"
        )
        port = free_port()
        delay = {"autoscaling_config": {"downscale_delay_s": args.downscale_delay_s}}
        config = local_cluster.cluster_serve_config(
            rayservice,
            settings=env,
            port=port,
            cpu_scale=scale,
            deployment_overrides={name: delay for name in WATCHED},
        )
        (app,) = config["applications"]
        bounds = {
            d["name"]: (
                d["autoscaling_config"]["min_replicas"],
                d["autoscaling_config"]["max_replicas"],
            )
            for d in app["deployments"]
        }
        args.minimums = {name: low for name, (low, _) in bounds.items()}
        print("Deploying serveConfigV2", flush=True)
        t = time.perf_counter()
        local_cluster.deploy(config)
        doc["deploy_s"] = round(time.perf_counter() - t, 1)
        print(f"  running after {doc['deploy_s']} s; load step", flush=True)
        run = asyncio.run(_run(args, f"http://127.0.0.1:{port}", boot["key"], texts))
        doc["run"] = run
        doc["summary"] = summarise(run, bounds)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        server.stop()
    doc["args"].pop("minimums", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    text = markdown(doc)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
