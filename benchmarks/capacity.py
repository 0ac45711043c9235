"""Requests/s per replica per core for each deployment, PostgreSQL CPU per request, and the
capacity model (replicas, cores, PostgreSQL connections) for a target load.

What it measures (one run, one machine)
    A private PostgreSQL 18 + pgvector (``EmbeddedPostgres`` in ``--data-dir``, database
    re-created each run), the shared Redis (``--redis-url``, a unique key prefix), one user with
    an API key and ``--memories`` facts. Ray (one node, 8 logical CPUs) and Serve run the
    application with one replica per deployment, shaped as the KubeRay cluster runs it:
    ``local_embedding_max_texts: 0``, so every text is embedded by the Embedding deployment
    and each deployment's CPU is its own work (the product's Serve environment: HAProxy,
    throughput-optimized mode).

    For each operation, ``--clients`` closed-loop HTTP clients for ``--seconds`` (after
    ``--warmup`` seconds), ``--rounds`` times in turn: ``search`` (a unique query each, so
    nothing is cached), ``store`` (a fact with unique text) and ``context``
    (``POST /v1/users/me/context`` with a unique query). The CPU seconds of every process of
    the run come from /proc (``serve_http.CpuMeter``): each replica, HAProxy, Ray's own
    processes, PostgreSQL.

    Requests/s per core of a deployment = requests answered / CPU seconds its replica spent:
    what one replica would serve with a whole core to itself. Ingress from every operation,
    Search from ``search``, Ingestion from ``store``, Context from ``context``, Embedding
    (texts/s per core, on CPU) from all three. PostgreSQL: ms of CPU per request, per operation.

    The capacity model: for ``--target-searches``, ``--target-stores`` and
    ``--target-contexts`` requests/s, the cores of each part (rate x CPU per request), the
    replicas at ``--utilisation`` of a core each (at least the RayService's ``min_replicas``),
    CPU pods (3 replicas each), and PostgreSQL connections = replicas x ``DB_POOL_SIZE`` (5)
    against PostgreSQL's default ``max_connections`` (100). Embedding is counted on CPU
    (GPU replicas: not measured here).

    Also the on-disk size of this run's ``memory_chunks`` (``pg_total_relation_size``) per row.

Results: printed as Markdown and written to ``benchmarks/results/capacity.json`` and ``.md``
with the machine, versions, date and the exact command.

Run from the repository root (about 3 minutes; wrap it in the project's Ray lock)::

    flock /tmp/halldyll-ray.lock .venv/bin/python benchmarks/capacity.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEPLOYMENTS = ("Ingress", "Search", "Ingestion", "Context", "Embedding")
# Which deployment each operation measures (besides Ingress and Embedding, which all touch).
MAIN = {"search": "Search", "store": "Ingestion", "context": "Context"}
POOL_SIZE = 5  # DB_POOL_SIZE's default
MAX_CONNECTIONS = 100  # PostgreSQL's default
PER_POD = 3  # replicas per CPU pod (kuberay/rayservice.yaml: num-cpus 3, 1 CPU per replica)


def per_core(requests: int, cpu_s: float) -> float | None:
    return round(requests / cpu_s, 1) if cpu_s > 0.01 else None


async def measure(args: argparse.Namespace, url: str, key: str, texts: Any) -> list[dict[str, Any]]:
    from serve_http import CpuMeter, LeanClient, _closed_loop, _cpu_delta

    meter = CpuMeter(args.data_dir / "pgdata")
    clients = [LeanClient(url, {"Authorization": f"Bearer {key}"}) for _ in range(args.clients)]

    async def check(r: Any, status: int) -> None:
        if r.status_code != status:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")

    async def search(w: int) -> None:
        body = {"query": texts.query(), "limit": 5}
        await check(await clients[w].post("/v1/users/me/search", json=body), 200)

    async def store(w: int) -> None:
        body = {"type": "fact", "statement": texts.fact()}
        await check(await clients[w].post("/v1/users/me/memories", json=body), 201)

    async def context(w: int) -> None:
        body = {"query": texts.query()}
        await check(await clients[w].post("/v1/users/me/context", json=body), 200)

    ops = {"search": search, "store": store, "context": context}
    rows = []
    for round_ in range(args.rounds):
        for name, op in ops.items():
            await _closed_loop(op, args.clients, args.warmup, None)
            before = meter.snapshot()
            latencies, errors, elapsed, first_error = await _closed_loop(
                op, args.clients, args.seconds, None
            )
            cpu = _cpu_delta(before, meter.snapshot())
            n = len(latencies)
            row = {
                "op": name,
                "round": round_,
                "requests": n,
                "errors": errors,
                "first_error": first_error,
                "per_s": round(n / elapsed, 1),
                "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
                "cpu_s": {k: round(v, 3) for k, v in sorted(cpu.items())},
                "cpu_ms_per_req": {
                    k: round(v * 1000 / n, 2)
                    for k, v in sorted(cpu.items())
                    if n and k != "machine"
                },
            }
            rows.append(row)
            print(
                f"  {name:8s} round {round_}: {row['per_s']:6.1f}/s p50 {row['p50_ms']} ms, "
                f"errors {errors}; CPU ms/req {row['cpu_ms_per_req']}",
                flush=True,
            )
    for client in clients:
        await client.aclose()
    return rows


def analyse(
    rows: list[dict[str, Any]], args: argparse.Namespace, mins: dict[str, int]
) -> dict[str, Any]:
    """Per-core rates (medians over rounds), PostgreSQL CPU per request, the capacity model."""

    def med(op: str, group: str) -> float:
        values = [r["cpu_ms_per_req"].get(group, 0.0) for r in rows if r["op"] == op]
        return float(statistics.median(values)) if values else 0.0

    ops = sorted({r["op"] for r in rows})
    ms = {
        op: {
            g: med(op, g)
            for g in (
                *DEPLOYMENTS,
                "proxy",
                "postgres",
                "redis",
                "raylet_gcs",
                "controller",
                "ray_other",
                "driver",
            )
        }
        for op in ops
    }
    rates: dict[str, Any] = {}
    for deployment in DEPLOYMENTS:
        by_op = {op: round(1000 / ms[op][deployment], 1) for op in ops if ms[op][deployment] > 0.05}
        rates[deployment] = by_op
    postgres = {op: ms[op]["postgres"] for op in ops}

    target = {
        "search": args.target_searches,
        "store": args.target_stores,
        "context": args.target_contexts,
    }
    cores: dict[str, float] = {}
    for group in (
        *DEPLOYMENTS,
        "proxy",
        "raylet_gcs",
        "controller",
        "ray_other",
        "postgres",
        "redis",
    ):
        cores[group] = round(sum(target[op] * ms[op][group] for op in ops) / 1000, 2)
    replicas = {
        d: max(mins.get(d, 1), math.ceil(cores[d] / args.utilisation - 1e-9)) for d in DEPLOYMENTS
    }
    cpu_replicas = sum(n for d, n in replicas.items() if d != "Embedding")
    ray_cores = round(
        sum(cores[g] for g in (*DEPLOYMENTS, "proxy", "raylet_gcs", "controller", "ray_other")), 2
    )
    connections = sum(replicas[d] * POOL_SIZE for d in DEPLOYMENTS if d != "Embedding")
    return {
        "cpu_ms_per_req": ms,
        "req_per_s_per_core": rates,
        "postgres_ms_per_req": postgres,
        "target": target,
        "cores": cores,
        "ray_cores": ray_cores,
        "replicas": replicas,
        "cpu_pods": math.ceil(cpu_replicas / PER_POD),
        "pg_connections": connections,
        "pg_max_connections": MAX_CONNECTIONS,
    }


async def table_size(db_url: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM memory_chunks")
        total = await conn.fetchval("SELECT pg_total_relation_size('memory_chunks')")
        memories = await conn.fetchval("SELECT pg_total_relation_size('memories')")
        n_memories = await conn.fetchval("SELECT count(*) FROM memories")
    finally:
        await conn.close()
    return {
        "memory_chunks_rows": rows,
        "memory_chunks_total_bytes": total,
        "bytes_per_chunk_row": round(total / rows) if rows else None,
        "memories_rows": n_memories,
        "memories_total_bytes": memories,
    }


def markdown(doc: dict[str, Any]) -> str:
    m, a = doc["machine"], doc["analysis"]
    lines = [
        "# Capacity: requests/s per replica per core, PostgreSQL CPU, the model",
        "",
        f"- date: {doc['date']}",
        f"- machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['ram_gib']} GiB; Ray {m['ray']}, "
        f"onnxruntime {m['onnxruntime']}; 10^6-iteration Python loop {m['python_loop_1e6_ms']} ms",
        f"- command: `{doc['command']}`",
        f"- {doc['args']['clients']} clients, {doc['args']['seconds']} s per operation, "
        f"{doc['args']['rounds']} rounds (medians); one replica per deployment, every text "
        "embedded by Embedding (local_embedding_max_texts 0, as on KubeRay)",
        "",
        "## Requests/s per replica per core (requests / CPU seconds of the replica)",
        "",
        "| deployment | search | store | context |",
        "| --- | ---: | ---: | ---: |",
    ]
    for d, by_op in a["req_per_s_per_core"].items():
        # A deployment an operation does not call shows only its idle replica's CPU: "—".
        cells = [
            str(by_op.get(op, "—")) if d in ("Ingress", "Embedding") or MAIN[op] == d else "—"
            for op in ("search", "store", "context")
        ]
        lines.append(f"| {d} | {' | '.join(cells)} |")
    pg = a["postgres_ms_per_req"]
    lines += [
        "| PostgreSQL | "
        + " | ".join(f"{1000 / pg[op]:.1f}" if pg.get(op) else "—" for op in MAIN)
        + " |",
    ]
    lines += [
        "",
        "Embedding: texts/s per core on CPU (one text per search and context query, one per "
        "short fact).",
        "",
        "## CPU per request (ms), by process",
        "",
        "| operation | req/s | " + " | ".join(a["cpu_ms_per_req"]["search"]) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in a["cpu_ms_per_req"]["search"]) + " |",
    ]
    for op, groups in a["cpu_ms_per_req"].items():
        per_s = statistics.median(r["per_s"] for r in doc["rows"] if r["op"] == op)
        lines.append(
            f"| {op} | {per_s:.1f} | " + " | ".join(f"{v:.2f}" for v in groups.values()) + " |"
        )
    t = a["target"]
    lines += [
        "",
        f"## The model: {t['search']} searches/s + {t['store']} stores/s + "
        f"{t['context']} contexts/s, replicas at {doc['args']['utilisation']} of a core",
        "",
        "| part | cores | replicas |",
        "| --- | ---: | ---: |",
    ]
    for g, c in a["cores"].items():
        lines.append(f"| {g} | {c} | {a['replicas'].get(g, '')} |")
    lines += [
        "",
        f"- Ray's processes in all: **{a['ray_cores']} cores** (Embedding on CPU included); "
        f"PostgreSQL **{a['cores']['postgres']} cores**.",
        f"- CPU pods (3 replicas each): {a['cpu_pods']}.",
        f"- PostgreSQL connections: replicas x DB_POOL_SIZE {POOL_SIZE} = "
        f"**{a['pg_connections']}** of max_connections {MAX_CONNECTIONS}.",
        "",
        "## memory_chunks on disk (this run's table)",
        "",
        f"{doc['table']}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memories", type=int, default=300)
    parser.add_argument("--target-searches", type=float, default=100)
    parser.add_argument("--target-stores", type=float, default=50)
    parser.add_argument("--target-contexts", type=float, default=0)
    parser.add_argument("--utilisation", type=float, default=0.7)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/hr-bench-capacity"))
    parser.add_argument("--database", default="bench_capacity")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=RESULTS / "capacity.json")
    parser.add_argument(
        "--render", action="store_true", help="rewrite the .md (and analysis) from --out's JSON"
    )
    args = parser.parse_args()
    if args.render:
        doc = json.loads(args.out.read_text())
        saved = argparse.Namespace(**{**vars(args), **doc["args"]})
        doc["analysis"] = analyse(doc["rows"], saved, doc["min_replicas"])
        args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        args.out.with_suffix(".md").write_text(markdown(doc))
        print(markdown(doc))
        return
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from halldyll_ray import serve_env

    serve_env.apply()
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray's own variable name)
    import yaml
    from serve_http import Texts, _bootstrap, _fresh_database, _start_serve, machine

    from halldyll_ray import Settings
    from halldyll_ray.serve import local_cluster
    from halldyll_ray.storage.embedded import EmbeddedPostgres

    v2 = yaml.safe_load(local_cluster.load_rayservice()["spec"]["serveConfigV2"])
    mins = {
        d["name"]: d["autoscaling_config"]["min_replicas"]
        for d in v2["applications"][0]["deployments"]
    }
    doc: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", "benchmarks/capacity.py", *sys.argv[1:]]),
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "min_replicas": mins,
    }
    server = EmbeddedPostgres(args.data_dir, database=args.database)
    texts = Texts(args.seed)
    import ray
    from ray import serve

    try:
        print("Starting PostgreSQL, bootstrapping data", flush=True)
        db_url = asyncio.run(_fresh_database(server, args.database, 384))
        env = {
            "DATABASE_URL": db_url,
            "REDIS_URL": args.redis_url,
            "REDIS_KEY_PREFIX": f"bench-cap-{uuid.uuid4().hex[:8]}",
        }
        settings = Settings.from_env(**{k.lower(): v for k, v in env.items()})
        boot = asyncio.run(_bootstrap(settings, texts, args.memories))
        doc["bootstrap"] = {k: v for k, v in boot.items() if k != "key"}
        print("Starting Ray Serve", flush=True)
        t = time.perf_counter()
        url, _ = _start_serve(env, app_args={"local_embedding_max_texts": 0})
        doc["serve_start_s"] = round(time.perf_counter() - t, 1)
        doc["rows"] = asyncio.run(measure(args, url, boot["key"], texts))
        doc["table"] = asyncio.run(table_size(db_url))
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        server.stop()
    doc["analysis"] = analyse(doc["rows"], args, mins)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    text = markdown(doc)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
