"""Bulk ingest against the raw embedding rate (issue #17 §2), side by side in one run.

What it measures
    The turns of the first ``--conversations`` conversations of the LoCoMo development split
    (``../shared/bench/locomo/locomo-dev.json``, loaded as ``benchmarks/locomo.py`` does: one
    message per turn, named by its speaker, dated by its session) stored in several ways,
    each to fresh users, with every embedding cache off (``CACHE_SIZE=0``, no Redis), so every
    text is embedded:

    * ``raw encoder, batch 32`` / ``batch 64``: ``OnnxEncoder.encode`` alone on the texts the
      engine embeds for the per-turn layout (``"<speaker> <date>: <turn>"``), all at once
      (it length-buckets them into calls of at most 32 or 64 texts). The reference rate.
    * ``store_memory per turn``: one Conversation of one message per turn, one call each.
    * ``store_memory per session``: one Conversation per session (its title and its
      messages), one call each: the single path for a conversation with many messages.
    * ``store_memories, turns in batches of 100``: the per-turn memories, 100 a call.
    * ``store_memories, sessions of a conversation``: every session of a conversation (one
      memory each) in one call.

    Each in-process (``MemoryEngine``) and over HTTP (``--via``): the served application
    started here as ``benchmarks/serve_http.py`` does (Ray Serve, ``build_app`` at its
    defaults, on the same database), through the Python client: Ingress, Ingestion, and the
    Embedding deployment for every request of more than one text.

    * ``× raw on the same calls``: a second reference per mode, the raw encoder (batch 32)
      timed in the same run on the texts of each of the mode's calls, one ``encode`` a call:
      what the product adds beyond embedding, with the cost of the calls' sizes taken out
      (100 short texts bucket by length less well than 788 at once).

    Rates are texts embedded per second (a session's title is a text too) over the whole
    store. The modes run one after the other, ``--runs`` times over; a rate is the median of
    its runs, a ratio the median of each run's rate over the raw batch-32 rate of the same run
    (the encoder's configured batch size, ``EMBEDDING_BATCH_SIZE``), so that load from outside
    moves both sides of a ratio alike. Printed as a Markdown table and written to
    ``benchmarks/results/ingest_bulk.json`` and ``.md`` with the machine and the command.

Run from the repository root (about 6 minutes on 2 cores with the defaults; serialise with
other Ray runs: ``flock /tmp/halldyll-ray.lock ...``)::

    .venv/bin/python benchmarks/ingest_bulk.py [--conversations 2] [--runs 3] \
        [--via inprocess http] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from locomo import DATA, _memories, write_results

RESULTS = Path(__file__).resolve().parent / "results"

#: name -> (layout of benchmarks/locomo.py, bulk: store_memories with this many a call)
MODES: dict[str, tuple[str, int | None]] = {
    "store_memory per turn": ("turn", None),
    "store_memory per session": ("session", None),
    "store_memories, turns in batches of {batch}": ("turn", 0),  # 0: --batch
    "store_memories, sessions of a conversation": ("session", 10_000),
}


def _chunks(engine: Any, memories: list[Any]) -> int:
    return sum(len(engine.components.ingestion.chunker.of(m)) for m in memories)


def _calls(
    engine: Any, samples: list[dict[str, Any]], layout: str, bulk: int | None
) -> list[list[str]]:
    """The texts each call of a mode embeds, in its calls: what the raw encoder is timed on
    for the mode's "same calls" reference (a call of 100 short texts buckets by length less
    well than 788 at once, and one text a call pays the model's per-call cost every time).
    Each conversation starts its own calls (its own user), as :func:`_ingest` stores them."""
    chunker = engine.components.ingestion.chunker
    calls: list[list[str]] = []
    for sample in samples:
        memories = [memory for memory, _ in _memories(sample, layout)]
        size = 1 if bulk is None else bulk
        for start in range(0, len(memories), size):
            calls.append(
                [
                    unicodedata.normalize("NFKC", chunk.indexed)
                    for memory in memories[start : start + size]
                    for chunk in chunker.of(memory)
                ]
            )
    return calls


async def _store_all(
    memories: list[Any], one: Callable[[Any], Awaitable[Any]], many: Any, bulk: int | None
) -> None:
    if bulk is None:
        for memory in memories:
            await one(memory)
        return
    for start in range(0, len(memories), bulk):
        stored = await many(memories[start : start + bulk])
        assert len(stored) == len(memories[start : start + bulk])


async def _ingest(
    engine: Any, samples: list[dict[str, Any]], layout: str, bulk: int | None, url: str | None
) -> float:
    """Seconds to store ``samples`` in ``layout`` (fresh users; the users' creation and
    their API keys are made before the clock starts)."""
    from halldyll_ray.client import AsyncHalldyllClient

    prepared = []
    for sample in samples:
        user = await engine.create_user(f"bulk{uuid.uuid4().hex[:8]}", None, "user")
        memories = [memory for memory, _ in _memories(sample, layout)]
        if url is None:
            prepared.append((user.id, None, memories))
        else:
            key = (await engine.create_api_key(user.id, name="bench")).key
            prepared.append((user.id, AsyncHalldyllClient(url, key, timeout=300), memories))
    started = time.perf_counter()
    for user_id, client, memories in prepared:
        if client is None:

            async def one(memory: Any, user_id: Any = user_id) -> Any:
                return await engine.store_memory(user_id, memory)

            async def many(batch: list[Any], user_id: Any = user_id) -> Any:
                return await engine.store_memories(user_id, batch)

            await _store_all(memories, one, many, bulk)
        else:
            await _store_all(memories, client.store_memory, client.store_memories, bulk)
    elapsed = time.perf_counter() - started
    for _, client, _ in prepared:
        if client is not None:
            await client.aclose()
    return elapsed


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from halldyll_ray import MemoryEngine, Settings
    from halldyll_ray.embedding import OnnxEncoder
    from halldyll_ray.storage.embedded import EmbeddedPostgres
    from halldyll_ray.storage.migrate import apply_migrations

    samples = json.loads(DATA.read_text())[: args.conversations]
    raw = {size: OnnxEncoder.load(batch_size=size) for size in (32, 64)}
    timings: dict[str, list[float]] = {}
    #: mode -> seconds of the raw encoder (batch 32) on that mode's calls, per run
    same_calls: dict[str, list[float]] = {}
    texts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="hr-ingest-") as tmp:
        server = EmbeddedPostgres(Path(tmp), database="ingest")
        try:
            url = await server.start_async()
            await apply_migrations(url, embedding_dimension=384)
            base_url = None
            if "http" in args.via:
                from serve_http import _start_serve

                from halldyll_ray import serve_env

                serve_env.apply()
                base_url, _ = _start_serve(
                    {"DATABASE_URL": url, "CACHE_SIZE": "0", "SEARCH_CACHE_TTL_SECONDS": "0"}
                )
            settings = Settings.from_env(
                database_url=url, redis_url=None, cache_size=0, search_cache_ttl_seconds=0
            )
            async with MemoryEngine(settings, encoder=raw[32]) as engine:
                # The texts the engine embeds for the per-turn layout, for the raw rate.
                turns = [m for sample in samples for m, _ in _memories(sample, "turn")]
                chunker = engine.components.ingestion.chunker
                indexed = [c.indexed for m in turns for c in chunker.of(m)]
                for encoder in raw.values():
                    encoder.encode(indexed[:64])  # warm-up
                modes = {
                    template.format(batch=args.batch): (layout, args.batch if bulk == 0 else bulk)
                    for template, (layout, bulk) in MODES.items()
                }
                calls = {
                    mode: _calls(engine, samples, layout, bulk)
                    for mode, (layout, bulk) in modes.items()
                }
                for run_no in range(args.runs):
                    for size, encoder in raw.items():
                        name = f"raw encoder, batch {size}"
                        t0 = time.perf_counter()
                        encoder.encode(indexed)
                        timings.setdefault(name, []).append(time.perf_counter() - t0)
                        texts[name] = len(indexed)
                    for mode, mode_calls in calls.items():
                        t0 = time.perf_counter()
                        for call in mode_calls:
                            raw[32].encode(call)
                        same_calls.setdefault(mode, []).append(time.perf_counter() - t0)
                    for via in args.via:
                        for mode, (layout, bulk) in modes.items():
                            name = f"{via}: {mode}"
                            memories = [m for s in samples for m, _ in _memories(s, layout)]
                            texts[name] = _chunks(engine, memories)
                            seconds = await _ingest(
                                engine,
                                samples,
                                layout,
                                bulk,
                                None if via == "inprocess" else base_url,
                            )
                            timings.setdefault(name, []).append(seconds)
                            print(
                                f"run {run_no + 1}: {name}: {texts[name] / seconds:.1f} texts/s",
                                flush=True,
                            )
        finally:
            if base_url is not None:
                import ray
                from ray import serve

                serve.shutdown()
                ray.shutdown()
            server.stop()
    # Each run's rate against the raw rate of the same run (the modes ran back to back), so
    # that load from outside the benchmark moves both sides of a ratio alike.
    raw_times = timings["raw encoder, batch 32"]
    raw_rates = [texts["raw encoder, batch 32"] / t for t in raw_times]
    out = {}
    for name, times in timings.items():
        rates = [texts[name] / t for t in times]
        out[name] = {
            "texts": texts[name],
            "median_s": round(statistics.median(times), 2),
            "texts_per_s": round(statistics.median(rates), 1),
            "ratio_to_raw_batch_32": round(
                statistics.median(r / raw for r, raw in zip(rates, raw_rates, strict=True)), 2
            ),
            "runs_texts_per_s": [round(r, 1) for r in rates],
        }
        mode = name.split(": ", 1)[-1]
        if mode in same_calls:
            # The raw encoder's seconds on this mode's own calls over the mode's seconds:
            # what the product adds beyond embedding, the calls' sizes aside.
            out[name]["ratio_to_raw_same_calls"] = round(
                statistics.median(
                    raw_s / t for raw_s, t in zip(same_calls[mode], times, strict=True)
                ),
                2,
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=2, help="first N of the split")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs (median)")
    parser.add_argument(
        "--via", nargs="+", choices=["inprocess", "http"], default=["inprocess", "http"]
    )
    parser.add_argument("--batch", type=int, default=100, help="per-turn memories a call")
    parser.add_argument("--out", type=Path, default=RESULTS / "ingest_bulk.json")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"{DATA} is missing (the shared development split)", file=sys.stderr)
        return 2
    results = asyncio.run(run(args))
    rows = [
        f"| {name} | {r['texts']} | {r['texts_per_s']} | {r['ratio_to_raw_batch_32']} | "
        f"{r.get('ratio_to_raw_same_calls', '')} | "
        f"{' / '.join(str(x) for x in r['runs_texts_per_s'])} |"
        for name, r in results.items()
    ]
    write_results(
        args.out,
        "ingest_bulk.py",
        {"results": results},
        "Bulk ingest against the raw embedding rate, LoCoMo development split",
        [
            "| path | texts | texts/s (median) | × raw batch 32 (paired runs, median) "
            "| × raw on the same calls | each run (texts/s) |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
            *rows,
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
