"""Facts: reinforcement instead of duplicates (also under concurrency), merging, expiry."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from support import make_settings

from halldyll_ray import Fact, FactKind, MemoryEngine, Summary
from halldyll_ray.errors import InvalidInput, NotFound


async def _fact_rows(engine: MemoryEngine, user_id) -> int:
    return await engine.db.fetchval(
        "SELECT count(*) FROM memories WHERE user_id = $1 AND type = 'fact'", user_id, admin=True
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (
            "My github token is ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZaBcDeFgHiJ",
            "My github token is ghp_zYxWvUtSrQpOnMlKjIhGfEdCbAzYxWvUtSrQ",
        ),
        ("The wifi password is " + "qwerty" * 20, "The wifi password is " + "azerty" * 20),
        ("q" * 150, "a\uffffb\ufffe"),
        # Secrets that differ only in letter case are different secrets.
        ("My wifi password is HelloWorld2024", "My wifi password is helloworld2024"),
        ("My api key is sk-aBcDeFgHiJkL", "My api key is sk-AbCdEfGhIjKl"),
        ("The vault code is " + "QWERTY" * 4, "The vault code is " + "qwerty" * 4),
        # What MiniLM reads as [UNK] (every emoji, Thai, Amharic): the same vector for all.
        ("\U0001f355", "\U0001f354"),
        ("My allergy: \U0001f95c", "My allergy: \U0001f990"),
        (
            "\u0e09\u0e31\u0e19\u0e0a\u0e2d\u0e1a\u0e01\u0e32\u0e41\u0e1f",
            "\u0e09\u0e31\u0e19\u0e41\u0e1e\u0e49\u0e16\u0e31\u0e48\u0e27",
        ),
        ("\u1230\u120b\u121d \u1290\u12cd", "\u12f0\u1205\u1293 \u1290\u12cd"),
    ],
)
async def test_statements_the_encoder_cannot_tell_apart_stay_two_facts(
    engine: MemoryEngine, first: str, second: str
) -> None:
    """Nearly the same vector (similarity over FACT_MERGE_SIMILARITY), different facts: the
    second used to reinforce the first and was stored nowhere."""
    user = await engine.create_user("tok", None, "user")
    a = await engine.store_memory(user.id, Fact(statement=first))
    b = await engine.store_memory(user.id, Fact(statement=second))
    assert a.id != b.id and b.reinforcement_count == 0
    stored = {m.memory.statement for m in (await engine.list_memories(user.id)).items}
    assert stored == {first, second}


async def test_the_same_unknown_words_still_reinforce(engine: MemoryEngine) -> None:
    """Words the encoder cannot read are compared as they are: the same ones merge."""
    user = await engine.create_user("emoji", None, "user")
    first = await engine.store_memory(user.id, Fact(statement="My allergy: \U0001f95c"))
    again = await engine.store_memory(user.id, Fact(statement="my allergy \U0001f95c!"))
    assert again.id == first.id and again.reinforcement_count == 1


async def test_german_in_capitals_is_the_same_fact_on_every_path(engine: MemoryEngine) -> None:
    """ "STRAßE" (German in capitals keeps a lowercase "ß", whose capital is "SS") was read as
    an identifier with a case of its own, like "iPhone": its fact was kept apart from
    "STRASSE" and "Straße", which case folding makes equal. Store, bulk store and import."""
    user = await engine.create_user("ada", None, "user")
    first = await engine.store_memory(user.id, Fact(statement="Ada lives on the STRASSE 5"))
    again = await engine.store_memory(user.id, Fact(statement="Ada lives on the STRAßE 5"))
    assert again.id == first.id and again.reinforcement_count == 1
    (bulk,) = await engine.store_memories(
        user.id, [{"type": "fact", "statement": "ADA LIVES ON THE STRAßE 5"}]
    )
    assert bulk.id == first.id and bulk.reinforcement_count == 2
    other = await engine.create_user("bob", None, "user")
    await engine.store_memory(other.id, Fact(statement="Ada lives on the Straße 5."))
    file = b"".join([line async for line in engine.export_memories(other.id)])
    report = await engine.import_memories(user.id, [file])
    assert report.merged == 1 and not report.created
    assert await _fact_rows(engine, user.id) == 1


async def test_the_dotted_capital_i_folds_as_i_does(engine: MemoryEngine) -> None:
    """ "İ" case-folds to "i" + U+0307: "İzmir", "Izmir" and "İZMİR" were three facts."""
    user = await engine.create_user("ada", None, "user")
    first = await engine.store_memory(user.id, Fact(statement="Ada was born in Izmir"))
    for statement in ("Ada was born in İzmir", "ADA WAS BORN IN İZMİR"):
        again = await engine.store_memory(user.id, Fact(statement=statement))
        assert again.id == first.id
    assert again.reinforcement_count == 2
    assert await _fact_rows(engine, user.id) == 1


async def test_invisible_marks_make_no_second_fact(engine: MemoryEngine) -> None:
    """A direction mark (text copied from right-to-left writing), a zero-width space or a
    soft hyphen gave a statement a key of its own: a bulk store kept it as a second fact."""
    user = await engine.create_user("ada", None, "user")
    stored = await engine.store_memories(
        user.id,
        [
            {"type": "fact", "statement": "Ada lives on the Straße 5"},
            {"type": "fact", "statement": "Ada lives on the STRASSE 5\u200f"},
            {"type": "fact", "statement": "Ada lives on the Stra\u00adße\u200b 5"},
        ],
    )
    assert len({m.id for m in stored}) == 1 and stored[-1].reinforcement_count == 2
    assert stored[0].memory.statement == "Ada lives on the Straße 5"  # type: ignore[union-attr]
    assert await _fact_rows(engine, user.id) == 1


async def test_same_fact_reinforces(engine: MemoryEngine) -> None:
    user = await engine.create_user("ada", None, "user")
    first = await engine.store_memory(user.id, Fact(statement="Ada likes jazz", confidence=0.5))
    second = await engine.store_memory(
        user.id, Fact(statement="  ada LIKES jazz!  ", confidence=0.5, tags=["music"])
    )
    assert second.id == first.id
    assert second.reinforcement_count == 1
    assert second.memory.confidence > first.memory.confidence
    assert second.memory.confidence == pytest.approx(1 - 0.5 * (1 - 0.25), abs=1e-6)
    assert "music" in second.tags
    assert await _fact_rows(engine, user.id) == 1
    # Chunks follow the merged tags: a tag filter finds the fact.
    hits = await engine.search(user.id, "music taste", tags=["music"])
    assert [h.memory.id for h in hits] == [first.id]


async def test_a_facts_sources_do_not_hide_its_own_metadata(engine: MemoryEngine) -> None:
    """The sources of a fact's stores are the record's ``sources``; ``metadata.sources`` shows
    them only where the caller's metadata has no key of that name (it was overwritten on every
    read, and the caller's value shown nowhere but the export)."""
    user = await engine.create_user("src", None, "user")
    own = {"sources": "my own field", "n": 1}
    first = await engine.store_memory(
        user.id, Fact(statement="Ada sings alto", source="chat-1", metadata=own)
    )
    again = await engine.store_memory(user.id, Fact(statement="Ada sings alto", source="chat-2"))
    assert again.id == first.id and first.sources == ["chat-1"]
    for read in (
        again,
        await engine.get_memory(user.id, first.id),
        (await engine.list_memories(user.id)).items[0],
        (await engine.search(user.id, "alto singer"))[0].memory,
    ):
        assert read.sources == ["chat-1", "chat-2"]
        assert read.metadata["sources"] == "my own field" and read.metadata["n"] == 1
        assert read.model_dump(mode="json")["sources"] == ["chat-1", "chat-2"]
    plain = await engine.store_memory(user.id, Fact(statement="Ada owns a cello", source="s"))
    assert plain.sources == ["s"] and plain.metadata == {"sources": ["s"]}  # as before
    assert (await engine.store_memory(user.id, Summary(text="A summary."))).sources == []


@pytest.mark.parametrize(
    "again", ["Ada likes green tea", "ada LIKES green tea!", "Ada really likes green tea"]
)
async def test_a_reinforced_fact_keeps_at_most_max_tags(engine: MemoryEngine, again: str) -> None:
    """Reinforcing merged the tags without bound: a fact of 32 tags said again with 32 others
    held 64, and every read of it (the store's answer included) failed on MAX_TAGS. It keeps
    its own tags and gains new ones while it has room; on every merge path (the same key,
    a near duplicate)."""
    from halldyll_ray.models import MAX_TAGS

    user = await engine.create_user("tags", None, "user")
    own = [f"a{i:02d}" for i in range(MAX_TAGS - 2)]
    first = await engine.store_memory(
        user.id, {"type": "fact", "statement": "Ada likes green tea", "tags": own}
    )
    new = ["b1", "b0", "b2", "b3", "a00"]
    merged = await engine.store_memory(user.id, {"type": "fact", "statement": again, "tags": new})
    assert merged.id == first.id and merged.reinforcement_count == 1
    assert merged.tags == sorted([*own, "b0", "b1"])
    assert (await engine.get_memory(user.id, first.id)).tags == merged.tags
    assert len((await engine.list_memories(user.id)).items[0].tags) == MAX_TAGS


async def test_a_reinforced_fact_keeps_its_newest_sources_and_exports_whole(
    engine: MemoryEngine,
) -> None:
    """Each reinforcement appended its sources without bound; a fact said 10,001 times
    exported a line the import refused (at most MAX_FACT_SOURCES sources). The newest are
    kept, oldest first, on every merge path."""
    from halldyll_ray.models import MAX_FACT_SOURCES

    user = await engine.create_user("sources", None, "user")
    fact = await engine.store_memory(user.id, Fact(statement="Ada sings alto", source="s0"))
    async with engine.db.scoped(admin=True) as conn:
        await conn.execute(
            "UPDATE memories SET payload = jsonb_set(payload, '{sources}', "
            "to_jsonb(array_fill('old'::text, ARRAY[$2::int]) || '{s0}'::text[])) WHERE id = $1",
            fact.id,
            MAX_FACT_SOURCES - 1,
        )
    again = await engine.store_memory(user.id, Fact(statement="Ada sings alto", source="s1"))
    assert again.id == fact.id
    assert len(again.sources) == MAX_FACT_SOURCES and again.sources[-2:] == ["s0", "s1"]
    near = await engine.store_memory(user.id, Fact(statement="Ada really sings alto", source="s2"))
    assert near.id == fact.id and near.sources[-3:] == ["s0", "s1", "s2"]
    assert len(near.sources) == MAX_FACT_SOURCES
    exported = b"".join([piece async for piece in engine.export_memories(user.id)])
    other = await engine.create_user("copy", None, "user")
    report = await engine.import_memories(other.id, [exported], atomic=True)
    assert report.error_count == 0 and report.created == {"fact": 1}
    copy = (await engine.list_memories(other.id)).items[0]
    assert copy.sources == near.sources


async def test_fact_scope_is_part_of_identity(engine: MemoryEngine) -> None:
    user = await engine.create_user("ada", None, "user")
    await engine.register_model("Qwen2.5-14B-Instruct", "llm")
    shared = await engine.store_memory(user.id, Fact(statement="Ada likes jazz"))
    scoped = await engine.store_memory(
        user.id, Fact(statement="Ada likes jazz", model="Qwen2.5-14B-Instruct")
    )
    assert scoped.id != shared.id
    other = await engine.create_user("bob", None, "user")
    bobs = await engine.store_memory(other.id, Fact(statement="Ada likes jazz"))
    assert bobs.id not in {shared.id, scoped.id}
    assert bobs.reinforcement_count == 0


async def test_near_duplicate_merges(engine: MemoryEngine) -> None:
    user = await engine.create_user("ada", None, "user")
    first = await engine.store_memory(
        user.id, Fact(statement="Ada's favourite colour is teal", confidence=0.6)
    )
    near = await engine.store_memory(
        user.id, Fact(statement="Ada's favorite color is teal", confidence=0.6)
    )
    assert near.id == first.id and near.reinforcement_count == 1
    different = await engine.store_memory(
        user.id, Fact(statement="Ada's favourite food is ramen", confidence=0.6)
    )
    assert different.id != first.id
    assert await _fact_rows(engine, user.id) == 2


async def test_a_near_duplicate_with_other_particulars_is_a_new_fact(engine: MemoryEngine) -> None:
    """Statements embedded as near-duplicates that differ in a number, a date, a negation or
    a name are different facts: the newer one is stored, the older one kept unchanged."""
    user = await engine.create_user("ada", None, "user")
    pairs = [
        ("The user is 30 years old", "The user is 31 years old"),
        ("The user likes coffee", "The user doesn't like coffee"),
        ("The user's sister is called Maria", "The user's sister is called Marta"),
        (
            "The user has a dentist appointment on Monday",
            "The user has a dentist appointment on Tuesday",
        ),
        ("The user has two cats", "The user has three cats"),
    ]
    for older, newer in pairs:
        first = await engine.store_memory(user.id, Fact(statement=older))
        second = await engine.store_memory(user.id, Fact(statement=newer))
        assert second.id != first.id, (older, newer)
        assert second.memory.statement == newer and second.reinforcement_count == 0
        kept = await engine.get_memory(user.id, first.id)
        assert kept.memory.statement == older and kept.reinforcement_count == 0
    assert await _fact_rows(engine, user.id) == 2 * len(pairs)
    # The same particulars in other words still reinforce.
    again = await engine.store_memory(user.id, Fact(statement="The user is 31 years of age"))
    assert again.reinforcement_count == 1
    assert again.memory.statement == "The user is 31 years old"
    tea = await engine.store_memory(user.id, Fact(statement="Ada drinks green tea every morning"))
    moved = await engine.store_memory(
        user.id, Fact(statement="Every morning, Ada drinks green tea")
    )
    assert moved.id == tea.id and moved.reinforcement_count == 1  # a name moved is the same name
    forty = await engine.store_memory(user.id, Fact(statement="Bo is forty years old"))
    digits = await engine.store_memory(user.id, Fact(statement="Bo is 40 years old"))
    assert digits.id == forty.id  # the same number in words and digits


async def test_parallel_reinforcement_from_two_replicas_leaves_one_row(
    engine: MemoryEngine, database_url: str, redis_url: str, encoder
) -> None:
    user = await engine.create_user("ada", None, "user")
    replica = MemoryEngine(make_settings(database_url, redis_url), encoder=encoder)
    await replica.initialize()
    try:
        statements = ["Ada keeps bees on her roof", "ada keeps bees on her roof."] * 6
        stores = [
            (engine if i % 2 == 0 else replica).store_memory(
                user.id, Fact(statement=s, confidence=0.2)
            )
            for i, s in enumerate(statements)
        ]
        results = await asyncio.gather(*stores)
    finally:
        await replica.close()
    assert len({r.id for r in results}) == 1
    assert await _fact_rows(engine, user.id) == 1
    final = await engine.get_memory(user.id, results[0].id)
    assert final.reinforcement_count == len(statements) - 1
    chunks = await engine.db.fetchval(
        "SELECT count(*) FROM memory_chunks WHERE memory_id = $1", final.id, admin=True
    )
    assert chunks == 1


async def _until_expired(memory: Any) -> None:
    """Sleep until a stored memory's expires_at has passed."""
    assert memory.expires_at is not None
    await asyncio.sleep(max(0.0, (memory.expires_at - datetime.now(UTC)).total_seconds()) + 0.2)


async def test_ephemeral_facts_expire_and_purge(database_url: str, redis_url: str, encoder) -> None:
    # A few seconds of life: the summary must cover the fact before it expires on a loaded
    # machine (1.5 s could pass in three stores).
    settings = make_settings(database_url, redis_url, ephemeral_fact_ttl_days=4 / 86_400)
    async with MemoryEngine(settings, encoder=encoder) as engine:
        user = await engine.create_user("ada", None, "user")
        lasting = await engine.store_memory(user.id, Fact(statement="Ada was born in Oslo"))
        fleeting = await engine.store_memory(
            user.id,
            Fact(
                statement="Ada is in a meeting right now", kind=FactKind.EPHEMERAL, confidence=0.3
            ),
        )
        summary = await engine.store_memory(
            user.id, Summary(text="Ada's day.", covers=[fleeting.id, lasting.id])
        )
        assert fleeting.expires_at is not None and lasting.expires_at is None
        await _until_expired(fleeting)
        hits = await engine.search(user.id, "is Ada busy in a meeting?", threshold=0.0)
        assert fleeting.id not in {h.memory.id for h in hits}
        page = await engine.list_memories(user.id)
        assert [m.id for m in page.items] == [summary.id, lasting.id]
        assert await engine.purge_expired() == 1
        # The purged fact leaves the summary's covers, as a deleted memory does.
        assert (await engine.get_memory(user.id, summary.id)).memory.covers == [lasting.id]
        assert await engine.purge_expired() == 0
        assert await _fact_rows(engine, user.id) == 1
        # An expired fact is no memory to cover, even before the purge comes by.
        gone = await engine.store_memory(
            user.id, Fact(statement="Ada is on a train", kind=FactKind.EPHEMERAL)
        )
        await _until_expired(gone)
        with pytest.raises(InvalidInput):
            await engine.store_memory(user.id, Summary(text="Ada's trip.", covers=[gone.id]))


async def test_reinforcement_extends_and_promotes(
    database_url: str, redis_url: str, encoder
) -> None:
    settings = make_settings(database_url, redis_url, fact_promotion_confidence=0.6)
    async with MemoryEngine(settings, encoder=encoder) as engine:
        user = await engine.create_user("ada", None, "user")
        fact = Fact(statement="Ada is vegetarian", kind=FactKind.EPHEMERAL, confidence=0.3)
        first = await engine.store_memory(user.id, fact)
        second = await engine.store_memory(user.id, fact)
        assert second.memory.kind is FactKind.EPHEMERAL
        assert second.expires_at > first.expires_at
        confidences = [second.memory.confidence]
        current = second
        while current.memory.kind is FactKind.EPHEMERAL:
            current = await engine.store_memory(user.id, fact)
            confidences.append(current.memory.confidence)
            assert len(confidences) < 20
        assert confidences == sorted(confidences)
        assert current.memory.confidence >= 0.6
        assert current.expires_at is None


async def _expire(engine: MemoryEngine, fact_id) -> None:
    """Move a fact's expiry into the past, as time does before the purge comes by."""
    async with engine.db.scoped(admin=True) as conn:
        assert await conn.fetchval(
            "UPDATE memories SET expires_at = now() - interval '1 second' WHERE id = $1 "
            "RETURNING id",
            fact_id,
        )


async def test_an_expired_fact_said_again_is_a_new_fact(engine: MemoryEngine) -> None:
    """A fact past its expiry but not purged yet still held its key: storing the same
    statement reinforced the dead row (its old confidence, count and sources came back,
    promoted to permanent), and a PATCH to that statement was refused as a duplicate of a
    fact the user could not see. Now a write under the user's lock purges their expired
    facts first, as ``purge_expired`` would (an ``expired`` event, forgotten everywhere)."""
    user = await engine.create_user("ada", None, "user")
    fact = Fact(
        statement="Ada is in a meeting right now",
        kind=FactKind.EPHEMERAL,
        confidence=0.5,
        source="chat 1",
    )
    old = await engine.store_memory(user.id, fact)
    await engine.store_memory(user.id, fact)
    summary = await engine.store_memory(user.id, Summary(text="Ada's day.", covers=[old.id]))
    await _expire(engine, old.id)
    again = await engine.store_memory(user.id, fact.model_copy(update={"source": "chat 2"}))
    assert again.id != old.id
    assert again.reinforcement_count == 0 and again.memory.confidence == 0.5
    assert again.memory.kind is FactKind.EPHEMERAL and again.sources == ["chat 2"]
    assert await _fact_rows(engine, user.id) == 1
    assert (await engine.get_memory(user.id, summary.id)).memory.covers == []
    kinds = await engine.db.fetch(
        "SELECT kind FROM memory_events WHERE memory_id = $1 ORDER BY id", old.id, admin=True
    )
    # (the "updated" is _expire's)
    assert [r["kind"] for r in kinds] == ["created", "reinforced", "updated", "expired"]
    # A PATCH to the statement of a fact that expired is no conflict either.
    other = await engine.store_memory(user.id, Fact(statement="Ada was born in Oslo"))
    await _expire(engine, again.id)
    changed = await engine.update_memory(
        user.id, other.id, {"statement": "Ada is in a meeting right now"}
    )
    assert changed.memory.statement == "Ada is in a meeting right now"
    assert await _fact_rows(engine, user.id) == 1
    assert await engine.purge_expired() == 0


async def test_a_fact_that_expires_before_its_patch_is_gone(engine: MemoryEngine) -> None:
    """The PATCH read the fact before taking the user's lock: one that expired in between
    was written (made permanent: brought back to life) instead of NotFound."""
    user = await engine.create_user("ada", None, "user")
    fact = await engine.store_memory(
        user.id, Fact(statement="Ada is on a train", kind=FactKind.EPHEMERAL, confidence=0.4)
    )
    ingestion = engine.components.ingestion
    original = ingestion.embeddings.embed

    async def embed_then_expire(texts):  # between the read and the lock
        vectors = await original(texts)
        await _expire(engine, fact.id)
        return vectors

    ingestion.embeddings.embed = embed_then_expire
    try:
        with pytest.raises(NotFound):
            await engine.update_memory(
                user.id, fact.id, {"statement": "Ada is on a plane", "kind": "permanent"}
            )
    finally:
        ingestion.embeddings.embed = original
    with pytest.raises(NotFound):
        await engine.get_memory(user.id, fact.id)
    # Unchanged (the refused PATCH wrote nothing), still expired, and purged as such.
    assert await engine.purge_expired() == 1
    assert await _fact_rows(engine, user.id) == 0
