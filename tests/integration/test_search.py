"""Search quality, modes, filters, and no lost results for small users in a big table."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import numpy as np
import pytest
from pgvector.asyncpg import register_vector
from pydantic import TypeAdapter
from support import make_settings

from halldyll_ray import (
    Conversation,
    Fact,
    FactKind,
    Image,
    InvalidInput,
    MemoryEngine,
    Message,
    NotFound,
    Summary,
    Transcription,
)
from halldyll_ray.models import STORED
from halldyll_ray.schemas import SearchResponse

CORPUS = [
    Fact(statement="Ada drinks green tea every morning before work"),
    Fact(statement="Ada's daughter Mia was born in March 2019"),
    Fact(statement="Ada is allergic to shellfish"),
    Fact(statement="Ada works as a structural engineer at a bridge company"),
    Fact(statement="Ada's car is a blue electric hatchback"),
    Fact(statement="Ada runs a half marathon every autumn"),
    Image(
        prompt="a watercolor painting of a lighthouse on a cliff during a storm",
        generator="RealVisXL_V5.0",
    ),
    Image(prompt="cyberpunk street market at night with neon signs and rain"),
    Transcription(
        text="Hi, this is the dentist's office calling to confirm your cleaning "
        "appointment next Tuesday at nine."
    ),
    Summary(
        text="Ada spent the week debugging a memory leak in the billing service and "
        "finally traced it to an unbounded cache."
    ),
    Conversation(
        title="Weekend plans",
        messages=[
            Message(role="user", content="Should we go hiking or to the museum on Saturday?"),
            Message(role="assistant", content="The forecast says sunny, so hiking sounds good."),
            Message(role="user", content="Great, let's take the trail up Mount Tam."),
        ],
    ),
]

# Paraphrased queries: none repeats the key words of its target.
QUERIES = [
    ("what does Ada have to drink when she wakes up?", 0),
    ("how old is her kid?", 1),
    ("foods Ada must avoid", 2),
    ("what is Ada's job?", 3),
    ("which vehicle does she drive?", 4),
    ("her yearly long-distance race", 5),
    ("that painting of the coastal tower in bad weather", 6),
    ("futuristic city image with glowing advertisements", 7),
    ("teeth appointment voicemail", 8),
    ("what was the bug she fixed in the payments system?", 9),
    ("which mountain trail did we choose for the weekend?", 10),
]


@pytest.fixture
async def corpus(engine: MemoryEngine):
    user = await engine.create_user("ada", None, "user")
    stored = [await engine.store_memory(user.id, memory) for memory in CORPUS]
    return user, stored


async def test_paraphrased_queries_rank_the_right_memory_first(engine: MemoryEngine, corpus):
    user, stored = corpus
    misses = []
    for query, index in QUERIES:
        hits = await engine.search(user.id, query, limit=3)
        if not hits or hits[0].memory.id != stored[index].id:
            misses.append((query, [h.memory.text[:40] for h in hits]))
    assert not misses, misses


async def test_conversation_hit_names_the_message(engine: MemoryEngine, corpus):
    user, stored = corpus
    hits = await engine.search(user.id, "which mountain trail did we choose?", limit=1)
    assert hits[0].memory.id == stored[10].id
    assert hits[0].matched.part == "message" and hits[0].matched.index == 2
    assert hits[0].matched.text == "Great, let's take the trail up Mount Tam."
    assert hits[0].source == "hybrid" and hits[0].similarity is not None


async def test_threshold_and_fulltext_fallback(engine: MemoryEngine, corpus):
    user, stored = corpus
    # Nothing passes a threshold of 0.99; the word "lighthouse" still finds the image.
    hits = await engine.search(user.id, "lighthouse", threshold=0.99, mode="semantic")
    assert hits and hits[0].memory.id == stored[6].id
    assert hits[0].source == "fulltext"
    assert hits[0].similarity is not None and hits[0].similarity < 0.99
    # Semantic hits when they pass the threshold.
    hits = await engine.search(user.id, "lighthouse", mode="semantic")
    assert hits[0].source == "semantic" and hits[0].similarity >= 0.2
    # Gibberish: nothing semantic, nothing textual.
    for mode in ("semantic", "hybrid", "fulltext"):
        assert await engine.search(user.id, "qwzx vbnm plokij", threshold=0.5, mode=mode) == []


async def test_hybrid_fuses_both_lists(engine: MemoryEngine, corpus):
    user, stored = corpus
    hits = await engine.search(user.id, "Mount Tam hiking trail", mode="hybrid", limit=3)
    assert hits[0].memory.id == stored[10].id
    assert hits[0].source == "hybrid"
    # the learned ranking's score is a probability; the semantic list alone scores the cosine
    assert hits[0].similarity is not None
    assert 0.0 < hits[0].score < 1.0
    alone = await engine.search(user.id, "Mount Tam hiking trail", mode="semantic", limit=1)
    assert alone[0].score == pytest.approx(hits[0].similarity, abs=1e-6)
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    # A part that holds only the query's common word ("Ada" is in most memories) scores
    # below one that holds its rare words.
    hits = await engine.search(user.id, "Ada bridge company", mode="hybrid", limit=3)
    assert hits[0].memory.id == stored[3].id


async def test_fulltext_mode_takes_query_text_literally(engine: MemoryEngine, corpus):
    user, _ = corpus
    # tsquery syntax in user input must not break or inject anything.
    for query in ["a & b | !c", "'); DROP TABLE memories; --", "(((", "shellfish:*"]:
        await engine.search(user.id, query, mode="fulltext")
    hits = await engine.search(user.id, "shellfish:*", mode="fulltext")
    assert hits and "shellfish" in hits[0].memory.text
    assert await engine.db.fetchval("SELECT count(*) FROM memories", admin=True) == len(CORPUS)


async def test_filters(engine: MemoryEngine):
    user = await engine.create_user("ada", None, "user")
    await engine.register_model("Qwen2.5-VL-7B-Instruct", "vision-language")
    shared = await engine.store_memory(user.id, Fact(statement="Ada loves orange cats"))
    scoped = await engine.store_memory(
        user.id,
        Image(
            prompt="an orange cat sleeping on a keyboard",
            model="Qwen2.5-VL-7B-Instruct",
            session_id="s-9",
            tags=["pets"],
        ),
    )
    query = "orange cat"
    both = {h.memory.id for h in await engine.search(user.id, query)}
    assert both == {shared.id, scoped.id}
    assert [h.memory.id for h in await engine.search(user.id, query, types=["image"])] == [
        scoped.id
    ]
    assert [
        h.memory.id
        for h in await engine.search(
            user.id, query, model="Qwen2.5-VL-7B-Instruct", include_shared=False
        )
    ] == [scoped.id]
    assert {
        h.memory.id for h in await engine.search(user.id, query, model="Qwen2.5-VL-7B-Instruct")
    } == {shared.id, scoped.id}
    assert [h.memory.id for h in await engine.search(user.id, query, session_id="s-9")] == [
        scoped.id
    ]
    assert [h.memory.id for h in await engine.search(user.id, query, tags=["pets"])] == [scoped.id]
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert await engine.search(user.id, query, since=later) == []
    assert {h.memory.id for h in await engine.search(user.id, query, until=later)} == both


async def test_search_cache_is_invalidated_by_writes(engine: MemoryEngine):
    user = await engine.create_user("ada", None, "user")
    first = await engine.store_memory(user.id, Fact(statement="Ada's bike is red"))
    hits = await engine.search(user.id, "bicycle colour")
    assert [h.memory.id for h in hits] == [first.id]
    hits_again = await engine.search(user.id, "bicycle colour")
    assert hits_again == hits
    assert engine.cache.stats.by_kind["search"][0] >= 1  # the second one came from the cache
    second = await engine.store_memory(user.id, Fact(statement="Ada's bicycle is a road bike"))
    hits = await engine.search(user.id, "bicycle colour")
    assert {h.memory.id for h in hits} == {first.id, second.id}
    await engine.delete_memory(user.id, first.id)
    assert [h.memory.id for h in await engine.search(user.id, "bicycle colour")] == [second.id]


async def test_search_json_is_the_search_response_cached_or_not(engine: MemoryEngine, corpus):
    """The HTTP answer written from the cached JSON (or with the JSON it caches) is byte for
    byte the response model's JSON of what ``search`` returns."""
    user, _ = corpus
    answer = TypeAdapter(SearchResponse)
    for query, options in [
        ("what does Ada have to drink when she wakes up?", {}),
        ("which mountain trail did we choose for the weekend?", {"group": "memory"}),
        ("Ada", {"mode": "fulltext", "limit": 3}),
        ("teeth appointment voicemail", {"mode": "semantic", "types": ["transcription"]}),
        ("nothing like this was ever stored", {"threshold": 0.99, "mode": "semantic"}),
    ]:
        missed = await engine.search_json(user.id, query, **options)  # computed, then cached
        hits_before = engine.cache.stats.by_kind["search"][0]
        cached = await engine.search_json(user.id, query, **options)  # passed on as cached
        assert engine.cache.stats.by_kind["search"][0] == hits_before + 1
        results = await engine.search(user.id, query, **options)
        expected = answer.dump_json(SearchResponse(results=results))
        assert missed == cached == expected, query
        assert [r["memory"]["id"] for r in json.loads(cached)["results"]] == [
            str(r.memory.id) for r in results
        ]


async def test_cached_search_json_answers_only_from_the_cache(engine: MemoryEngine, corpus):
    """What the Ingress answers without the hop to Search: None until a search of the same
    arguments filled the cache, then the same bytes; a write makes it None again."""
    user, _ = corpus
    query, options = "which mountain trail did we choose?", {"mode": "hybrid", "limit": 4}
    embedded = list(engine.cache.stats.by_kind.get("embedding", []))
    missed = await engine.cached_search_json(user.id, query, **options)
    assert missed.answer is None
    # A miss searched nothing: no query embedding was looked up or computed.
    assert engine.cache.stats.by_kind.get("embedding", []) == embedded
    answer = await engine.search_json(user.id, query, **options)
    hit = await engine.cached_search_json(user.id, query, **options)
    assert hit.answer == answer and hit.key == missed.key
    other = await engine.cached_search_json(user.id, query, mode="fulltext", limit=4)
    assert other.answer is None and other.key != missed.key
    await engine.store_memory(user.id, Fact(statement="Ada prefers the ridge trail"))
    assert (await engine.cached_search_json(user.id, query, **options)).answer is None
    with pytest.raises(InvalidInput):
        await engine.cached_search_json(user.id, query, mode="psychic")


async def test_an_answer_kept_from_another_process_is_served_until_a_write(
    database_url: str, encoder
):
    """Without Redis each process caches alone: the Ingress keeps the answer Search sent it
    (``keep_search_json``) and answers the next identical search itself; a write still makes
    it unreachable."""
    settings = make_settings(database_url, None)
    async with (
        MemoryEngine(settings, encoder=encoder) as ingress,
        MemoryEngine(settings, encoder=encoder) as searcher,
    ):
        user = await ingress.create_user("ada", None, "user")
        await ingress.store_memory(user.id, Fact(statement="Ada keeps bees in her garden"))
        query = "does Ada keep any animals?"
        missed = await ingress.cached_search_json(user.id, query)
        assert missed.answer is None
        answer = await searcher.search_json(user.id, query)  # Search's own cache only
        assert (await ingress.cached_search_json(user.id, query)).answer is None
        ingress.keep_search_json(missed.key, answer)
        assert (await ingress.cached_search_json(user.id, query)).answer == answer
        ingress.keep_search_json("search:not-an-answer", b"<html>")  # not a search answer
        assert ingress.cache.local.get("search:not-an-answer") is None
        await searcher.store_memory(user.id, Fact(statement="Ada also keeps two goats"))
        assert (await ingress.cached_search_json(user.id, query)).answer is None


async def test_search_json_drops_a_memory_that_expired_since_it_was_cached(
    database_url: str, redis_url: str, encoder
):
    # A few seconds of life: the first search must come before the expiry on a loaded machine
    # (1.5 s was not always enough for two stores and a search).
    settings = make_settings(database_url, redis_url, ephemeral_fact_ttl_days=4 / 86_400)
    async with MemoryEngine(settings, encoder=encoder) as engine:
        user = await engine.create_user("ada", None, "user")
        lasting = await engine.store_memory(user.id, Fact(statement="Ada meets Bo on Mondays"))
        fleeting = await engine.store_memory(
            user.id, Fact(statement="Ada is in a meeting right now", kind=FactKind.EPHEMERAL)
        )
        assert fleeting.expires_at is not None
        query = "is Ada in a meeting?"
        before = json.loads(await engine.search_json(user.id, query, threshold=0.0))
        assert datetime.now(UTC) < fleeting.expires_at, "the first search came too late"
        assert {r["memory"]["id"] for r in before["results"]} == {str(fleeting.id), str(lasting.id)}
        # The fact expires; the cached answer (no write since) stays.
        await asyncio.sleep((fleeting.expires_at - datetime.now(UTC)).total_seconds() + 0.2)
        hits = engine.cache.stats.by_kind["search"][0]
        after = json.loads(await engine.search_json(user.id, query, threshold=0.0))
        assert engine.cache.stats.by_kind["search"][0] == hits + 1
        assert [r["memory"]["id"] for r in after["results"]] == [str(lasting.id)]


async def test_bad_search_input(engine: MemoryEngine):
    user = await engine.create_user("ada", None, "user")
    cases = [
        ({"query": ""}, "query"),
        ({"query": "x" * 5000}, "query"),
        ({"query": "ok", "limit": 0}, "limit"),
        ({"query": "ok", "limit": 1000}, "limit"),
        ({"query": "ok", "mode": "psychic"}, "mode"),
        ({"query": "ok", "types": ["diary"]}, "types"),
        ({"query": "ok", "threshold": 2}, "threshold"),
        ({"query": "ok", "session_id": "bad session id!"}, "session_id"),
        ({"query": "ok", "tags": ["#bad tag with a very long name" * 5]}, "tags"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidInput) as err:
            await engine.search(user.id, **kwargs)
        assert err.value.field == field, kwargs
    with pytest.raises(InvalidInput):
        await engine.search("not-a-uuid", "ok")
    with pytest.raises(NotFound):
        await engine.search(uuid.uuid4(), "ok")


@pytest.mark.slow
async def test_small_user_among_many_rows_loses_nothing(
    engine: MemoryEngine, encoder, database_url: str
):
    """One user owns 5 rows among 20,000 of other users, all near the query.

    The query runs on the HNSW index only (the per-user btree index is dropped and other
    plans disabled). Without iterative scans the index returns ef_search candidates, nearly
    all of other users, and the filter leaves the small user with almost nothing; with the
    product's settings every one of the user's rows comes back.
    """
    small = await engine.create_user("small", None, "user")
    texts = [
        "notes about the quarterly budget review",
        "budget spreadsheet for the marketing team",
        "reminder to send the budget numbers",
        "the budget meeting moved to Thursday",
        "questions about next year's budget",
    ]
    mine = [await engine.store_memory(small.id, Fact(statement=t)) for t in texts]
    query_vector = encoder.encode(["budget"])[0]
    rng = np.random.default_rng(7)
    others = [uuid.uuid4() for _ in range(200)]
    # Bulk setup as the database owner (the application role may not drop indexes).
    conn = await asyncpg.connect(database_url)
    await register_vector(conn)
    async with conn.transaction():
        await conn.executemany(
            "INSERT INTO users (id, username, role) VALUES ($1, $2, 'user')",
            [(u, f"u{i}") for i, u in enumerate(others)],
        )
        memory_rows, chunk_rows = [], []
        for i in range(20_000):
            memory_id = uuid.uuid4()
            owner = others[i % len(others)]
            vector = query_vector + rng.normal(0, 0.02, size=query_vector.shape)
            vector = (vector / np.linalg.norm(vector)).astype(np.float32)
            memory_rows.append((memory_id, owner, f"other budget note {i}", f"k{i}"))
            chunk_rows.append((memory_id, owner, f"other budget note {i}", vector))
        # Bulk load without the HNSW index, then build it once (much faster than 20,000
        # incremental inserts into the graph).
        await conn.execute("DROP INDEX memory_chunks_embedding")
        await conn.copy_records_to_table(
            "memories",
            records=[(m, o, "fact", c, k, 0.5) for m, o, c, k in memory_rows],
            columns=["id", "user_id", "type", "content", "fact_key", "confidence"],
            timeout=300,
        )
        await conn.copy_records_to_table(
            "memory_chunks",
            records=[(m, o, "fact", "statement", c, v) for m, o, c, v in chunk_rows],
            columns=["memory_id", "user_id", "type", "part", "content", "embedding"],
            timeout=300,
        )
        await conn.execute(
            "CREATE INDEX memory_chunks_embedding ON memory_chunks "
            "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)",
            timeout=300,
        )
        await conn.execute("DROP INDEX memory_chunks_user")
        await conn.execute("ANALYZE memory_chunks")
    await conn.close()

    from halldyll_ray.storage.sql import bind

    search_small = bind(
        "search_semantic",
        user_id=small.id,
        vector=query_vector,
        embedding_model=engine.components.embeddings.encoder.model_id,
        types=None,
        model_id=None,
        include_shared=True,
        session_id=None,
        tags=None,
        since=None,
        until=None,
        fetch=10,
    )

    async def ids_found(iterative: str) -> set[uuid.UUID]:
        async with engine.db.scoped(admin=True) as conn:
            await conn.execute("SET LOCAL enable_seqscan = off")
            await conn.execute("SET LOCAL enable_bitmapscan = off")
            await conn.execute(f"SET LOCAL hnsw.iterative_scan = {iterative}")
            await conn.execute("SET LOCAL hnsw.ef_search = 40")
            plan = await conn.fetch("EXPLAIN " + search_small[0], *search_small[1:])
            assert "memory_chunks_embedding" in "\n".join(r[0] for r in plan)
            rows = await conn.fetch(*search_small)
        return {r["memory_id"] for r in rows}

    assert len(await ids_found("off")) < len(mine)  # the failure mode this guards against
    assert await ids_found("relaxed_order") == {m.id for m in mine}
    # And through the public API with the product's settings:
    hits = await engine.search(small.id, "budget", limit=10, threshold=0.0)
    assert {h.memory.id for h in hits} == {m.id for m in mine}


async def test_large_users_get_their_own_index(engine: MemoryEngine, database_url: str):
    big = await engine.create_user("big", None, "user")
    small = await engine.create_user("small", None, "user")
    statements = [
        "quarterly report is due Friday",
        "the team offsite is in Lisbon",
        "my manager prefers email over chat",
        "payroll runs on the 25th",
        "the office wifi password changed",
        "standup moved to 9:30",
    ]
    facts = [await engine.store_memory(big.id, Fact(statement=s)) for s in statements]
    await engine.store_memory(small.id, Fact(statement="a single note"))
    result = await engine.ensure_user_indexes(min_rows=5)
    assert result == {"created": [big.id], "dropped": []}
    conn = await asyncpg.connect(database_url)
    try:
        definition = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = $1",
            f"memory_chunks_user_hnsw_{big.id.hex}",
        )
        assert "USING hnsw (embedding vector_cosine_ops)" in definition
        assert f"WHERE (user_id = '{big.id}'::uuid)" in definition
    finally:
        await conn.close()
    assert await engine.ensure_user_indexes(min_rows=5) == {"created": [], "dropped": []}
    hits = await engine.search(big.id, "work notes", limit=10, threshold=-1.0)
    assert {h.memory.id for h in hits} == {f.id for f in facts}
    for fact in facts[:5]:
        await engine.delete_memory(big.id, fact.id)
    assert await engine.ensure_user_indexes(min_rows=5) == {"created": [], "dropped": [big.id]}


# --------------------------------------------------------------------------- turns
SAID = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
TALK = [
    ("Caroline", "I went to an LGBTQ support group yesterday and it was so powerful."),
    ("Melanie", "Wow, that's cool! What was the best part of it?"),
    ("Caroline", "The transgender stories were inspiring, I felt accepted by the group."),
    ("Melanie", "I painted a sunrise over the lake last week, my kids loved it."),
    ("Caroline", "Your painting sounds lovely, I'd like to see it some day."),
    ("Melanie", "Sure! I'm taking the kids camping in the mountains next month."),
]


@pytest.fixture
async def talk(engine: MemoryEngine):
    user = await engine.create_user(f"talk{uuid.uuid4().hex[:6]}", None, "user")
    conversation = await engine.store_memory(
        user.id,
        Conversation(
            title="session 1",
            messages=[
                Message(
                    role="user" if name == "Caroline" else "assistant",
                    name=name,
                    content=text,
                    created_at=SAID,
                )
                for name, text in TALK
            ],
        ),
    )
    await engine.store_memory(user.id, Fact(statement="Melanie's favourite coffee is a flat white"))
    return user, conversation


async def test_a_conversation_answers_with_each_turn_that_matches(engine: MemoryEngine, talk):
    user, conversation = talk
    for mode in ("semantic", "hybrid", "fulltext"):
        hits = await engine.search(user.id, "Caroline support group accepted", 4, mode=mode)
        turns = [h.matched.index for h in hits if h.memory.id == conversation.id]
        # turns 0 and 2 both speak of the support group: both come back, once each
        assert {0, 2} <= set(turns) and len(turns) == len(set(turns)), (mode, turns)
        for hit in hits:
            if hit.matched.part == "message":
                assert hit.matched.text == TALK[hit.matched.index][1]  # the text, no label
        grouped = await engine.search(
            user.id, "Caroline support group accepted", 4, mode=mode, group="memory"
        )
        assert len({h.memory.id for h in grouped}) == len(grouped)
        assert grouped[0].memory.id == conversation.id
        assert grouped[0].matched.index == hits[0].matched.index  # its best part
    with pytest.raises(InvalidInput, match="group") as err:
        await engine.search(user.id, "anything", group="sentence")
    assert err.value.field == "group"


async def test_speakers_and_dates_are_findable(engine: MemoryEngine, talk):
    user, conversation = talk
    # No message says "Melanie": her turns are found by the speaker's name in their label.
    hits = await engine.search(user.id, "Melanie", 10, mode="fulltext")
    assert {h.matched.index for h in hits if h.memory.id == conversation.id} == {1, 3, 5}
    # The date of the session, as a person would write it.
    hits = await engine.search(user.id, "May 2023", 10, mode="fulltext")
    assert {h.matched.index for h in hits if h.memory.id == conversation.id} == set(range(6))
    # The name also reaches the embedding: her painting, asked for by her name.
    hits = await engine.search(user.id, "What did Melanie paint?", 1)
    assert (hits[0].memory.id, hits[0].matched.index) == (conversation.id, 3)


async def test_rare_query_words_outweigh_common_ones(engine: MemoryEngine):
    # BM25: "coffee" is in every memory, "Reykjavik" in one; the one wins, however often
    # another repeats the common word.
    user = await engine.create_user(f"bm{uuid.uuid4().hex[:6]}", None, "user")
    for text in [
        "coffee coffee coffee, the more coffee the better",
        "coffee with oat milk in the morning",
        "decaf coffee after lunch",
        "cold brew coffee in summer",
    ]:
        await engine.store_memory(user.id, Fact(statement=text))
    target = await engine.store_memory(user.id, Fact(statement="a coffee in Reykjavik harbour"))
    hits = await engine.search(user.id, "coffee Reykjavik", 5, mode="fulltext")
    assert hits[0].memory.id == target.id
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))


async def _bm25_rows(engine: MemoryEngine, user_id: uuid.UUID, query: str) -> list[Any]:
    """search_fulltext as the product runs it, every match returned (no cut among ties)."""
    from halldyll_ray.storage.sql import bind

    filters = dict.fromkeys(("types", "model_id", "session_id", "tags", "since", "until"))
    sql, *args = bind(
        "search_fulltext",
        user_id=user_id,
        query=query,
        vector=None,
        embedding_model=None,
        fetch=10_000,
        include_shared=True,
        **filters,
    )
    async with engine.db.scoped(user_id, readonly=True) as conn:
        return list(await conn.fetch(sql, *args))


async def _bm25_by_hand(
    engine: MemoryEngine, user_id: uuid.UUID, query: str
) -> tuple[dict[tuple[Any, ...], float], float]:
    """Okapi BM25 (k1 1.2, b 0.75, tf 1) computed here from the chunks' lexemes: each
    matching chunk's score by its key, and the query's idf sum."""
    import math

    async with engine.db.scoped(user_id, readonly=True) as conn:
        terms = {
            r["lexeme"]
            for r in await conn.fetch(
                "SELECT lexeme FROM unnest(tsvector_to_array(halldyll_tsvector($1))) AS lexeme"
                " WHERE to_tsvector('english'::regconfig, lexeme) <> ''::tsvector",
                query,
            )
        }
        chunks = await conn.fetch(
            "SELECT memory_id, part, part_index, chunk_index, tsvector_to_array(tsv) AS words,"
            " length(tsv) AS len FROM memory_chunks WHERE user_id = $1",
            user_id,
        )
    n = len(chunks)
    matches = [c for c in chunks if terms & set(c["words"])]
    df = {t: sum(t in c["words"] for c in matches) for t in terms}
    idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}
    avg = sum(c["len"] for c in matches) / len(matches)
    scores = {
        (c["memory_id"], c["part"], c["part_index"], c["chunk_index"]): sum(
            idf[t] * 2.2 / (1 + 1.2 * (0.25 + 0.75 * c["len"] / avg))
            for t in terms & set(c["words"])
        )
        for c in matches
    }
    return scores, sum(idf.values())


async def test_a_long_query_is_scored_as_a_short_one(engine: MemoryEngine):
    """BM25 reads a query of many words (over 64: a pasted page, the 4,000 characters of a
    message prepare_context searches with) by each chunk's own words instead of each query
    word against each chunk. Both ways give the scores computed by hand, the same for the
    same words, and a word no chunk holds weighs in the idf sum only."""
    user = await engine.create_user(f"bm{uuid.uuid4().hex[:6]}", None, "user")
    texts = [
        "Ada keeps bees in three hives behind the barn in Voss",
        "The honey harvest in August gave forty jars of heather honey",
        "Mia painted the hives blue and yellow last spring",
        "Ada sold honey and beeswax candles at the Bergen market",
        "A storm knocked over one hive; the bees swarmed into an old oak",
        "Ada's grandmother taught her to smoke the bees before opening a hive",
        "Κάθε πρωί ο ΝΊΚΟΣ πίνει καφέ στην Αθήνα",
        "今天我们在京都的花园里看到了很多蜜蜂",
    ]
    for text in texts:
        await engine.store_memory(user.id, Fact(statement=text))
    short = "bees hives honey Voss"
    padding = " ".join(f"qx{i}zz" for i in range(80))  # words no chunk holds
    pasted = " ".join(texts * 2)  # about 80 distinct words, most of them found
    for query in (short, f"{short} {padding}", pasted, f"{pasted} {padding}", "京都 花园 蜜蜂"):
        rows = await _bm25_rows(engine, user.id, query)
        expected, idf_sum = await _bm25_by_hand(engine, user.id, query)
        got = {(r["memory_id"], r["part"], r["part_index"], r["chunk_index"]): r for r in rows}
        assert set(got) == set(expected), query
        for key, score in expected.items():
            assert got[key]["rank"] == pytest.approx(score, rel=1e-9), query
            assert got[key]["idf_sum"] == pytest.approx(idf_sum, rel=1e-9), query
        assert [r["rank"] for r in rows] == sorted((r["rank"] for r in rows), reverse=True)
    # The words found rank alike however many unfound ones the query carries.
    plain = {r["memory_id"]: r["rank"] for r in await _bm25_rows(engine, user.id, short)}
    padded = await _bm25_rows(engine, user.id, f"{short} {padding}")
    assert {r["memory_id"]: r["rank"] for r in padded} == pytest.approx(plain, rel=1e-9)


async def test_hybrid_reports_the_part_each_signal_found(engine: MemoryEngine, talk):
    user, conversation = talk
    # "camping" is a word of turn 5 only: full-text finds it, and the fused list reports
    # turn 5 with its own text (not the part the semantic list liked best).
    hits = await engine.search(user.id, "camping", 10, mode="hybrid")
    found = {(h.memory.id, h.matched.index): h.matched.text for h in hits}
    assert found[(conversation.id, 5)] == TALK[5][1]


async def test_the_basic_view_leaves_a_transcriptions_parts_out_of_its_hits(
    engine: MemoryEngine,
):
    """Every hit of a transcription carried its whole text and every segment (a 2,000-segment
    recording made ten hits a 3.2 MB answer): ``view="basic"`` leaves them out, keeps the
    rest of the record and the matched segment, and is cached apart from the full view."""
    user = await engine.create_user(f"view{uuid.uuid4().hex[:6]}", None, "user")
    segments = [
        {"start": float(i), "end": i + 1.0, "text": f"item {i} of the ferry budget", "speaker": "A"}
        for i in range(40)
    ]
    talk = await engine.store_memory(
        user.id,
        {
            "type": "transcription",
            "segments": segments,
            "language": "en",
            "tags": ["meeting"],
            "metadata": {"room": "B2"},
        },
    )
    fact = await engine.store_memory(user.id, Fact(statement="The ferry budget is 40 euros"))
    for mode in ("semantic", "hybrid", "fulltext"):
        full = await engine.search(user.id, "ferry budget item 7", 5, mode=mode)
        basic = await engine.search(user.id, "ferry budget item 7", 5, mode=mode, view="basic")
        assert [(h.memory.id, h.matched, h.score) for h in basic] == [
            (h.memory.id, h.matched, h.score) for h in full
        ], mode
        for hit in basic:
            if hit.memory.id == talk.id:
                assert hit.memory.memory.text == "" and hit.memory.memory.segments == []  # type: ignore[union-attr]
                assert hit.memory.memory.language == "en"  # type: ignore[union-attr]
                assert (hit.memory.tags, hit.memory.metadata) == (["meeting"], {"room": "B2"})
                assert hit.matched.text == segments[hit.matched.index]["text"]
            else:
                assert hit.memory == (await engine.get_memory(user.id, fact.id))
        whole = [h for h in full if h.memory.id == talk.id]
        assert whole and len(whole[0].memory.memory.segments) == 40  # type: ignore[union-attr]
        # Read back from the result cache (validated as stored: no text, no segments).
        again = await engine.search(user.id, "ferry budget item 7", 5, mode=mode, view="basic")
        assert again == basic
    # The HTTP answer's JSON, from the cache for the second call of each view.
    for _ in range(2):
        full_json = await engine.search_json(user.id, "ferry budget", 10)
        basic_json = await engine.search_json(user.id, "ferry budget", 10, view="basic")
        assert b"item 39 of the ferry budget" in full_json
        assert b"item 39 of the ferry budget" not in basic_json
        assert len(basic_json) * 5 < len(full_json)
        parsed = SearchResponse.model_validate_json(basic_json, context=STORED)
        assert talk.id in {r.memory.id for r in parsed.results}
    with pytest.raises(InvalidInput, match="view must be full or basic") as err:
        await engine.search(user.id, "ferry", view="compact")
    assert err.value.field == "view"
