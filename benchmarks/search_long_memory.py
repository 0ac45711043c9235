"""Search latency for a user who holds one long transcription, against the same user without it.

What it measures
    A user with ``--facts`` short facts is searched (4 queries, each in the three modes,
    ``--repeat`` times over, result caching off) three times: before a transcription of
    ``--segments`` segments is stored, while it is stored, and after it is deleted. A search
    hit of a memory carries that memory's whole record, so a long transcription's record
    (thousands of segments) is read into every result that is a part of it: the run shows
    what that costs per search. Searches in the basic view (``view="basic"``: a transcription's
    hits without its text and segments) are timed beside the full view when the code has it,
    and so is ``build_context`` for the same queries (which searches in the basic view since
    it has one). With the transcription stored, the size of a hybrid search's HTTP answer
    (``search_json``, limit 10) is measured in each view. Printed as Markdown tables (median
    milliseconds per call, by mode) and written to
    ``benchmarks/results/search_long_memory.json`` and ``.md`` with the machine and the
    command.

Run from the repository root (about a minute on 2 cores at the defaults; the old code of a
commit can be measured beside it from a ``git worktree`` of that commit, run from its own
folder)::

    .venv/bin/python benchmarks/search_long_memory.py [--segments 2000] [--facts 20] \
        [--repeat 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from locomo import write_results

RESULTS = Path(__file__).resolve().parent / "results"
QUERIES = ("what does Ada like", "tea", "meeting about the budget", "weather today")
TALK_QUERY = QUERIES[2]
MODES = ("semantic", "fulltext", "hybrid")
COLUMNS = (*MODES, "hybrid, basic view", "build_context")


def _has_views(engine: Any) -> bool:
    """Whether this code's search takes ``view`` (the code before it is measured too)."""
    return "view" in inspect.signature(engine.search).parameters


async def _timed(engine: Any, user_id: Any, repeat: int) -> dict[str, float | None]:
    """Median milliseconds of a search, by mode (and view), and of a context block."""
    calls: dict[str, Any] = {
        mode: (lambda q, m=mode: engine.search(user_id, q, mode=m, limit=10)) for mode in MODES
    }
    if _has_views(engine):
        calls["hybrid, basic view"] = lambda q: engine.search(
            user_id, q, mode="hybrid", limit=10, view="basic"
        )
    calls["build_context"] = lambda q: engine.build_context(user_id, q, max_tokens=500)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for query in QUERIES:
            for name, call in calls.items():
                started = time.perf_counter()
                await call(query)
                times[name].append((time.perf_counter() - started) * 1000)
    return {
        name: round(statistics.median(times[name]), 2) if name in times else None
        for name in COLUMNS
    }


async def _answers(engine: Any, user_id: Any, repeat: int) -> dict[str, dict[str, Any]]:
    """The HTTP answer of a hybrid search (limit 10) for ``TALK_QUERY``, whose hits are
    segments of the transcription, by view: its size in bytes, and the median milliseconds
    the Python client spends reading it (``json.loads`` and a ``SearchResult`` per hit, as
    ``halldyll_ray.client`` does)."""
    from halldyll_ray.models import STORED, SearchResult

    answers: dict[str, dict[str, Any]] = {}
    for view in ("full", "basic"):
        if view == "basic" and not _has_views(engine):
            answers[view] = {"bytes": None, "client_parse_ms": None}
            continue
        options = {"view": view} if view == "basic" else {}
        body = await engine.search_json(user_id, TALK_QUERY, 10, mode="hybrid", **options)
        parse_ms = []
        for _ in range(repeat):
            started = time.perf_counter()
            for item in json.loads(body)["results"]:
                SearchResult.model_validate(item, context=STORED)
            parse_ms.append((time.perf_counter() - started) * 1000)
        answers[view] = {
            "bytes": len(body),
            "client_parse_ms": round(statistics.median(parse_ms), 2),
        }
    return answers


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
                answers = await _answers(engine, user.id, args.repeat)
                await engine.delete_memory(user.id, talk.id)
                phases["after deleting it"] = await _timed(engine, user.id, args.repeat)
        finally:
            server.stop()
    return {"median_ms": phases, "answers": answers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=2000)
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "search_long_memory.json")
    args = parser.parse_args()
    measured = asyncio.run(run(args))
    phases, answers = measured["median_ms"], measured["answers"]
    table = [
        f"| the user's memories ({args.facts} facts) | " + " | ".join(COLUMNS) + " |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |",
        *(
            f"| {phase} | "
            + " | ".join("n/a" if ms[name] is None else f"{ms[name]} ms" for name in COLUMNS)
            + " |"
            for phase, ms in phases.items()
        ),
        "",
        "| a hybrid search's answer with it, limit 10 | full view | basic view |",
        "| --- | ---: | ---: |",
        *(
            f"| {label} | "
            + " | ".join(
                "n/a" if answers[v][key] is None else f"{answers[v][key]:,}{unit}"
                for v in ("full", "basic")
            )
            + " |"
            for label, key, unit in (
                (f"bytes ({TALK_QUERY!r})", "bytes", ""),
                ("the Python client's reading of it (median)", "client_parse_ms", " ms"),
            )
        ),
    ]
    write_results(
        args.out,
        "search_long_memory.py",
        {"segments": args.segments, "facts": args.facts, **measured},
        f"Search with a transcription of {args.segments} segments",
        table,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
