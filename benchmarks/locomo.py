"""LoCoMo evidence recall through the public API: in-process ``MemoryEngine`` or HTTP.

What it measures
    The development split in ``../shared/bench/locomo/locomo-dev.json`` (6 conversations, the
    questions of categories 1-4; category 5 has no answer in the conversation). Each
    conversation goes to a user of its own, in one of two layouts:

    * ``session``: one Conversation per session, one message per turn (``name`` = the
      speaker, ``created_at`` = the session's date, the turn's text and the caption of the
      photo it shares as the content), as an agent imports history;
    * ``turn``: one Conversation memory per turn (a single message);
    * ``agent``: each session through the agent loop (``record_turn``, two turns a call with
      the speakers' names, no session dates; its facts and summaries compete too).

    Then every question is searched (``limit`` 10, ``--group``) in each ``--modes``
    (semantic, hybrid, fulltext). A hit is mapped back to turns by the matched part: the
    message's sequence number in its conversation. Evidence recall@k is the share of a
    question's evidence turns among the turns of the first k hits, averaged over questions;
    any-hit@10 is the share of questions with at least one evidence turn in the first 10.
    Nothing here reads the answers.

    ``--via inprocess`` (default) calls the engine in this process; ``--via http`` starts the
    served application (Ray Serve, ``build_app`` at its defaults, as
    ``benchmarks/serve_http.py`` does) on the same database and stores and searches through
    the Python client over HTTP, one API key per user, so the latency includes HTTP, the
    Ingress, the hop to Search and the Embedding deployment. Result caching is off in both.

    Printed as a Markdown table and written to ``benchmarks/results/locomo.json`` and ``.md``
    (``--out``) with the machine, the date and the exact command.

Run from the repository root (about 5 minutes on 2 cores per layout, embedded PostgreSQL, no
Redis)::

    .venv/bin/python benchmarks/locomo.py [--layouts session turn] \
        [--modes semantic hybrid fulltext] [--group part|memory] [--via inprocess|http] \
        [--data locomo10.json] [--samples conv-47 conv-48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "bench" / "locomo" / "locomo-dev.json"
RESULTS = Path(__file__).resolve().parent / "results"


def _sessions(
    conversation: dict[str, Any],
) -> list[tuple[str, datetime | None, list[dict[str, Any]]]]:
    """(name, date, turns) of each session; the date as LoCoMo writes it, "1:56 pm on 8 May,
    2023", read as UTC."""
    keys = [k for k in conversation if k.startswith("session_") and not k.endswith("date_time")]
    keys.sort(key=lambda k: int(k.split("_")[1]))
    out = []
    for key in keys:
        if not conversation[key]:
            continue
        written = conversation.get(f"{key}_date_time")
        when = None
        if written:
            when = datetime.strptime(written, "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)
        out.append((key, when, conversation[key]))
    return out


def _turn_text(turn: dict[str, Any]) -> str:
    """A turn's text, and the caption of the photo it shares, as LoCoMo's own RAG baseline
    writes it (``[shares <caption>]``, snap-research/locomo ``task_eval/dpr_qa.py``): what an
    agent importing the history would have for the photo."""
    text = turn.get("text") or ""
    if turn.get("blip_caption"):
        text = f"{text} [shares {turn['blip_caption']}]".strip()
    return text or "(a photo)"


def _memories(sample: dict[str, Any], layout: str) -> list[tuple[Any, list[tuple[int, str]]]]:
    """The memories that store one conversation in ``layout``, each with its (message seq,
    dia_id) pairs."""
    from halldyll_ray import Conversation, Message

    conversation = sample["conversation"]
    speaker_a = conversation["speaker_a"]
    out: list[tuple[Any, list[tuple[int, str]]]] = []
    for name, when, session in _sessions(conversation):
        messages = [
            Message(
                role="user" if turn["speaker"] == speaker_a else "assistant",
                name=turn["speaker"],
                content=_turn_text(turn),
                created_at=when,
            )
            for turn in session
        ]
        if layout == "session":
            out.append(
                (
                    Conversation(title=name.replace("_", " "), messages=messages),
                    [(seq, turn["dia_id"]) for seq, turn in enumerate(session)],
                )
            )
        else:
            for message, turn in zip(messages, session, strict=True):
                out.append((Conversation(messages=[message]), [(0, turn["dia_id"])]))
    return out


async def _record_turns(turn: Any, sample: dict[str, Any]) -> tuple[dict, int]:
    """The ``agent`` layout: each session through the agent loop's ``record_turn``, two
    consecutive turns as (user message, assistant message) with their speakers' names; a
    session's last turn, when it has no partner, with the reply "(end of session)". No
    session dates: the agent loop stores the time of the call. Returns
    ({(conversation_id, seq): dia_id}, turns stored)."""
    where: dict[tuple[Any, int], str] = {}
    turns = 0
    for name, _, session in _sessions(sample["conversation"]):
        session_id = f"{sample.get('sample_id', 'locomo')}-{name}"
        for i in range(0, len(session), 2):
            pair = session[i : i + 2]
            answer = _turn_text(pair[1]) if len(pair) == 2 else "(end of session)"
            names = (pair[0]["speaker"], pair[1]["speaker"] if len(pair) == 2 else None)
            record = await turn(session_id, _turn_text(pair[0]), answer, names)
            for seq, spoken in zip(record.message_seqs, pair, strict=False):
                where[(record.conversation_id, seq)] = spoken["dia_id"]
            turns += len(pair)
    return where, turns


async def _ingest(store: Any, turn: Any, sample: dict[str, Any], layout: str) -> tuple[dict, int]:
    """Store one conversation with ``store(memory) -> StoredMemory`` (or ``turn`` for the
    ``agent`` layout); return ({(memory_id, seq): dia_id}, turns stored)."""
    if layout == "agent":
        return await _record_turns(turn, sample)
    where: dict[tuple[Any, int], str] = {}
    turns = 0
    for memory, seqs in _memories(sample, layout):
        stored = await store(memory)
        for seq, dia_id in seqs:
            where[(stored.id, seq)] = dia_id
        turns += len(seqs)
    return where, turns


def _recall(evidence: set[str], found: list[str], k: int) -> float:
    return len(evidence & set(found[:k])) / len(evidence)


class _Door:
    """Where the benchmark stores and searches: the in-process engine, or the HTTP API of a
    served application through the Python client (one API key per conversation's user)."""

    def __init__(self, engine: Any, base_url: str | None, group: str) -> None:
        self.engine = engine
        self.base_url = base_url
        self.group = group
        self.clients: list[Any] = []

    async def user(self) -> tuple[Any, Any, Any]:
        """A new user: (store(memory), search(query, mode), turn(session, user, assistant))."""
        from halldyll_ray.client import AsyncHalldyllClient

        user = await self.engine.create_user(f"locomo{uuid.uuid4().hex[:8]}", None, "user")
        if self.base_url is None:

            async def store(memory: Any) -> Any:
                return await self.engine.store_memory(user.id, memory)

            async def search(query: str, mode: str, limit: int = 10) -> Any:
                return await self.engine.search(user.id, query, limit, mode=mode, group=self.group)

            async def turn(session_id: str, said: str, answer: str, names: Any) -> Any:
                return await self.engine.record_turn(
                    user.id, session_id, said, answer, user_name=names[0], assistant_name=names[1]
                )

            return store, search, turn
        key = (await self.engine.create_api_key(user.id, name="locomo")).key
        client = AsyncHalldyllClient(self.base_url, key, timeout=120)
        self.clients.append(client)

        async def store_http(memory: Any) -> Any:
            return await client.store_memory(memory)

        async def search_http(query: str, mode: str, limit: int = 10) -> Any:
            return await client.search(query, limit=limit, mode=mode, group=self.group)

        async def turn_http(session_id: str, said: str, answer: str, names: Any) -> Any:
            return await client.record_turn(
                session_id, said, answer, user_name=names[0], assistant_name=names[1]
            )

        return store_http, search_http, turn_http

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


async def _measure(door: _Door, samples: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for layout in args.layouts:
        started = time.perf_counter()
        users = []
        turns = 0
        for sample in samples:
            store, search, turn = await door.user()
            where, n = await _ingest(store, turn, sample, layout)
            users.append((search, where))
            turns += n
        ingest_s = time.perf_counter() - started
        for mode in args.modes:
            per_category: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
            deep: list[tuple[float, float]] = []  # recall@20 and @depth (--depth)
            latencies = []
            for sample, (search, where) in zip(samples, users, strict=True):
                for qa in sample["qa"]:
                    if qa["category"] == 5 or not qa.get("evidence"):
                        continue
                    t0 = time.perf_counter()
                    hits = await search(qa["question"], mode)
                    latencies.append((time.perf_counter() - t0) * 1000)
                    found = [
                        where.get((h.memory.id, h.matched.index), "")
                        for h in hits
                        if h.matched.part == "message"
                    ]
                    evidence = set(qa["evidence"])
                    if args.depth:  # untimed: how much evidence the first candidates hold
                        more = [
                            where.get((h.memory.id, h.matched.index), "")
                            for h in await search(qa["question"], mode, args.depth)
                            if h.matched.part == "message"
                        ]
                        deep.append((_recall(evidence, more, 20), _recall(evidence, more, 10**6)))
                    per_category[qa["category"]].append(
                        (
                            _recall(evidence, found, 5),
                            _recall(evidence, found, 10),
                            float(bool(evidence & set(found[:10]))),
                        )
                    )
            rows = [row for rows in per_category.values() for row in rows]
            name = f"{args.via}/{layout}/{mode}/{args.group}"
            results[name] = {
                "questions": len(rows),
                "recall@5": round(statistics.fmean(r[0] for r in rows), 3),
                "recall@10": round(statistics.fmean(r[1] for r in rows), 3),
                "any_hit@10": round(statistics.fmean(r[2] for r in rows), 3),
                "by_category_recall@10": {
                    str(c): round(statistics.fmean(r[1] for r in per_category[c]), 3)
                    for c in sorted(per_category)
                },
                "search_p50_ms": round(statistics.median(latencies), 2),
                "search_p95_ms": round(statistics.quantiles(latencies, n=20)[-1], 2),
                "ingest_turns_per_s": round(turns / ingest_s, 1),
            }
            if deep:
                results[name]["recall@20"] = round(statistics.fmean(d[0] for d in deep), 3)
                results[name][f"recall@{args.depth}"] = round(
                    statistics.fmean(d[1] for d in deep), 3
                )
            print(f"{name}: {results[name]}", flush=True)
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from halldyll_ray import MemoryEngine, Settings
    from halldyll_ray.storage.embedded import EmbeddedPostgres
    from halldyll_ray.storage.migrate import apply_migrations

    samples = json.loads(args.data.read_text())
    if args.samples:
        samples = [s for s in samples if s.get("sample_id") in args.samples]
    with tempfile.TemporaryDirectory(prefix="hr-locomo-") as tmp:
        server = EmbeddedPostgres(Path(tmp), database="locomo")
        try:
            url = await server.start_async()
            # the dimension of the configured model (EMBEDDING_MODEL / EMBEDDING_DIMENSION),
            # so that another encoder is measured the same way
            dimension = Settings.from_env(database_url=url, redis_url=None).embedding_dimension
            await apply_migrations(url, embedding_dimension=dimension)
            base_url = None
            if args.via == "http":
                # the served application on the same database (sibling script's Serve start),
                # in the product's Serve environment, which Ray reads at import
                from serve_http import _start_serve

                from halldyll_ray import serve_env

                serve_env.apply()

                base_url, _ = _start_serve({"DATABASE_URL": url, "SEARCH_CACHE_TTL_SECONDS": "0"})
            settings = Settings.from_env(
                database_url=url, redis_url=None, search_cache_ttl_seconds=0
            )
            async with MemoryEngine(settings) as engine:
                door = _Door(engine, base_url, args.group)
                try:
                    return await _measure(door, samples, args)
                finally:
                    await door.close()
        finally:
            if args.via == "http":
                import ray
                from ray import serve

                serve.shutdown()
                ray.shutdown()
            server.stop()


def write_results(
    out: Path, script: str, payload: dict[str, Any], title: str, table: list[str]
) -> None:
    """Write ``out`` (JSON: ``payload`` plus the date, the machine and the exact command) and
    ``out`` with ``.md`` (``title``, the same facts, the Markdown ``table`` lines); print the
    Markdown. Shared by the benchmarks over the LoCoMo data (``fulltext_scale.py`` too)."""
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": f"python benchmarks/{script} " + shlex.join(sys.argv[1:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **payload}, indent=2) + "\n")
    lines = [
        f"# {title} ({meta['date']})",
        "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`.",
        "",
        *table,
    ]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layouts", nargs="+", choices=["session", "turn", "agent"], default=["session", "turn"]
    )
    parser.add_argument("--modes", nargs="+", default=["semantic", "hybrid", "fulltext"])
    parser.add_argument("--group", choices=["part", "memory"], default="part")
    parser.add_argument(
        "--via",
        choices=["inprocess", "http"],
        default="inprocess",
        help="the in-process engine, or the HTTP API of the served app (Ray Serve, started here)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=0,
        help="also search each question (untimed) for this many results and report recall@20 "
        "and recall@depth: the most a reranker of that many first-stage candidates could "
        "reach (0: skip; at most 100)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DATA,
        help="a LoCoMo JSON file (a list of samples, as locomo10.json): the development split "
        "by default; the held-out conversations are measured the same way with their file",
    )
    parser.add_argument(
        "--samples", nargs="+", default=None, help="only these sample_ids (e.g. conv-47)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "locomo.json")
    args = parser.parse_args()
    if not 0 <= args.depth <= 100:
        parser.error("--depth must be between 0 and 100")
    if not args.data.exists():
        print(f"{args.data} is missing (the shared development split)", file=sys.stderr)
        return 2
    found = {s.get("sample_id") for s in json.loads(args.data.read_text())}
    if args.samples and not set(args.samples) <= found:
        parser.error(f"--samples: not in {args.data}: {sorted(set(args.samples) - found)}")
    results = asyncio.run(run(args))
    rows = []
    for name, r in results.items():
        cats = " / ".join(str(v) for v in r["by_category_recall@10"].values())
        rows.append(
            f"| {name} | {r['questions']} | {r['recall@5']} | {r['recall@10']} | "
            f"{r['any_hit@10']} | {cats} | {r['search_p50_ms']} / {r['search_p95_ms']} | "
            f"{r['ingest_turns_per_s']} |"
        )
    if args.depth:
        rows += [
            "",
            f"| via/layout/mode/group | recall@20 | recall@{args.depth} |",
            "| --- | ---: | ---: |",
        ]
        rows += [
            f"| {name} | {r['recall@20']} | {r[f'recall@{args.depth}']} |"
            for name, r in results.items()
        ]
    write_results(
        args.out,
        "locomo.py",
        {"results": results},
        "LoCoMo development split, evidence recall",
        [
            "| via/layout/mode/group | questions | recall@5 | recall@10 | any-hit@10 "
            "| cat 1 / 2 / 3 / 4 @10 | search p50 / p95 ms | ingest turns/s |",
            "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
            *rows,
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
