"""Two users, every operation: nothing of one is ever returned, counted, ranked or deleted
through the other (SPEC §4.1, data isolation)."""

from __future__ import annotations

import pytest

from halldyll_ray import (
    Conversation,
    Fact,
    InvalidInput,
    MemoryEngine,
    Message,
    NotFound,
    Summary,
)


@pytest.fixture
async def two_users(engine: MemoryEngine):
    ada = await engine.create_user("ada", None, "user")
    bob = await engine.create_user("bob", None, "user")
    # Both users store the very same texts: any leak would show up as a hit.
    texts = ["The vault code is 4417", "My cat is called Pixel"]
    adas = [await engine.store_memory(ada.id, Fact(statement=t)) for t in texts]
    bobs = [await engine.store_memory(bob.id, Fact(statement=t)) for t in texts]
    ada_conv = await engine.store_memory(
        ada.id,
        Conversation(
            title="secrets",
            session_id="shared-session-name",
            messages=[Message(role="user", content="the vault code is 4417")],
        ),
    )
    return ada, bob, adas, bobs, ada_conv


async def test_get_list_search_are_per_user(engine: MemoryEngine, two_users) -> None:
    _, bob, adas, bobs, ada_conv = two_users
    for memory in [*adas, ada_conv]:
        with pytest.raises(NotFound):
            await engine.get_memory(bob.id, memory.id)
    listed = await engine.list_memories(bob.id)
    assert {m.id for m in listed.items} == {m.id for m in bobs}
    for mode in ("semantic", "hybrid", "fulltext"):
        hits = await engine.search(bob.id, "vault code 4417", mode=mode, threshold=-1.0, limit=100)
        assert {h.memory.id for h in hits} <= {m.id for m in bobs}, mode
        assert all(h.memory.user_id == bob.id for h in hits)
    assert await engine.list_memories(bob.id, session_id="shared-session-name") == type(listed)(
        items=[], next_cursor=None
    )


async def test_write_paths_cannot_cross(engine: MemoryEngine, two_users) -> None:
    ada, bob, adas, _, ada_conv = two_users
    with pytest.raises(NotFound):
        await engine.delete_memory(bob.id, adas[0].id)
    with pytest.raises(NotFound):
        await engine.update_memory(bob.id, adas[0].id, {"tags": ["stolen"]})
    with pytest.raises(NotFound):
        await engine.append_messages(bob.id, ada_conv.id, [Message(role="user", content="hi")])
    with pytest.raises(InvalidInput):
        await engine.store_memory(bob.id, Summary(text="mine now", covers=[adas[0].id]))
    # Ada's data is untouched.
    assert (await engine.get_memory(ada.id, adas[0].id)).tags == []
    assert (await engine.get_memory(ada.id, ada_conv.id)).message_count == 1


async def test_context_and_session_are_per_user(engine: MemoryEngine, two_users) -> None:
    ada, bob, _, bobs, _ = two_users
    await engine.record_turn(ada.id, "same-session", "My name is Ada Lovelace.", "Hello Ada!")
    context = await engine.prepare_context(bob.id, "same-session", "what is my name?")
    assert "Lovelace" not in context.text
    assert set(context.sources) <= {m.id for m in bobs}
    built = await engine.build_context(bob.id, "vault code")
    assert set(built.sources) <= {m.id for m in bobs}
    assert built.sources  # Bob's own copy is found


async def test_purge_and_delete_user_touch_only_their_rows(engine: MemoryEngine, two_users):
    ada, bob, adas, _, _ = two_users
    await engine.delete_user(bob.id)
    assert (await engine.get_memory(ada.id, adas[0].id)).id == adas[0].id
    count = await engine.db.fetchval(
        "SELECT count(*) FROM memories WHERE user_id = $1", bob.id, admin=True
    )
    assert count == 0
    chunks = await engine.db.fetchval(
        "SELECT count(*) FROM memory_chunks WHERE user_id = $1", bob.id, admin=True
    )
    assert chunks == 0


async def test_cache_keys_carry_the_user(engine: MemoryEngine, two_users) -> None:
    ada, bob, *_ = two_users
    await engine.search(ada.id, "vault code")
    await engine.search(bob.id, "vault code")
    keys = [k for k in list(engine.cache.local._data) if k.startswith("search:")]
    assert {k.split(":")[1] for k in keys} == {str(ada.id), str(bob.id)}
