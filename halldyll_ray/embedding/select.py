"""Choosing the text encoder: ``EMBEDDING_MODEL`` (a packaged model by name) or
``EMBEDDING_MODEL_PATH`` (an ONNX model of your own), loaded by one function.

This module never imports Ray and never reads settings: callers pass the values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from halldyll_ray.embedding.encoder import OnnxEncoder, Provider
from halldyll_ray.embedding.use_multilingual import UseMultilingualEncoder
from halldyll_ray.errors import ConfigurationError

__all__ = ["EMBEDDING_MODELS", "EmbeddingModelName", "LoadedEncoder", "load_encoder"]

#: Packaged models ``EMBEDDING_MODEL`` names.
EmbeddingModelName = Literal["minilm", "use-multilingual"]
EMBEDDING_MODELS: tuple[str, ...] = get_args(EmbeddingModelName)

#: What :func:`load_encoder` returns: a :class:`~halldyll_ray.embedding.encoder.TextEncoder`
#: that also says its provider, batch size and truncation.
LoadedEncoder = OnnxEncoder | UseMultilingualEncoder


def load_encoder(
    model: str,
    path: str | Path | None = None,
    *,
    dimension: int,
    provider: Provider = "auto",
    batch_size: int = 32,
    max_seq_length: int = 256,
    intra_op_threads: int | None = None,
    cpu_mem_arena: bool = True,
) -> LoadedEncoder:
    """Load the encoder a configuration names.

    Args:
        model: ``EMBEDDING_MODEL``: ``"minilm"`` (the packaged all-MiniLM-L6-v2, or the ONNX
            model at ``path``) or ``"use-multilingual"``
            (:class:`~halldyll_ray.embedding.use_multilingual.UseMultilingualEncoder`).
        path: ``EMBEDDING_MODEL_PATH``; only with ``"minilm"``.
        dimension: ``EMBEDDING_DIMENSION``, checked against the model's output.
        provider: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        batch_size: Texts per model call.
        max_seq_length: Truncation in tokens, special tokens included.
        intra_op_threads: onnxruntime threads per call; ``None`` keeps its default.
        cpu_mem_arena: ``EMBEDDING_CPU_MEM_ARENA``: ONNX Runtime's CPU memory arena.

    Returns:
        The loaded encoder.

    Raises:
        ConfigurationError: An unknown model name, a path given with a packaged model other
            than minilm, or any error of the model's own ``load``.
    """
    if model == "minilm":
        return OnnxEncoder.load(
            path,
            dimension=dimension,
            provider=provider,
            max_seq_length=max_seq_length,
            batch_size=batch_size,
            intra_op_threads=intra_op_threads,
            cpu_mem_arena=cpu_mem_arena,
        )
    if model == "use-multilingual":
        if path is not None:
            raise ConfigurationError(
                "EMBEDDING_MODEL=use-multilingual and EMBEDDING_MODEL_PATH name two models; "
                "unset one of them.",
                setting="EMBEDDING_MODEL_PATH",
            )
        return UseMultilingualEncoder.load(
            dimension=dimension,
            provider=provider,
            max_seq_length=max_seq_length,
            batch_size=batch_size,
            intra_op_threads=intra_op_threads,
            cpu_mem_arena=cpu_mem_arena,
        )
    raise ConfigurationError(
        f"Unknown EMBEDDING_MODEL {model!r}; use one of {', '.join(EMBEDDING_MODELS)}.",
        setting="EMBEDDING_MODEL",
    )
