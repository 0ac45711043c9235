"""What the embedding model guard of migration 0010 costs a search.

What it measures
    Every search names the model its query vector was made with, and PostgreSQL checks it
    against ``halldyll_meta`` (``halldyll_embedding_model_is``, a one-time filter). This runs
    the product's ``search_semantic`` and ``search_fulltext`` (with a query vector, as hybrid
    search does) as ``halldyll_ray.storage.sql`` ships them, and the same SQL with the call
    replaced by a constant, alternately, on one user's ``--chunks`` chunks (random unit
    vectors, word-salad texts) in an embedded PostgreSQL, and prints the p50 / p95 of each in
    milliseconds. The query vectors are random: this times SQL only, no model.

Run from the repository root (about a minute)::

    .venv/bin/python benchmarks/model_guard.py [--chunks 20000] [--queries 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from pgvector.asyncpg import register_vector

DIM = 384
GUARD = "halldyll_embedding_model_is("


def _unguarded(sql: str) -> str:
    """The SQL with the guard call replaced by a constant of the same parameter."""
    start = sql.index(GUARD)
    end = sql.index(")", start)
    param = sql[start + len(GUARD) : end]
    out = sql[:start] + f"({param}::text IS NULL OR true)" + sql[end + 1 :]
    if GUARD in out:
        raise RuntimeError("the guard appears twice; update the benchmark")
    return out


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


async def main(args: argparse.Namespace) -> None:
    from halldyll_ray.storage.embedded import EmbeddedPostgres
    from halldyll_ray.storage.migrate import apply_migrations
    from halldyll_ray.storage.sql import query

    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(3000)] + ["bees", "harbour", "violin", "glacier"]
    with tempfile.TemporaryDirectory(prefix="hr-guard-") as tmp:
        server = EmbeddedPostgres(Path(tmp), database="guard")
        try:
            url = await server.start_async()
            await apply_migrations(url, embedding_dimension=DIM)
            conn = await asyncpg.connect(url)
            await register_vector(conn)
            await conn.execute(
                "INSERT INTO halldyll_meta (key, value) VALUES ('embedding_model_id', 'm')"
            )
            user, memory = uuid.uuid4(), uuid.uuid4()
            await conn.execute(
                "INSERT INTO users (id, username, role) VALUES ($1, 'u', 'user')", user
            )
            await conn.execute(
                "INSERT INTO memories (id, user_id, type) VALUES ($1, $2, 'transcription')",
                memory,
                user,
            )
            vectors = rng.standard_normal((args.chunks, DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            await conn.copy_records_to_table(
                "memory_chunks",
                records=[
                    (
                        memory,
                        user,
                        "transcription",
                        "segment",
                        i,
                        " ".join(rng.choice(words, 12)),
                        v,
                    )
                    for i, v in enumerate(vectors)
                ],
                columns=[
                    "memory_id",
                    "user_id",
                    "type",
                    "part",
                    "part_index",
                    "content",
                    "embedding",
                ],
            )
            await conn.execute("VACUUM ANALYZE memory_chunks")
            filters: dict[str, Any] = dict.fromkeys(
                ("types", "model_id", "session_id", "tags", "since", "until")
            )
            rows = []
            for name in ("search_semantic", "search_fulltext"):
                found = query(name)
                variants = {"guarded": found.sql, "unguarded": _unguarded(found.sql)}
                times: dict[str, list[float]] = {k: [] for k in variants}
                for i in range(args.queries):
                    q = rng.standard_normal(DIM).astype(np.float32)
                    q /= np.linalg.norm(q)
                    values = dict(
                        user_id=user,
                        vector=q,
                        embedding_model="m",
                        fetch=100,
                        include_shared=True,
                        **filters,
                    )
                    if name == "search_fulltext":
                        values["query"] = " ".join(rng.choice(words[-50:], 3))
                    bound = found.args(**values)
                    order = list(variants) if i % 2 == 0 else list(reversed(variants))
                    for key in order:
                        t0 = time.perf_counter()
                        await conn.fetch(variants[key], *bound)
                        times[key].append((time.perf_counter() - t0) * 1000)
                for key, spent in times.items():
                    rows.append((name, key, _p(spent, 0.5), _p(spent, 0.95)))
            await conn.close()
        finally:
            server.stop()
    print(f"{args.chunks} chunks of one user, {args.queries} queries each, ms")
    print("| query | guard | p50 | p95 |\n| --- | --- | ---: | ---: |")
    for name, key, p50, p95 in rows:
        print(f"| {name} | {key} | {p50:.3f} | {p95:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=300)
    asyncio.run(main(parser.parse_args()))
