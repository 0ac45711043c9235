"""What an embedding model costs on this machine: encode time per text and memory (issue 16).

What it measures
    For each ``--models`` entry (``minilm``: the packaged int8 all-MiniLM-L6-v2; or
    ``NAME=PATH:DIMENSION``: a folder with ``model.onnx`` and ``tokenizer.json``, as
    ``EMBEDDING_MODEL_PATH`` takes, e.g. what ``benchmarks/build_mpnet_onnx.py`` writes), in a
    process of its own (``OnnxEncoder.load`` with the product's defaults: CPU, batch 32,
    length bucketing, 256 tokens at most):

    * one text a call: the first ``--queries`` LoCoMo development questions, one
      ``encode([question])`` each (what a search embeds), p50 and p95 ms;
    * batched: every turn of the first two LoCoMo development conversations, as the engine
      indexes a message (``"<speaker> <date>: <text>"``), in one ``encode`` call (the encoder
      groups them into calls of at most 32), texts per second;
    * the process's peak resident memory (``ru_maxrss``) after both, MB.

    Processes alternate over ``--rounds``; each figure is the median of its rounds. Printed as
    Markdown and written to ``benchmarks/results/encoder_candidates.json`` and ``.md``.

Run from the repository root (about 2 minutes for MiniLM and an int8 and an fp32 mpnet)::

    python benchmarks/encoder_candidates.py \
        --models minilm mpnet-int8=/tmp/mpnet/int8:768 mpnet-fp32=/tmp/mpnet/fp32:768
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from locomo import DATA, _sessions, _turn_text, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def _texts(queries: int) -> tuple[list[str], list[str]]:
    """(questions, indexed turns) from the development split."""
    from halldyll_ray.components.base import message_label

    samples = json.loads(DATA.read_text())
    questions = [qa["question"] for s in samples for qa in s["qa"] if qa["category"] != 5]
    turns = []
    for sample in samples[:2]:
        for _, when, session in _sessions(sample["conversation"]):
            for turn in session:
                label = message_label(turn["speaker"], when) if when else turn["speaker"]
                turns.append(f"{label}: {_turn_text(turn)}")
    return questions[:queries], turns


def _worker(spec: str, queries: int) -> dict[str, Any]:
    """Load one model and measure it; the result as JSON on stdout."""
    from halldyll_ray.embedding import OnnxEncoder

    name, _, where = spec.partition("=")
    if where:
        path, _, dimension = where.rpartition(":")
        encoder = OnnxEncoder.load(path, dimension=int(dimension))
    else:
        encoder = OnnxEncoder.load(None)
    questions, turns = _texts(queries)
    encoder.encode(questions[:8])  # warm-up: thread pool and allocator
    single = []
    for question in questions:
        start = time.perf_counter()
        encoder.encode([question])
        single.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    encoder.encode(turns)
    batched = len(turns) / (time.perf_counter() - start)
    single.sort()
    return {
        "model": name,
        "model_id": encoder.model_id,
        "dimension": encoder.dimension,
        "one_text_p50_ms": round(statistics.median(single), 2),
        "one_text_p95_ms": round(single[int(0.95 * (len(single) - 1))], 2),
        "batched_texts_per_s": round(batched, 1),
        "turns": len(turns),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm"])
    parser.add_argument("--queries", type=int, default=200, help="questions embedded one a call")
    parser.add_argument("--rounds", type=int, default=2, help="alternated processes per model")
    parser.add_argument("--out", type=Path, default=RESULTS / "encoder_candidates.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.queries)))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {spec: [] for spec in args.models}
    for _ in range(args.rounds):
        for spec in args.models:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", spec, "--queries", str(args.queries)],
                check=True,
                capture_output=True,
                text=True,
            )
            runs[spec].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = {}
    for results in runs.values():
        first = results[0]
        rows[first["model"]] = {
            **{k: first[k] for k in ("model_id", "dimension", "turns")},
            **{
                key: round(statistics.median(r[key] for r in results), 1)
                for key in (
                    "one_text_p50_ms",
                    "one_text_p95_ms",
                    "batched_texts_per_s",
                    "peak_rss_mb",
                )
            },
        }
    table = [
        "| model | dim | one text p50 / p95 ms | batched texts/s | peak RSS MB |",
        "| --- | ---: | --- | ---: | ---: |",
        *(
            f"| {name} | {r['dimension']} | {r['one_text_p50_ms']} / {r['one_text_p95_ms']} | "
            f"{r['batched_texts_per_s']} | {r['peak_rss_mb']} |"
            for name, r in rows.items()
        ),
    ]
    write_results(
        args.out,
        "encoder_candidates.py",
        {"models": rows, "rounds": args.rounds, "queries": args.queries},
        "Embedding model cost on this machine",
        table,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
