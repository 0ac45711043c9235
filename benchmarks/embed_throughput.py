"""Embedding throughput of the default ONNX encoder.

Measures sentences per second for short chat texts and ~200-token texts at batch sizes 1, 8
and 32, and for a mixed-length set batched in input order versus sorted by token length
(what ``OnnxEncoder.encode`` does). Prints a table and writes
``benchmarks/results/embed_throughput.json``. Each figure is the median of several timed runs
after one warm-up run. Run from the repository root::

    python benchmarks/embed_throughput.py [--runs 5] [--provider auto]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from halldyll_ray.embedding import OnnxEncoder

RESULTS = Path(__file__).resolve().parent / "results" / "embed_throughput.json"

_CHAT = [
    "hi, how are you today?",
    "can you remind me what we said about the budget",
    "ok thanks!",
    "what's the weather like in Oslo tomorrow?",
    "please book a table for two at eight",
    "I prefer tea over coffee",
    "lol that's hilarious",
    "my sister's birthday is on the 12th of May",
    "send the report to Anna before Friday",
    "where did I park the car?",
]

# Kept as one string (then split) so the vocabulary reads as prose, not a 90-item list.
_WORD_TEXT = (
    "memory agent user model search context budget token vector index database cache session "
    "summary fact image prompt seed guidance transcription language audio segment replica "
    "cluster request latency throughput query result score ranking recency salience weight "
    "the a of to and in that is for on with as it by at from this be are was have has not "
    "which will can would should about into after before while during between through under "
    "quickly slowly carefully often rarely never always new old large small important recent"
)
_WORDS = _WORD_TEXT.split()


def _paragraph(rng: random.Random, words: int) -> str:
    sentences: list[str] = []
    left = words
    while left > 0:
        n = min(left, rng.randint(8, 18))
        sentence = " ".join(rng.choice(_WORDS) for _ in range(n))
        sentences.append(sentence.capitalize() + ".")
        left -= n
    return " ".join(sentences)


def _median_rate(fn: Callable[[], None], count: int, runs: int) -> float:
    fn()  # warm-up: first calls pay for allocator growth and thread-pool start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


def _in_chunks(encoder: OnnxEncoder, texts: Sequence[str], size: int) -> Callable[[], None]:
    """Encode ``texts`` in input-order chunks of ``size`` (no reordering across chunks)."""

    def run() -> None:
        for start in range(0, len(texts), size):
            encoder.encode(texts[start : start + size])

    return run


def _padded_tokens(lengths: Sequence[int], size: int) -> tuple[int, int]:
    """Return (real tokens, padded tokens) when ``lengths`` are batched in order by ``size``."""
    real = padded = 0
    for start in range(0, len(lengths), size):
        chunk = lengths[start : start + size]
        real += sum(chunk)
        padded += max(chunk) * len(chunk) - sum(chunk)
    return real, padded


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__,
    }


def main() -> None:
    """Run the benchmark, print the table, write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure (median)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args()

    # Recorded because other processes on a small machine skew every figure.
    load_before = os.getloadavg()
    encoder = OnnxEncoder.load(provider=args.provider, batch_size=32)
    rng = random.Random(1234)
    short = [_CHAT[i % len(_CHAT)] + f" #{i}" for i in range(256)]
    long = [_paragraph(rng, 160) for _ in range(64)]
    # Mixed lengths from one word to past truncation, shuffled as real ingestion traffic is.
    mixed = [_paragraph(rng, rng.choice([2, 5, 10, 20, 40, 80, 160, 240])) for _ in range(128)]
    rng.shuffle(mixed)

    def tokens(texts: Sequence[str]) -> list[int]:
        # Model tokens per text: [CLS] + text + [SEP], cut at max_seq_length.
        return [min(n + 2, encoder.max_seq_length) for n in encoder.count_tokens_batch(texts)]

    rows: list[dict[str, Any]] = []
    for name, texts in (("short chat", short), ("~200 tokens", long)):
        mean_tokens = statistics.mean(tokens(texts))
        for size in (1, 8, 32):
            rate = _median_rate(_in_chunks(encoder, texts, size), len(texts), args.runs)
            rows.append(
                {
                    "set": name,
                    "texts": len(texts),
                    "mean_tokens": round(mean_tokens, 1),
                    "batch_size": size,
                    "order": "input",
                    "sentences_per_s": round(rate, 1),
                }
            )

    mixed_lengths = tokens(mixed)
    real, unsorted_pad = _padded_tokens(mixed_lengths, 32)
    _, sorted_pad = _padded_tokens(sorted(mixed_lengths), 32)

    def encode_sorted() -> None:
        encoder.encode(mixed)  # sorts by length internally

    for order, pad, fn in (
        ("input (unsorted)", unsorted_pad, _in_chunks(encoder, mixed, 32)),
        ("sorted by length", sorted_pad, encode_sorted),
    ):
        rate = _median_rate(fn, len(mixed), args.runs)
        rows.append(
            {
                "set": "mixed lengths",
                "texts": len(mixed),
                "mean_tokens": round(statistics.mean(mixed_lengths), 1),
                "batch_size": 32,
                "order": order,
                "real_tokens": real,
                "padded_tokens": pad,
                "sentences_per_s": round(rate, 1),
            }
        )

    header = f"{'set':<14}{'texts':>6}{'tokens':>8}{'batch':>6}  {'order':<17}{'pad tok':>8}"
    print(f"{header}{'sent/s':>9}")
    for r in rows:
        pad_text = str(r.get("padded_tokens", ""))
        print(
            f"{r['set']:<14}{r['texts']:>6}{r['mean_tokens']:>8}{r['batch_size']:>6}  "
            f"{r['order']:<17}{pad_text:>8}{r['sentences_per_s']:>9}"
        )

    result = {
        "benchmark": "embed_throughput",
        "model_id": encoder.model_id,
        "provider": encoder.provider,
        "max_seq_length": encoder.max_seq_length,
        "runs": args.runs,
        "statistic": "median sentences per second over runs, after one warm-up",
        "machine": _machine(),
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
