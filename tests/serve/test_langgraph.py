"""The LangGraph store (halldyll_ray.integrations.langgraph) against the running Serve app.

LangGraph ships no store conformance suite (langgraph-checkpoint-conformance covers
checkpointers only), so the scenarios of its own store tests (basic operations, batch order,
search with filters and pages, numeric comparisons, namespace listing) run here over both the
sync and the async API, and LangGraph's InMemoryStore is the oracle for a longer sequence of
operations. Then the namespace mapping, query search, and a StateGraph that remembers
across two runs with two different store objects.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import GetOp, Item, ListNamespacesOp, PutOp, SearchOp
from langgraph.store.memory import InMemoryStore

from halldyll_ray.client import AsyncHalldyllClient
from halldyll_ray.errors import InvalidInput, PermissionDenied
from halldyll_ray.integrations.langgraph import ITEM_TAG, HalldyllStore, item_tags
from halldyll_ray.models import ModelKind, Role, Summary

MODES = ["sync", "async"]


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def _user(url: str, admin_key: str, role: Role = Role.USER) -> tuple[str, str]:
    """A fresh user (so a fresh, empty store) and its API key."""
    async with AsyncHalldyllClient(url, admin_key, timeout=60) as admin:
        user = await admin.create_user(_name("lg"), role=role)
        key = await admin.create_api_key(user.id, name="langgraph")
    return str(user.id), key.key


class _Api:
    """The store's sync methods (run in a thread, the test's loop is running) or its async
    ones, under the same names: one scenario tests both."""

    def __init__(self, store: HalldyllStore, mode: str) -> None:
        self.store, self.mode = store, mode

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if self.mode == "async":
            method: Callable[..., Awaitable[Any]] = getattr(self.store, "a" + name)
            return method
        blocking = getattr(self.store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(blocking, *args, **kwargs)

        return call


@pytest.fixture(params=MODES)
async def api(request: pytest.FixtureRequest, ray_serve: dict[str, Any], admin_key: str):
    _, key = await _user(ray_serve["url"], admin_key)
    store = HalldyllStore(ray_serve["url"], key, timeout=60)
    yield _Api(store, request.param)
    await store.aclose()


# --------------------------------------------------------------------------- LangGraph's tests
async def test_basic_store_ops(api: _Api) -> None:
    namespace = ("test", "documents")
    value = {"title": "Test Document", "content": "Hello, World!"}
    await api.put(namespace, "doc1", value)
    item = await api.get(namespace, "doc1")
    assert isinstance(item, Item)
    assert (item.namespace, item.key, item.value) == (namespace, "doc1", value)
    assert item.created_at == item.updated_at or item.created_at < item.updated_at

    updated = {"title": "Updated Document", "content": "Hello, Updated!"}
    await api.put(namespace, "doc1", updated)
    again = await api.get(namespace, "doc1")
    assert again.value == updated
    assert again.updated_at > item.updated_at and again.created_at == item.created_at
    assert len(await api.search(namespace)) == 1  # updated, not duplicated

    assert await api.get(("test", "other_documents"), "doc1") is None
    assert await api.get(namespace, "doc2") is None
    await api.delete(namespace, "doc1")
    assert await api.get(namespace, "doc1") is None
    await api.delete(namespace, "doc1")  # deleting what is not there is not an error
    assert await api.search(("test",)) == []


async def test_batch_order(api: _Api) -> None:
    await api.put(("test", "foo"), "key1", {"data": "value1"})
    await api.put(("test", "bar"), "key2", {"data": "value2"})
    results = await api.batch(
        [
            GetOp(("test", "foo"), "key1"),
            PutOp(("test", "bar"), "key2", {"data": "value2"}),
            SearchOp(("test",), filter={"data": "value1"}, limit=10, offset=0),
            ListNamespacesOp(match_conditions=None, max_depth=None, limit=10, offset=0),
            GetOp(("test",), "key3"),
            PutOp(("test",), "key3", {"data": "value3"}),
            GetOp(("test",), "key3"),  # in order: sees the put before it
            PutOp(("test",), "key3", None),
            GetOp(("test",), "key3"),
        ]
    )
    assert len(results) == 9
    assert results[0].value == {"data": "value1"} and results[0].key == "key1"
    assert results[1] is None
    assert [item.key for item in results[2]] == ["key1"]
    assert results[3] == [("test", "bar"), ("test", "foo")]
    assert results[4] is None and results[5] is None
    assert results[6].value == {"data": "value3"}
    assert results[7] is None and results[8] is None


async def test_search(api: _Api) -> None:
    data = [
        (("test", "docs"), "doc1", {"title": "First Doc", "author": "Alice", "tags": ["a"]}),
        (("test", "docs"), "doc2", {"title": "Second Doc", "author": "Bob", "tags": ["d"]}),
        (("test", "images"), "img1", {"title": "Image 1", "author": "Alice", "tags": ["f"]}),
        (("testing",), "other", {"title": "Not under test", "author": "Alice"}),
    ]
    for namespace, key, value in data:
        await api.put(namespace, key, value)

    everything = await api.search(("test",))
    assert {item.key for item in everything} == {"doc1", "doc2", "img1"}
    assert all(item.score is None for item in everything)
    assert [item.key for item in everything] == ["img1", "doc2", "doc1"]  # newest first
    docs = await api.search(("test", "docs"))
    assert {item.key for item in docs} == {"doc1", "doc2"}
    assert all(item.namespace == ("test", "docs") for item in docs)
    alice = await api.search(("test",), filter={"author": "Alice"})
    assert {item.key for item in alice} == {"doc1", "img1"}
    assert {item.key for item in await api.search(("test",), filter={"tags": ["d"]})} == {"doc2"}
    assert len(await api.search(("test",), limit=2)) == 2
    assert [i.key for i in await api.search(("test",), offset=2)] == ["doc1"]
    assert await api.search(("test",), offset=3) == []
    assert len(await api.search((), limit=10)) == 4  # the whole store


async def test_numeric_comparison_filters(api: _Api) -> None:
    namespace = ("test", "scores")
    for key, score in [("a", 2), ("b", 9), ("c", 10), ("d", 11), ("e", 9.5)]:
        await api.put(namespace, key, {"score": score})

    async def scores(filter: dict[str, Any]) -> list[float]:
        return sorted(item.value["score"] for item in await api.search(namespace, filter=filter))

    assert await scores({"score": {"$gte": 10}}) == [10, 11]  # not [9, 9.5, 10, 11]
    assert await scores({"score": {"$gt": 9}}) == [9.5, 10, 11]
    assert await scores({"score": {"$lt": 10}}) == [2, 9, 9.5]
    assert await scores({"score": {"$lte": 9}}) == [2, 9]
    assert await scores({"score": {"$ne": 9}}) == [2, 9.5, 10, 11]
    assert await scores({"score": {"$gt": 2, "$lt": 10}}) == [9, 9.5]


async def test_list_namespaces(api: _Api) -> None:
    namespaces = [
        ("test", "documents", "public"),
        ("test", "documents", "private"),
        ("test", "images", "public"),
        ("test", "images", "private"),
        ("prod", "documents", "public"),
        ("prod", "documents", "private"),
    ]
    for namespace in namespaces:
        await api.put(namespace, "dummy", {"content": "dummy"})
    await api.put(namespaces[0], "second", {"content": "same namespace"})

    assert await api.list_namespaces() == sorted(namespaces)
    assert await api.list_namespaces(prefix=("test",)) == sorted(namespaces[:4])
    assert await api.list_namespaces(suffix=("public",)) == sorted(namespaces[::2])
    assert await api.list_namespaces(prefix=("test", "*", "private")) == [
        ("test", "documents", "private"),
        ("test", "images", "private"),
    ]
    assert await api.list_namespaces(prefix=("*", "documents"), suffix=("public",)) == [
        ("prod", "documents", "public"),
        ("test", "documents", "public"),
    ]
    assert await api.list_namespaces(max_depth=2) == [
        ("prod", "documents"),
        ("test", "documents"),
        ("test", "images"),
    ]
    assert await api.list_namespaces(prefix=("test",), max_depth=1) == [("test",)]
    assert await api.list_namespaces(limit=3) == sorted(namespaces)[:3]
    assert await api.list_namespaces(limit=3, offset=4) == sorted(namespaces)[4:]
    assert await api.list_namespaces(prefix=("nothing",)) == []
    for namespace in namespaces:
        await api.delete(namespace, "dummy")
    assert await api.list_namespaces() == [namespaces[0]]


async def test_values_read_back_exactly(api: _Api) -> None:
    value = {
        "z-first": 1,
        "floats": [0.1, 1.0, -0.0, 1e300, 2.5e-308],
        "big": 12345678901234567890,
        "text": "naïve café ☕ 漢字 \u00a0 spaced ",
        "nul": "a\x00b",
        "nested": {"empty": {}, "list": [[], None, True, False]},
    }
    await api.put(("rt",), "key with spaces/and:colons", value)
    item = await api.get(("rt",), "key with spaces/and:colons")
    assert item.value == value and list(item.value) == list(value)
    assert json.dumps(item.value) == json.dumps(value)  # same types, same order
    await api.put(("rt",), "empty", {})
    assert (await api.get(("rt",), "empty")).value == {}


async def test_against_langgraph_in_memory_store(api: _Api) -> None:
    """A seeded run of puts, overwrites and deletes on both stores: the same items."""
    oracle = InMemoryStore()
    rng = random.Random(12)
    namespaces = [("a",), ("a", "b"), ("a", "b", "c"), ("a", "c"), ("d",), ("d", "b")]
    keys = ["k1", "k2", "k3"]
    for step in range(40):
        namespace, key = rng.choice(namespaces), rng.choice(keys)
        if rng.random() < 0.25:
            oracle.delete(namespace, key)
            await api.delete(namespace, key)
        else:
            value = {"step": step, "even": step % 2 == 0, "label": rng.choice("xyz")}
            oracle.put(namespace, key, value)
            await api.put(namespace, key, value)

    def triples(items: list[Item]) -> set[tuple[Any, ...]]:
        return {(i.namespace, i.key, json.dumps(i.value)) for i in items}

    for prefix in [(), ("a",), ("a", "b"), ("d",), ("x",)]:
        for filter in [None, {"even": True}, {"label": "y", "step": {"$gte": 20}}]:
            ours = await api.search(prefix, filter=filter, limit=100)
            expected = oracle.search(prefix, filter=filter, limit=100)
            assert triples(ours) == triples(expected), (prefix, filter)
    for namespace in namespaces:
        for key in keys:
            ours_item, expected_item = await api.get(namespace, key), oracle.get(namespace, key)
            assert (ours_item and ours_item.value) == (expected_item and expected_item.value)
    # InMemoryStore keeps listing a namespace once its items are gone (or was only read):
    # a copy holding the live items answers as LangGraph's PostgreSQL store does.
    live = InMemoryStore()
    for item in oracle.search((), limit=1000):
        live.put(item.namespace, item.key, item.value)
    for options in [{}, {"prefix": ("a",)}, {"suffix": ("b",)}, {"max_depth": 1}]:
        assert await api.list_namespaces(**options) == live.list_namespaces(**options)


# --------------------------------------------------------------------------- query search
async def test_query_search_ranks_the_prefix(api: _Api) -> None:
    notes = {
        "tea": {"text": "Ada drinks green tea every morning", "kind": "habit"},
        "office": {"text": "The office moved to Lyon last spring", "kind": "place"},
        "bike": {"text": "Bob rides a red bicycle to work", "kind": "habit"},
    }
    for key, value in notes.items():
        await api.put(("notes",), key, value)
    await api.put(("elsewhere",), "tea2", {"text": "A tea ceremony in Kyoto", "kind": "habit"})

    ranked = await api.search(("notes",), query="what does Ada drink in the morning?")
    assert ranked[0].key == "tea"
    assert {item.key for item in ranked} == set(notes)  # every item of the prefix, ranked
    assert all(isinstance(item.score, float) for item in ranked)
    assert all(item.value == notes[item.key] for item in ranked)
    page = await api.search(("notes",), query="what does Ada drink in the morning?", offset=1)
    assert [item.key for item in page] == [item.key for item in ranked[1:]]
    places = await api.search(("notes",), query="where is the office?", filter={"kind": "place"})
    assert [item.key for item in places] == ["office"]
    everywhere = await api.search((), query="tea ceremony Kyoto", limit=1)
    assert [item.key for item in everywhere] == ["tea2"]


# --------------------------------------------------------------------------- mapping
async def test_namespaces_map_to_user_model_and_session(
    ray_serve: dict[str, Any], admin_key: str
) -> None:
    url = ray_serve["url"]
    ada_id, ada_key = await _user(url, admin_key)
    bob_id, bob_key = await _user(url, admin_key)
    _, service_key = await _user(url, admin_key, role=Role.SERVICE)
    async with AsyncHalldyllClient(url, admin_key, timeout=60) as admin:
        model = await admin.register_model(_name("qwen-"), ModelKind.LLM)
    mapping = {"user_label": 1, "model_label": 2, "session_label": 3}
    ada_ns = ("users", ada_id, model.name, "chat-1", "prefs")
    bob_ns = ("users", bob_id, model.name, "chat-2", "prefs")

    async with HalldyllStore(url, service_key, timeout=60, **mapping) as store:
        await store.aput(ada_ns, "drink", {"likes": "tea"})
        await store.aput(bob_ns, "drink", {"likes": "coffee"})
        assert (await store.aget(bob_ns, "drink")).value == {"likes": "coffee"}
        assert (await store.aget(ada_ns, "drink")).value == {"likes": "tea"}
        assert await store.aget(("users", ada_id, model.name, "chat-2", "prefs"), "drink") is None
        found = await store.asearch(("users", ada_id))
        assert [(i.namespace, i.value) for i in found] == [(ada_ns, {"likes": "tea"})]
        assert await store.alist_namespaces(prefix=("users", bob_id)) == [bob_ns]
        with pytest.raises(InvalidInput, match="must name the user"):
            await store.asearch(("users",))
        with pytest.raises(InvalidInput, match="must name the user"):
            await store.alist_namespaces(prefix=("users", "*"))
        # A session label the service refuses: a 422, and nothing stored.
        with pytest.raises(InvalidInput) as bad:
            await store.aput(("users", ada_id, model.name, "no spaces!", "p"), "k", {"v": 1})
        assert bad.value.fields["status_code"] == 422

    # Each user owns their memory, in the model and session its namespace names.
    async with AsyncHalldyllClient(url, ada_key, timeout=60) as ada:
        (memory,) = (await ada.list_memories(tags=[ITEM_TAG])).items
        assert memory.model_id == model.id and memory.session_id == "chat-1"
        assert isinstance(memory.memory, Summary) and json.loads(memory.text) == {"likes": "tea"}
        assert memory.metadata["langgraph"] == {"namespace": list(ada_ns), "key": "drink"}
        hits = await ada.search("tea", session_id="chat-1", model=model.name, limit=5)
        assert memory.id in {hit.memory.id for hit in hits}
        # The user's own key reads the same item through a store with the same mapping...
        async with HalldyllStore(url, ada_key, timeout=60, **mapping) as own:
            assert (await own.aget(ada_ns, "drink")).value == {"likes": "tea"}
            # ...and cannot touch another user's namespace.
            with pytest.raises(PermissionDenied):
                await own.aput(bob_ns, "drink", {"likes": "water"})
    async with AsyncHalldyllClient(url, bob_key, timeout=60) as bob:
        (memory,) = (await bob.list_memories(tags=[ITEM_TAG])).items
        assert json.loads(memory.text) == {"likes": "coffee"}

    # Fixed scopes: the same (namespace, key) is a different item per model and session.
    async with (
        HalldyllStore(url, ada_key, timeout=60) as shared,
        HalldyllStore(url, ada_key, model=str(model.id), timeout=60) as scoped,
        HalldyllStore(url, ada_key, session_id="chat-9", timeout=60) as session,
    ):
        await shared.aput(("prefs",), "color", {"v": "blue"})
        await scoped.aput(("prefs",), "color", {"v": "green"})
        await session.aput(("prefs",), "color", {"v": "red"})
        assert (await shared.aget(("prefs",), "color")).value == {"v": "blue"}
        assert (await scoped.aget(("prefs",), "color")).value == {"v": "green"}
        assert (await session.aget(("prefs",), "color")).value == {"v": "red"}
        assert [i.value for i in await scoped.asearch(("prefs",))] == [{"v": "green"}]
        assert await shared.alist_namespaces() == [("prefs",)]  # not ada_ns: its model
        await scoped.adelete(("prefs",), "color")
        assert (await shared.aget(("prefs",), "color")).value == {"v": "blue"}


@pytest.mark.parametrize("mode", MODES)
async def test_concurrent_puts_of_a_new_key_leave_one_memory(
    ray_serve: dict[str, Any], admin_key: str, mode: str
) -> None:
    url = ray_serve["url"]
    _, key = await _user(url, admin_key)
    stores = [HalldyllStore(url, key, timeout=60) for _ in range(4)]
    apis = [_Api(store, mode) for store in stores]
    try:
        for round_ in range(3):
            await asyncio.gather(
                *(api.put(("race",), f"k{round_}", {"writer": i}) for i, api in enumerate(apis))
            )
            found = await apis[0].search(("race",), filter=None, limit=100)
            assert [item.key for item in found].count(f"k{round_}") == 1
            item = await apis[1].get(("race",), f"k{round_}")
            assert item.value in [{"writer": i} for i in range(4)]
    finally:
        for store in stores:
            await store.aclose()
    async with AsyncHalldyllClient(url, key, timeout=60) as client:
        assert len((await client.list_memories(tags=[ITEM_TAG])).items) == 3


async def test_duplicates_from_racing_puts_are_healed(
    ray_serve: dict[str, Any], admin_key: str
) -> None:
    """Two clients putting one new key at once leave two memories: reads take the latest,
    and the next put keeps one."""
    url = ray_serve["url"]
    _, key = await _user(url, admin_key)
    namespace = ("race",)
    metadata = {"langgraph": {"namespace": list(namespace), "key": "k"}}
    async with AsyncHalldyllClient(url, key, timeout=60) as client:
        for text in ('{"v": 1}', '{"v": 2}'):
            await client.store_memory(
                Summary(text=text, tags=item_tags(namespace, "k"), metadata=metadata)
            )
        async with HalldyllStore(url, key, timeout=60) as store:
            assert (await store.aget(namespace, "k")).value == {"v": 2}
            assert len(await store.asearch(namespace)) == 2
            await store.aput(namespace, "k", {"v": 3})
            assert [i.value for i in await store.asearch(namespace)] == [{"v": 3}]
            await client.store_memory(
                Summary(text='{"v": 4}', tags=item_tags(namespace, "k"), metadata=metadata)
            )
            await store.adelete(namespace, "k")
            assert await store.aget(namespace, "k") is None
        assert (await client.list_memories(tags=[ITEM_TAG])).items == []


# --------------------------------------------------------------------------- a graph
class State(TypedDict, total=False):
    message: str
    recalled: list[str]


@dataclass
class Context:
    user_id: str


def _namespace(runtime: Runtime[Context]) -> tuple[str, ...]:
    return ("users", runtime.context.user_id, "memories")


def remember(state: State, runtime: Runtime[Context]) -> State:
    message = state["message"]
    if message.startswith("remember "):
        assert runtime.store is not None
        runtime.store.put(_namespace(runtime), uuid.uuid4().hex, {"text": message[9:]})
    return {}


def recall(state: State, runtime: Runtime[Context]) -> State:
    assert runtime.store is not None
    found = runtime.store.search(_namespace(runtime), query=state["message"], limit=3)
    return {"recalled": [item.value["text"] for item in found]}


async def aremember(state: State, runtime: Runtime[Context]) -> State:
    message = state["message"]
    if message.startswith("remember "):
        assert runtime.store is not None
        await runtime.store.aput(_namespace(runtime), uuid.uuid4().hex, {"text": message[9:]})
    return {}


async def arecall(state: State, runtime: Runtime[Context]) -> State:
    assert runtime.store is not None
    found = await runtime.store.asearch(_namespace(runtime), query=state["message"], limit=3)
    return {"recalled": [item.value["text"] for item in found]}


def _graph(store: HalldyllStore, *, mode: str) -> Any:
    builder = StateGraph(State, context_schema=Context)
    builder.add_node("remember", remember if mode == "sync" else aremember)
    builder.add_node("recall", recall if mode == "sync" else arecall)
    builder.add_edge(START, "remember")
    builder.add_edge("remember", "recall")
    builder.add_edge("recall", END)
    return builder.compile(store=store)  # the one line that differs from InMemoryStore()


@pytest.mark.parametrize("mode", MODES)
async def test_a_graph_remembers_across_runs(
    ray_serve: dict[str, Any], admin_key: str, mode: str
) -> None:
    """Run 1 stores what the user says; run 2, with a new store object and a new graph,
    recalls it. A Service key acts for the user named in the namespace."""
    url = ray_serve["url"]
    user_id, _ = await _user(url, admin_key)
    _, service_key = await _user(url, admin_key, role=Role.SERVICE)
    context = Context(user_id=user_id)

    async def run(message: str) -> State:
        async with HalldyllStore(url, service_key, user_label=1, timeout=60) as store:
            graph = _graph(store, mode=mode)
            if mode == "sync":
                return await asyncio.to_thread(graph.invoke, {"message": message}, context=context)
            return await graph.ainvoke({"message": message}, context=context)

    await run("remember Ada drinks green tea every morning")
    await run("remember the office moved to Lyon")
    answer = await run("what does Ada drink?")
    assert answer["recalled"][0] == "Ada drinks green tea every morning"
    assert set(answer["recalled"]) == {
        "Ada drinks green tea every morning",
        "the office moved to Lyon",
    }
    # Another user's runs do not see these memories.
    other_id, _ = await _user(url, admin_key)
    context = Context(user_id=other_id)
    assert (await run("what does Ada drink?"))["recalled"] == []


def _readme_example() -> str:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### LangGraph store") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```\n", start)]


async def test_the_readme_example_runs(
    ray_serve: dict[str, Any], admin_key: str, tmp_path: Path
) -> None:
    _, key = await _user(ray_serve["url"], admin_key)
    (tmp_path / "admin_api_key").write_text(key + "\n")
    code = _readme_example().replace("http://127.0.0.1:8000", ray_serve["url"])
    assert code.count(ray_serve["url"]) == 2
    env = {**os.environ, "DATA_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}
    for _ in range(2):  # a second run finds the same memory, not a second one
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "['Ada drinks green tea']\n"
