"""EMBEDDING_MODEL=use-multilingual through the engine, on real PostgreSQL: a 512-d database,
questions in other languages finding English memories, and moving a database between MiniLM
and the multilingual model (the database names the packaged model it must load meanwhile).

The messages are Django's, in five languages (tests/data/multilingual_messages.json, made by
scripts/make_multilingual_fixture.py)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import asyncpg
from support import make_settings

from halldyll_ray import Fact, MemoryEngine
from halldyll_ray.embedding import OnnxEncoder, UseMultilingualEncoder

FIXTURE = Path(__file__).parents[1] / "data" / "multilingual_messages.json"
MESSAGES: dict[str, list[str]] = json.loads(FIXTURE.read_text())["texts"]


async def _top_hits(engine: MemoryEngine, user_id: uuid.UUID, lang: str) -> float:
    """Share of the messages in ``lang`` whose first semantic hit is their English text."""
    found = 0
    for query, english in zip(MESSAGES[lang], MESSAGES["en"], strict=True):
        hits = await engine.search(user_id, query, mode="semantic", threshold=-1)
        found += bool(hits) and hits[0].memory.text == english
    return found / len(MESSAGES["en"])


async def _meta(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT key, value FROM halldyll_meta WHERE key LIKE 'embedding%'")
        return {r["key"]: r["value"] for r in rows}
    finally:
        await conn.close()


async def test_questions_in_other_languages_find_english_memories(
    fresh_db: str, redis_url: str, encoder: OnnxEncoder
) -> None:
    settings = make_settings(fresh_db, redis_url, embedding_model="use-multilingual")
    assert settings.embedding_dimension == 512
    engine = MemoryEngine(settings)
    await engine.initialize(migrate=True)
    try:
        assert isinstance(engine.encoder, UseMultilingualEncoder)
        user = await engine.create_user(f"ada{uuid.uuid4().hex[:6]}", None, "user")
        for text in MESSAGES["en"]:
            await engine.store_memory(user.id, Fact(statement=text))
        for lang in ("fr", "de", "es", "ja"):
            assert await _top_hits(engine, user.id, lang) >= 0.85, lang
        meta = await _meta(fresh_db)
        assert meta["embedding_model_name"] == "use-multilingual"
        assert (meta["embedding_dimension"], meta["embedding_model_path"]) == ("512", "")
    finally:
        await engine.close()

    # The same database, restarted with the default MiniLM: until the re-embedding switches,
    # the process loads the multilingual model by the name the database recorded, and the
    # French questions still find their English memories; after it, MiniLM (384-d) answers.
    moved = MemoryEngine(
        make_settings(fresh_db, redis_url, reembed_in_background=False, reembed_batch_size=10),
        encoder=encoder,
    )
    await moved.initialize()
    try:
        assert moved.components.reembedding is not None
        assert isinstance(moved.components.embeddings.encoder, UseMultilingualEncoder)
        assert await _top_hits(moved, user.id, "fr") >= 0.85
        status = await moved.reembed()
        assert (status.state, status.active_model, status.active_dimension) == (
            "complete",
            encoder.model_id,
            384,
        )
        meta = await _meta(fresh_db)
        assert (meta["embedding_model_name"], meta["embedding_dimension"]) == ("minilm", "384")
        # MiniLM ranks the English memories by their own text still.
        hits = await moved.search(user.id, MESSAGES["en"][3], mode="semantic")
        assert hits[0].memory.text == MESSAGES["en"][3]
    finally:
        await moved.close()
