"""LoCoMo evidence recall through the public Python API (in-process ``MemoryEngine``).

What it measures
    The development split in ``../shared/bench/locomo/locomo-dev.json`` (6 conversations, the
    questions of categories 1-4; category 5 has no answer in the conversation). Each
    conversation goes to a user of its own, in one of two layouts:

    * ``session``: one Conversation per session, one message per turn (``name`` = the
      speaker, the turn's text as the content), as an agent imports history;
    * ``turn``: one Conversation memory per turn (a single message).

    Then every question is searched (``limit`` 10) in each ``--modes`` (semantic, hybrid,
    fulltext). A hit is mapped back to turns by the matched part: the message's sequence
    number in its conversation. Evidence recall@k is the share of a question's evidence turns
    among the turns of the first k hits, averaged over questions; any-hit@10 is the share of
    questions with at least one evidence turn in the first 10. Nothing here reads the answers.

    Printed as a Markdown table and written to ``benchmarks/results/locomo.json`` and ``.md``
    with the machine, the date and the exact command.

Run from the repository root (about 3 minutes on 2 cores, embedded PostgreSQL, no Redis)::

    .venv/bin/python benchmarks/locomo.py [--layouts session turn] \
        [--modes semantic hybrid fulltext]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def _ingest(engine: Any, sample: dict[str, Any], layout: str) -> tuple[Any, dict, int]:
    """Store one conversation; return (user, {(memory_id, seq): dia_id}, turns stored)."""
    from halldyll_ray import Conversation, Message

    conversation = sample["conversation"]
    speaker_a = conversation["speaker_a"]
    user = await engine.create_user(f"locomo{uuid.uuid4().hex[:8]}", None, "user")
    where: dict[tuple[Any, int], str] = {}
    turns = 0
    for name, when, session in _sessions(conversation):
        messages = [
            Message(
                role="user" if turn["speaker"] == speaker_a else "assistant",
                name=turn["speaker"],
                content=turn["text"] or "(a photo)",
                created_at=when,
            )
            for turn in session
        ]
        if layout == "session":
            stored = await engine.store_memory(
                user.id, Conversation(title=name.replace("_", " "), messages=messages)
            )
            for seq, turn in enumerate(session):
                where[(stored.id, seq)] = turn["dia_id"]
        else:
            for message, turn in zip(messages, session, strict=True):
                stored = await engine.store_memory(user.id, Conversation(messages=[message]))
                where[(stored.id, 0)] = turn["dia_id"]
        turns += len(session)
    return user, where, turns


def _recall(evidence: set[str], found: list[str], k: int) -> float:
    return len(evidence & set(found[:k])) / len(evidence)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from halldyll_ray import MemoryEngine, Settings

    samples = json.loads(DATA.read_text())
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hr-locomo-") as tmp:
        settings = Settings.from_env(
            database_url=None, redis_url=None, data_dir=Path(tmp), search_cache_ttl_seconds=0
        )
        async with MemoryEngine(settings) as engine:
            for layout in args.layouts:
                started = time.perf_counter()
                stored = [await _ingest(engine, sample, layout) for sample in samples]
                ingest_s = time.perf_counter() - started
                turns = sum(n for _, _, n in stored)
                for mode in args.modes:
                    per_category: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
                    latencies = []
                    for sample, (user, where, _) in zip(samples, stored, strict=True):
                        for qa in sample["qa"]:
                            if qa["category"] == 5 or not qa.get("evidence"):
                                continue
                            t0 = time.perf_counter()
                            hits = await engine.search(
                                user.id, qa["question"], 10, mode=mode, group=args.group
                            )
                            latencies.append((time.perf_counter() - t0) * 1000)
                            found = [
                                where.get((h.memory.id, h.matched.index), "")
                                for h in hits
                                if h.matched.part == "message"
                            ]
                            evidence = set(qa["evidence"])
                            per_category[qa["category"]].append(
                                (
                                    _recall(evidence, found, 5),
                                    _recall(evidence, found, 10),
                                    float(bool(evidence & set(found[:10]))),
                                )
                            )
                    rows = [row for rows in per_category.values() for row in rows]
                    results[f"{layout}/{mode}/{args.group}"] = {
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
                    name = f"{layout}/{mode}/{args.group}"
                    print(f"{name}: {results[name]}", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["session", "turn"])
    parser.add_argument("--modes", nargs="+", default=["semantic", "hybrid", "fulltext"])
    parser.add_argument("--group", choices=["part", "memory"], default="part")
    parser.add_argument("--out", type=Path, default=RESULTS / "locomo.json")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"{DATA} is missing (the shared development split)", file=sys.stderr)
        return 2
    results = asyncio.run(run(args))
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{__import__('os').cpu_count()} CPUs, Python {platform.python_version()}",
        "command": "python benchmarks/locomo.py " + shlex.join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        f"# LoCoMo development split, evidence recall ({meta['date']})",
        "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`.",
        "",
        "| layout/mode/group | questions | recall@5 | recall@10 | any-hit@10 "
        "| cat 1 / 2 / 3 / 4 @10 | search p50 / p95 ms | ingest turns/s |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for name, r in results.items():
        cats = " / ".join(str(v) for v in r["by_category_recall@10"].values())
        lines.append(
            f"| {name} | {r['questions']} | {r['recall@5']} | {r['recall@10']} | "
            f"{r['any_hit@10']} | {cats} | {r['search_p50_ms']} / {r['search_p95_ms']} | "
            f"{r['ingest_turns_per_s']} |"
        )
    table = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
