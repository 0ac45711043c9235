"""Export and import: the import's embedding rate against the raw encoder's, and the export's
memory as the number of memories grows.

What it measures
    A private PostgreSQL 18 + pgvector (``EmbeddedPostgres`` in a temporary folder), the
    in-process engine with the packaged model and no Redis.

    1. **Raw**: ``OnnxEncoder.encode`` over the texts the import embeds (each message as the
       service indexes it, "<speaker> <date>: <text>"), in one call: the encoder's own batches
       of 32, sorted by length. Texts/s.
    2. **Store**: the LoCoMo development split (``../shared/bench/locomo/``), one Conversation
       per session (``store_memory``), into user A. Texts/s.
    3. **Export** A, then **import** the file into user B (``import_memories``, batches of 128
       lines, one embedding call per batch): texts/s, and the ratio to the raw rate. Then the
       same file again: the idempotent re-import (nothing embedded, nothing written).
    4. **Export memory**: user C gets ``--rows`` synthetic facts (inserted in SQL, no
       embedding); the export is read to the end while ``tracemalloc`` records the peak of
       Python allocations. Flat means the peak does not grow with the rows.

    Medians are not needed: each step is one long run. Printed as Markdown and written to
    ``benchmarks/results/transfer.{json,md}``.

Run from the repository root (about 3 minutes on 2 cores)::

    .venv/bin/python benchmarks/transfer.py [--rows 10000 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from locomo import DATA, RESULTS, _memories, write_results  # the sibling script's data


async def _export_peak(engine: Any, user_id: Any) -> tuple[int, int, float]:
    """(bytes exported, peak traced Python allocation in bytes, seconds) of one export."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    size = 0
    async for line in engine.export_memories(user_id):
        size += len(line)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return size, peak, elapsed


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import json

    from halldyll_ray import MemoryEngine, Settings
    from halldyll_ray.components.base import message_label
    from halldyll_ray.storage.embedded import EmbeddedPostgres
    from halldyll_ray.storage.migrate import apply_migrations

    samples = json.loads(DATA.read_text())
    memories = [memory for sample in samples for memory, _ in _memories(sample, "session")]
    texts = [
        f"{message_label(m.name, m.created_at)}: {m.content}"
        for memory in memories
        for m in memory.messages
    ]
    result: dict[str, Any] = {"memories": len(memories), "texts": len(texts)}
    with tempfile.TemporaryDirectory(prefix="hr-transfer-") as tmp:
        server = EmbeddedPostgres(Path(tmp), database="transfer")
        try:
            url = await server.start_async()
            await apply_migrations(url, embedding_dimension=384)
            settings = Settings.from_env(database_url=url, redis_url=None)
            async with MemoryEngine(settings) as engine:
                encoder = engine.encoder
                encoder.encode(texts[:64])  # warm up
                started = time.perf_counter()
                await asyncio.to_thread(encoder.encode, texts)
                result["raw_texts_per_s"] = len(texts) / (time.perf_counter() - started)

                a = await engine.create_user("exporter", None, "user")
                started = time.perf_counter()
                for memory in memories:
                    await engine.store_memory(a.id, memory)
                result["store_texts_per_s"] = len(texts) / (time.perf_counter() - started)

                started = time.perf_counter()
                file = b"".join([line async for line in engine.export_memories(a.id)])
                result["export_s"] = time.perf_counter() - started
                result["file_bytes"] = len(file)

                b = await engine.create_user("importer", None, "user")
                started = time.perf_counter()
                report = await engine.import_memories(b.id, [file])
                elapsed = time.perf_counter() - started
                assert report.error_count == 0 and sum(report.created.values()) == len(memories)
                result["import_texts_per_s"] = len(texts) / elapsed
                result["import_vs_raw"] = result["import_texts_per_s"] / result["raw_texts_per_s"]
                started = time.perf_counter()
                again = await engine.import_memories(b.id, [file])
                assert again.unchanged == len(memories)
                result["reimport_s"] = time.perf_counter() - started

                c = await engine.create_user("large", None, "user")
                peaks = []
                inserted = 0
                for rows in sorted(args.rows):
                    async with engine.db.scoped(c.id) as conn:
                        await conn.execute(
                            "INSERT INTO memories (id, user_id, type, content, fact_key,"
                            " confidence, fact_kind, tags, metadata)"
                            " SELECT gen_random_uuid(), $1, 'fact',"
                            " 'Synthetic fact number ' || n || ' about the large user',"
                            " 'k' || n, 0.7, 'permanent', ARRAY['bench'], '{\"n\": 1}'"
                            " FROM generate_series($2::int, $3::int - 1) AS n",
                            c.id,
                            inserted,
                            rows,
                        )
                    inserted = rows
                    size, peak, seconds = await _export_peak(engine, c.id)
                    peaks.append(
                        {
                            "rows": rows,
                            "mb_exported": size / 1e6,
                            "peak_mb": peak / 1e6,
                            "rows_per_s": rows / seconds,
                        }
                    )
                    print(peaks[-1], flush=True)
                result["export_memory"] = peaks
        finally:
            server.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--out", type=Path, default=RESULTS / "transfer.json")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"{DATA} is missing (the shared development split)", file=sys.stderr)
        return 2
    result = asyncio.run(run(args))
    table = [
        f"LoCoMo development split, one Conversation per session: {result['memories']} "
        f"memories, {result['texts']} messages embedded.",
        "",
        "| step | texts/s | vs raw encoder |",
        "| --- | ---: | ---: |",
        f"| raw `OnnxEncoder.encode` (batches of 32) | {result['raw_texts_per_s']:.0f} | 1.00× |",
        f"| `store_memory`, one per session | {result['store_texts_per_s']:.0f} | "
        f"{result['store_texts_per_s'] / result['raw_texts_per_s']:.2f}× |",
        f"| `import_memories` of the export | {result['import_texts_per_s']:.0f} | "
        f"{result['import_vs_raw']:.2f}× |",
        "",
        f"Export of those memories: {result['export_s']:.2f} s, {result['file_bytes'] / 1e6:.1f} "
        f"MB. Re-import of the same file: {result['reimport_s']:.2f} s (nothing embedded or "
        "written).",
        "",
        "| facts exported | MB exported | peak Python allocation (MB) | rows/s |",
        "| ---: | ---: | ---: | ---: |",
        *(
            f"| {p['rows']:,} | {p['mb_exported']:.1f} | {p['peak_mb']:.2f} | "
            f"{p['rows_per_s']:,.0f} |"
            for p in result["export_memory"]
        ),
    ]
    write_results(args.out, "transfer.py", result, "Export and import", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
