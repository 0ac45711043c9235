"""Search latency for a user who holds one long transcription, against the same user without it.

What it measures
    A user with ``--facts`` short facts is searched (4 queries, each in the three modes,
    ``--repeat`` times over, result caching off) three times: before a transcription of
    ``--segments`` segments is stored, while it is stored, and after it is deleted. A search
    hit of a memory carries that memory's whole record, so a long transcription's record
    (thousands of segments) is read into every result that is a part of it: the run shows
    what that costs per search. Printed as a Markdown table (median milliseconds per search,
    by mode) and written to ``benchmarks/results/search_long_memory.json`` and ``.md`` with
    the machine and the command.

Run from the repository root (about a minute on 2 cores at the defaults; the old code of a
commit can be measured beside it from a ``git worktree`` of that commit, run from its own
folder)::

    .venv/bin/python benchmarks/search_long_memory.py [--segments 2000] [--facts 20] \
        [--repeat 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from locomo import write_results

RESULTS = Path(__file__).resolve().parent / "results"
QUERIES = ("what does Ada like", "tea", "meeting about the budget", "weather today")
MODES = ("semantic", "fulltext", "hybrid")


async def _timed(engine: Any, user_id: Any, repeat: int) -> dict[str, float]:
    """Median milliseconds of a search, by mode."""
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeat):
        for query in QUERIES:
            for mode in MODES:
                started = time.perf_counter()
                await engine.search(user_id, query, mode=mode, limit=10)
                times[mode].append((time.perf_counter() - started) * 1000)
    return {mode: round(statistics.median(values), 2) for mode, values in times.items()}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from halldyll_ray import MemoryEngine, Settings
    from halldyll_ray.storage.embedded import EmbeddedPostgres
    from halldyll_ray.storage.migrate import apply_migrations

    with tempfile.TemporaryDirectory(prefix="hr-long-") as tmp:
        server = EmbeddedPostgres(Path(tmp), database="long")
        try:
            url = await server.start_async()
            await apply_migrations(url, embedding_dimension=384)
            settings = Settings.from_env(
                database_url=url, redis_url=None, search_cache_ttl_seconds=0
            )
            async with MemoryEngine(settings) as engine:
                user = await engine.create_user("long", None, "user")
                for i in range(args.facts):
                    await engine.store_memory(
                        user.id, {"type": "fact", "statement": f"Ada likes topic {i} and tea"}
                    )
                await _timed(engine, user.id, 1)  # warm-up
                phases = {"without it": await _timed(engine, user.id, args.repeat)}
                segments = [
                    {
                        "start": 2.0 * i,
                        "end": 2.0 * i + 2,
                        "text": f"segment {i}: we went over item {i % 97} of the budget plan",
                        "speaker": f"S{i % 3}",
                    }
                    for i in range(args.segments)
                ]
                talk = await engine.store_memory(
                    user.id,
                    {
                        "type": "transcription",
                        "text": " ".join(s["text"] for s in segments),
                        "segments": segments,
                    },
                )
                phases["with it"] = await _timed(engine, user.id, args.repeat)
                await engine.delete_memory(user.id, talk.id)
                phases["after deleting it"] = await _timed(engine, user.id, args.repeat)
        finally:
            server.stop()
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=2000)
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "search_long_memory.json")
    args = parser.parse_args()
    phases = asyncio.run(run(args))
    table = [
        f"| the user's memories ({args.facts} facts) | " + " | ".join(MODES) + " |",
        "| --- | " + " | ".join("---:" for _ in MODES) + " |",
        *(
            f"| {phase} | " + " | ".join(f"{ms[mode]} ms" for mode in MODES) + " |"
            for phase, ms in phases.items()
        ),
    ]
    write_results(
        args.out,
        "search_long_memory.py",
        {"segments": args.segments, "facts": args.facts, "median_ms": phases},
        f"Search with a transcription of {args.segments} segments",
        table,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
