"""Full-text search for one large user: the BM25 query against the previous ``ts_rank_cd`` one.

What it measures
    A private PostgreSQL 18 + pgvector (``EmbeddedPostgres``, a temporary folder, the product's
    migrations at dimension 384) holds one user whose chunks are the turn texts of the LoCoMo
    development split (``../shared/bench/locomo/``), repeated ``--copies`` times (3,435 texts
    once; the sizes grow by inserting more copies). The HNSW index is dropped: only the text
    index matters here, and loading is faster without it. For each size, the first
    ``--queries`` LoCoMo questions run through:

    * ``search_fulltext`` as ``halldyll_ray.storage.sql`` ships it (BM25 over the user's
      chunks, English stop words left out of the query; 100 candidates, as a top-10 search
      asks);
    * the query it replaced (``git show fba3b61:halldyll_ray/storage/sql/search.sql``: every
      lexeme of the query OR-ed, ``ts_rank_cd``; 40 candidates), read from ``--old-sql``
      when given;
    * ``--compare-sql``: another version of the shipped BM25 query (a file of named queries
      such as ``git show <rev>:halldyll_ray/storage/sql/search.sql``), run with the same
      arguments: a before/after of the query itself.

    ``--long`` adds as many long queries: windows of the split's turn texts joined and cut at
    4,000 characters, as ``prepare_context`` cuts a user's message before it searches with it
    (hundreds of distinct words where a question has a handful).

    Client-side latency over the unix socket, owner connection (row-level security is not in
    play: both queries filter on ``user_id`` themselves), warm cache, p50 and p95 over the
    queries. Printed as Markdown and written to ``benchmarks/results/fulltext_scale.{json,md}``.

Run from the repository root (about 4 minutes)::

    git show fba3b61:halldyll_ray/storage/sql/search.sql > /tmp/old_search.sql
    .venv/bin/python benchmarks/fulltext_scale.py [--copies 1 5 20] [--old-sql /tmp/old_search.sql]
        [--compare-sql /tmp/before_search.sql] [--long 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from locomo import DATA, RESULTS, write_results  # the sibling script (same data, same output)


def _texts_and_questions(limit: int) -> tuple[list[str], list[str]]:
    samples = json.loads(DATA.read_text())
    texts = [
        turn["text"]
        for sample in samples
        for key, turns in sample["conversation"].items()
        if key.startswith("session_") and isinstance(turns, list)
        for turn in turns
        if turn.get("text")
    ]
    questions = [qa["question"] for sample in samples for qa in sample["qa"]][:limit]
    return texts, questions


def _long_queries(texts: list[str], count: int, chars: int = 4000) -> list[str]:
    """``count`` queries of ``chars`` characters: consecutive turn texts joined, windows
    spread over the split (the cut ``prepare_context`` makes of a long message)."""
    queries: list[str] = []
    for n in range(count):
        start, parts = n * len(texts) // max(count, 1), []
        while sum(len(p) + 1 for p in parts) < chars and start < len(texts):
            parts.append(texts[start])
            start += 1
        queries.append(" ".join(parts)[:chars])
    return queries


async def _timed(conn: Any, sql: str, args: tuple[Any, ...], runs: list[float]) -> None:
    started = time.perf_counter()
    await conn.fetch(sql, *args)
    runs.append((time.perf_counter() - started) * 1000)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import asyncpg
    import numpy as np
    from pgvector.asyncpg import register_vector

    from halldyll_ray.components.search import Filters
    from halldyll_ray.storage.embedded import EmbeddedPostgres
    from halldyll_ray.storage.migrate import apply_migrations
    from halldyll_ray.storage.sql import parse_queries, query

    new = query("search_fulltext")
    old = compare = None
    if args.old_sql is not None:
        old = parse_queries(args.old_sql.read_text())["search_fulltext"]
    if args.compare_sql is not None:
        compare = parse_queries(args.compare_sql.read_text())["search_fulltext"]
    texts, questions = _texts_and_questions(args.queries)
    long_queries = _long_queries(texts, args.long)
    filters = Filters(None, None, True, None, None, None, None).params()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hr-fts-") as tmp:
        server = EmbeddedPostgres(Path(tmp), database="fts")
        try:
            url = await server.start_async()
            await apply_migrations(url, embedding_dimension=384)
            conn = await asyncpg.connect(url)
            await register_vector(conn)
            await conn.execute("DROP INDEX memory_chunks_embedding")
            user, memory = uuid.uuid4(), uuid.uuid4()
            await conn.execute(
                "INSERT INTO users (id, username, role) VALUES ($1, 'large', 'user')", user
            )
            await conn.execute(
                "INSERT INTO memories (id, user_id, type) VALUES ($1, $2, 'transcription')",
                memory,
                user,
            )
            vector = np.full(384, 0.05, dtype=np.float32)
            stored = 0
            for copies in args.copies:
                wanted = texts * copies
                await conn.executemany(
                    "INSERT INTO memory_chunks (memory_id, user_id, type, part, part_index,"
                    " content, embedding) VALUES ($1, $2, 'transcription', 'segment', $3, $4, $5)",
                    [(memory, user, i, wanted[i], vector) for i in range(stored, len(wanted))],
                )
                stored = len(wanted)
                await conn.execute("VACUUM ANALYZE memory_chunks")
                timings: dict[str, list[float]] = {
                    name: [] for name in ("bm25", "compare", "long", "long_compare", "ts_rank_cd")
                }
                for question in questions + long_queries:
                    values = dict(user_id=user, query=question, vector=None, **filters)
                    is_long = len(question) > 1000
                    timed = [(new, "long" if is_long else "bm25")]
                    if compare is not None:
                        timed.append((compare, "long_compare" if is_long else "compare"))
                    if is_long:  # the order alternates, so neither side always runs warm
                        timed.reverse()
                    for sql, name in timed:
                        await _timed(
                            conn,
                            sql.sql,
                            sql.args(fetch=100, embedding_model=None, **values),
                            timings[name],
                        )
                    if old is not None and not is_long:
                        await _timed(
                            conn, old.sql, old.args(fetch=40, **values), timings["ts_rank_cd"]
                        )
                row: dict[str, Any] = {"chunks": stored}
                for name, runs in timings.items():
                    if len(runs) >= 2:
                        row[f"{name}_p50_ms"] = round(statistics.median(runs), 1)
                        row[f"{name}_p95_ms"] = round(statistics.quantiles(runs, n=20)[-1], 1)
                print(row, flush=True)
                rows.append(row)
            await conn.close()
        finally:
            server.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", nargs="+", type=int, default=[1, 5, 20])
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--old-sql", type=Path, default=None)
    parser.add_argument("--compare-sql", type=Path, default=None)
    parser.add_argument("--long", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "fulltext_scale.json")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"{DATA} is missing (the shared development split)", file=sys.stderr)
        return 2
    rows = asyncio.run(run(args))

    def cell(row: dict[str, Any], name: str) -> str:
        if f"{name}_p50_ms" not in row:
            return "–"
        return f"{row[f'{name}_p50_ms']} / {row[f'{name}_p95_ms']}"

    lines = [
        f"| {row['chunks']:,} | {cell(row, 'bm25')} | {cell(row, 'compare')} "
        f"| {cell(row, 'long')} | {cell(row, 'long_compare')} | {cell(row, 'ts_rank_cd')} |"
        for row in rows
    ]
    write_results(
        args.out,
        "fulltext_scale.py",
        {"rows": rows},
        "Full-text search for one large user",
        [
            "| chunks of the user | BM25 p50 / p95 ms | --compare-sql p50 / p95 ms "
            "| BM25, 4,000-character queries | --compare-sql, 4,000-character queries "
            "| previous ts_rank_cd p50 / p95 ms |",
            "| ---: | --- | --- | --- | --- | --- |",
            *lines,
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
