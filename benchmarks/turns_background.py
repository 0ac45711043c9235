"""Turns stored per second with learning inline vs in background jobs, and jobs drained per
second by N workers (issue #14 §2).

What it measures
    1. ``record_turn`` throughput and latency, ``--writers`` concurrent sessions of
       ``--turns`` turns each, on an in-process engine (no Ray, no Redis), in four modes:

       * ``inline``: facts and the session summary written before the call returns (today's
         default without an LLM);
       * ``background``: the turn and its jobs committed, then the call returns; the engine's
         own JOBS_WORKERS run the jobs meanwhile, in the same process (sharing its CPU);
       * ``background, no workers``: the write path alone (the jobs wait: in production they
         run in other Ingestion replicas);
       * ``background, model +X ms``: as ``background``, with every model call made X ms
         slower (an ``asyncio.sleep`` standing in for an LLM's latency; the facts are the
         heuristic model's): the write path must not wait for the model.

    2. Jobs drained per second by 1, 2, 4 ... workers of one process: the ``extract`` jobs of
       ``--drain-turns`` turns queued beforehand (one per turn: heuristic extraction, then
       embedding and storing its three or four facts), the same with the model X ms slower
       per call, and no-op jobs (the queue's own cost: take, lease, finish).

    3. Pickup latency, from a job's commit to its handler's start, for an idle worker woken
       by LISTEN/NOTIFY and for one that only polls every JOBS_POLL_SECONDS.

Run from the repository root (timings: under ``flock /tmp/halldyll-ray.lock``)::

    python benchmarks/turns_background.py

Results go to ``benchmarks/results/turns_background.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from halldyll_ray import MemoryEngine, Settings
from halldyll_ray.components.jobs import JobQueue
from halldyll_ray.embedding import OnnxEncoder
from halldyll_ray.llm.heuristic import HeuristicMemoryModel
from halldyll_ray.llm.protocol import DatedText, FactCandidate
from halldyll_ray.models import Job
from halldyll_ray.storage.embedded import EmbeddedPostgres
from halldyll_ray.storage.migrate import apply_migrations

RESULTS = Path(__file__).parent / "results"
FOODS = ["green tea", "ramen", "jazz", "hiking", "chess", "sushi", "rock climbing", "opera"]
CITIES = ["Lyon", "Oslo", "Kyoto", "Lima", "Porto", "Quebec", "Hanoi", "Tunis"]


class SlowModel(HeuristicMemoryModel):
    """The heuristic model, ``delay_s`` slower per call: stands in for an LLM's latency."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def extract_facts(
        self, messages: Sequence[DatedText], *, speaker: str | None = None
    ) -> list[FactCandidate]:
        await asyncio.sleep(self.delay_s)
        return await super().extract_facts(messages, speaker=speaker)

    async def summarize(self, messages: Sequence[DatedText], *, max_words: int) -> str:
        await asyncio.sleep(self.delay_s)
        return await super().summarize(messages, max_words=max_words)


def _turn(i: int) -> tuple[str, str]:
    user = (
        f"My name is Person{i % 97} and I live in {CITIES[i % len(CITIES)]}. "
        f"I really love {FOODS[i % len(FOODS)]}, and my favourite number is {i % 13}."
    )
    return user, f"Noted: {FOODS[i % len(FOODS)]} it is. Anything else about {CITIES[i % 8]}?"


def _engine(settings: Settings, encoder: OnnxEncoder, **kw: Any) -> MemoryEngine:
    return MemoryEngine(settings, encoder=encoder, **kw)


async def _wait_drained(engine: MemoryEngine) -> None:
    while await engine.components.jobs.pending():  # noqa: ASYNC110 - the database knows
        await asyncio.sleep(0.02)


async def _turns(engine: MemoryEngine, *, writers: int, turns: int, mode: str) -> dict[str, Any]:
    users = [
        await engine.create_user(f"w{uuid.uuid4().hex[:10]}", None, "user") for _ in range(writers)
    ]
    latencies: list[float] = []

    async def writer(w: int) -> None:
        for t in range(turns):
            user_message, answer = _turn(w * turns + t)
            started = time.perf_counter()
            await engine.record_turn(users[w].id, f"s{w}", user_message, answer)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    elapsed = time.perf_counter() - started
    drained_s = None
    if engine.extraction_mode == "background" and engine.components.jobs.running:
        await _wait_drained(engine)
        drained_s = round(time.perf_counter() - started, 2)
    elif engine.extraction_mode == "background":
        await engine.run_pending_jobs(limit=100_000)  # untimed: the next mode starts clean
    return {
        "part": "turns",
        "mode": mode,
        "writers": writers,
        "turns": len(latencies),
        "turns_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p95_ms": round(statistics.quantiles(latencies, n=20)[18] * 1000, 1),
        "learned_after_s": drained_s,
    }


async def _drain(
    settings: Settings, encoder: OnnxEncoder, *, workers: int, turns: int, label: str, model: Any
) -> dict[str, Any]:
    """Queue the extract jobs of ``turns`` turns (no workers), then time N workers on them."""
    # Extraction jobs only (no session summaries), one per turn.
    quiet = settings.model_copy(
        update={
            "memory_extraction": "background",
            "jobs_workers": 0,
            "session_summary_every_n_turns": 1000,
        }
    )
    async with _engine(quiet, encoder, run_jobs=False) as engine:
        user = await engine.create_user(f"d{uuid.uuid4().hex[:10]}", None, "user")
        for t in range(turns):
            await engine.record_turn(user.id, "s", *_turn(t), extract_facts=True)
    runner = settings.model_copy(update={"jobs_workers": workers, "jobs_poll_seconds": 0.05})
    engine = _engine(runner, encoder, memory_model=model, run_jobs=False)
    await engine.initialize()
    try:
        queued = len((await engine.list_jobs(user.id, status="queued", limit=500)).items)
        started = time.perf_counter()
        engine.start_job_workers(workers)
        await _wait_drained(engine)
        elapsed = time.perf_counter() - started
        done = len((await engine.list_jobs(user.id, status="done", limit=500)).items)
        assert done == queued, (done, queued)
    finally:
        await engine.close()
    return {
        "part": "drain",
        "jobs": label,
        "workers": workers,
        "n": queued,
        "jobs_per_s": round(queued / elapsed, 1),
    }


async def _noop_drain(engine: MemoryEngine, dsn: str, *, workers: int, n: int) -> dict[str, Any]:
    user = await engine.create_user(f"n{uuid.uuid4().hex[:10]}", None, "user")
    queue = JobQueue(engine.db, dsn, poll_s=0.05)

    async def noop(job: Job) -> dict[str, Any]:
        return {}

    queue.register("noop", noop)
    async with engine.db.scoped(user.id) as conn:
        for i in range(n):
            await queue.enqueue(conn, user.id, "noop", {"i": i})
    started = time.perf_counter()
    queue.start(workers)
    while queue.counts["done"] < n:  # noqa: ASYNC110 - a counter, not an event
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await queue.stop()
    return {
        "part": "drain",
        "jobs": "no-op",
        "workers": workers,
        "n": n,
        "jobs_per_s": round(n / elapsed, 1),
    }


async def _pickup(
    engine: MemoryEngine, dsn: str, *, listen: bool, poll_s: float, n: int
) -> dict[str, Any]:
    user = await engine.create_user(f"p{uuid.uuid4().hex[:10]}", None, "user")
    queue = JobQueue(engine.db, dsn, poll_s=poll_s, listen=listen)
    started_at: dict[uuid.UUID, float] = {}
    arrived = asyncio.Event()

    async def mark(job: Job) -> dict[str, Any]:
        started_at[job.id] = time.perf_counter()
        arrived.set()
        return {}

    queue.register("mark", mark)
    queue.start(1)
    if listen:
        await queue._listener.wait_up(10)
    await asyncio.sleep(0.2)
    delays = []
    for i in range(n):
        arrived.clear()
        async with engine.db.scoped(user.id) as conn:
            job_id = await queue.enqueue(conn, user.id, "mark", {"i": i})
        committed = time.perf_counter()
        await asyncio.wait_for(arrived.wait(), poll_s * 3 + 10)
        delays.append(started_at[job_id] - committed)
        await asyncio.sleep(0.137 * (i % 7))  # commits at arbitrary points of the poll cycle
    await queue.stop()
    return {
        "part": "pickup",
        "wake": f"LISTEN/NOTIFY (poll {poll_s:g} s)" if listen else f"poll every {poll_s:g} s",
        "n": n,
        "p50_ms": round(statistics.median(delays) * 1000, 1),
        "max_ms": round(max(delays) * 1000, 1),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    encoder = OnnxEncoder.load()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        server = EmbeddedPostgres(Path(folder), database="bench")
        dsn = await server.start_async()
        try:
            await apply_migrations(dsn, embedding_dimension=384)
            base = Settings.from_env(
                database_url=dsn,
                redis_url=None,
                db_pool_size=8,
                session_summary_every_n_turns=5,
                jobs_workers=args.workers,
            )
            slow = args.model_latency_ms / 1000
            modes = [
                ("inline", {"memory_extraction": "inline"}, {}),
                ("background", {"memory_extraction": "background"}, {}),
                (
                    "background, no workers",
                    {"memory_extraction": "background"},
                    {"run_jobs": False},
                ),
                (
                    f"background, model +{args.model_latency_ms:g} ms",
                    {"memory_extraction": "background"},
                    {"memory_model": SlowModel(slow)},
                ),
            ]
            for _ in range(args.rounds):  # rounds interleave the modes: drift hits all alike
                for mode, update, kw in modes:
                    async with _engine(base.model_copy(update=update), encoder, **kw) as engine:
                        row = await _turns(
                            engine, writers=args.writers, turns=args.turns, mode=mode
                        )
                    print(row, flush=True)
                    results.append(row)
            for workers in args.drain_workers:
                for label, model in (
                    ("extract (heuristic)", None),
                    (f"extract (model +{args.model_latency_ms:g} ms)", SlowModel(slow)),
                ):
                    row = await _drain(
                        base,
                        encoder,
                        workers=workers,
                        turns=args.drain_turns,
                        label=label,
                        model=model,
                    )
                    print(row, flush=True)
                    results.append(row)
            quiet = base.model_copy(update={"memory_extraction": "inline"})
            async with _engine(quiet, encoder, run_jobs=False) as engine:
                for workers in args.drain_workers:
                    row = await _noop_drain(engine, dsn, workers=workers, n=args.noop_jobs)
                    print(row, flush=True)
                    results.append(row)
                for listen, poll_s in ((True, 2.0), (False, 2.0), (False, 0.2)):
                    row = await _pickup(engine, dsn, listen=listen, poll_s=poll_s, n=args.pickups)
                    print(row, flush=True)
                    results.append(row)
        finally:
            server.stop()
    return results


def _median_turns(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for row in results:
        if row["part"] == "turns":
            by_mode.setdefault(row["mode"], []).append(row)
    inline = statistics.median(r["turns_per_s"] for r in by_mode["inline"])
    summary = []
    for mode, rows in by_mode.items():
        rate = statistics.median(r["turns_per_s"] for r in rows)
        learned = [r["learned_after_s"] for r in rows if r["learned_after_s"] is not None]
        summary.append(
            {
                "mode": mode,
                "turns_per_s": rate,
                "vs_inline": round(rate / inline, 2),
                "p50_ms": statistics.median(r["p50_ms"] for r in rows),
                "p95_ms": statistics.median(r["p95_ms"] for r in rows),
                "learned_after_s": statistics.median(learned) if learned else None,
            }
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=4, help="concurrent sessions")
    parser.add_argument("--turns", type=int, default=25, help="turns per session")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="JOBS_WORKERS in part 1")
    parser.add_argument("--model-latency-ms", type=float, default=500)
    parser.add_argument("--drain-turns", type=int, default=60)
    parser.add_argument("--drain-workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--noop-jobs", type=int, default=400)
    parser.add_argument("--pickups", type=int, default=15)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    RESULTS.mkdir(exist_ok=True)
    summary = _median_turns(results)
    (RESULTS / "turns_background.json").write_text(
        json.dumps(
            {"machine": machine, "args": vars(args), "summary": summary, "runs": results}, indent=2
        )
        + "\n"
    )
    command = "python benchmarks/turns_background.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
    )
    lines = [
        f"Machine: {machine}; embedded PostgreSQL 18, no Redis, in-process engine.",
        f"Command: `{command}`",
        "",
        f"record_turn, {args.writers} concurrent sessions x {args.turns} turns, median of "
        f"{args.rounds} interleaved rounds (learned after: from the first turn until every "
        "job is done):",
        "",
        "| mode | turns/s | vs inline | p50 ms | p95 ms | learned after s |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['mode']} | {r['turns_per_s']} | {r['vs_inline']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['learned_after_s'] if r['learned_after_s'] is not None else '—'} |"
            for r in summary
        ),
        "",
        "Jobs drained by N workers of one process:",
        "",
        "| jobs | workers | n | jobs/s |",
        "| --- | --- | --- | --- |",
        *(
            f"| {r['jobs']} | {r['workers']} | {r['n']} | {r['jobs_per_s']} |"
            for r in results
            if r["part"] == "drain"
        ),
        "",
        "Pickup latency (commit of a job to its handler's start, one idle worker):",
        "",
        "| wake-up | n | p50 ms | max ms |",
        "| --- | --- | --- | --- |",
        *(
            f"| {r['wake']} | {r['n']} | {r['p50_ms']} | {r['max_ms']} |"
            for r in results
            if r["part"] == "pickup"
        ),
    ]
    (RESULTS / "turns_background.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
