"""Redis as the shared cache tier: hits across replicas, and an outage that changes nothing
but speed (SPEC §4.6)."""

from __future__ import annotations

import numpy as np
from support import RedisServer, make_settings

from halldyll_ray import Fact, MemoryEngine


async def test_embeddings_are_shared_through_redis(
    database_url: str, redis_url: str, encoder
) -> None:
    settings = make_settings(database_url, redis_url)
    async with (
        MemoryEngine(settings, encoder=encoder) as one,
        MemoryEngine(settings, encoder=encoder) as two,
    ):
        vector = await one.embed(["a sentence only replica one has seen"])
        again = await two.embed(["a sentence only replica one has seen"])
        assert np.array_equal(vector, again)
        assert two.cache.stats.by_kind["embedding"] == [0, 1, 0]  # from Redis, not the model
        user = await one.create_user("ada", None, "user")
        await one.store_memory(user.id, Fact(statement="Ada sails on weekends"))
        first = await one.search(user.id, "boat hobby")
        second = await two.search(user.id, "boat hobby")
        assert second == first
        assert two.cache.stats.by_kind["search"][1] == 1
        # A write through replica two invalidates replica one's cached result.
        await two.store_memory(user.id, Fact(statement="Ada's sailboat is called Wren"))
        third = await one.search(user.id, "boat hobby")
        assert len(third) == 2


async def test_redis_outage_mid_test(database_url: str, own_redis: RedisServer, encoder) -> None:
    settings = make_settings(database_url, own_redis.url)
    async with MemoryEngine(settings, encoder=encoder) as engine:
        user = await engine.create_user("ada", None, "user")
        tea = await engine.store_memory(user.id, Fact(statement="Ada drinks oolong tea"))
        assert [h.memory.id for h in await engine.search(user.id, "favourite drink")] == [tea.id]
        assert (await engine.health())["redis"]["ok"] is True

        own_redis.stop()  # Redis goes away in the middle of the work.
        coffee = await engine.store_memory(user.id, Fact(statement="Ada dislikes coffee"))
        hits = await engine.search(user.id, "favourite drink")
        assert {h.memory.id for h in hits} == {tea.id, coffee.id}  # fresh, not a stale cache
        context = await engine.build_context(user.id, "what should I serve Ada to drink?")
        assert str(tea.id) in {str(s) for s in context.sources}
        turn = await engine.record_turn(user.id, "s-1", "I like green tea.", "Noted.")
        assert turn.message_seqs == [0, 1]
        health = await engine.health()
        assert health["redis"]["ok"] is False and health["database"]["ok"] is True
        assert health["ok"] is True  # still ready: Redis only makes it faster
        assert engine.cache.remote is not None and engine.cache.remote.errors >= 1

        own_redis.start()  # It comes back on the same port.
        engine.cache.remote._down_until = 0.0  # skip the back-off wait
        await engine.search(user.id, "another query to populate redis")
        assert (await engine.health())["redis"]["ok"] is True
        fresh = MemoryEngine(settings, encoder=encoder)
        await fresh.initialize()
        try:
            await fresh.search(user.id, "another query to populate redis")
            assert fresh.cache.stats.by_kind["search"][1] == 1  # served from Redis again
        finally:
            await fresh.close()


async def test_without_redis_url_cache_is_in_process(database_url: str, encoder) -> None:
    settings = make_settings(database_url, None)
    async with MemoryEngine(settings, encoder=encoder) as engine:
        assert engine.cache.remote is None
        user = await engine.create_user("ada", None, "user")
        await engine.store_memory(user.id, Fact(statement="Ada collects stamps"))
        first = await engine.search(user.id, "hobby")
        assert await engine.search(user.id, "hobby") == first
        assert engine.cache.stats.by_kind["search"][0] == 1
        assert (await engine.health())["redis"] == {"ok": True, "configured": False}


async def test_an_erasure_waits_out_a_stalled_redis(
    database_url: str, own_redis: RedisServer, encoder
) -> None:
    """The cache's commands time out after 0.25 s (an outage costs a hot read little); an
    erasure's deletion of the user's cached entries is tried again over about 3 s, so a Redis
    that stalls for a second (CLIENT PAUSE: a fork, a slow disk, a loaded machine) no longer
    fails the erasure with Unavailable."""
    import redis

    settings = make_settings(database_url, own_redis.url)
    async with MemoryEngine(settings, encoder=encoder) as engine:
        user = await engine.create_user("ada", None, "user")
        await engine.store_memory(user.id, Fact(statement="Ada drinks oolong tea"))
        await engine.search(user.id, "favourite drink")  # a cached entry in Redis
        assert engine.cache.remote is not None
        pattern = f"{settings.redis_key_prefix}*:{user.id}:*"
        side = redis.Redis(port=own_redis.port)
        try:
            assert side.keys(pattern)
            side.client_pause(1000)  # every client waits a second for its next reply
            assert await engine.cache.erase(user.id, []) >= 1
            assert side.keys(pattern) == []
        finally:
            side.close()
