"""The Python API given what a library user may pass by mistake: wrong types, mutated models,
options of the wrong kind. Each is InvalidInput naming its field (never a bare TypeError,
OverflowError or a driver's error), and nothing stored changes."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from halldyll_ray import Fact, InvalidInput, MemoryEngine
from halldyll_ray.models import MemoryUpdate, Message

TABLES = (
    "users",
    "memories",
    "memory_chunks",
    "conversation_messages",
    "api_keys",
    "ai_models",
    "turn_requests",
    "audit_log",
)


async def _state(engine: MemoryEngine) -> dict[str, str]:
    """A digest of every row of the tables a refused call must leave as they were."""
    state = {}
    for table in TABLES:
        state[table] = await engine.db.fetchval(
            f"SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t",
            admin=True,
        )
    return state


async def _refused(
    engine: MemoryEngine, call: Callable[[], Awaitable[Any]], field: str
) -> InvalidInput:
    before = await _state(engine)
    with pytest.raises(InvalidInput) as caught:
        await call()
    assert caught.value.field == field, caught.value.message
    assert await _state(engine) == before
    return caught.value


BAD_REQUEST_IDS = [5, b"req", "\x00", "a b", "x" * 129, "r\u00e9q", ""]


@pytest.mark.parametrize("request_id", BAD_REQUEST_IDS)
async def test_a_bad_request_id_is_refused_before_any_write(
    engine: MemoryEngine, request_id: Any
) -> None:
    # It goes to audit rows: record_turn created the session's log, then the audit write
    # failed (a driver's error, mapped to an InvalidInput naming no field).
    user = (await engine.create_user("ada")).id
    fact = await engine.store_memory(user, {"type": "fact", "statement": "Ada likes tea"})
    conv = await engine.store_memory(
        user, {"type": "conversation", "messages": [{"role": "user", "content": "hello"}]}
    )
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: engine.record_turn(user, "s1", "hi", "hello", request_id=request_id),
        lambda: engine.store_memory(
            user, {"type": "fact", "statement": "new"}, request_id=request_id
        ),
        lambda: engine.store_memories(
            user, [{"type": "fact", "statement": "new"}], request_id=request_id
        ),
        lambda: engine.append_messages(
            user, conv.id, [{"role": "user", "content": "more"}], request_id=request_id
        ),
        lambda: engine.update_memory(user, fact.id, {"tags": ["t"]}, request_id=request_id),
        lambda: engine.delete_memory(user, fact.id, request_id=request_id),
    ]
    for call in calls:
        await _refused(engine, call, "request_id")
    # Through the permission checks: a refusal's audit row carries it too (a viewer's
    # store is refused and audited), so it is checked where it enters.
    viewer = await engine.create_user("val", role="viewer")
    principal = await engine.authenticate((await engine.create_api_key(viewer.id)).key)
    before = await _state(engine)
    with pytest.raises(InvalidInput) as caught:
        engine.authorized(principal, request_id=request_id)
    assert caught.value.field == "request_id"
    assert await _state(engine) == before
    # A request id of the HTTP header's form is taken.
    await engine.delete_memory(user, fact.id, request_id="req-1.a:b_C")


async def test_mutated_and_constructed_models_are_checked_again(engine: MemoryEngine) -> None:
    # Input models are mutable and pydantic checks no assignment: such an instance reached
    # SQL (a NUL, a NaN), the chunker (IndexError) or len() (TypeError).
    user = (await engine.create_user("ada")).id
    stored = await engine.store_memory(user, {"type": "fact", "statement": "Ada likes tea"})
    conv = await engine.store_memory(
        user, {"type": "conversation", "messages": [{"role": "user", "content": "hello"}]}
    )
    changes: list[tuple[str, Any, str]] = [
        ("statement", "bad\x00", "fact.statement"),
        ("statement", "   ", "fact.statement"),
        ("confidence", float("nan"), "fact.confidence"),
        ("tags", "pets", "fact.tags"),
        ("metadata", {"a": float("inf")}, "fact.metadata"),
    ]
    for name, value, field in changes:
        fact = Fact(statement="a fine fact")
        setattr(fact, name, value)
        await _refused(engine, lambda fact=fact: engine.store_memory(user, fact), field)
        await _refused(
            engine,
            lambda fact=fact: engine.store_memories(user, [fact]),
            "memories.0." + field,
        )
    constructed = Fact.model_construct(statement=5)
    await _refused(engine, lambda: engine.store_memory(user, constructed), "fact.statement")

    update = MemoryUpdate(tags=["a"])
    update.importance = float("nan")
    await _refused(engine, lambda: engine.update_memory(user, stored.id, update), "importance")
    update = MemoryUpdate()
    update.statement = "\x00"
    await _refused(engine, lambda: engine.update_memory(user, stored.id, update), "statement")

    message = Message(role="user", content="hi")
    message.content = ""
    await _refused(
        engine, lambda: engine.append_messages(user, conv.id, [message]), "messages.0.content"
    )
    await _refused(
        engine, lambda: engine.build_context(user, None, messages=[message]), "messages.0.content"
    )
    assert (await engine.get_memory(user, stored.id)).memory == Fact(statement="Ada likes tea")


@pytest.mark.parametrize(
    "metadata",
    [
        {(1, 2): "a"},
        {b"k": "a"},
        {1: "a", "1": "b"},  # json.dumps made both "1": one value was lost
        {None: "a"},
        {"nested": {1: "a"}},
    ],
)
async def test_metadata_keys_must_be_strings(engine: MemoryEngine, metadata: Any) -> None:
    user = (await engine.create_user("ada", metadata={"kept": True})).id
    await _refused(engine, lambda: engine.create_user("bob", metadata=metadata), "metadata")
    await _refused(engine, lambda: engine.update_user(user, metadata=metadata), "metadata")
    await _refused(
        engine, lambda: engine.register_model("m1", "llm", metadata=metadata), "metadata"
    )
    # The model's own metadata: a nested dict's keys are pydantic's Any, unchecked before.
    if metadata == {"nested": {1: "a"}}:
        await _refused(
            engine,
            lambda: engine.store_memory(
                user, {"type": "fact", "statement": "x", "metadata": metadata}
            ),
            "fact.metadata",
        )
    assert (await engine.get_user(user)).metadata == {"kept": True}


async def test_collection_arguments_that_are_not_collections(engine: MemoryEngine) -> None:
    user = (await engine.create_user("ada")).id
    conv = await engine.store_memory(
        user, {"type": "conversation", "messages": [{"role": "user", "content": "hello"}]}
    )
    one = {"role": "user", "content": "tea"}
    for messages in (None, 5, "hello", one, Message(role="user", content="tea")):
        await _refused(
            engine, lambda m=messages: engine.append_messages(user, conv.id, m), "messages"
        )
    for messages in (5, one):
        await _refused(
            engine, lambda m=messages: engine.build_context(user, None, messages=m), "messages"
        )
    # A generator of messages is a list of them, as append_messages takes one.
    context = await engine.build_context(user, None, messages=(one for _ in range(2)))
    assert context.token_count > 0
    for texts in (None, 5, "abc", [5], [None], [b"x"], ["\x00"], ["\ud800"]):
        await _refused(engine, lambda t=texts: engine.embed(t), "texts")
    for ids in (5, None, "abc", [5], ["x"]):
        await _refused(engine, lambda i=ids: engine.users_state(i), "user_ids")
    assert await engine.users_state((str(user),)) == {
        user: (await engine.users_state([user]))[user]
    }


async def test_numbers_and_flags_of_the_wrong_kind(engine: MemoryEngine) -> None:
    user = (await engine.create_user("ada", "ada@example.com")).id
    await engine.store_memory(user, {"type": "fact", "statement": "Ada likes tea"})
    conv = await engine.store_memory(
        user, {"type": "conversation", "messages": [{"role": "user", "content": "hello"}]}
    )
    # True is an int: it purged every audit row older than a day, and built a partial HNSW
    # index for every user with one row.
    await _refused(engine, lambda: engine.purge_audit(older_than_days=True), "older_than_days")
    await _refused(engine, lambda: engine.ensure_user_indexes(min_rows=True), "min_rows")
    for limit in (True, 0, -1, "3", 1.5):
        await _refused(engine, lambda n=limit: engine.run_pending_jobs(limit=n), "limit")
        # Taken as given while no re-embedding was due.
        await _refused(engine, lambda n=limit: engine.reembed(max_batches=n), "max_batches")
    # An age older than any time purges nothing (it was an OverflowError).
    for age in (float("inf"), 10**30):
        assert await engine.purge_jobs(older_than_hours=age) == 0
        assert await engine.purge_events(older_than_hours=age) == 0
        if isinstance(age, int):
            assert await engine.purge_audit(older_than_days=age) == 0
    # A flag that is not a bool ("no" is truthy).
    await _refused(engine, lambda: engine.update_user(user, clear_email="no"), "clear_email")
    assert (await engine.get_user(user)).email == "ada@example.com"
    await _refused(
        engine, lambda: engine.get_memory(user, conv.id, include_messages="no"), "include_messages"
    )
    export = b"".join([line async for line in engine.export_memories(user)])
    await _refused(engine, lambda: engine.import_memories(user, [export], atomic="no"), "atomic")


async def test_an_api_key_replaces_only_a_key_of_its_user(engine: MemoryEngine) -> None:
    ada = (await engine.create_user("ada")).id
    bob = (await engine.create_user("bob")).id
    bobs = await engine.create_api_key(bob, name="bob's")
    for replaces in ("x", 5, uuid.uuid4(), bobs.api_key.id):
        await _refused(
            engine, lambda r=replaces: engine.create_api_key(ada, replaces=r), "replaces"
        )
    adas = await engine.create_api_key(ada)
    new = await engine.create_api_key(ada, replaces=str(adas.api_key.id))
    assert new.api_key.user_id == ada
    rotated = await engine.rotate_api_key(bobs.api_key.id)  # bob's key was replaced by none
    assert rotated.api_key.user_id == bob


async def test_import_chunks_of_the_wrong_kind(engine: MemoryEngine) -> None:
    ada = (await engine.create_user("ada")).id
    bob = (await engine.create_user("bob")).id
    await engine.store_memory(ada, {"type": "fact", "statement": "Ada likes tea"})
    export = b"".join([line async for line in engine.export_memories(ada)])
    header = export.split(b"\n", 1)[0] + b"\n"
    for lines in (None, 5, [5], [None], [header, 5]):
        await _refused(engine, lambda x=lines: engine.import_memories(bob, x), "lines")
    # Text holding a lone surrogate (read with errors="surrogateescape") is a bad line
    # (it was a UnicodeEncodeError out of the import).
    report = await engine.import_memories(bob, [header.decode(), '{"a": "\udcff"}\n'])
    assert report.error_count == 1 and report.errors[0].line == 2
    # The whole file as one bytes object, or one str, is the file (iterating bytes gave ints).
    report = await engine.import_memories(bob, export)
    assert report.created == {"fact": 1}
    report = await engine.import_memories(bob, export.decode())
    assert report.unchanged == 1


@pytest.mark.parametrize(
    ("memory", "field"),
    [
        ({"type": "fact", "statement": b"Ada likes tea"}, "fact.statement"),
        ({"type": "fact", "statement": bytearray(b"x")}, "fact.statement"),
        ({"type": "fact", "statement": "x", "tags": [b"pets"]}, "fact.tags.0"),
        ({"type": "fact", "statement": "x", "metadata": {b"k": 1}}, "fact.metadata.b'k'.[key]"),
        ({"type": "fact", "statement": "x", "session_id": b"s1"}, "fact.session_id"),
        ({"type": "fact", "statement": "x", "source": b"chat"}, "fact.source"),
        (
            {"type": "conversation", "messages": [{"role": "user", "content": b"hi"}]},
            "conversation.messages.0.content",
        ),
        ({"type": "image", "prompt": "x", "uri": b"s3://b/k"}, "image.uri"),
        ({"type": "transcription", "text": "hello", "language": b"en"}, "transcription.language"),
        ({"type": "summary", "text": b"s"}, "summary.text"),
    ],
)
async def test_bytes_are_not_text(engine: MemoryEngine, memory: dict[str, Any], field: str) -> None:
    # Pydantic's lax mode decoded them as UTF-8 and stored the text, where every other
    # argument of the API (a query, a username, an id) refuses bytes.
    user = (await engine.create_user("ada")).id
    stored = await engine.store_memory(user, {"type": "fact", "statement": "Ada likes tea"})
    await _refused(engine, lambda: engine.store_memory(user, memory), field)
    if memory["type"] == "fact" and "statement" in memory and memory["statement"] == "x":
        update = {k: v for k, v in memory.items() if k in ("tags", "metadata")}
        if update:
            await _refused(
                engine,
                lambda: engine.update_memory(user, stored.id, update),
                field.removeprefix("fact."),
            )
