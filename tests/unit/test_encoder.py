"""The ONNX encoder against sentence-transformers' reference vectors, and its contracts."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from halldyll_ray.embedding import OnnxEncoder, TextEncoder, default_model_files
from halldyll_ray.embedding.encoder import CPU_CALL_OVERHEAD_TOKENS, plan_batches
from halldyll_ray.errors import ConfigurationError

REFERENCE = Path(__file__).resolve().parent.parent / "data" / "minilm_reference.json"


@pytest.fixture(scope="module")
def encoder() -> Iterator[OnnxEncoder]:
    yield OnnxEncoder.load(provider="cpu")


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    data: dict[str, object] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the default model (symlinked) and tokenizer.json (copied)."""
    folder = tmp_path_factory.mktemp("model")
    model, tokenizer = default_model_files()
    (folder / "model.onnx").symlink_to(model)
    shutil.copy(tokenizer, folder / "tokenizer.json")
    return folder


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def test_matches_sentence_transformers_on_every_text(
    encoder: OnnxEncoder, reference: dict[str, object]
) -> None:
    texts = reference["texts"]
    assert isinstance(texts, list)
    expected = np.asarray(reference["vectors"], dtype=np.float32)

    cosines = _cosines(encoder.encode(texts), expected)

    worst = int(np.argmin(cosines))
    print(f"min cosine vs sentence-transformers: {cosines[worst]:.5f} on {texts[worst]!r:.60}")
    assert cosines.min() >= 0.99, texts[worst]


def test_reference_exercises_truncation(encoder: OnnxEncoder, reference: dict[str, object]) -> None:
    # Without texts over max_seq_length the fidelity test would not catch a wrong truncation.
    texts = reference["texts"]
    assert isinstance(texts, list)
    counts = encoder.count_tokens_batch(texts)
    assert sum(c + 2 > encoder.max_seq_length for c in counts) >= 2


def test_shape_dtype_and_unit_norm(encoder: OnnxEncoder) -> None:
    vectors = encoder.encode(["one", "two words", ""])

    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_input_gives_empty_matrix(encoder: OnnxEncoder) -> None:
    vectors = encoder.encode([])

    assert vectors.shape == (0, 384)
    assert vectors.dtype == np.float32


def test_single_string_is_rejected(encoder: OnnxEncoder) -> None:
    with pytest.raises(TypeError):
        encoder.encode("not a list")


def test_attributes(encoder: OnnxEncoder) -> None:
    assert isinstance(encoder, TextEncoder)
    assert encoder.dimension == 384
    assert encoder.provider == "cpu"
    assert encoder.max_seq_length == 256
    assert encoder.model_id == "onnx:8199be6f699a395f:256"
    assert encoder.call_overhead_tokens == CPU_CALL_OVERHEAD_TOKENS


def test_mixed_length_batch_keeps_input_order_and_matches_one_by_one(
    encoder: OnnxEncoder, reference: dict[str, object]
) -> None:
    texts = reference["texts"]
    assert isinstance(texts, list)
    expected = np.asarray(reference["vectors"], dtype=np.float32)
    # A fixed shuffle mixes long and short texts, so sorting by length reorders them heavily.
    order = np.random.default_rng(7).permutation(len(texts))
    mixed = [texts[i] for i in order]

    batched = encoder.encode(mixed)
    one_by_one = np.vstack([encoder.encode([t]) for t in mixed])

    assert _cosines(batched, expected[order]).min() >= 0.99
    assert _cosines(batched, one_by_one).min() > 0.9999


def test_length_bucketing_gives_the_vectors_of_plain_batches(
    model_copy: Path, encoder: OnnxEncoder, reference: dict[str, object]
) -> None:
    texts = reference["texts"]
    assert isinstance(texts, list)
    order = np.random.default_rng(11).permutation(len(texts))
    mixed = [texts[i] for i in order] * 2
    plain = OnnxEncoder.load(model_copy, provider="cpu", call_overhead_tokens=None)
    finest = OnnxEncoder.load(model_copy, provider="cpu", call_overhead_tokens=0)
    lengths = sorted(len(e.ids) for e in encoder._embed_tokenizer.encode_batch(mixed))
    # The default cuts these texts into more calls than plain batches do, and 0 into more
    # still: otherwise the comparison below would compare a plan with itself.
    calls = [
        len(plan_batches(lengths, max_batch=32, call_overhead_tokens=overhead))
        for overhead in (None, CPU_CALL_OVERHEAD_TOKENS, 0)
    ]
    assert calls[0] < calls[1] < calls[2]

    expected = plain.encode(mixed)

    np.testing.assert_allclose(encoder.encode(mixed), expected, atol=1e-5)
    np.testing.assert_allclose(finest.encode(mixed), expected, atol=1e-5)


def _brute_force_cost(lengths: list[int], max_batch: int, overhead: float) -> float:
    """The least cost over every way of cutting ``lengths`` into consecutive calls."""
    best = [0.0] + [float("inf")] * len(lengths)
    for end in range(1, len(lengths) + 1):
        for start in range(max(0, end - max_batch), end):
            cost = best[start] + overhead + (end - start) * max(lengths[start:end])
            best[end] = min(best[end], cost)
    return best[-1]


def _plan_cost(plan: list[tuple[int, int]], lengths: list[int], overhead: float) -> float:
    return sum(overhead + (end - start) * lengths[end - 1] for start, end in plan)


@pytest.mark.parametrize("seed", range(20))
def test_plan_batches_finds_the_cheapest_plan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = sorted(int(x) for x in rng.integers(3, 130, size=int(rng.integers(1, 40))))
    max_batch = int(rng.integers(1, 9))
    overhead = float(rng.choice([0.0, 8.0, 32.0, 500.0]))

    plan = plan_batches(lengths, max_batch=max_batch, call_overhead_tokens=overhead)

    assert plan[0][0] == 0 and plan[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))
    assert all(0 < end - start <= max_batch for start, end in plan)
    assert _plan_cost(plan, lengths, overhead) == pytest.approx(
        _brute_force_cost(lengths, max_batch, overhead)
    )


def test_plan_batches_separates_short_from_long_texts() -> None:
    lengths = [12] * 16 + [120] * 16

    assert plan_batches(lengths, max_batch=32, call_overhead_tokens=32) == [(0, 16), (16, 32)]
    # When a call costs more than the padding it saves, one call.
    assert plan_batches(lengths, max_batch=32, call_overhead_tokens=5000) == [(0, 32)]
    # None: runs of max_batch whatever the lengths.
    assert plan_batches(lengths, max_batch=10, call_overhead_tokens=None) == [
        (0, 10),
        (10, 20),
        (20, 30),
        (30, 32),
    ]
    assert plan_batches([], max_batch=4, call_overhead_tokens=32) == []


def test_plan_batches_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ascending"):
        plan_batches([5, 3], max_batch=4, call_overhead_tokens=32)
    with pytest.raises(ValueError, match="max_batch"):
        plan_batches([3], max_batch=0, call_overhead_tokens=32)
    with pytest.raises(ValueError, match="call_overhead_tokens"):
        plan_batches([3], max_batch=4, call_overhead_tokens=-1)


@pytest.mark.parametrize("bad", [-1, "fast", float("nan"), True])
def test_load_refuses_a_bad_call_overhead(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="call_overhead_tokens"):
        OnnxEncoder.load(provider="cpu", call_overhead_tokens=bad)  # type: ignore[arg-type]


def test_duplicates_and_small_batch_size(model_copy: Path, encoder: OnnxEncoder) -> None:
    small = OnnxEncoder.load(model_copy, batch_size=3, provider="cpu")
    texts = ["short", "a much longer sentence about the weather in Bergen", "short", "x"] * 3

    assert _cosines(small.encode(texts), encoder.encode(texts)).min() > 0.9999


def test_concurrent_calls_agree(encoder: OnnxEncoder) -> None:
    texts = [f"memory number {i} about topic {i % 7}" for i in range(40)]
    expected = encoder.encode(texts)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: encoder.encode(texts), range(8)))

    for result in results:
        assert _cosines(result, expected).min() > 0.9999


def test_count_tokens_excludes_special_tokens_and_truncation(encoder: OnnxEncoder) -> None:
    assert encoder.count_tokens("") == 0
    assert encoder.count_tokens("hello") == 1
    assert encoder.count_tokens("hello world") == 2
    long_text = "word " * 1000
    assert encoder.count_tokens(long_text) == 1000
    assert encoder.count_tokens_batch(["hello", "", long_text]) == [1, 0, 1000]
    assert encoder.count_tokens_batch([]) == []


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("a" + "\u0301" * 199_999, 200_000),  # combining marks the normaliser strips
        ("cafe\u0301", 2),  # "café" spelt with a combining accent: one more than "café"
        ("caf\u00e9", 1),
        ("hello" + "\u200b" * 30 + "world", 32),  # zero-width spaces: a token each
        ("x\x00\x01\x02y", 5),  # control characters inside a word
        ("\u00ad" * 40, 40),  # soft hyphens only
        ("a" + " " * 9 + "b", 2),  # up to 9 whitespace characters in a row are free
        ("a" + " " * 10 + "b", 3),
        ("a" + " " * 50 + "b", 8),  # then a token per 8
        ("def f():\n    return 1\n", 7),  # code's indentation costs nothing
    ],
)
def test_what_the_tokenizer_drops_costs_tokens(
    encoder: OnnxEncoder, text: str, tokens: int
) -> None:
    """WordPiece's normaliser drops combining marks, format and control characters, and
    whitespace separates tokens: counted as nothing, "a" and 199,999 combining accents was
    one token of a prompt budget. Each costs a token now, whitespace past a run of 9 a
    token per 8."""
    assert encoder.count_tokens(text) == tokens
    assert encoder.count_tokens_batch([text, "hello"]) == [tokens, 1]


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
        "Je voudrais réserver une table 🙂 pour deux personnes, s'il vous plaît!",
        "我明天要去北京参加一个关于人工智能的会议。",
        "SELECT id FROM memories WHERE user_id = $1;",
        "a" + "\u0301" * 50 + " b" + "\u0301" * 3 + "c",
        "x\u200by\u200bz\x00 " * 10,
        "indented:\n" + " " * 40 + "deep" + "\t" * 30 + "end",
    ],
)
@pytest.mark.parametrize("limit", [0, 1, 3, 7, 1000])
def test_truncate_to_tokens(encoder: OnnxEncoder, text: str, limit: int) -> None:
    cut = encoder.truncate_to_tokens(text, limit)

    assert text.startswith(cut)
    assert encoder.count_tokens(cut) <= limit
    if encoder.count_tokens(text) <= limit:
        assert cut == text
    else:
        # Longest prefix: up to the next token's end would not fit.
        ends = [end for _, end in encoder.token_offsets(text) if end > len(cut)]
        assert encoder.count_tokens(text[: ends[0]]) > limit


@pytest.mark.parametrize(
    "text",
    [
        "ฉันชอบกินข้าวผัดกุ้งที่ร้านริมแม่น้ำ" * 5,  # Thai: one [UNK] "word" of 180 letters
        "x" * 500 + " y",  # a word longer than WordPiece spells (100 characters)
        "ខ្ញុំចូលចិត្តញ៉ាំបាយ and some English 🙂🙂🙂",
    ],
)
def test_chunking_units_are_the_budgets_tokens(encoder: OnnxEncoder, text: str) -> None:
    """An [UNK] costs one token a character in a prompt budget; as one chunking unit, a long
    unspaced run was one chunk no budget could hold (huggingface/transformers#17551)."""
    offsets = encoder.token_offsets(text)
    assert len(offsets) == encoder.count_tokens(text)
    assert all(text[start:end].strip() for start, end in offsets)
    assert offsets == sorted(offsets) and offsets[-1][1] == len(text.rstrip())


def test_truncate_rejects_negative_limit(encoder: OnnxEncoder) -> None:
    with pytest.raises(ValueError):
        encoder.truncate_to_tokens("text", -1)


def test_dimension_mismatch_names_the_setting() -> None:
    with pytest.raises(ConfigurationError) as info:
        OnnxEncoder.load(dimension=768, provider="cpu")

    assert "EMBEDDING_DIMENSION" in info.value.message
    assert "384" in info.value.message


def test_loads_from_folder_and_from_file(model_copy: Path, encoder: OnnxEncoder) -> None:
    text = ["a folder path and a file path load the same model"]
    from_folder = OnnxEncoder.load(model_copy, provider="cpu")
    from_file = OnnxEncoder.load(str(model_copy / "model.onnx"), provider="cpu")

    assert from_folder.model_id == from_file.model_id == encoder.model_id
    assert _cosines(from_folder.encode(text), encoder.encode(text))[0] > 0.9999
    assert _cosines(from_file.encode(text), encoder.encode(text))[0] > 0.9999


def test_missing_tokenizer_is_a_configuration_error(tmp_path: Path) -> None:
    model, _ = default_model_files()
    (tmp_path / "model.onnx").symlink_to(model)

    with pytest.raises(ConfigurationError) as info:
        OnnxEncoder.load(tmp_path, provider="cpu")

    assert "tokenizer.json" in info.value.message
    assert "EMBEDDING_MODEL_PATH" in info.value.message


def test_missing_model_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        OnnxEncoder.load(tmp_path / "nope.onnx", provider="cpu")

    assert "EMBEDDING_MODEL_PATH" in info.value.message


def test_unreadable_model_is_a_configuration_error(tmp_path: Path) -> None:
    _, tokenizer = default_model_files()
    (tmp_path / "model.onnx").write_bytes(b"not an onnx model")
    shutil.copy(tokenizer, tmp_path / "tokenizer.json")

    with pytest.raises(ConfigurationError) as info:
        OnnxEncoder.load(tmp_path, provider="cpu")

    assert "EMBEDDING_MODEL_PATH" in info.value.message


def test_cuda_without_cuda_is_a_configuration_error() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ConfigurationError) as info:
        OnnxEncoder.load(provider="cuda")

    assert "cuda" in info.value.message


def test_configuration_error_pickles() -> None:
    import pickle

    with pytest.raises(ConfigurationError) as info:
        OnnxEncoder.load(dimension=12, provider="cpu")

    clone = pickle.loads(pickle.dumps(info.value))
    assert clone.message == info.value.message
    assert clone.fields["setting"] == "EMBEDDING_DIMENSION"


def test_the_memory_arena_setting_reaches_the_session_and_leaves_vectors_alike(
    encoder: OnnxEncoder,
) -> None:
    off = OnnxEncoder.load(cpu_mem_arena=False)
    assert off._session.get_session_options().enable_cpu_mem_arena is False
    assert encoder._session.get_session_options().enable_cpu_mem_arena is True
    texts = ["a short line", "a somewhat longer line about the quarterly budget review " * 5]
    np.testing.assert_allclose(off.encode(texts), encoder.encode(texts), atol=1e-6)
