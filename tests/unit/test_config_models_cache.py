"""Settings validation, input models' limits, the LRU, the SQL file loader, error pickling."""

from __future__ import annotations

import pickle
import time

import pytest
from pydantic import ValidationError

from halldyll_ray import (
    ConfigurationError,
    Conversation,
    Fact,
    Image,
    InvalidInput,
    NotFound,
    Settings,
    Summary,
    Transcription,
)
from halldyll_ray.storage.cache import LocalLRU
from halldyll_ray.storage.sql import parse_queries, queries


def test_defaults_match_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "SEARCH_TOP_K", "CACHE_SIZE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert settings.database_url is None and settings.redis_url is None
    assert settings.embedding_dimension == 384
    assert settings.search_top_k == 10
    assert settings.similarity_threshold == 0.20
    assert settings.cache_size == 1000
    assert settings.ephemeral_fact_ttl_days == 30
    assert settings.max_context_tokens == 4000
    assert settings.db_pool_size == 5
    assert settings.log_level == "info"


def test_bad_environment_names_variable_and_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://root:hunter2@db/x")
    monkeypatch.setenv("SEARCH_TOP_K", "zero")
    monkeypatch.setenv("LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env()
    message = err.value.message
    assert "DATABASE_URL" in message and "postgresql://" in message
    assert "SEARCH_TOP_K" in message and "LOG_LEVEL" in message
    assert "hunter2" not in message
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.delenv("SEARCH_TOP_K")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("EMBEDDING_MODEL_PATH", "/nonexistent/model")
    with pytest.raises(ConfigurationError, match="EMBEDDING_MODEL_PATH"):
        Settings.from_env()


def test_secrets_do_not_print(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env(
        database_url="postgresql://u:hunter2@h/db", redis_url="redis://:hunter2@h:6379/0"
    )
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())


@pytest.mark.parametrize(
    "build",
    [
        lambda: Fact(statement=""),
        lambda: Fact(statement="x", confidence=1.5),
        lambda: Fact(statement="x" * 2001),
        lambda: Fact(statement="x", kind="forever"),
        lambda: Fact(statement="x", tags=[f"ok{i}" for i in range(33)]),
        lambda: Fact(statement="x", tags=["bad tag!"]),
        lambda: Fact(statement="x", metadata={"blob": "x" * 20_000}),
        lambda: Fact(statement="x", session_id="has spaces"),
        lambda: Fact(statement="x", unknown_field=1),
        lambda: Conversation(messages=[{"role": "robot", "content": "hi"}]),
        lambda: Conversation(messages=[{"role": "user", "content": ""}]),
        lambda: Image(prompt="p", seed=-1),
        lambda: Image(prompt="p", sha256="xyz"),
        lambda: Image(prompt="p", size={"width": 0, "height": 10}),
        lambda: Transcription(text="", segments=[]),
        lambda: Transcription(text="x", segments=[{"start": 5, "end": 1, "text": "t"}]),
        lambda: Transcription(text="x", language="english"),
        lambda: Summary(text="x", covers=["not-a-uuid"]),
    ],
)
def test_input_models_reject_bad_values(build) -> None:
    with pytest.raises((ValidationError, InvalidInput)):
        build()


def test_transcription_text_from_segments() -> None:
    t = Transcription(
        segments=[
            {"start": 0, "end": 1, "text": "hello"},
            {"start": 1, "end": 2, "text": " world "},
        ]
    )
    assert t.text == "hello world"


def test_lru_evicts_least_recent_and_expires() -> None:
    lru = LocalLRU(2)
    lru.set("a", b"1")
    lru.set("b", b"2")
    assert lru.get("a") == b"1"
    lru.set("c", b"3")
    assert lru.get("b") is None and lru.get("a") == b"1" and lru.get("c") == b"3"
    lru.set("t", b"x", ttl=0.01)
    time.sleep(0.02)
    assert lru.get("t") is None
    off = LocalLRU(0)
    off.set("a", b"1")
    assert off.get("a") is None


def test_queries_file_parses() -> None:
    names = queries()
    assert {"search_semantic", "search_fulltext", "upsert_fact", "list_memories"} <= set(names)
    assert all(
        found.sql.strip() and not found.sql.rstrip().endswith(";") for found in names.values()
    )
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")


def test_errors_pickle_with_fields() -> None:
    err = pickle.loads(pickle.dumps(InvalidInput("bad", field="query")))
    assert isinstance(err, InvalidInput) and err.field == "query" and err.message == "bad"
    nf = pickle.loads(pickle.dumps(NotFound("gone", id="x")))
    assert nf.to_dict() == {"code": "not_found", "message": "gone", "id": "x"}


def test_env_example_documents_every_setting() -> None:
    from pathlib import Path

    text = (Path(__file__).parents[2] / ".env.example").read_text()
    documented = {
        line.lstrip("# ").split("=")[0]
        for line in text.splitlines()
        if "=" in line and line.lstrip("# ").split("=")[0].isupper()
    }
    assert documented == {name.upper() for name in Settings.model_fields}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("api_key_secret", "short-secret-123"),
        ("database_url", "mysql://app:hunter2@db/x"),
        ("redis_url", "http://:hunter2@cache"),
    ],
)
def test_a_bad_secret_is_named_but_never_echoed(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env(**{name: value})
    assert name.upper() in str(err.value)
    assert value not in str(err.value) and "hunter2" not in str(err.value)
    assert "short-secret" not in repr(err.value.fields)


def test_a_bad_ordinary_setting_shows_its_value() -> None:
    with pytest.raises(ConfigurationError, match=r"SEARCH_TOP_K: .*\(got 'many'\)"):
        Settings.from_env(search_top_k="many")


def test_a_text_too_long_is_told_in_characters() -> None:
    """Every memory model's text fields, a value over any bound: the error counts characters.
    A bound stated after the visibility check read "at most 2000 items after validation"."""
    from pydantic import BaseModel

    from halldyll_ray import models

    checked = 0
    for cls in vars(models).values():
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            continue
        for name in cls.model_fields:
            try:
                cls.model_validate({name: "a" * 300_000})
            except ValidationError as exc:
                for error in exc.errors():
                    if error["loc"] == (name,) and error["type"].endswith("too_long"):
                        checked += 1
                        assert error["type"] == "string_too_long", (cls.__name__, name, error)
                        assert "characters" in error["msg"], (cls.__name__, name, error["msg"])
    assert checked >= 10  # statement, content, prompt, text, name, title, ...
    with pytest.raises(ValidationError) as refused:
        Fact(statement=" " + "a" * 2001)
    assert refused.value.errors()[0]["msg"] == "String should have at most 2000 characters"
    assert Fact(statement=" " + "a" * 1999 + " ").statement == "a" * 1999  # stripped first
