"""Deleting a user is an erasure: nothing of theirs stays in PostgreSQL or Redis, and the
receipt says what went."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from halldyll_ray import (
    Conversation,
    Fact,
    Image,
    MemoryEngine,
    Message,
    NotFound,
    Transcription,
    requestctx,
)
from halldyll_ray.errors import Unavailable
from halldyll_ray.models import Segment


async def _tables_with_uuid_columns(engine: MemoryEngine) -> list[tuple[str, str]]:
    rows = await engine.db.fetch(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND data_type = 'uuid'",
        admin=True,
    )
    return [(r["table_name"], r["column_name"]) for r in rows]


async def _rows_naming(engine: MemoryEngine, user_id: uuid.UUID) -> dict[str, int]:
    found = {}
    for table, column in await _tables_with_uuid_columns(engine):
        n = await engine.db.fetchval(
            f'SELECT count(*) FROM "{table}" WHERE "{column}" = $1', user_id, admin=True
        )
        if n:
            found[f"{table}.{column}"] = n
    # arrays of ids (the audit log's target ids)
    n = await engine.db.fetchval(
        "SELECT count(*) FROM audit_log WHERE $1 = ANY(target_ids)", str(user_id), admin=True
    )
    if n:
        found["audit_log.target_ids"] = n
    return found


async def test_erasure_removes_every_row_and_cache_entry_and_returns_a_receipt(
    engine: MemoryEngine, redis_url: str
) -> None:
    keep = await engine.create_user(f"keep{uuid.uuid4().hex[:6]}", None, "user")
    gone = await engine.create_user(f"gone{uuid.uuid4().hex[:6]}", None, "user")
    viewer = await engine.create_user(f"view{uuid.uuid4().hex[:6]}", None, "viewer")
    await engine.grant_viewer(viewer.id, gone.id)
    await engine.create_api_key(gone.id, name="laptop")
    await engine.create_api_key(gone.id, name="phone")
    await engine.store_memory(gone.id, Fact(statement="Gone hides the spare key in the shed"))
    await engine.store_memory(keep.id, Fact(statement="Keep hides the spare key in the shed"))
    await engine.store_memory(gone.id, Image(prompt="a red fox in the snow", seed=1))
    await engine.store_memory(
        gone.id,
        Transcription(
            text="call me back",
            segments=[Segment(start=0.0, end=1.0, text="call me back")],
        ),
    )
    await engine.store_memory(
        gone.id,
        Conversation(
            messages=[
                Message(role="user", name="Gone", content="I moved to Bergen in May"),
                Message(role="assistant", content="How do you like Bergen?"),
            ]
        ),
    )
    await engine.record_turn(
        gone.id, "chat-1", "Remind me to water the plants", "Noted.", idempotency_key="t-1"
    )
    await engine.search(gone.id, "where is the spare key?")  # a cached search result
    before = await _rows_naming(engine, gone.id)
    assert before.keys() >= {"users.id", "memories.user_id", "memory_chunks.user_id"}
    redis = aioredis.Redis.from_url(redis_url)
    prefix = engine.settings.redis_key_prefix + ":"
    try:
        mine = [k async for k in redis.scan_iter(match=f"{prefix}*:{gone.id}:*")]
        assert mine  # session state and the cached search are there
        texts = [
            r["indexed"]
            for r in await engine.db.fetch(
                "SELECT CASE WHEN label IS NULL THEN content ELSE label || ': ' || content END"
                " AS indexed FROM memory_chunks WHERE user_id = $1",
                gone.id,
                admin=True,
            )
        ]
        embedded = [prefix + k for k in engine.components.embeddings.cache_keys(texts)]
        assert await redis.exists(*embedded) > 0

        with requestctx.acting(keep.id, "req-erase-1"):
            receipt = await engine.delete_user(gone.id)

        assert (receipt.user_id, receipt.username) == (gone.id, gone.username)
        assert receipt.memories == {"conversation": 2, "fact": 1, "image": 1, "transcription": 1}
        assert receipt.messages == 4  # two stored, two from the turn
        assert receipt.chunks == before["memory_chunks.user_id"]
        assert (receipt.api_keys, receipt.viewer_grants, receipt.turn_requests) == (2, 1, 1)
        assert receipt.erased_by == keep.id and receipt.request_id == "req-erase-1"
        assert receipt.cache_entries >= len(mine)

        # Nothing of the user in PostgreSQL but the audit log, whose row is the receipt.
        after = await _rows_naming(engine, gone.id)
        assert set(after) <= {"audit_log.acting_for", "audit_log.target_ids"}, after
        row = await engine.db.fetchrow(
            "SELECT actor_id, request_id, details FROM audit_log"
            " WHERE operation = 'user.delete' AND $1 = ANY(target_ids)",
            str(gone.id),
            admin=True,
        )
        assert (row["actor_id"], row["request_id"]) == (keep.id, "req-erase-1")
        assert row["details"]["memories"] == receipt.memories
        assert row["details"]["chunks"] == receipt.chunks
        # Nothing in Redis: no key of the user, no embedding of their stored texts.
        assert [k async for k in redis.scan_iter(match=f"{prefix}*:{gone.id}:*")] == []
        assert await redis.exists(*embedded) == 0
        assert not any(str(gone.id) in k for k in engine.cache.local._data)
    finally:
        await redis.aclose()
    # The others are untouched; a second erasure finds nobody.
    assert [h.memory.user_id for h in await engine.search(keep.id, "spare key")] == [keep.id]
    assert (await engine.get_user(viewer.id)).id == viewer.id
    with pytest.raises(NotFound):
        await engine.delete_user(gone.id)


async def test_an_erasure_that_cannot_reach_redis_deletes_nothing(
    database_url: str, own_redis, encoder
) -> None:
    from support import make_settings

    async with MemoryEngine(make_settings(database_url, own_redis.url), encoder=encoder) as e:
        user = await e.create_user(f"r{uuid.uuid4().hex[:6]}", None, "user")
        await e.store_memory(user.id, Fact(statement="kept while Redis is down"))
        own_redis.stop()
        with pytest.raises(Unavailable, match="Redis"):
            await e.delete_user(user.id)
        assert (await e.get_user(user.id)).id == user.id  # nothing deleted: retry later
        assert len((await e.list_memories(user.id)).items) == 1
        own_redis.start()
        receipt = await e.delete_user(user.id)
        assert receipt.memories == {"fact": 1}


async def test_a_deleted_memory_s_cached_embeddings_go_with_it(
    engine: MemoryEngine, redis_url: str
) -> None:
    """An erasure removes the cached embeddings of the user's texts; deleting one memory (or
    the purge of an expired fact) left those of its texts in Redis for a week: a vector of a
    text says much of its words, and its key (a hash of the text) confirms a guess."""
    user = await engine.create_user(f"cached{uuid.uuid4().hex[:6]}", None, "user")
    said = f"My locker code is {uuid.uuid4().hex[:8]}"
    brief = f"Ada waits at gate {uuid.uuid4().hex[:4]}"
    talk = await engine.store_memory(
        user.id, Conversation(title="Locker", messages=[Message(role="user", content=said)])
    )
    fact = await engine.store_memory(user.id, Fact(statement=brief, kind="ephemeral"))
    keep = await engine.store_memory(user.id, Fact(statement="Ada keeps bees"))
    texts = [
        r["indexed"]
        for r in await engine.db.fetch(
            "SELECT CASE WHEN label IS NULL THEN content ELSE label || ': ' || content END "
            "AS indexed, memory_id FROM memory_chunks WHERE user_id = $1",
            user.id,
            admin=True,
        )
    ]
    assert any(said in t for t in texts) and "Ada keeps bees" in texts
    embeddings = engine.components.embeddings
    redis = aioredis.Redis.from_url(redis_url)
    prefix = engine.settings.redis_key_prefix + ":"

    async def cached(*of: str) -> int:
        return int(await redis.exists(*[prefix + k for k in embeddings.cache_keys(list(of))]))

    try:
        talk_texts = [t for t in texts if said in t or t == "Locker"]
        assert await cached(*talk_texts) == len(talk_texts)
        await engine.delete_memory(user.id, talk.id)
        assert await cached(*talk_texts) == 0
        assert await cached(brief) == 1
        async with engine.db.scoped(admin=True) as conn:
            await conn.execute(
                "UPDATE memories SET expires_at = now() - interval '1 second' WHERE id = $1",
                fact.id,
            )
        assert await engine.purge_expired() == 1
        assert await cached(brief) == 0
        assert await cached("Ada keeps bees") == 1  # the user's other texts stay cached
        assert (await engine.get_memory(user.id, keep.id)).memory.statement == "Ada keeps bees"
    finally:
        await redis.aclose()


async def test_what_a_request_caches_while_its_user_is_erased_does_not_stay(
    engine: MemoryEngine, redis_url: str
) -> None:
    """A search reads its results, then caches them; a turn finds its session's log, then
    caches its id under the session's name. An erasure that committed in between swept the
    user's keys before that write (in its transaction and once after), so the search's
    results, the text of the erased user's memories, stayed in Redis for
    SEARCH_CACHE_TTL_SECONDS, and the session's state for a day. Each write now checks that
    its user still exists once it is written."""
    user = await engine.create_user(f"racing{uuid.uuid4().hex[:6]}", None, "user")
    await engine.store_memory(user.id, Fact(statement="Ada takes insulin every morning"))
    search = engine.components.search
    found = search._search

    async def found_then_erased(*args, **kwargs):  # the search's query ran, then the erasure
        results = await found(*args, **kwargs)
        await engine.delete_user(user.id)
        return results

    redis = aioredis.Redis.from_url(redis_url)
    prefix = engine.settings.redis_key_prefix + ":"
    mine = f"{prefix}*:{user.id}:*"
    try:
        search._search = found_then_erased  # type: ignore[method-assign]
        try:
            hits = await engine.search(user.id, "what does Ada take")
        finally:
            search._search = found  # type: ignore[method-assign]
        assert hits[0].memory.memory.statement == "Ada takes insulin every morning"
        assert [k async for k in redis.scan_iter(match=mine)] == []
        assert engine.cache.local.delete_containing(str(user.id)) == 0

        other = await engine.create_user(f"racing{uuid.uuid4().hex[:6]}", None, "user")
        mine = f"{prefix}*:{other.id}:*"
        loop = engine.components.agent_loop
        cache = loop.cache
        keep = cache.set

        async def erased_then_kept(key: str, value: bytes, *, ttl: float | None) -> None:
            if key.startswith("session:"):  # the log was found, then the erasure
                await engine.delete_user(other.id)
            await keep(key, value, ttl=ttl)

        cache.set = erased_then_kept  # type: ignore[method-assign]
        try:
            with pytest.raises(NotFound):
                await engine.record_turn(other.id, "visit-to-dr-lee", "I take insulin", "Noted.")
        finally:
            cache.set = keep  # type: ignore[method-assign]
        assert [k async for k in redis.scan_iter(match=mine)] == []
        assert engine.cache.local.delete_containing(str(other.id)) == 0
    finally:
        await redis.aclose()
