"""The context's earlier sessions (issue #14 §4): how far back a budget reaches, and what the
section costs ``build_context``.

What it measures
    A private PostgreSQL 18 + pgvector (``EmbeddedPostgres``, a temporary folder, the
    product's migrations at dimension 384) holds one user with ``--sessions`` quiet sessions
    spread evenly over the twelve months of 2024: stored conversations of four messages,
    each summarised through ``Summaries.refresh_session`` by this script's extractive model
    (``textproc.extractive_summary``, the no-LLM summariser, for sessions and roll-ups
    alike, cut to SESSION_SUMMARY_MAX_WORDS / PERIOD_SUMMARY_MAX_WORDS). Then:

    * **reach**: for each budget, the Earlier sessions section of ``build_context`` before
      and after ``Summaries.roll_up``: the oldest month it shows, how many sessions it stands
      for (a period line counts its sessions), its tokens;
    * **cost**: ``build_context`` latency, p50 and p95 over ``--calls`` calls, with the
      section (CONTEXT_HISTORY_SHARE 0.2, after the roll-up) and without it (0), the two
      engines on the same database, calls interleaved, search cache off (each call searches).

    In-process engine, packaged all-MiniLM-L6-v2 on the CPU. Printed as Markdown and written
    to ``benchmarks/results/context_history.{json,md}``.

Run from the repository root (about a minute; timings under the machine lock)::

    flock /tmp/halldyll-ray.lock .venv/bin/python benchmarks/context_history.py [--sessions 240]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from locomo import RESULTS, write_results  # the sibling script's output helper

TOPICS = [
    "sailing on the lake",
    "a pottery class",
    "the chess club",
    "baking sourdough",
    "the new telescope",
    "the vegetable garden",
    "a cycling trip",
    "an oil painting",
    "the bird census",
    "indoor climbing",
    "a knitting pattern",
    "street photography",
]
BUDGETS = (500, 1000, 2000, 4000)
QUERIES = [
    "what should we plan for the weekend?",
    "remind me what I did last spring",
    "which hobbies did I talk about?",
    "what did I say about my friends?",
]


class ExtractiveModel:
    """A MemoryModel without a language model: extractive summaries of sessions and of
    periods, cut to the words asked (consolidation is not used here)."""

    name = "extractive"

    async def extract_facts(self, messages: Sequence[Any], *, speaker: str | None = None) -> Any:
        return []

    async def consolidate(self, fact: Any, neighbours: Any) -> Any:
        from halldyll_ray.llm.protocol import Action, Decision

        return Decision(action=Action.IGNORE, reason="this benchmark learns no facts")

    async def summarize(self, messages: Sequence[Any], *, max_words: int) -> str:
        from halldyll_ray.textproc import Line, extractive_summary

        lines = [Line(*m.text.split(": ", 1)) for m in messages]
        return " ".join(extractive_summary(lines).split()[:max_words])

    async def roll_up(self, summaries: Sequence[Any], *, max_words: int) -> str:
        from halldyll_ray.textproc import Line, extractive_summary

        lines = [Line("summary", s.text.replace("\n", " ")) for s in summaries]
        return " ".join(extractive_summary(lines).split()[:max_words])


def _history(context: Any) -> list[Any]:
    return next((s.items for s in context.sections if s.name == "Earlier sessions"), [])


async def _reach(engine: Any, user_id: Any, periods: dict[Any, int]) -> list[dict[str, Any]]:
    rows = []
    for budget in BUDGETS:
        context = await engine.build_context(user_id, QUERIES[0], max_tokens=budget)
        items = _history(context)
        months = sorted(item.text.split("] (", 1)[1][:7] for item in items)
        rows.append(
            {
                "budget": budget,
                "oldest_month": months[0] if months else None,
                "sessions_covered": sum(periods.get(item.memory_id, 1) for item in items),
                "lines": len(items),
                "tokens": sum(item.tokens for item in items),
            }
        )
    return rows


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from halldyll_ray import MemoryEngine, Message, Settings
    from halldyll_ray.components.summaries import Summaries
    from halldyll_ray.embedding import OnnxEncoder
    from halldyll_ray.models import Conversation
    from halldyll_ray.storage.embedded import EmbeddedPostgres
    from halldyll_ray.storage.migrate import apply_migrations

    encoder = OnnxEncoder.load()
    with tempfile.TemporaryDirectory(prefix="hr-history-") as tmp:
        server = EmbeddedPostgres(Path(tmp), database="history")
        try:
            url = await server.start_async()
            await apply_migrations(url, embedding_dimension=384)
            base = {"database_url": url, "redis_url": None, "search_cache_ttl_seconds": 0}
            on = Settings.from_env(**base, context_history_share=0.2)
            off = Settings.from_env(**base, context_history_share=0.0)
            async with (
                MemoryEngine(on, encoder=encoder) as engine,
                MemoryEngine(off, encoder=encoder) as plain,
            ):
                user = await engine.create_user("hist", None, "user")
                c = engine.components
                model = ExtractiveModel()
                summaries = Summaries(
                    engine.db, c.embeddings, c.models, c.ingestion, engine.settings, model
                )
                started = time.perf_counter()
                for n in range(args.sessions):
                    day = datetime(2024, 1, 1, 9, tzinfo=UTC) + timedelta(
                        days=365 * n / args.sessions
                    )
                    topic = TOPICS[n % len(TOPICS)]
                    talk = [
                        f"Last week I spent two days on {topic} with my sister and her kids.",
                        f"That sounds lovely. What did you enjoy most about {topic}?",
                        f"Honestly the quiet mornings; next time I want to try {topic} alone.",
                        "Then let's put a free weekend for it in your calendar.",
                    ]
                    stored = await engine.store_memory(
                        user.id,
                        Conversation(
                            session_id=f"s{n}",
                            messages=[
                                Message(
                                    role="user" if i % 2 == 0 else "assistant",
                                    content=text,
                                    created_at=day + timedelta(minutes=i),
                                )
                                for i, text in enumerate(talk)
                            ],
                        ),
                    )
                    await summaries.refresh_session(user.id, f"s{n}", stored.id, None, job_id=None)
                setup_s = time.perf_counter() - started
                before = await _reach(engine, user.id, {})
                written = await summaries.roll_up(user.id, job_id=None, model_id=None)
                periods = {
                    p: len((await engine.get_memory(user.id, p)).memory.covers) for p in written
                }
                after = await _reach(engine, user.id, periods)
                timings: dict[str, list[float]] = {"with section": [], "without": []}
                for i in range(args.calls):
                    for label, which in (("with section", engine), ("without", plain)):
                        t0 = time.perf_counter()
                        await which.build_context(
                            user.id, QUERIES[i % len(QUERIES)], max_tokens=1000
                        )
                        timings[label].append(time.perf_counter() - t0)
        finally:
            server.stop()
    cost = {
        label: {
            "p50_ms": round(statistics.median(values) * 1000, 2),
            "p95_ms": round(statistics.quantiles(values, n=20)[18] * 1000, 2),
        }
        for label, values in timings.items()
    }
    return {
        "sessions": args.sessions,
        "periods": len(written),
        "setup_s": round(setup_s, 1),
        "reach_before_rollup": before,
        "reach_after_rollup": after,
        "build_context_1000_tokens": cost,
        "ratio_p50": round(cost["with section"]["p50_ms"] / cost["without"]["p50_ms"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=240)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    table = [
        f"{result['sessions']} quiet sessions over 2024, rolled up into {result['periods']} "
        "period summaries. Earlier sessions section at CONTEXT_HISTORY_SHARE 0.2:",
        "",
        "| budget | oldest month shown (before / after roll-up) | sessions covered | "
        "lines | section tokens |",
        "| --- | --- | --- | --- | --- |",
    ]
    for b, a in zip(result["reach_before_rollup"], result["reach_after_rollup"], strict=True):
        table.append(
            f"| {b['budget']} | {b['oldest_month']} / {a['oldest_month']} | "
            f"{b['sessions_covered']} / {a['sessions_covered']} | {b['lines']} / {a['lines']} | "
            f"{b['tokens']} / {a['tokens']} |"
        )
    cost = result["build_context_1000_tokens"]
    table += [
        "",
        f"`build_context` at 1,000 tokens, {args.calls} calls each, interleaved, search cache off:",
        "",
        "| | p50 ms | p95 ms |",
        "| --- | --- | --- |",
        *(f"| {label} | {v['p50_ms']} | {v['p95_ms']} |" for label, v in cost.items()),
        "",
        f"Ratio of medians (with / without): {result['ratio_p50']}.",
    ]
    write_results(
        RESULTS / "context_history.json",
        "context_history.py",
        result,
        "Earlier sessions in the context: reach and cost",
        table,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
