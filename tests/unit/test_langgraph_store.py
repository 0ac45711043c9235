"""The pure logic of the LangGraph store: value encoding, tags, filters, namespace scopes.

LangGraph's own InMemoryStore is the oracle for the filter semantics; the store against the
running service is tested in tests/serve/test_langgraph.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from langgraph.store.base import InvalidNamespaceError, PutOp
from langgraph.store.memory import InMemoryStore

from halldyll_ray.errors import InvalidInput
from halldyll_ray.integrations.langgraph import (
    ITEM_TAG,
    MAX_NAMESPACE_DEPTH,
    HalldyllStore,
    encode_value,
    item_tags,
    key_tag,
    matches_filter,
    namespace_tag,
)
from halldyll_ray.models import MAX_TAGS, MAX_TEXT_CHARS, TAG_PATTERN

VALUES: list[dict[str, Any]] = [
    {"name": "Ada", "age": 36, "score": 9.5, "tags": ["math", "engines"], "active": True},
    {"name": "Bob", "age": 41, "score": 10, "tags": ["draft"], "active": False},
    {"name": "Cy", "age": 7, "score": 2, "nested": {"city": "Paris", "zip": "75001"}},
    {"name": "Di", "score": 11.25, "nested": {"city": "Lyon"}, "tags": []},
]

# Filters on which LangGraph's stores agree (its in-memory one is the oracle here).
FILTERS: list[dict[str, Any]] = [
    {},
    {"name": "Ada"},
    {"name": "Zed"},
    {"age": 36},
    {"tags": ["math", "engines"]},
    {"tags": ["engines", "math"]},
    {"tags": []},
    {"nested": {"city": "Paris"}},
    {"nested": {"city": "Lyon", "zip": "69001"}},
    {"score": {"$gt": 9}},
    {"score": {"$gte": 10}},
    {"score": {"$lt": 10}},
    {"score": {"$lte": 9.5}},
    {"score": {"$gte": 2, "$lt": 11}},
    {"age": {"$ne": 36}},
    {"name": {"$eq": "Bob"}},
    {"name": "Ada", "score": {"$gt": 5}},
    {"missing": None},
]


@pytest.mark.parametrize("filter", FILTERS, ids=[json.dumps(f) for f in FILTERS])
def test_filters_agree_with_langgraph_in_memory_store(filter: dict[str, Any]) -> None:
    oracle = InMemoryStore()
    for i, value in enumerate(VALUES):
        oracle.put(("docs",), f"k{i}", value)
    expected = {item.key for item in oracle.search(("docs",), filter=filter, limit=100)}
    ours = {f"k{i}" for i, value in enumerate(VALUES) if matches_filter(value, filter)}
    assert ours == expected


def test_filters_follow_json_types_where_python_does_not() -> None:
    # As LangGraph's PostgreSQL store (JSONB): true is not 1, and ordering never mixes types.
    assert not matches_filter({"flag": True}, {"flag": 1})
    assert not matches_filter({"flag": 1}, {"flag": True})
    assert matches_filter({"flag": True}, {"flag": True})
    assert not matches_filter({"n": "9"}, {"n": {"$gte": 10}})
    assert not matches_filter({"n": None}, {"n": {"$lt": 10}})
    assert matches_filter({"n": 9}, {"n": {"$lt": 10}})  # numerically, not as text
    # Strings compare lexicographically (the in-memory store raises on them).
    assert matches_filter({"name": "Bob"}, {"name": {"$gt": "B"}})
    assert not matches_filter({"name": "Ada"}, {"name": {"$gt": "B"}})


def test_encoded_values_read_back_exactly() -> None:
    value = {
        "z": 1,
        "a": [1.0, -0.0, 1e300, 12345678901234567890, "naïve ☕ 漢字", None, True],
        "nested": {"deep": [{"x": "\x00 \n \t"}]},
        "": {},
    }
    text = encode_value(value)
    back = json.loads(text)
    assert back == value and list(back) == list(value)  # key order too
    assert type(back["a"][0]) is float and type(back["a"][3]) is int
    assert "☕" in text  # not escaped: the full-text index reads the words
    assert text == text.strip()  # the service strips a summary's text


@pytest.mark.parametrize(
    "value",
    [
        {"x": float("nan")},
        {"x": float("inf")},
        {"x": {1, 2}},
        {1: "int key"},
        {"x": (1, 2)},
        {"x": "\ud800"},
        ["not", "a", "mapping"],
        {"x": "y" * MAX_TEXT_CHARS},
    ],
    ids=["nan", "inf", "set", "int-key", "tuple", "surrogate", "list", "too-long"],
)
def test_values_that_would_not_read_back_are_refused(value: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        encode_value(value)
    assert caught.value.field == "value"


def test_tags_are_valid_distinct_and_bounded() -> None:
    namespace = ("users", "ada", "memories")
    tags = item_tags(namespace, "prefs")
    assert tags[0] == ITEM_TAG and len(tags) == 2 + len(namespace)
    assert all(TAG_PATTERN.fullmatch(tag) for tag in tags)
    assert tags[1:4] == [namespace_tag(namespace[: i + 1]) for i in range(3)]
    assert tags[-1] == key_tag(namespace, "prefs")
    assert namespace_tag(()) == ITEM_TAG
    # Labels are not joined with a separator that a label could contain.
    assert namespace_tag(("a", "b")) != namespace_tag(("a,b",))
    assert key_tag(("a",), "b") != key_tag(("a", "b"), "")
    deepest = tuple(f"l{i}" for i in range(MAX_NAMESPACE_DEPTH))
    assert len(item_tags(deepest, "k")) == MAX_TAGS


def _store(**options: Any) -> HalldyllStore:
    return HalldyllStore("http://127.0.0.1:9", "hr_unused", **options)


def test_bad_paths_are_refused_before_any_request() -> None:
    # Port 9 answers nothing: a request would raise Unavailable, not these errors.
    with _store() as store:
        too_deep = tuple(f"l{i}" for i in range(MAX_NAMESPACE_DEPTH + 1))
        with pytest.raises(InvalidInput, match="at most"):
            store.put(too_deep, "k", {"v": 1})
        with pytest.raises(InvalidNamespaceError):
            store.batch([PutOp(("a.b",), "k", {"v": 1})])
        with pytest.raises(InvalidNamespaceError):
            store.batch([PutOp((), "k", {"v": 1})])
        # A huge label is quoted short, as every error quotes what it was given.
        with pytest.raises(InvalidNamespaceError) as huge:
            store.batch([PutOp(("Z" * 10_000 + ".",), "k", {"v": 1})])
        assert "Z" * 41 not in str(huge.value) and len(str(huge.value)) < 300
        with pytest.raises(InvalidInput) as operator:
            store.search(("a",), filter={"$" + "Z" * 10_000: 1})
        assert "Z" * 41 not in operator.value.message
        # As LangGraph's stores: the empty namespace holds nothing, and reads say so.
        assert store.get((), "k") is None
        store.delete((), "k")
        with pytest.raises(InvalidInput) as caught:
            store.put(("ok",), "k\ud800", {"v": 1})
        assert caught.value.field == "key"
        with pytest.raises(InvalidInput, match="value"):
            store.put(("ok",), "k", {"v": float("nan")})
        with pytest.raises(InvalidInput, match="operator"):
            store.search(("ok",), filter={"v": {"$in": [1]}})
        with pytest.raises(NotImplementedError):
            store.put(("ok",), "k", {"v": 1}, ttl=5)


def test_scopes_follow_the_namespace_mapping() -> None:
    with _store(user_label=1, model_label=2, session_label=3) as store:
        full = store._scope(("users", "u1", "Qwen", "s1", "x"), exact=True, field="namespace")
        assert (full.user, full.model, full.session) == ("u1", "Qwen", "s1")
        assert not (full.any_model or full.any_session)
        short = store._scope(("users", "u1"), exact=True, field="namespace")
        assert (short.model, short.session, short.any_model) == (None, None, False)
        prefix = store._scope(("users", "u1"), exact=False, field="namespace_prefix")
        assert prefix.any_model and prefix.any_session
        wildcard = store._scope(["users", "u1", None, "s1"], exact=False, field="prefix")
        assert wildcard.any_model and wildcard.session == "s1"
        with pytest.raises(InvalidInput, match="must name the user"):
            store._scope(("users",), exact=False, field="namespace_prefix")
    with _store(user_id="me", model="Qwen", session_id="s9") as fixed:
        scope = fixed._scope(("a",), exact=False, field="namespace_prefix")
        assert (scope.user, scope.model, scope.session) == ("me", "Qwen", "s9")
        assert scope.filters()["include_shared"] is False


@pytest.mark.parametrize(
    "options",
    [
        {"user_label": -1},
        {"user_label": 1, "session_label": 1},
        {"page_size": 0},
        {"page_size": True},  # taken as a page of 1
        {"search_mode": "best"},  # a bare ValueError
        {"search_mode": 5},
    ],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as caught:
        _store(**options)
    if "page_size" in options or "search_mode" in options:
        assert caught.value.field == next(iter(options))


@pytest.mark.parametrize("value", ["5", True, 1.5, -1, 10**30])
@pytest.mark.parametrize("name", ["limit", "offset"])
def test_a_page_option_is_a_whole_number(name: str, value: Any) -> None:
    # "5" was a TypeError, True a page of 1, 1.5 and 10**30 were sent to the service; every
    # one of them is refused before anything is sent (the store's URL answers nothing).
    with _store() as store:
        with pytest.raises(InvalidInput) as caught:
            store.search(("docs",), **{name: value})
        assert caught.value.field == name
        with pytest.raises(InvalidInput) as caught:
            store.list_namespaces(**{name: value})
        assert caught.value.field == name
        with pytest.raises(InvalidInput) as caught:
            store.list_namespaces(max_depth=value if value != -1 else 0)
        assert caught.value.field == "max_depth"


def test_import_without_langgraph_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['langgraph'] = None\n"
        "try:\n"
        "    import halldyll_ray.integrations.langgraph\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "pip install 'halldyll-ray[langgraph]'" in out.stdout
