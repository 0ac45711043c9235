"""Fault kinds from issue 15, each at its root: lock order, transient errors, caches of ids,
validation before the first write, one answer for a missing user, one time-zone rule.

Every case asserts the right value or the typed error, and that a refused call changed
nothing stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from halldyll_ray import (
    Conflict,
    Conversation,
    Fact,
    Image,
    InvalidInput,
    MemoryEngine,
    Message,
    NotFound,
    Settings,
    Transcription,
    Unavailable,
)
from halldyll_ray.components import agent_loop
from halldyll_ray.textproc import search_form


@pytest.fixture
async def second(settings: Settings, encoder) -> MemoryEngine:
    """Another engine (another replica) on the same database and Redis."""
    engine = MemoryEngine(settings, encoder=encoder)
    await engine.initialize()
    yield engine
    await engine.close()


# ------------------------------------------------------------------ 1. concurrency
async def test_parallel_turns_through_two_engines_are_all_stored_once_in_order(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    user = await engine.create_user("racer", None, "user")
    turns = await asyncio.gather(
        *(
            (engine if i % 2 else second).record_turn(
                user.id, "race-2", f"message {i}", f"reply {i}", extract_facts=False
            )
            for i in range(10)
        )
    )
    assert len({t.conversation_id for t in turns}) == 1
    log = await engine.get_memory(user.id, turns[0].conversation_id)
    assert [m.seq for m in log.messages] == list(range(20))
    contents = [m.content for m in log.messages]
    assert sorted(contents[0::2]) == sorted(f"message {i}" for i in range(10))
    for asked, answered in zip(contents[0::2], contents[1::2], strict=True):
        assert answered == asked.replace("message", "reply")  # each reply right after its turn
    for turn in turns:
        pair = [log.messages[s].content for s in turn.message_seqs]
        assert pair[1] == pair[0].replace("message", "reply")


async def test_appends_racing_title_updates_and_deletes_do_not_deadlock(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    user = await engine.create_user("writer", None, "user")
    chat = await engine.store_memory(user.id, Conversation(title="t", messages=[]))
    other = [
        await engine.store_memory(user.id, Image(prompt=f"picture number {i}")) for i in range(5)
    ]
    calls = []
    for i in range(10):
        calls.append(
            engine.append_messages(user.id, chat.id, [Message(role="user", content=f"m{i}")])
        )
        calls.append(second.update_memory(user.id, chat.id, {"title": f"title {i}"}))
    calls += [second.delete_memory(user.id, m.id) for m in other]
    calls.append(engine.purge_expired())
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    stored = await engine.get_memory(user.id, chat.id)
    assert [m.seq for m in stored.messages] == list(range(10))


async def test_a_turn_retried_with_its_idempotency_key_is_stored_once(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    user = await engine.create_user("retrier", None, "user")
    first = await engine.record_turn(user.id, "s1", "hello", "hi", idempotency_key="turn-1")
    again = await second.record_turn(user.id, "s1", "hello", "hi", idempotency_key="turn-1")
    assert not first.replayed and again.replayed
    assert (again.conversation_id, again.message_seqs) == (
        first.conversation_id,
        first.message_seqs,
    )
    # Concurrent retries of one new key: one stores, the others replay it.
    racing = await asyncio.gather(
        *(
            (engine, second)[i % 2].record_turn(
                user.id, "s1", "second", "answer", idempotency_key="turn-2"
            )
            for i in range(6)
        )
    )
    assert sum(not t.replayed for t in racing) == 1
    assert len({tuple(t.message_seqs) for t in racing}) == 1
    log = await engine.get_memory(user.id, first.conversation_id)
    assert [m.content for m in log.messages] == ["hello", "hi", "second", "answer"]
    with pytest.raises(InvalidInput) as err:
        await engine.record_turn(user.id, "s1", "x", "y", idempotency_key="has space")
    assert err.value.field == "idempotency_key"


async def test_a_retried_turn_reports_what_the_first_attempt_learned(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """A retry got the first attempt's messages back with no facts and no summary
    (``fact_ids=[]``), although the first attempt's answer named them."""
    user = await engine.create_user("rememberer", None, "user")
    said = "I work at Acme. My dog is called Rex."
    first = await engine.record_turn(user.id, "s1", said, "ok", idempotency_key="t1")
    assert len(first.fact_ids) == 2 and not first.replayed
    again = await second.record_turn(user.id, "s1", said, "ok", idempotency_key="t1")
    assert again.replayed and again.fact_ids == first.fact_ids
    assert again.summary_id == first.summary_id
    # A summary turn (every SESSION_SUMMARY_EVERY_N_TURNS turns): its id comes back too.
    n = engine.settings.session_summary_every_n_turns
    for i in range(2, n):
        await engine.record_turn(user.id, "s1", f"turn {i}", "ok")
    last = await engine.record_turn(user.id, "s1", "I live in Paris", "ok", idempotency_key="t2")
    assert last.summary_id is not None and last.fact_ids
    repeat = await second.record_turn(user.id, "s1", "I live in Paris", "ok", idempotency_key="t2")
    assert (repeat.summary_id, repeat.fact_ids) == (last.summary_id, last.fact_ids)
    for fact_id in first.fact_ids + last.fact_ids:  # learned once: nothing reinforced
        assert (await engine.get_memory(user.id, fact_id)).reinforcement_count == 0


async def test_a_turn_whose_learning_failed_is_learned_by_its_retry(
    engine: MemoryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt stored the messages, then failed storing a fact (a 503 to the
    client): the retry answered "replayed" and the turn's facts were never extracted."""
    user = await engine.create_user("unlucky", None, "user")
    ingestion = engine.components.agent_loop.ingestion
    learn = ingestion.learn
    calls = 0

    async def failing_once(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Unavailable("the embedder is unavailable")
        return await learn(*args, **kwargs)

    monkeypatch.setattr(ingestion, "learn", failing_once)
    said = "I work at Acme. My dog is called Rex."
    with pytest.raises(Unavailable):
        await engine.record_turn(user.id, "s1", said, "ok", idempotency_key="t1")
    retried = await engine.record_turn(user.id, "s1", said, "ok", idempotency_key="t1")
    assert retried.replayed and len(retried.fact_ids) == 2
    statements = {(await engine.get_memory(user.id, f)).text for f in retried.fact_ids}
    assert statements == {"The user works at Acme", "The user's dog is called Rex"}
    log = await engine.get_memory(user.id, retried.conversation_id)
    assert [m.content for m in log.messages] == [said, "ok"]  # the messages stored once
    # Learned now: a third call reports the same ids and learns nothing more.
    third = await engine.record_turn(user.id, "s1", said, "ok", idempotency_key="t1")
    assert third.fact_ids == retried.fact_ids and calls == 2


async def test_a_retry_during_the_first_attempts_learning_waits_for_it(
    engine: MemoryEngine, second: MemoryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retries while the first attempt learns get its whole record (concurrent retries of
    one key all answer alike); past the wait, a 409 rather than a record without facts, and
    the learning is not done twice."""
    user = await engine.create_user("impatient", None, "user")
    ingestion = engine.components.agent_loop.ingestion
    learn = ingestion.learn
    release = asyncio.Event()

    async def slow(*args, **kwargs):
        await release.wait()
        return await learn(*args, **kwargs)

    monkeypatch.setattr(ingestion, "learn", slow)
    monkeypatch.setattr(agent_loop, "TURN_REPLAY_WAIT_S", 0.3)
    said = "I live in Paris"
    first = asyncio.create_task(engine.record_turn(user.id, "s1", said, "ok", idempotency_key="t1"))
    await asyncio.sleep(0.5)  # the messages are stored; the fact waits
    with pytest.raises(Conflict) as busy:
        await second.record_turn(user.id, "s1", said, "ok", idempotency_key="t1")
    assert busy.value.fields["field"] == "idempotency_key"
    monkeypatch.setattr(agent_loop, "TURN_REPLAY_WAIT_S", 30.0)
    waiting = [
        asyncio.create_task(second.record_turn(user.id, "s1", said, "ok", idempotency_key="t1"))
        for _ in range(3)
    ]
    await asyncio.sleep(0.3)
    release.set()
    done = await first
    retries = await asyncio.gather(*waiting)
    assert len(done.fact_ids) == 1 and not done.replayed
    assert all(r.replayed and r.fact_ids == done.fact_ids for r in retries)
    assert (await engine.get_memory(user.id, done.fact_ids[0])).reinforcement_count == 0


async def test_an_idempotency_key_names_one_request(engine: MemoryEngine) -> None:
    """A key sent again with another request is refused (the IETF Idempotency-Key draft),
    not answered with the first request's record; the refusal creates nothing."""
    user = await engine.create_user("keyholder", None, "user")
    first = await engine.record_turn(user.id, "s1", "I live in Paris", "ok", idempotency_key="k1")
    before = (await engine.list_memories(user.id)).items
    other_requests = [
        ("s1", "I live in Berlin", "ok", {}),  # another user message
        ("s1", "I live in Paris", "different", {}),  # another reply
        ("s1", "I live in Paris", "ok", {"user_name": "Ada"}),  # another speaker
        ("s2", "I live in Paris", "ok", {}),  # the same turn in another session
    ]
    for session, said, reply, names in other_requests:
        with pytest.raises(InvalidInput) as refused:
            await engine.record_turn(user.id, session, said, reply, idempotency_key="k1", **names)
        assert refused.value.field == "idempotency_key"
    # Nothing new: no message, and no empty log for session s2.
    after = (await engine.list_memories(user.id)).items
    assert [m.id for m in after] == [m.id for m in before]
    log = await engine.get_memory(user.id, first.conversation_id)
    assert [m.content for m in log.messages] == ["I live in Paris", "ok"]
    again = await engine.record_turn(user.id, "s1", "I live in Paris", "ok", idempotency_key="k1")
    assert again.replayed and again.message_seqs == first.message_seqs


async def test_an_idempotency_key_names_whether_its_turn_asked_for_facts(
    engine: MemoryEngine,
) -> None:
    """record_turn with extract_facts=False, sent again with the same key and
    extract_facts=True, was answered replayed=True with no facts, as if it were the same
    request (and the facts asked for were never extracted); the other way round, it was told
    the facts it did not ask for. Both are another request: InvalidInput, nothing written."""
    user = await engine.create_user("factkey", None, "user")
    said = "I live in Paris"
    quiet = await engine.record_turn(
        user.id, "s1", said, "ok", idempotency_key="k-quiet", extract_facts=False
    )
    learned = await engine.record_turn(user.id, "s2", said, "ok", idempotency_key="k-facts")
    assert quiet.fact_ids == [] and len(learned.fact_ids) == 1
    before = (await engine.list_memories(user.id)).items
    for session, key, extract in (("s1", "k-quiet", True), ("s2", "k-facts", False)):
        with pytest.raises(InvalidInput) as refused:
            await engine.record_turn(
                user.id, session, said, "ok", idempotency_key=key, extract_facts=extract
            )
        assert refused.value.field == "idempotency_key"
    after = (await engine.list_memories(user.id)).items
    assert [(m.id, m.updated_at) for m in after] == [(m.id, m.updated_at) for m in before]
    # The same request again is still its replay.
    again = await engine.record_turn(
        user.id, "s1", said, "ok", idempotency_key="k-quiet", extract_facts=False
    )
    assert again.replayed and again.fact_ids == [] and again.message_seqs == quiet.message_seqs
    again = await engine.record_turn(user.id, "s2", said, "ok", idempotency_key="k-facts")
    assert again.replayed and again.fact_ids == learned.fact_ids
    # A key lives with its turn's conversation (README): once that is deleted, the same
    # request is a new turn, in the session's next log.
    await engine.delete_memory(user.id, quiet.conversation_id)
    anew = await engine.record_turn(
        user.id, "s1", said, "ok", idempotency_key="k-quiet", extract_facts=False
    )
    assert not anew.replayed and anew.conversation_id != quiet.conversation_id


async def test_one_key_on_two_new_sessions_at_once_leaves_one_log(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """Two first uses of one key at once, each on a new session: one turn is stored, the
    other refused, and the refused one leaves no empty session log behind (both pass the
    key's check before either is stored, so each creates its session's log)."""
    user = await engine.create_user("racer", None, "user")
    for attempt in range(3):
        key = f"race-{attempt}"
        results = await asyncio.gather(
            engine.record_turn(user.id, f"a{attempt}", "I live in Oslo", "ok", idempotency_key=key),
            second.record_turn(user.id, f"b{attempt}", "I live in Oslo", "ok", idempotency_key=key),
            return_exceptions=True,
        )
        stored = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, InvalidInput)]
        assert len(stored) == 1 and len(refused) == 1, results
        assert refused[0].field == "idempotency_key"
    logs = (await engine.list_memories(user.id, types=["conversation"])).items
    assert len(logs) == 3
    for log in logs:
        assert len((await engine.get_memory(user.id, log.id)).messages) == 2
    # The refused session is new again: a turn there starts a log of its own.
    loser = next(s for s in ("a0", "b0") if s not in {log.session_id for log in logs})
    turn = await engine.record_turn(user.id, loser, "hello", "hi")
    assert turn.conversation_id not in {log.id for log in logs}
    assert len((await engine.get_memory(user.id, turn.conversation_id)).messages) == 2


async def test_blank_speaker_names_are_refused_naming_the_argument(engine: MemoryEngine) -> None:
    user = await engine.create_user("blank", None, "user")
    for names, field in (
        ({"user_name": ""}, "user_name"),
        ({"assistant_name": "   "}, "assistant_name"),
        ({"user_name": "\u3164"}, "user_name"),
    ):
        with pytest.raises(InvalidInput) as refused:
            await engine.record_turn(user.id, "s1", "hello", "hi", **names)
        assert refused.value.field == field
    assert (await engine.list_memories(user.id)).items == []
    kept = await engine.record_turn(user.id, "s1", "hello", "hi", user_name=" Ada ")
    log = await engine.get_memory(user.id, kept.conversation_id)
    assert [m.name for m in log.messages] == ["Ada", None]


async def test_a_session_belongs_to_one_ai_model(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """A turn of model B in model A's session was appended to A's log: B's searches missed it,
    A's found it. It is a Conflict naming the model, through the cached session state and
    through another engine (replica) that reads it from the database."""
    user = await engine.create_user("models", None, "user")
    for name in ("mA", "mB"):
        with contextlib.suppress(Conflict):
            await engine.register_model(name, "llm")
    first = await engine.record_turn(user.id, "mix-1", "hello", "hi", model="mA")
    for loop, model in ((engine, "mB"), (second, "mB"), (engine, None), (second, None)):
        with pytest.raises(Conflict) as refused:
            await loop.record_turn(user.id, "mix-1", "orchid-77 is B's secret", "ok", model=model)
        assert refused.value.fields.get("field") == "model"
    log = await engine.get_memory(user.id, first.conversation_id)
    assert [m.content for m in log.messages] == ["hello", "hi"]
    again = await second.record_turn(user.id, "mix-1", "still A", "ok", model="mA")
    assert again.conversation_id == first.conversation_id
    shared = await engine.record_turn(user.id, "mix-2", "shared", "ok")
    with pytest.raises(Conflict):
        await second.record_turn(user.id, "mix-2", "B here", "ok", model="mB")
    assert shared.conversation_id


async def test_a_session_summary_is_not_written_for_a_log_deleted_meanwhile(
    engine: MemoryEngine,
) -> None:
    """The summary reads the log's messages before it takes the user's lock; a delete of the
    log in between left a summary covering the deleted id and repeating its text. The
    write, under the lock, finds the log gone: NotFound, nothing written."""
    user = await engine.create_user("summarised", None, "user")
    turn = await engine.record_turn(user.id, "s1", "I keep bees in Oslo", "Lovely")
    await engine.delete_memory(user.id, turn.conversation_id)
    loop = engine.components.agent_loop
    with pytest.raises(NotFound):
        await loop.refresh_summary(user.id, "s1", turn.conversation_id, None)
    with pytest.raises(NotFound):
        await engine.components.learning.summaries.refresh_session(
            user.id, "s1", turn.conversation_id, None, job_id=None
        )
    left = (await engine.list_memories(user.id)).items
    assert all(m.type.value != "summary" for m in left), left


async def test_concurrent_rotations_leave_one_live_key(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    user = await engine.create_user("rotator", None, "user")
    key = await engine.create_api_key(user.id, name="k")
    results = await asyncio.gather(
        engine.rotate_api_key(key.api_key.id),
        second.rotate_api_key(key.api_key.id),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Conflict) for r in results) == 1
    live = [k for k in await engine.list_api_keys(user.id) if k.revoked_at is None]
    assert len(live) == 1 and live[0].name == "k"


async def test_a_rotation_during_an_erasure_of_its_user_waits_instead_of_deadlocking(
    engine: MemoryEngine,
) -> None:
    """An erasure locks the user's row, then deletes their keys. A rotation locked the old
    key's row, then the user's (the new key's foreign key): the two deadlocked, and one of
    them answered 503. The rotation now takes the user's row first: it waits for the
    erasure and finds the key gone; the erasure goes through."""
    from halldyll_ray.storage.sql import q

    user = await engine.create_user("rotated-away", None, "user")
    key = await engine.create_api_key(user.id, name="k")
    async with engine.db.scoped(user.id) as conn:  # the erasure's first two steps
        assert await conn.fetchrow(q("lock_user_for_update"), user.id) is not None
        rotation = asyncio.create_task(engine.rotate_api_key(key.api_key.id))
        await asyncio.sleep(0.5)  # the rotation is waiting on a lock now
        assert not rotation.done()
        assert await conn.fetchval(q("delete_user"), user.id) == user.id
    with pytest.raises(NotFound):
        await rotation
    with pytest.raises(NotFound):
        await engine.get_user(user.id)


async def test_a_key_revoked_many_times_at_once_is_audited_once(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """Revoking a revoked key keeps its first time and changes nothing; it wrote a
    ``key.revoke`` row each time, so five revocations at once read as five mutations."""
    user = await engine.create_user("revoked", None, "user")
    key = await engine.create_api_key(user.id, name="k")
    revoked = await asyncio.gather(
        *((engine, second)[i % 2].revoke_api_key(key.api_key.id) for i in range(5))
    )
    assert len({k.revoked_at for k in revoked}) == 1 and revoked[0].revoked_at is not None
    again = await engine.revoke_api_key(key.api_key.id)
    assert again.revoked_at == revoked[0].revoked_at
    rows = await engine.list_audit(user_id=user.id, operation="key.revoke")
    assert len(rows) == 1


async def test_grants_given_both_ways_at_once_do_not_deadlock(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """Two Viewers granted each other's memories at once: each grant locked its Viewer's row,
    then the owner's (the grant's foreign key), the other way round, and PostgreSQL aborted
    one (a 503). Both rows are now locked in the order of their ids."""
    for attempt in range(20):  # a race: it deadlocked in about half the rounds
        one = await engine.create_user(f"v1-{attempt}-{uuid.uuid4().hex[:6]}", None, "viewer")
        two = await engine.create_user(f"v2-{attempt}-{uuid.uuid4().hex[:6]}", None, "viewer")
        results = await asyncio.gather(
            engine.grant_viewer(one.id, two.id),
            second.grant_viewer(two.id, one.id),
            return_exceptions=True,
        )
        assert results == [None, None]
        assert await engine.viewer_grants(one.id) == [two.id]
        assert await engine.viewer_grants(two.id) == [one.id]
    gone = uuid.uuid4()
    with pytest.raises(NotFound):
        await engine.grant_viewer(one.id, gone)


async def test_a_model_registered_again_elsewhere_is_not_served_from_a_stale_id(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    user = await engine.create_user("modeller", None, "user")
    await engine.register_model("m-x", "llm")
    await engine.store_memory(user.id, Fact(statement="Old model fact", model="m-x"))
    await engine.list_memories(user.id, model="m-x")  # engine A has used the model
    page = await second.list_memories(user.id, model="m-x", include_shared=False)
    for memory in page.items:
        await second.delete_memory(user.id, memory.id)
    await second.delete_model("m-x")
    await second.register_model("m-x", "llm")
    stored = await engine.store_memory(
        user.id, Fact(statement="Ada prefers jasmine tea", model="m-x")
    )
    hits_a = await engine.search(user.id, "jasmine tea", model="m-x", include_shared=False)
    hits_b = await second.search(user.id, "jasmine tea", model="m-x", include_shared=False)
    assert [h.memory.id for h in hits_a] == [h.memory.id for h in hits_b] == [stored.id]


async def test_a_model_deleted_while_a_memory_of_it_is_stored_is_not_found(
    engine: MemoryEngine, second: MemoryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store, a batch or a turn names a model that another replica deletes after the name
    was resolved: the insert's foreign key refused it, and that answered Conflict "the AI
    model is still referenced by memories; delete or move them first", the message of the
    other side (a model deleted while memories use it). It is NotFound on the model, as the
    same request sent a moment later is, and nothing is stored."""
    user = await engine.create_user("late", None, "user")
    registry = engine.components.models
    resolve = registry.resolve

    async def resolve_then_lose(ref, **kwargs):  # the other replica deletes it meanwhile
        found = await resolve(ref, **kwargs)
        if ref is not None:
            await second.delete_model(found)
        return found

    writes = {
        "store": lambda name: engine.store_memory(
            user.id, Fact(statement="Ada likes green tea", model=name)
        ),
        "batch": lambda name: engine.store_memories(
            user.id, [Fact(statement="Ada likes black tea", model=name)]
        ),
        "turn": lambda name: engine.record_turn(user.id, f"s-{name}", "hi", "ok", model=name),
    }
    for what, write in writes.items():
        name = f"gone-{what}"
        await engine.register_model(name, "llm")
        monkeypatch.setattr(registry, "resolve", resolve_then_lose)
        with pytest.raises(NotFound) as refused:
            await write(name)
        monkeypatch.setattr(registry, "resolve", resolve)
        assert refused.value.fields.get("field") == "model", (what, refused.value)
        with pytest.raises(NotFound) as later:
            await write(name)
        assert later.value.fields.get("field") == "model"
    assert (await engine.list_memories(user.id)).items == []


async def test_transient_database_errors_are_unavailable_with_a_retry_hint(
    engine: MemoryEngine,
) -> None:
    from halldyll_ray import Unavailable

    async def deadlock() -> None:
        async with engine.db.scoped() as conn:
            await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40P01'; END $$")

    async def serialization() -> None:
        async with engine.db.scoped() as conn:
            await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40001'; END $$")

    async def read_only() -> None:
        async with engine.db.scoped(readonly=True) as conn:
            await conn.execute("CREATE TEMP TABLE t (x int)")

    for failing in (deadlock, serialization, read_only):
        with pytest.raises(Unavailable) as err:
            await failing()
        assert err.value.fields["retry_after"] >= 1
        assert "40P01" not in err.value.message and "'x'" not in err.value.message


async def test_two_engines_of_one_process_share_the_embedded_server(
    tmp_path: Path, encoder
) -> None:
    settings = Settings.from_env(database_url=None, redis_url=None, data_dir=tmp_path / "data")
    first = await MemoryEngine(settings, encoder=encoder).initialize()
    second = await MemoryEngine(settings, encoder=encoder).initialize()
    user = await first.create_user("ada", None, "user")
    await first.close()
    # Closing the first engine must not stop the server under the second.
    stored = await second.store_memory(user.id, Fact(statement="Still here"))
    assert (await second.get_memory(user.id, stored.id)).memory.statement == "Still here"
    pgdata = second._embedded.pgdata  # type: ignore[union-attr]
    await second.close()
    assert not (pgdata / "postmaster.pid").exists()  # the last holder stopped it


# ------------------------------------------------------------------ 2. validation
async def _nothing_stored(engine: MemoryEngine, user_id: uuid.UUID) -> None:
    assert (await engine.list_memories(user_id)).items == []
    # ...and every read still works for the user.
    assert await engine.search(user_id, "anything at all") == []


@pytest.mark.parametrize(
    "session_id", ["chat-7\n", "chat-7\r\n", "\nchat-7", "chat 7", "chat-7\x00", "ｃｈａｔ"]
)
async def test_bad_session_ids_are_refused_before_any_write(
    engine: MemoryEngine, session_id: str
) -> None:
    user = await engine.create_user(f"s{uuid.uuid4().hex[:8]}", None, "user")
    with pytest.raises(InvalidInput) as err:
        await engine.record_turn(user.id, session_id, "hello there", "hi")
    assert err.value.field == "session_id"
    for call in (
        engine.list_memories(user.id, session_id=session_id),
        engine.search(user.id, "hello", session_id=session_id),
        engine.prepare_context(user.id, session_id, "hello"),
    ):
        with pytest.raises(InvalidInput):
            await call
    await _nothing_stored(engine, user.id)


@pytest.mark.parametrize("reply", ["", "   ", "\u00a0", "\u2003\n", "ok\udc97", "a\x00b"])
async def test_an_empty_or_unstorable_reply_leaves_no_conversation_behind(
    engine: MemoryEngine, reply: str
) -> None:
    user = await engine.create_user(f"r{uuid.uuid4().hex[:8]}", None, "user")
    with pytest.raises(InvalidInput) as err:
        await engine.record_turn(user.id, "s", "Generate the audio clip", reply)
    assert err.value.field == "assistant_message"
    await _nothing_stored(engine, user.id)


@pytest.mark.parametrize(
    ("memory", "field"),
    [
        ({"type": "image", "prompt": "a cat", "controlnet": {"scale": float("nan")}}, "controlnet"),
        ({"type": "image", "prompt": "a cat", "instantid": {"w": float("inf")}}, "instantid"),
        ({"type": "fact", "statement": "x", "confidence": float("nan")}, "confidence"),
        ({"type": "fact", "statement": "pizza \udc97"}, "statement"),
        ({"type": "fact", "statement": "a\x00b"}, "statement"),
        ({"type": "fact", "statement": "ok", "metadata": {"k\udc97": 1}}, "metadata"),
        ({"type": "fact", "statement": "ok", "tags": ["tea\nparty"]}, "tags"),
        ({"type": "summary", "text": "ok", "metadata": {"v": [1e309]}}, "metadata"),
        (
            {
                "type": "conversation",
                "messages": [{"role": "user", "content": "x", "created_at": 0}],
            },
            "created_at",
        ),
    ],
)
async def test_unstorable_values_are_refused_with_their_field(
    engine: MemoryEngine, memory: dict, field: str
) -> None:
    user = await engine.create_user(f"v{uuid.uuid4().hex[:8]}", None, "user")
    with pytest.raises(InvalidInput) as err:
        await engine.store_memory(user.id, memory)
    assert err.value.field is not None and err.value.field.split(".")[-1].startswith(field)
    await _nothing_stored(engine, user.id)


@pytest.mark.parametrize("depth", [33, 200, 2_000])
async def test_deep_metadata_is_refused_and_reads_keep_working(
    engine: MemoryEngine, depth: int
) -> None:
    user = await engine.create_user(f"d{uuid.uuid4().hex[:8]}", None, "user")
    nested: dict = {}
    inner = nested
    for _ in range(depth):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(InvalidInput) as err:
        await engine.store_memory(
            user.id, {"type": "fact", "statement": "deep", "metadata": nested}
        )
    assert err.value.field and err.value.field.endswith("metadata")
    with pytest.raises(InvalidInput):
        await engine.create_user(f"e{uuid.uuid4().hex[:8]}", None, "user", metadata=nested)
    await _nothing_stored(engine, user.id)
    # 32 levels are fine, and come back through a cached search.
    ok: dict = {}
    inner = ok
    for _ in range(31):
        inner["a"] = {}
        inner = inner["a"]
    await engine.store_memory(user.id, Fact(statement="Nested but fine", metadata=ok))
    for _ in range(2):
        hits = await engine.search(user.id, "nested but fine")
        assert hits[0].memory.metadata == ok


@pytest.mark.parametrize("query", ["pizza \udc97", "\ud83d", "a\x00b"])
async def test_unencodable_queries_are_invalid_input(engine: MemoryEngine, query: str) -> None:
    user = await engine.create_user(f"q{uuid.uuid4().hex[:8]}", None, "user")
    for call in (
        engine.search(user.id, query),
        engine.build_context(user.id, query),
        engine.prepare_context(user.id, "s", query),
    ):
        with pytest.raises(InvalidInput):
            await call


async def test_names_are_matched_whole(engine: MemoryEngine) -> None:
    for username in ("ada\n", "ada\r", " ada"):
        with pytest.raises(InvalidInput) as err:
            await engine.create_user(username, None, "user")
        assert err.value.field == "username"
    with pytest.raises(InvalidInput) as err:
        await engine.create_user("ada", "ada@example.com\n", "user")
    assert err.value.field == "email"


async def test_database_refusals_name_no_server_wording(engine: MemoryEngine) -> None:
    with pytest.raises(InvalidInput) as err:
        await engine.list_audit(before_id=2**70)
    assert err.value.field == "before_id"
    assert "$" not in err.value.message and "int64" not in err.value.message


async def test_a_missing_user_gets_the_same_answer_on_every_path(engine: MemoryEngine) -> None:
    ghost = uuid.uuid4()
    memory_id = uuid.uuid4()
    calls = {
        "get_memory": engine.get_memory(ghost, memory_id),
        "list_memories": engine.list_memories(ghost),
        "search": engine.search(ghost, "tea"),
        "store_memory": engine.store_memory(ghost, Fact(statement="x")),
        "update_memory": engine.update_memory(ghost, memory_id, {"importance": 0.2}),
        "delete_memory": engine.delete_memory(ghost, memory_id),
        "append_messages": engine.append_messages(
            ghost, memory_id, [Message(role="user", content="x")]
        ),
        "record_turn": engine.record_turn(ghost, "s", "a", "b"),
        "build_context": engine.build_context(ghost, "tea"),
        "prepare_context": engine.prepare_context(ghost, "s", "tea"),
        "list_api_keys": engine.list_api_keys(ghost),
        "create_api_key": engine.create_api_key(ghost),
        "get_user": engine.get_user(ghost),
    }
    for name, call in calls.items():
        with pytest.raises(NotFound) as err:
            await call
        assert err.value.message == f"user {ghost} not found", name


async def test_a_changed_transcript_has_its_language_detected_again(engine: MemoryEngine) -> None:
    user = await engine.create_user("lingua", None, "user")
    stored = await engine.store_memory(
        user.id,
        Transcription(text="Bonjour à tous, merci d'être venus si nombreux ce soir pour la fête."),
    )
    assert stored.memory.language == "fr"
    updated = await engine.update_memory(
        user.id,
        stored.id,
        {"text": "Good evening everyone, thank you all for coming to the party tonight."},
    )
    assert updated.memory.language == "en"


# ------------------------------------------------------------------ 3. time zones
@pytest.fixture(params=["America/New_York", "Asia/Tokyo"])
def local_zone(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


async def test_a_naive_time_means_utc_whatever_the_process_zone(
    engine: MemoryEngine, local_zone: str
) -> None:
    assert time.strftime("%Z") not in ("UTC", "GMT"), os.environ["TZ"]
    user = await engine.create_user(f"tz{uuid.uuid4().hex[:8]}", None, "user")
    naive = datetime(2026, 1, 15, 9, 30)
    chat = await engine.store_memory(
        user.id,
        Conversation(title="tz", messages=[Message(role="user", content="hi", created_at=naive)]),
    )
    await engine.append_messages(
        user.id, chat.id, [{"role": "assistant", "content": "hello", "created_at": naive}]
    )
    stored = await engine.get_memory(user.id, chat.id)
    assert [m.created_at for m in stored.messages] == [naive.replace(tzinfo=UTC)] * 2
    # since/until follow the same rule.
    window = await engine.list_memories(
        user.id, since=datetime(2000, 1, 1), until=datetime(2100, 1, 1)
    )
    assert [m.id for m in window.items] == [chat.id]
    image = await engine.store_memory(user.id, Image(prompt="a clock"))
    assert image.created_at.tzinfo is not None


# ------------------------------------------------------------------ 4. every script and form
@pytest.mark.parametrize("mode", ["fulltext", "hybrid"])
async def test_words_of_scripts_without_spaces_are_found(engine: MemoryEngine, mode: str) -> None:
    user = await engine.create_user(f"zh{uuid.uuid4().hex[:8]}", None, "user")
    fact = await engine.store_memory(user.id, Fact(statement="今天我们玩了成语接龙游戏"))
    await engine.store_memory(user.id, Fact(statement="We talked about the weather all day"))
    await engine.store_memory(user.id, Fact(statement="昨天下雨了"))
    hits = await engine.search(user.id, "成语接龙", mode=mode)
    assert hits and hits[0].memory.id == fact.id
    jp = await engine.store_memory(user.id, Fact(statement="東京でラーメンを食べました"))
    hits = await engine.search(user.id, "ラーメン", mode=mode)
    assert hits and hits[0].memory.id == jp.id


async def _found_first(
    engine: MemoryEngine, wanted: str, other: str, query: str, mode: str
) -> None:
    """``wanted``, stored beside ``other`` and an unrelated fact, is the first hit of ``query``."""
    user = await engine.create_user(f"ff{uuid.uuid4().hex[:8]}", None, "user")
    fact = await engine.store_memory(user.id, Fact(statement=wanted))
    await engine.store_memory(user.id, Fact(statement=other))
    await engine.store_memory(user.id, Fact(statement="We talked about the weather all day"))
    hits = await engine.search(user.id, query, mode=mode)
    assert hits and hits[0].memory.id == fact.id


@pytest.mark.parametrize(
    ("wanted", "other", "query"),
    [
        ("ฉันชอบกินข้าวผัดกุ้งที่ร้านริมแม่น้ำ", "วันนี้ฝนตกหนักมากที่กรุงเทพ", "ข้าวผัด"),  # Thai
        ("ຂ້ອຍມັກກິນເຂົ້າໜຽວ", "ມື້ນີ້ຝົນຕົກໜັກ", "ເຂົ້າໜຽວ"),  # Lao
        ("ខ្ញុំចូលចិត្តញ៉ាំបាយ", "ថ្ងៃនេះភ្លៀងធ្លាក់ខ្លាំង", "បាយ"),  # Khmer
        ("ကျွန်တော်ထမင်းစားချင်တယ်", "ဒီနေ့မိုးအရမ်းရွာတယ်", "ထမင်း"),  # Burmese
    ],
)
@pytest.mark.parametrize("mode", ["fulltext", "hybrid"])
async def test_words_of_southeast_asian_scripts_without_spaces_are_found(
    engine: MemoryEngine, mode: str, wanted: str, other: str, query: str
) -> None:
    """Thai, Lao, Khmer and Burmese put no space between words, as Chinese does, but a word
    is several letters and marks: a sentence was one lexeme and a word in it was found by no
    mode (the embedding missed it as well). Inspired by meilisearch/meilisearch#864 ("the
    middle words won't be found with query 'eating' or 'rice'")."""
    await _found_first(engine, wanted, other, query, mode)


@pytest.mark.parametrize(
    ("wanted", "other", "query"),
    [
        ("We celebrated 🎉 after the launch", "The launch was delayed again", "🎉"),
        ("Pizza night 🍕🍕 with the team", "Sushi night 🍣 with the team", "🍕"),
        ("Thumbs up 👍🏽 from Ada", "Ada said no 👎", "👍"),
        ("Family photo 👨\u200d👩\u200d👧 at the beach", "Photo of the beach 🏖", "👧"),
        ("It was ☀️ all week", "It rained ☔ all week", "☀"),
        ("Remember the ⭐ of the show", "Remember the end of the show", "⭐ show"),
    ],
)
@pytest.mark.parametrize("mode", ["fulltext", "hybrid"])
async def test_an_emoji_is_a_word_of_full_text_search(
    engine: MemoryEngine, mode: str, wanted: str, other: str, query: str
) -> None:
    """PostgreSQL's parser reads a symbol as a blank and MiniLM reads every emoji as the same
    [UNK]: a query of "🎉" found nothing in full text, and hybrid search was left with an
    embedding that cannot tell 🎉 from 🍕. Each symbol is now a word of its own (migration
    0015), a skin tone and a ZWJ sequence's members words beside it."""
    await _found_first(engine, wanted, other, query, mode)


@pytest.mark.parametrize(
    ("stored", "query"),
    [
        ("Ｃａｆé déjà vu at the ﬁsh market", "cafe deja vu fish"),
        ("cafe deja vu at the fish market", "Café déjà vu ﬁsh"),
        ("Le garçon a mangé une crème brûlée", "creme brulee"),
        ("Die Straße nach München ist gesperrt", "München Straße"),
        # Greek final sigma: lower() made a capital "Σ" a "σ" wherever it stood, "ς" stayed
        ("Ο ΜΎΘΟΣ ΤΟΥ ΣΙΣΎΦΟΥ", "μύθος"),
        ("Ο Νίκος διάβασε", "ΝΊΚΟΣ"),
        # the same word in NFC and NFD (macOS, some keyboards), either way round
        ("Ada visited the caf\u00e9 in Paris", "cafe\u0301 Paris"),
        ("Ada visited the cafe\u0301 in Paris", "caf\u00e9 Paris"),
    ],
)
async def test_other_forms_of_the_same_words_match_in_full_text(
    engine: MemoryEngine, stored: str, query: str
) -> None:
    user = await engine.create_user(f"nf{uuid.uuid4().hex[:8]}", None, "user")
    wanted = await engine.store_memory(user.id, Fact(statement=stored))
    await engine.store_memory(user.id, Fact(statement="Something else entirely about boats"))
    for mode in ("fulltext", "hybrid"):
        hits = await engine.search(user.id, query, mode=mode)
        assert hits and hits[0].memory.id == wanted.id, mode


async def test_the_rankings_word_form_is_the_full_text_indexs(database_url: str) -> None:
    """search_form() (the hybrid ranking's words: the query's, a speaker's) folds a word as
    halldyll_search_text() and the 'simple' dictionary do for the full-text index."""
    words = [
        "Zo\u00eb",  # NFC
        "Zoe\u0308",  # NFD
        "ZO\u00cb",
        "\u0130zmir",  # Turkish dotted capital I
        "\u0131stanbul",  # ... and dotless small i
        "\u039d\u038a\u039a\u039f\u03a3",  # Greek capitals
        "\u03bd\u03af\u03ba\u03bf\u03c2",  # ... and small, with a final sigma
        "Stra\u00dfe",
        "STRA\u1e9eE",  # capital sharp s
        "\uff21\uff22\uff23",  # full-width
        "\ufb01sh",  # ligature
        "\u00c6sir",
        "\u00d8resund",
        "\u0141\u00f3d\u017a",
        "\u0152uvre",
        "Lon\u200bdon",  # zero-width space
        "\u05e9\u05b8\u05c1\u05dc\u05d5\u05b9\u05dd",  # Hebrew points
        "\u041c\u041e\u0421\u041a\u0412\u0410",  # Cyrillic capitals
        "\u01c4emal",  # the DZ-caron digraph
        "\u0928\u092e\u0938\u094d\u0924\u0947",  # Devanagari signs stay
    ]
    conn = await asyncpg.connect(database_url)
    try:
        for word in words:
            indexed = await conn.fetchval(
                "SELECT tsvector_to_array(to_tsvector('simple', halldyll_search_text($1)))",
                word,
            )
            assert indexed == [search_form(word)], word
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("stored", "query"),
    [
        ("I moved to Lon\u200bdon last spring", "London"),  # zero-width space (web copy)
        ("The super\u00adcalifragilistic song", "supercalifragilistic"),  # soft hyphen
        ("The pass\u2060word is under the mat", "password"),  # word joiner
        ("Order \u202eevil\u202c number 42 shipped", "evil"),  # right-to-left override
        ("\ufeffGrandmother baked plum cake", "grandmother"),  # BOM opening a pasted text
        ("We met at \u2067Lyon\u2069 station", "Lyon"),  # bidi isolate
        ("שָׁלוֹם to everyone at the meeting", "שלום"),  # Hebrew points
        ("ذَهَبَ الوَلَدُ إِلَى المَدْرَسَةِ", "المدرسة"),  # Arabic harakat
        ("ذهب الولد إلى المدرسة", "المَدْرَسَةِ"),  # ... and the other way round
        ("The kitten is called Mi\u200dmi", "Mimi"),  # a joiner where none belongs
    ],
)
async def test_invisible_characters_and_vowel_points_do_not_hide_a_word(
    engine: MemoryEngine, stored: str, query: str
) -> None:
    """Inspired by contao/core#8389 (soft hyphens) and dotnet/docfx#2112 (zero-width spaces
    in copied text): a format character inside or around a word (what text copied from the
    web or a right-to-left document carries) made the word another lexeme, and Hebrew and
    Arabic words written with their optional vowel points did not match the same words
    written without."""
    user = await engine.create_user(f"cf{uuid.uuid4().hex[:8]}", None, "user")
    wanted = await engine.store_memory(user.id, Fact(statement=stored))
    await engine.store_memory(user.id, Fact(statement="Something else entirely about boats"))
    hits = await engine.search(user.id, query, mode="fulltext")
    assert [h.memory.id for h in hits] == [wanted.id]


async def test_an_export_saved_with_a_byte_order_mark_imports(engine: MemoryEngine) -> None:
    """Inspired by cityjson/cjio#21 ("Unexpected UTF-8 BOM"): an export opened and saved
    again by a Windows editor starts with a UTF-8 BOM, which made its header line "not
    JSON" and the whole file unimportable."""
    owner = await engine.create_user(f"bo{uuid.uuid4().hex[:8]}", None, "user")
    fact = await engine.store_memory(owner.id, Fact(statement="Ada keeps bees in Lyon"))
    exported = b"".join([chunk async for chunk in engine.export_memories(owner.id)])
    for saved in (
        b"\xef\xbb\xbf" + exported,
        b"\xef\xbb\xbf" + exported.replace(b"\n", b"\r\n"),
        ["\ufeff" + exported.decode()],
        [b"\xef", b"\xbb", b"\xbf" + exported],  # the mark cut across chunks
    ):
        other = await engine.create_user(f"bi{uuid.uuid4().hex[:8]}", None, "user")
        chunks = [saved] if isinstance(saved, bytes) else saved
        report = await engine.import_memories(other.id, chunks, atomic=True)
        assert report.error_count == 0 and report.created == {"fact": 1}, report
        page = await engine.list_memories(other.id)
        assert [m.memory.statement for m in page.items] == [fact.memory.statement]
    # A mark anywhere but the file's start is still the line's content: refused, by line.
    other = await engine.create_user(f"bx{uuid.uuid4().hex[:8]}", None, "user")
    header, rest = exported.split(b"\n", 1)
    report = await engine.import_memories(other.id, [header + b"\n\xef\xbb\xbf" + rest])
    assert report.error_count == 1 and report.errors[0].line == 2
    assert (await engine.list_memories(other.id)).items == []


async def test_every_part_of_a_long_text_is_findable(engine: MemoryEngine) -> None:
    user = await engine.create_user("longtext", None, "user")
    filler = (
        "ultra detailed matte painting of a misty mountain valley at dawn, volumetric light, "
        "soft pastel colours, wide angle, trending artstation style, intricate details, "
    )
    key = "A red bicycle leans against the old lighthouse door."
    prompt = (filler * 40)[: 3_900 - len(key) - 1] + " " + key
    image = await engine.store_memory(user.id, Image(prompt=prompt))
    fact_text = (filler * 20)[: 1_900 - len(key) - 1] + " " + key
    fact = await engine.store_memory(user.id, Fact(statement=fact_text, importance=0.4))
    hits = await engine.search(user.id, "red bicycle by a lighthouse", limit=5)
    assert {h.memory.id for h in hits[:2]} == {image.id, fact.id}
    assert all(key in h.matched.text for h in hits[:2])
    # A long Chinese transcript (no spaces) is cut into several chunks, not one.
    transcript = "今天我们玩了成语接龙游戏，大家都很开心。" * 50
    stored = await engine.store_memory(user.id, Transcription(text=transcript, language="zh"))
    chunks = await engine.db.fetchval(
        "SELECT count(*) FROM memory_chunks WHERE memory_id = $1", stored.id, user_id=user.id
    )
    assert chunks >= 4


@pytest.mark.parametrize(
    "text",
    [
        "ฉันชอบกินข้าวผัดกุ้งที่ร้านริมแม่น้ำ" * 120,  # Thai, no spaces
        "ខ្ញុំចូលចិត្តញ៉ាំបាយនៅផ្ទះជាមួយគ្រួសារ" * 120,  # Khmer, no spaces
    ],
)
async def test_a_long_text_of_unspaced_unknown_words_is_cut_to_the_budget(
    engine: MemoryEngine, text: str
) -> None:
    """Inspired by huggingface/transformers#17551 and tensorflow/text#73 (a word WordPiece
    cannot spell, or one past 100 characters, is one [UNK] however long): a Thai transcript
    was one chunk costing thousands of budget tokens, so build_context could never include
    it and a search matched all of it."""
    user = await engine.create_user(f"lt{uuid.uuid4().hex[:8]}", None, "user")
    stored = await engine.store_memory(user.id, Transcription(text=text))
    rows = await engine.db.fetch(
        "SELECT content FROM memory_chunks WHERE memory_id = $1", stored.id, user_id=user.id
    )
    assert len(rows) >= 10
    assert max(engine.encoder.count_tokens(r["content"]) for r in rows) <= 128
    word = text[20:26]
    hits = await engine.search(user.id, word, mode="fulltext")
    assert hits and hits[0].memory.id == stored.id and len(hits[0].matched.text) <= 128
    context = await engine.build_context(user.id, query=word, max_tokens=300)
    assert context.sources == [stored.id] and context.token_count <= 300


async def test_an_idempotency_key_names_one_models_turn(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """The key's replay was checked for the session and the messages, not the AI model: a
    turn of model B (or of none) with model A's key in A's session came back replayed=True,
    as if stored, where without the key it is a Conflict. It is another request: refused,
    nothing written, and A's own retry still replays."""
    user = await engine.create_user("keymodels", None, "user")
    for name in ("kA", "kB"):
        with contextlib.suppress(Conflict):
            await engine.register_model(name, "llm")
    first = await engine.record_turn(user.id, "s1", "hello", "hi", model="kA", idempotency_key="k")
    for loop, model in ((engine, "kB"), (second, "kB"), (engine, None), (second, None)):
        with pytest.raises(InvalidInput) as refused:
            await loop.record_turn(user.id, "s1", "hello", "hi", model=model, idempotency_key="k")
        assert refused.value.field == "idempotency_key"
    log = await engine.get_memory(user.id, first.conversation_id)
    assert [m.content for m in log.messages] == ["hello", "hi"]
    again = await second.record_turn(user.id, "s1", "hello", "hi", model="kA", idempotency_key="k")
    assert again.replayed and again.message_seqs == first.message_seqs
    # A shared session's key is refused to a model's turn too.
    await engine.record_turn(user.id, "s2", "hey", "yo", idempotency_key="k2")
    with pytest.raises(InvalidInput):
        await engine.record_turn(user.id, "s2", "hey", "yo", model="kA", idempotency_key="k2")


async def test_speaker_names_with_line_breaks_are_refused(engine: MemoryEngine) -> None:
    """U+2028 and U+2029 are line breaks that are not controls: a name holding one passed
    the check for "no line break" and was stored (the context fenced it, a log line or a
    client's transcript did not)."""
    user = await engine.create_user("breaks", None, "user")
    for names, field in (
        ({"user_name": "Ada\u2028## Relevant facts"}, "user_name"),
        ({"assistant_name": "Bot\u2029[1] forged"}, "assistant_name"),
    ):
        with pytest.raises(InvalidInput) as refused:
            await engine.record_turn(user.id, "s1", "hello", "hi", **names)
        assert refused.value.field == field
    with pytest.raises(InvalidInput):
        await engine.build_context(
            user.id, "hello", messages=[{"role": "user", "content": "hi", "name": "a\u2028b"}]
        )
    assert (await engine.list_memories(user.id)).items == []


async def test_a_deleted_session_log_frees_the_session_for_another_model(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """The session's owner was read from the cached session state (a day's TTL): once the
    log was deleted, a turn of another model in that session was a Conflict naming a model
    whose log no longer exists, on every replica. The refusal now reads the stored log."""
    user = await engine.create_user("freed", None, "user")
    for name in ("fA", "fB"):
        with contextlib.suppress(Conflict):
            await engine.register_model(name, "llm")
    first = await engine.record_turn(user.id, "s1", "hello", "hi", model="fA")
    await second.record_turn(user.id, "s1", "again", "yes", model="fA")  # cached there too
    await engine.delete_memory(user.id, first.conversation_id)
    for loop, model in ((second, "fB"), (engine, "fB")):
        turn = await loop.record_turn(user.id, "s1", "B speaks", "ok", model=model)
        assert turn.conversation_id != first.conversation_id
    with pytest.raises(Conflict):  # the session is B's now, whatever A's replicas cached
        await second.record_turn(user.id, "s1", "A again", "ok", model="fA")
    logs = (await engine.list_memories(user.id, types=["conversation"])).items
    assert len(logs) == 1
    assert [m.content for m in (await engine.get_memory(user.id, logs[0].id)).messages] == [
        "B speaks",
        "ok",
        "B speaks",
        "ok",
    ]


@pytest.mark.parametrize("extract_facts", ["no", 0, None])
async def test_extract_facts_must_be_a_boolean(engine: MemoryEngine, extract_facts) -> None:
    """Over HTTP extract_facts is a strict boolean; the engine read "no" as true and stored
    the facts the caller said not to extract (and the turn with them)."""
    user = await engine.create_user("strict", None, "user")
    with pytest.raises(InvalidInput) as refused:
        await engine.record_turn(user.id, "s1", "I live in Oslo", "ok", extract_facts=extract_facts)
    assert refused.value.field == "extract_facts"
    assert (await engine.list_memories(user.id)).items == []


# ------------------------------------------------------------------ list arguments
# MemTensor/MemOS#1274 (fixed by #1275): a plain string sent as a memory service's `messages`
# was silently skipped; agentuniverse-ai/agentUniverse#3242: `str` and `dict` message forms
# crashed a memory reader. Here a string was read as its characters and a dict as its keys
# (refused on "0", a field no caller sent), and a number raised TypeError. (A generator of
# messages is taken as their list: tests/integration/test_python_api_inputs.py.)
@pytest.mark.parametrize(
    "given",
    [
        lambda: "hello",
        lambda: {"role": "user", "content": "hello"},
        lambda: Message(role="user", content="hello"),
        lambda: 5,
    ],
    ids=["str", "dict", "message", "int"],
)
async def test_messages_not_given_as_a_list_are_refused_naming_the_argument(
    engine: MemoryEngine, given
) -> None:
    user = await engine.create_user(f"m{uuid.uuid4().hex[:8]}", None, "user")
    talk = await engine.store_memory(
        user.id, Conversation(messages=[Message(role="user", content="hi")])
    )
    calls = (
        lambda: engine.append_messages(user.id, talk.id, given()),
        lambda: engine.build_context(user.id, "hi", messages=given()),
    )
    for call in calls:
        with pytest.raises(InvalidInput) as err:
            await call()
        assert err.value.field == "messages"
        assert "must be a list" in err.value.message
    assert [m.content for m in (await engine.get_memory(user.id, talk.id)).messages] == ["hi"]


async def test_a_bad_message_is_named_under_its_argument_as_http_names_it(
    engine: MemoryEngine,
) -> None:
    """The HTTP API's 422 says ``messages.1.content``; the engine said ``1.content``."""
    user = await engine.create_user(f"m{uuid.uuid4().hex[:8]}", None, "user")
    talk = await engine.store_memory(
        user.id, Conversation(messages=[Message(role="user", content="hi")])
    )
    bad = [{"role": "user", "content": "fine"}, {"role": "user", "content": " "}]
    with pytest.raises(InvalidInput) as err:
        await engine.append_messages(user.id, talk.id, bad)
    assert err.value.field == "messages.1.content"
    with pytest.raises(InvalidInput) as err:
        await engine.build_context(user.id, messages=[{"role": "root", "content": "x"}])
    assert err.value.field == "messages.0.role"
    with pytest.raises(InvalidInput) as err:
        await engine.store_memories(user.id, "fact")  # type: ignore[arg-type]
    assert err.value.field == "memories"
    assert [m.content for m in (await engine.get_memory(user.id, talk.id)).messages] == ["hi"]
