"""Bulk store (issue #17 §2): ``store_memories`` writes a batch of any memory types in one
embedding call and one transaction, all or nothing, with the same rows, vectors, filters,
fact merges, audit and background jobs as single stores."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np
import pytest

from halldyll_ray import (
    Conversation,
    Fact,
    Image,
    InvalidInput,
    MemoryEngine,
    MemoryType,
    Message,
    NotFound,
    PermissionDenied,
    Segment,
    Settings,
    Summary,
    Transcription,
)
from halldyll_ray.components.base import Chunk, insert_chunk_rows
from halldyll_ray.embedding import OnnxEncoder

SAID = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)


def _batch(tag: str) -> list[Any]:
    """One memory of each type, every text distinct (searchable one by one)."""
    return [
        Conversation(
            title="Planning the Kyoto trip",
            session_id="s-1",
            tags=[tag, "travel"],
            metadata={"channel": "web"},
            messages=[
                Message(
                    role="user",
                    name="Ada",
                    content="I want to see the temples of Kyoto.",
                    created_at=SAID,
                ),
                Message(
                    role="assistant",
                    content="Cherry blossoms peak in early April.",
                    created_at=SAID,
                ),
            ],
        ),
        Fact(statement="Ada is allergic to peanuts", confidence=0.9, tags=[tag]),
        {"type": "image", "prompt": "a lighthouse on a basalt cliff at dusk", "tags": [tag]},
        Transcription(
            segments=[
                Segment(start=0.0, end=2.5, text="Welcome to the quarterly budget review."),
                Segment(start=2.5, end=5.0, text="Revenue grew by twelve percent."),
            ],
            tags=[tag],
        ),
        Summary(text="Ada keeps bees in Bergen and sells honey at the market.", tags=[tag]),
    ]


_QUERIES = [
    "temples in Kyoto",
    "peanut allergy",
    "lighthouse on a cliff",
    "quarterly budget revenue",
    "honey from bees in Bergen",
]


async def _counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {
            table: await conn.fetchval(f"SELECT count(*) FROM {table}")
            for table in (
                "memories",
                "memory_chunks",
                "conversation_messages",
                "audit_log",
                "memory_jobs",
            )
        }
    finally:
        await conn.close()


async def _chunk_rows(url: str, memory_id: uuid.UUID) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(
            "SELECT part, part_index, chunk_index, content, label, type, tags, model_id,"
            " session_id, valid_to, embedding::text AS embedding FROM memory_chunks"
            " WHERE memory_id = $1 ORDER BY part, part_index, chunk_index",
            memory_id,
        )
    finally:
        await conn.close()


def _vector(text: str) -> np.ndarray:
    return np.array([float(v) for v in text[1:-1].split(",")], dtype=np.float32)


@pytest.fixture
async def ada(engine: MemoryEngine) -> Any:
    return await engine.create_user("ada", "ada@example.com", "user")


async def test_a_batch_of_every_type_stores_as_single_stores_do(
    engine: MemoryEngine, encoder: OnnxEncoder, ada: Any, database_url: str
) -> None:
    stored = await engine.store_memories(ada.id, _batch("bulk"))
    assert [s.type for s in stored] == [
        MemoryType.CONVERSATION,
        MemoryType.FACT,
        MemoryType.IMAGE,
        MemoryType.TRANSCRIPTION,
        MemoryType.SUMMARY,
    ]
    assert len({s.id for s in stored}) == 5
    conversation = await engine.get_memory(ada.id, stored[0].id)
    assert conversation.message_count == 2 and stored[0].message_count == 2
    assert [(m.seq, m.name, m.content) for m in conversation.messages] == [
        (0, "Ada", "I want to see the temples of Kyoto."),
        (1, None, "Cherry blossoms peak in early April."),
    ]
    assert conversation.tags == ["bulk", "travel"] and conversation.metadata == {"channel": "web"}
    assert stored[2].memory.prompt == "a lighthouse on a basalt cliff at dusk"
    assert stored[3].memory.language == "en"  # detected, as a single store does

    # The same memories stored one by one for another user: the same chunk rows, filters
    # and vectors (the vectors of single stores come from the cache the batch filled, so
    # they are also checked against the encoder run on each text alone).
    bea = await engine.create_user("bea", None, "user")
    singles = [await engine.store_memory(bea.id, memory) for memory in _batch("bulk")]
    for batched, single in zip(stored, singles, strict=True):
        rows = await _chunk_rows(database_url, batched.id)
        expected = await _chunk_rows(database_url, single.id)
        assert rows, batched.type
        strip = [{k: v for k, v in dict(r).items() if k != "embedding"} for r in (*rows, *expected)]
        assert strip[: len(rows)] == strip[len(rows) :]
        for row, other in zip(rows, expected, strict=True):
            indexed = Chunk(
                row["part"], row["part_index"], row["chunk_index"], row["content"], row["label"]
            ).indexed
            alone = encoder.encode([indexed])[0]
            np.testing.assert_allclose(_vector(row["embedding"]), alone, atol=1e-5)
            np.testing.assert_allclose(_vector(other["embedding"]), alone, atol=1e-5)

    # Every memory of the batch is found by a search for it.
    for query, memory in zip(_QUERIES, stored, strict=True):
        hits = await engine.search(ada.id, query, limit=3)
        assert hits and hits[0].memory.id == memory.id, query


async def test_one_bad_memory_stores_nothing_and_is_named_by_its_index(
    engine: MemoryEngine, ada: Any, database_url: str
) -> None:
    await engine.store_memory(ada.id, Fact(statement="Ada lives in Lyon"))
    before = await _counts(database_url)
    bad = [*_batch("x"), {"type": "fact", "statement": "Ada rides", "confidence": 2}]
    with pytest.raises(InvalidInput) as refused:
        await engine.store_memories(ada.id, bad)
    assert refused.value.field == "memories.5.fact.confidence"
    assert refused.value.fields["index"] == 5
    assert "memories.5" in str(refused.value)

    with pytest.raises(InvalidInput) as refused:
        await engine.store_memories(ada.id, [{"type": "photo", "prompt": "x"}])
    assert refused.value.field == "memories.0.type"

    with pytest.raises(NotFound) as unknown:
        await engine.store_memories(ada.id, [*_batch("y")[:2], Fact(statement="x", model="nope")])
    assert unknown.value.fields["index"] == 2 and "memories.2" in str(unknown.value)

    with pytest.raises(InvalidInput) as refused:
        await engine.store_memories(
            ada.id, [*_batch("z")[:3], Summary(text="about nothing", covers=[uuid.uuid4()])]
        )
    assert refused.value.field == "memories.3.covers"

    # Refused by the database in the chunk insert, after the memories and messages were
    # written in the transaction: everything rolls back.
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(
            """
            CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.content LIKE '%poison%' THEN RAISE EXCEPTION 'refused'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_poison BEFORE INSERT ON memory_chunks
                FOR EACH ROW EXECUTE FUNCTION refuse_poison();
            """
        )
        poisoned = [*_batch("p"), Image(prompt="a poison bottle")]
        with pytest.raises(asyncpg.RaiseError):
            await engine.store_memories(ada.id, poisoned)
    finally:
        await admin.execute("DROP TRIGGER refuse_poison ON memory_chunks")
        await admin.close()
    assert await _counts(database_url) == before


async def test_the_batch_size_is_bounded(
    engine: MemoryEngine, settings: Settings, encoder: OnnxEncoder, ada: Any, database_url: str
) -> None:
    before = await _counts(database_url)
    with pytest.raises(InvalidInput) as refused:
        await engine.store_memories(ada.id, [])
    assert refused.value.field == "memories"
    too_many = [{"type": "fact", "statement": f"fact {i}"} for i in range(501)]
    with pytest.raises(InvalidInput) as refused:
        await engine.store_memories(ada.id, too_many)
    assert "STORE_BATCH_MAX" in str(refused.value) and refused.value.field == "memories"
    with pytest.raises(InvalidInput):
        await engine.store_memories(ada.id, "not a list")  # type: ignore[arg-type]

    small = MemoryEngine(
        settings.model_copy(update={"store_batch_max": 2, "redis_key_prefix": "small"}),
        encoder=encoder,
    )
    await small.initialize(migrate=False)
    try:
        with pytest.raises(InvalidInput, match="1 to 2 memories"):
            await small.store_memories(ada.id, _batch("s")[:3])
        assert len(await small.store_memories(ada.id, _batch("s")[:2])) == 2
    finally:
        await small.close()
    after = await _counts(database_url)
    assert after["memories"] == before["memories"] + 2


async def test_another_users_batch_is_refused_and_rows_stay_with_their_owner(
    engine: MemoryEngine, ada: Any, database_url: str
) -> None:
    bea = await engine.create_user("bea", None, "user")
    bea_key = (await engine.create_api_key(bea.id, name="test")).key
    as_bea = engine.authorized(await engine.authenticate(bea_key))
    before = await _counts(database_url)
    with pytest.raises(PermissionDenied):
        await as_bea.store_memories(ada.id, _batch("b"))
    counts = await _counts(database_url)
    assert {k: v for k, v in counts.items() if k != "audit_log"} == {
        k: v for k, v in before.items() if k != "audit_log"
    }
    assert counts["audit_log"] == before["audit_log"] + 1  # the denied row

    mine = await as_bea.store_memories(None, _batch("b"))
    assert (await engine.list_memories(ada.id)).items == []
    assert {m.id for m in (await engine.list_memories(bea.id, limit=10)).items} == {
        m.id for m in mine
    }
    # Row-level security behind the join of the chunk insert: chunks placed on another
    # user's memory inside Ada's transaction are refused and nothing is written.
    vectors = await engine.components.embeddings.embed(["a stray chunk"])
    with pytest.raises(NotFound):
        async with engine.db.scoped(ada.id) as conn:
            await insert_chunk_rows(
                conn, ada.id, [(mine[0].id, Chunk("text", 9, 0, "a stray chunk"))], vectors
            )
    assert "a stray chunk" not in {
        r["content"] for r in await _chunk_rows(database_url, mine[0].id)
    }


async def test_one_audit_row_names_the_batch_and_facts_merge_as_single_stores(
    engine: MemoryEngine, ada: Any
) -> None:
    kept = await engine.store_memory(ada.id, Fact(statement="Ada drinks green tea"))
    stored = await engine.store_memories(
        ada.id,
        [
            Fact(statement="Ada drinks green tea", confidence=0.9),  # a stored fact
            Fact(statement="Ada plays the cello"),
            Fact(statement="Ada  plays the cello."),  # an earlier fact of the batch
            Image(prompt="a cello in a sunlit room"),
        ],
        request_id="req-bulk",
    )
    assert stored[0].id == kept.id and stored[0].reinforcement_count == 1
    assert stored[2].id == stored[1].id and stored[2].reinforcement_count == 1
    assert len((await engine.list_memories(ada.id, limit=10)).items) == 3

    rows = [
        r
        for r in await engine.list_audit(user_id=ada.id, limit=20)
        if r["request_id"] == "req-bulk"
    ]
    by_operation = {r["operation"]: r for r in rows}
    assert sorted(by_operation) == ["fact.reinforce", "memory.store"] and len(rows) == 2
    store = by_operation["memory.store"]
    assert store["target_type"] == "memory"
    assert [str(i) for i in store["target_ids"]] == [str(stored[1].id), str(stored[3].id)]
    assert store["details"] == {"memories": 4}
    assert [str(i) for i in by_operation["fact.reinforce"]["target_ids"]] == [
        str(kept.id),
        str(stored[1].id),
    ]


@pytest.fixture
async def background(settings: Settings, encoder: OnnxEncoder) -> AsyncIterator[MemoryEngine]:
    """An engine that learns in the background (jobs queued, no workers started)."""
    changed = settings.model_copy(
        update={"memory_extraction": "background", "redis_key_prefix": f"bg-{uuid.uuid4().hex}"}
    )
    engine = MemoryEngine(changed, encoder=encoder)
    await engine.initialize(migrate=False)
    yield engine
    await engine.close()


async def test_background_learning_queues_a_job_per_conversation(
    engine: MemoryEngine, background: MemoryEngine, ada: Any
) -> None:
    stored = await background.store_memories(
        ada.id,
        [
            Conversation(messages=[Message(role="user", content="I moved to Oslo in May.")]),
            Fact(statement="Ada likes skiing"),
            Conversation(messages=[Message(role="user", content="My sister is a pilot.")]),
            Conversation(messages=[Message(role="assistant", content="Hello!")]),  # no user
        ],
    )
    jobs = (await engine.list_jobs(ada.id)).items
    assert sorted(
        (j.kind, j.payload["conversation_id"], j.payload["seqs"]) for j in jobs
    ) == sorted([("extract", str(stored[0].id), [0]), ("extract", str(stored[2].id), [0])])
