"""ONNX Runtime's CPU memory arena on the embedding session: resident memory and throughput.

What it measures
    The default encoder (all-MiniLM-L6-v2 int8, ``OnnxEncoder.load``) with
    ``SessionOptions.enable_cpu_mem_arena`` on (ONNX Runtime's default) and off, each in a
    process of its own so that its RSS is its own, the two alternated ``--rounds`` times. In
    each process: RSS after the imports, after loading, and after encoding

    * the per-turn texts of the LoCoMo development split, all at once (``encode`` buckets
      them by length into calls of at most 32: what a bulk store embeds), ``--runs`` times;
    * the same turns session by session (one ``encode`` call per session: calls of many
      different shapes, what single stores of whole sessions embed).

    Throughput is texts per second, the median of the runs; RSS is read with psutil. Printed
    as a Markdown table and written to ``benchmarks/results/encoder_arena.json`` and ``.md``.

Run from the repository root (about 3 minutes on 2 cores)::

    flock /tmp/halldyll-ray.lock .venv/bin/python benchmarks/encoder_arena.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from locomo import DATA, _memories, write_results

RESULTS = Path(__file__).resolve().parent / "results"
#: The label date of a turn whose session has none (none in the development split has).
SAID = datetime(2023, 1, 1, tzinfo=UTC)


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def worker(arena: bool, conversations: int, runs: int) -> dict[str, Any]:
    """One configuration in this process: load, encode, measure."""
    from halldyll_ray.components.base import Chunk, message_label
    from halldyll_ray.embedding import OnnxEncoder
    from halldyll_ray.models import Conversation

    samples = json.loads(DATA.read_text())[:conversations]
    sessions: list[list[str]] = []
    for sample in samples:
        for memory, _ in _memories(sample, "session"):
            assert isinstance(memory, Conversation)
            sessions.append(
                [
                    Chunk(
                        "message", 0, 0, m.content, message_label(m.name, m.created_at or SAID)
                    ).indexed
                    for m in memory.messages
                ]
            )
    texts = [text for session in sessions for text in session]
    base = _rss_mb()
    encoder = OnnxEncoder.load(cpu_mem_arena=arena)
    loaded = _rss_mb()
    bulk = []
    for _ in range(runs):
        started = time.perf_counter()
        encoder.encode(texts)
        bulk.append(len(texts) / (time.perf_counter() - started))
    after_bulk = _rss_mb()
    per_session = []
    for _ in range(runs):
        started = time.perf_counter()
        for session in sessions:
            encoder.encode(session)
        per_session.append(len(texts) / (time.perf_counter() - started))
    return {
        "arena": arena,
        "texts": len(texts),
        "sessions": len(sessions),
        "rss_base_mb": round(base, 1),
        "rss_loaded_mb": round(loaded, 1),
        "rss_after_bulk_mb": round(after_bulk, 1),
        "rss_after_sessions_mb": round(_rss_mb(), 1),
        "bulk_texts_per_s": round(statistics.median(bulk), 1),
        "sessions_texts_per_s": round(statistics.median(per_session), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternated processes per setting")
    parser.add_argument("--runs", type=int, default=3, help="encodes per process (median)")
    parser.add_argument("--conversations", type=int, default=2, help="first N of the split")
    parser.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "encoder_arena.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker == "on", args.conversations, args.runs)))
        return 0
    if not DATA.exists():
        print(f"{DATA} is missing (the shared development split)", file=sys.stderr)
        return 2
    found: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for _ in range(args.rounds):
        for setting in ("on", "off"):
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    setting,
                    "--runs",
                    str(args.runs),
                    "--conversations",
                    str(args.conversations),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            found[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(setting, found[setting][-1], flush=True)

    def median(setting: str, key: str) -> float:
        return round(statistics.median(r[key] for r in found[setting]), 1)

    rows = []
    for label, key in [
        ("RSS after loading (MB)", "rss_loaded_mb"),
        ("RSS after the bulk encodes (MB)", "rss_after_bulk_mb"),
        ("RSS after the per-session encodes (MB)", "rss_after_sessions_mb"),
        ("bulk encode (texts/s)", "bulk_texts_per_s"),
        ("per-session encodes (texts/s)", "sessions_texts_per_s"),
    ]:
        rows.append(f"| {label} | {median('on', key)} | {median('off', key)} |")
    grown = {
        s: round(
            statistics.median(r["rss_after_sessions_mb"] - r["rss_loaded_mb"] for r in found[s]), 1
        )
        for s in found
    }
    rows.append(f"| RSS grown by encoding (MB) | {grown['on']} | {grown['off']} |")
    first = found["on"][0]
    write_results(
        args.out,
        "encoder_arena.py",
        {"rounds": found, "rss_grown_by_encoding_mb": grown},
        f"ONNX Runtime CPU memory arena, MiniLM, {first['texts']} LoCoMo turns "
        f"({first['sessions']} sessions)",
        [
            "| medians over processes | arena on (ONNX Runtime default) | arena off |",
            "| --- | ---: | ---: |",
            *rows,
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
