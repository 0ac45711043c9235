"""LLM fact extraction: call latency, extraction jobs/s, and LoCoMo evidence recall (#14).

What it measures, with the real test model (SmolLM2-135M-Instruct, Q8_0, served by
dasllama-server as ``scripts/install_test_llm.py`` installs it; ``--base-url``/``--model`` for
another server):

``latency``
    The LLM side of a background extraction job, as the job runs it: ``extract_facts`` on two
    consecutive LoCoMo turns (the pair ``record_turn`` stores), then one ``consolidate`` per
    fact found against its 3 nearest earlier facts (cosine with the product's encoder, in
    memory: the database's part is not measured here). Run at ``--concurrency`` 1, 2 and 4
    jobs at once against one server with 4 streams. Reported: the median and p95 latency of
    each call kind, tokens per call, jobs/s measured, and the jobs/s a worker pool of that
    size would reach if it spent only the median LLM time per job (concurrency / median job
    LLM time): the LLM bound of the extraction jobs.

``recall``
    The LoCoMo development split (``--samples``, default conv-26; its first ``--sessions``,
    default 5, and the questions whose evidence lies there): each session cut into chunks of
    ``--chunk`` turns; every chunk stored three ways for a user of its own in the
    in-process engine (embedded PostgreSQL): the chunk's text as one conversation memory
    (``raw``), the facts the LLM extracts from it about each speaker (``llm``), and the facts
    the heuristic extractor (``textproc.extract_candidate_facts``, the product without an LLM)
    finds in its turns (``heuristic``, each prefixed with its speaker's name). Every question
    (categories 1-4) is searched (hybrid, limit 10, facts only for the fact layouts); a hit
    stands for the turns of its chunk.
    Evidence recall@10 is the share of a question's evidence turns among those turns.

Printed as Markdown and written to ``benchmarks/results/llm_extraction.json`` and ``.md``
with the machine, the date and the command. Timings matter: run ``latency`` under
``flock /tmp/halldyll-ray.lock``. From the repository root::

    .venv/bin/python benchmarks/llm_extraction.py --parts latency recall [--samples conv-26]
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
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from locomo import DATA, RESULTS, _sessions, _turn_text, write_results  # noqa: E402

from examples.local_llm import LocalLLMServer, read_manifest  # noqa: E402
from halldyll_ray.llm.client import LLMClient, OpenAITransport  # noqa: E402
from halldyll_ray.llm.openai_model import LLMMemoryModel  # noqa: E402
from halldyll_ray.llm.protocol import (  # noqa: E402
    DatedText,
    FactCandidate,
    LLMOutputInvalid,
    Neighbour,
)


def _model(base_url: str, model_id: str, concurrency: int) -> LLMMemoryModel:
    transport = OpenAITransport(base_url, timeout_s=300, max_retries=0)
    return LLMMemoryModel(LLMClient(transport, model=model_id, max_concurrency=concurrency))


def _pairs(sample: dict[str, Any]) -> list[list[DatedText]]:
    """Two consecutive turns at a time, each session in order (as record_turn stores them)."""
    out = []
    for _, when, session in _sessions(sample["conversation"]):
        for i in range(0, len(session) - 1, 2):
            out.append(
                [
                    DatedText(text=f"{t['speaker']}: {_turn_text(t)}", start=when)
                    for t in session[i : i + 2]
                ]
            )
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _Jobs:
    """Extraction jobs' LLM calls (extract, then consolidate each fact) and their timings."""

    def __init__(self, model: LLMMemoryModel, encoder: Any) -> None:
        self.model, self.encoder = model, encoder
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.job_llm_s: list[float] = []
        self.stored: list[tuple[str, Any]] = []  # (statement, vector) of the facts so far
        self.invalid = 0

    async def _timed(self, kind: str, call: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        try:
            return await call, time.perf_counter() - t0
        except LLMOutputInvalid:
            self.invalid += 1
            return None, time.perf_counter() - t0
        finally:
            self.calls[kind].append(time.perf_counter() - t0)

    async def job(self, pair: list[DatedText]) -> None:
        speaker = pair[0].text.split(":")[0]
        extract = self.model.extract_facts(pair, speaker=speaker)
        facts, spent = await self._timed("extract_facts", extract)
        for fact in facts or []:
            vector = self.encoder.encode([fact.statement])[0]
            near = sorted(self.stored, key=lambda s: -float(s[1] @ vector))[:3]
            shown = [
                Neighbour(
                    id=uuid.uuid5(uuid.NAMESPACE_URL, text),
                    statement=text,
                    confidence=0.7,
                    similarity=round(float(v @ vector), 4),
                )
                for text, v in near
            ]
            candidate = FactCandidate(statement=fact.statement)
            _, seconds = await self._timed("consolidate", self.model.consolidate(candidate, shown))
            spent += seconds
            self.stored.append((fact.statement, vector))
        self.job_llm_s.append(spent)

    async def run(self, pairs: list[list[DatedText]], concurrency: int) -> float:
        """Run every job with ``concurrency`` workers; the elapsed seconds."""
        queue = list(pairs)

        async def worker() -> None:
            while queue:
                await self.job(queue.pop(0))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


async def _latency(base_url: str, model_id: str, args: argparse.Namespace) -> dict[str, Any]:
    from halldyll_ray.embedding import OnnxEncoder

    encoder = OnnxEncoder.load(None)
    sample = next(s for s in json.loads(DATA.read_text()) if s["sample_id"] == args.samples[0])
    pairs = _pairs(sample)[: args.jobs]
    results: dict[str, Any] = {}
    for concurrency in args.concurrency:
        model = _model(base_url, model_id, concurrency)
        jobs = _Jobs(model, encoder)
        elapsed = await jobs.run(pairs, concurrency)
        snapshot = model.client.metrics.snapshot()["models"][0]
        await model.client.aclose()
        median_job = statistics.median(jobs.job_llm_s)
        row = {
            "jobs": len(pairs),
            "jobs_per_s": round(len(pairs) / elapsed, 3),
            "llm_bound_jobs_per_s": round(concurrency / median_job, 3),
            "job_llm_p50_s": round(median_job, 3),
            "calls": snapshot["calls"],
            "invalid": jobs.invalid,
            "prompt_tokens_per_call": round(snapshot["prompt_tokens"] / snapshot["calls"], 1),
            "completion_tokens_per_call": round(
                snapshot["completion_tokens"] / snapshot["calls"], 1
            ),
        }
        for kind, values in jobs.calls.items():
            row[f"{kind}_p50_s"] = round(statistics.median(values), 3)
            row[f"{kind}_p95_s"] = round(_pct(values, 0.95), 3)
            row[f"{kind}_calls"] = len(values)
        results[f"concurrency {concurrency}"] = row
        print(f"concurrency {concurrency}: {row}", flush=True)
    return results


def _chunks(sample: dict[str, Any], size: int, sessions: int) -> list[list[dict[str, Any]]]:
    out = []
    for _, when, session in _sessions(sample["conversation"])[:sessions]:
        for i in range(0, len(session), size):
            out.append([{**t, "when": when} for t in session[i : i + size]])
    return out


async def _recall(base_url: str, model_id: str, args: argparse.Namespace) -> dict[str, Any]:
    from halldyll_ray import Conversation, Fact, MemoryEngine, Message, Settings
    from halldyll_ray.storage.embedded import EmbeddedPostgres
    from halldyll_ray.storage.migrate import apply_migrations
    from halldyll_ray.textproc import extract_candidate_facts

    samples = [s for s in json.loads(DATA.read_text()) if s["sample_id"] in args.samples]
    model = _model(base_url, model_id, 2)
    layouts = ("raw", "heuristic", "llm")
    scores: dict[str, list[float]] = {layout: [] for layout in layouts}
    stored_counts = {layout: 0 for layout in layouts}
    invalid = 0
    with tempfile.TemporaryDirectory(prefix="hr-llm-recall-") as tmp:
        server = EmbeddedPostgres(Path(tmp), database="recall")
        url = await server.start_async()
        try:
            await apply_migrations(url, embedding_dimension=384)
            settings = Settings.from_env(database_url=url, search_cache_ttl_seconds=0)
            async with MemoryEngine(settings) as engine:
                for sample in samples:
                    users = {
                        layout: await engine.create_user(
                            f"{layout}{uuid.uuid4().hex[:6]}", None, "user"
                        )
                        for layout in layouts
                    }
                    turns_of: dict[str, dict[Any, set[str]]] = {
                        layout: defaultdict(set) for layout in layouts
                    }
                    chunks = _chunks(sample, args.chunk, args.sessions)
                    kept = {t["dia_id"] for chunk in chunks for t in chunk}
                    for n, chunk in enumerate(chunks):
                        dia = {t["dia_id"] for t in chunk}
                        raw = await engine.store_memory(
                            users["raw"].id,
                            Conversation(
                                messages=[
                                    Message(
                                        role="user",
                                        name=t["speaker"],
                                        content=_turn_text(t),
                                        created_at=t["when"],
                                    )
                                    for t in chunk
                                ]
                            ),
                        )
                        turns_of["raw"][raw.id] |= dia
                        stored_counts["raw"] += 1
                        for t in chunk:
                            for statement in extract_candidate_facts(_turn_text(t)):
                                fact = await engine.store_memory(
                                    users["heuristic"].id,
                                    Fact(statement=f"{t['speaker']}: {statement}"),
                                )
                                turns_of["heuristic"][fact.id] |= dia
                                stored_counts["heuristic"] += 1
                        texts = [
                            DatedText(text=f"{t['speaker']}: {_turn_text(t)}", start=t["when"])
                            for t in chunk
                        ]
                        for speaker in sorted({t["speaker"] for t in chunk}):
                            try:
                                facts = await model.extract_facts(texts, speaker=speaker)
                            except LLMOutputInvalid:
                                invalid += 1
                                continue
                            for candidate in facts:
                                fact = await engine.store_memory(
                                    users["llm"].id,
                                    Fact(statement=candidate.statement, kind=candidate.kind),
                                )
                                turns_of["llm"][fact.id] |= dia
                                stored_counts["llm"] += 1
                        if n % 20 == 0:
                            print(f"{sample['sample_id']}: chunk {n + 1}/{len(chunks)}", flush=True)
                    for qa in sample["qa"]:
                        evidence = set(qa.get("evidence") or ())
                        if qa["category"] == 5 or not evidence or not evidence <= kept:
                            continue
                        for layout in layouts:
                            types = None if layout == "raw" else ["fact"]
                            hits = await engine.search(
                                users[layout].id, qa["question"], 10, types=types
                            )
                            found: set[str] = set()
                            for hit in hits:
                                found |= turns_of[layout].get(hit.memory.id, set())
                            scores[layout].append(len(evidence & found) / len(evidence))
        finally:
            server.stop()
    snapshot = model.client.metrics.snapshot()["models"][0]
    await model.client.aclose()
    out = {
        layout: {
            "questions": len(scores[layout]),
            "recall@10": round(statistics.fmean(scores[layout]), 3),
            "memories_stored": stored_counts[layout],
        }
        for layout in layouts
    }
    out["llm"].update(
        {
            "extraction_calls": snapshot["calls"],
            "invalid_answers": invalid,
            "mean_call_s": snapshot["mean_seconds"],
        }
    )
    print(json.dumps(out), flush=True)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.base_url:
        about = {"id": args.model, "base_url": args.base_url}
        return await _parts(args.base_url, args.model, args, about)
    info = read_manifest()
    with LocalLLMServer.from_manifest(threads=args.threads, streams=4) as server:
        about = {
            "id": server.model_id,
            "name": info["model"]["name"],
            "source": info["source"]["package"],
            "licence": info["source"]["licence"],
            "server": f"{info['server']['package']}, --threads {args.threads} --streams 4",
        }
        return await _parts(server.base_url, server.model_id, args, about)


async def _parts(
    base_url: str, model_id: str, args: argparse.Namespace, about: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {"model": about}
    if "latency" in args.parts:
        out["latency"] = await _latency(base_url, model_id, args)
    if "recall" in args.parts:
        out["recall"] = await _recall(base_url, model_id, args)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["latency", "recall"], default=["latency"])
    parser.add_argument("--samples", nargs="+", default=["conv-26"])
    parser.add_argument("--jobs", type=int, default=12, help="extraction jobs per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--chunk", type=int, default=4, help="turns per chunk (recall)")
    parser.add_argument(
        "--sessions", type=int, default=5, help="first sessions of each sample (recall)"
    )
    parser.add_argument("--threads", type=int, default=2, help="dasllama-server threads")
    parser.add_argument("--base-url", help="an OpenAI-compatible API root instead")
    parser.add_argument("--model", help="the model id (with --base-url)")
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_extraction.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    table = [f"Model: {results['model']}.", ""]
    if "latency" in results:
        table += [
            "| concurrency | jobs/s | LLM-bound jobs/s | job LLM p50 s | extract p50 / p95 s "
            "| consolidate p50 / p95 s | tokens in / out per call | invalid |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in results["latency"].items():
            table.append(
                f"| {name.split()[-1]} | {r['jobs_per_s']} | {r['llm_bound_jobs_per_s']} "
                f"| {r['job_llm_p50_s']} | {r.get('extract_facts_p50_s')} / "
                f"{r.get('extract_facts_p95_s')} | {r.get('consolidate_p50_s')} / "
                f"{r.get('consolidate_p95_s')} | {r['prompt_tokens_per_call']} / "
                f"{r['completion_tokens_per_call']} | {r['invalid']} of {r['calls']} |"
            )
        table.append("")
    if "recall" in results:
        table += [
            f"LoCoMo {', '.join(args.samples)}, first {args.sessions} sessions (the questions "
            f"whose evidence lies there), chunks of {args.chunk} turns, hybrid search, limit 10:",
            "",
            "| layout | questions | evidence recall@10 | memories stored |",
            "| --- | --- | --- | --- |",
        ]
        for layout, r in results["recall"].items():
            table.append(
                f"| {layout} | {r['questions']} | {r['recall@10']} | {r['memories_stored']} |"
            )
    write_results(args.out, "llm_extraction.py", results, "LLM fact extraction", table)


if __name__ == "__main__":
    main()
