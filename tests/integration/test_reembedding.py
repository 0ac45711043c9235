"""Moving an installation to another embedding model (halldyll_ray.components.reembedding):
real PostgreSQL, real ONNX models (the packaged MiniLM, the same with another truncation,
and a tiny 8-dimensional model built here with the onnx package)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import asyncpg
import numpy as np
import pytest
from support import make_settings

from halldyll_ray import Conversation, Fact, MemoryEngine, Message
from halldyll_ray.embedding import OnnxEncoder, default_model_files
from halldyll_ray.errors import Unavailable
from halldyll_ray.storage.migrate import apply_migrations

TINY_DIM = 8


def tiny_model(folder: Path) -> Path:
    """A real ONNX text encoder of 8 dimensions: a token embedding table (seeded random
    values) looked up per token; the encoder mean-pools and normalises it. The packaged
    tokenizer gives it the MiniLM vocabulary."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    _, tokenizer = default_model_files()
    vocab = 30522
    table = np.random.default_rng(7).standard_normal((vocab, TINY_DIM)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"], axis=0)],
        "tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info(
                "last_hidden_state", TensorProto.FLOAT, ["batch", "seq", TINY_DIM]
            )
        ],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    shutil.copy(tokenizer, folder / "tokenizer.json")
    return folder


async def _chunks(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(
            "SELECT id, user_id, memory_id, embedding::text AS embedding,"
            " CASE WHEN label IS NULL THEN content ELSE label || ': ' || content END AS indexed"
            " FROM memory_chunks ORDER BY id"
        )
    finally:
        await conn.close()


def _vectors(rows: list[asyncpg.Record]) -> np.ndarray:
    return np.array([json.loads(r["embedding"]) for r in rows], dtype=np.float32)


_WORDS = [
    "bees",
    "harbour",
    "violin",
    "glacier",
    "tax",
    "lantern",
    "orchard",
    "ferry",
    "granite",
    "pepper",
    "comet",
    "tennis",
    "library",
    "saddle",
    "quantum",
    "marble",
    "desert",
    "kettle",
    "opera",
    "walnut",
    "tunnel",
    "meadow",
    "circus",
    "parrot",
    "bakery",
    "anchor",
    "chess",
    "volcano",
    "pillow",
    "rocket",
    "cactus",
    "mirror",
    "jungle",
    "ladder",
    "bronze",
    "whistle",
]


def statement(i: int) -> str:
    """The i-th fact of the corpus: words far enough apart that no two facts merge."""
    words = np.random.default_rng(i).choice(_WORDS, size=6, replace=False)
    return f"Ada's note {i} mentions " + ", ".join(words)


async def _store_corpus(engine: MemoryEngine, user_id: uuid.UUID, n: int) -> None:
    for i in range(n):
        await engine.store_memory(user_id, Fact(statement=statement(i)))
    await engine.store_memory(
        user_id,
        Conversation(
            messages=[
                Message(role="user", name="Ada", content="I moved to Bergen in May"),
                Message(role="assistant", content="How do you like Bergen?"),
            ]
        ),
    )


async def test_switch_to_a_model_of_another_dimension(
    database_url: str, redis_url: str, encoder: OnnxEncoder, tmp_path: Path
) -> None:
    old = MemoryEngine(make_settings(database_url, redis_url), encoder=encoder)
    await old.initialize()
    new = None
    try:
        user = await old.create_user(f"ada{uuid.uuid4().hex[:6]}", None, "user")
        other = await old.create_user(f"bob{uuid.uuid4().hex[:6]}", None, "user")
        await _store_corpus(old, user.id, 12)
        await _store_corpus(old, other.id, 3)
        query = statement(7)
        before = await old.search(user.id, query, mode="semantic", threshold=-1)
        assert before[0].memory.text == query

        new_settings = make_settings(
            database_url,
            redis_url,
            embedding_model_path=str(tiny_model(tmp_path / "tiny")),
            embedding_dimension=TINY_DIM,
            reembed_in_background=False,
            reembed_batch_size=4,
        )
        new = MemoryEngine(new_settings)
        await new.initialize()
        tiny = new.encoder
        assert tiny.dimension == TINY_DIM and tiny.model_id != encoder.model_id
        status = await new.reembed_status()
        assert (status.state, status.active_model, status.active_dimension) == (
            "idle",
            encoder.model_id,
            384,
        )
        # Before and during the job, the new process searches the old vectors with the old
        # model: the same answers as the old process.
        same = await new.search(user.id, query, mode="semantic", threshold=-1)
        assert [(r.memory.id, r.similarity) for r in same] == [
            (r.memory.id, r.similarity) for r in before
        ]

        status = await new.reembed(max_batches=2)  # interrupted after two batches
        assert status.state == "embedding" and status.target_dimension == TINY_DIM
        assert status.done == 8 and status.remaining == status.total - 8 > 0
        during = await new.search(user.id, query, mode="hybrid", threshold=-1)
        assert during[0].memory.text == query
        assert [r.memory.id for r in await old.search(user.id, query, mode="semantic")] == [
            r.memory.id for r in before
        ]
        # Writes go on during the job (with the old model's vectors, caught up by the job);
        # an erasure during the job takes the user's chunks, both vectors.
        written = await new.store_memory(user.id, Fact(statement="Ada sold the hives in June"))
        await old.delete_user(other.id)

        # A restart: another engine resumes the job where the committed batches stop.
        await new.close()
        new = MemoryEngine(new_settings)
        await new.initialize()
        resumed = await new.reembed_status()
        assert resumed.state == "embedding" and resumed.done == 8
        final = await new.reembed()
        assert final.state == "complete" and final.active_model == tiny.model_id
        assert final.active_dimension == TINY_DIM and final.remaining == 0
        assert final.done >= resumed.done

        # Every chunk now holds the tiny model's vector of its text; no chunk of the erased
        # user is left.
        rows = await _chunks(database_url)
        assert {r["user_id"] for r in rows} == {user.id}
        assert written.id in {r["memory_id"] for r in rows}
        expected = tiny.encode([r["indexed"] for r in rows])
        np.testing.assert_allclose(_vectors(rows), expected, atol=1e-5)

        # Searches use the new vectors and the new model; the old process is refused, and
        # writes nothing.
        after = await new.search(user.id, query, mode="semantic", threshold=-1)
        assert after[0].memory.text == query
        facts = await new.search(
            user.id, "bees in Bergen", mode="semantic", types=["fact"], threshold=-1
        )
        assert facts
        q = tiny.encode(["bees in Bergen"])[0]
        for hit in facts:
            assert hit.matched is not None
            expected_similarity = float(q @ tiny.encode([hit.matched.text])[0])
            assert hit.similarity == pytest.approx(expected_similarity, abs=1e-4)
        assert (await new.health())["model"] == {
            "ok": True,
            "id": tiny.model_id,
            "dimension": TINY_DIM,
        }
        with pytest.raises(Unavailable):
            await old.search(user.id, "bees in Bergen", mode="semantic")
        count = len(rows)
        with pytest.raises(Unavailable):
            await old.store_memory(user.id, Fact(statement="Ada bought a new hive"))
        assert len(await _chunks(database_url)) == count

        conn = await asyncpg.connect(database_url)
        try:
            column = await conn.fetchval(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid ="
                " 'memory_chunks'::regclass AND attname = 'embedding' AND NOT attisdropped"
            )
            assert column == f"vector({TINY_DIM})"
            indexes = {
                r["indexname"]: r["indexdef"]
                for r in await conn.fetch(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'memory_chunks'"
                )
            }
            assert "hnsw (embedding vector_cosine_ops)" in indexes["memory_chunks_embedding"]
            assert not {"memory_chunks_pending", "memory_chunks_embedding_next"} & set(indexes)
            assert await conn.fetchval(
                "SELECT convalidated FROM pg_constraint"
                " WHERE conname = 'memory_chunks_embedding_present'"
            )
        finally:
            await conn.close()
        # Migrations still render as the database was built (no checksum mismatch).
        assert await apply_migrations(database_url, embedding_dimension=TINY_DIM) == []
    finally:
        if new is not None:
            await new.close()
        await old.close()


async def test_background_job_interrupted_and_resumed_same_dimension(
    database_url: str, redis_url: str, encoder: OnnxEncoder
) -> None:
    """MiniLM truncating at 128 tokens is another model (another model_id), same size: the
    background task of a process embeds, is stopped midway (the process closes), and the
    next process finishes; searches answer throughout."""
    old = MemoryEngine(make_settings(database_url, redis_url), encoder=encoder)
    await old.initialize()
    user = await old.create_user(f"ada{uuid.uuid4().hex[:6]}", None, "user")
    await _store_corpus(old, user.id, 30)
    await old.close()
    short = OnnxEncoder.load(max_seq_length=128)
    settings = make_settings(
        database_url,
        redis_url,
        embedding_max_seq_length=128,
        reembed_batch_size=1,
    )
    first = MemoryEngine(settings, encoder=short)
    await first.initialize()
    try:
        for _ in range(2000):
            status = await first.reembed_status()
            if status.done >= 3:
                break
            await asyncio.sleep(0.005)
        assert status.state == "embedding" and 3 <= status.done < status.total
        assert (await first.search(user.id, "who keeps bees?", threshold=-1))[0]
    finally:
        await first.close()  # cancels the background task, wherever it is
    second = MemoryEngine(settings, encoder=short)
    await second.initialize()
    try:
        stopped = await second.reembed_status()
        assert stopped.state != "idle" and stopped.done >= 3  # resumed, not restarted
        reembedding = second.components.reembedding
        assert reembedding is not None
        await asyncio.wait_for(reembedding.switched.wait(), timeout=120)
        status = await second.reembed_status()
        assert status.state == "complete" and status.active_model == short.model_id
        assert second.components.embeddings.encoder.model_id == short.model_id
        hits = await second.search(user.id, statement(3), mode="semantic")
        assert hits[0].memory.text == statement(3)
        assert hits[0].similarity == pytest.approx(1.0, abs=1e-4)
        rows = await _chunks(database_url)
        assert len(rows) == 32
    finally:
        await second.close()
    # A process with the model the database now names starts without any job.
    third = MemoryEngine(settings, encoder=short)
    await third.initialize()
    try:
        assert third.components.reembedding is None
    finally:
        await third.close()


async def test_an_unloadable_previous_model_stops_the_start(
    database_url: str, redis_url: str, encoder: OnnxEncoder, tmp_path: Path
) -> None:
    """The old model must stay loadable until the switch: a database that names a model file
    that is gone refuses a process with another model, and nothing changes."""
    folder = tiny_model(tmp_path / "first")
    first = MemoryEngine(
        make_settings(
            database_url,
            redis_url,
            embedding_model_path=str(folder),
            embedding_dimension=TINY_DIM,
        )
    )
    # a database built for 384 dimensions cannot be adopted by an 8-d model
    from halldyll_ray.errors import ConfigurationError, MigrationError

    with pytest.raises(MigrationError, match="EMBEDDING_DIMENSION=384"):
        await first.initialize()
    base = MemoryEngine(make_settings(database_url, redis_url), encoder=encoder)
    await base.initialize()
    await base.close()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE halldyll_meta SET value = $1 WHERE key = 'embedding_model_path'",
            str(tmp_path / "missing"),
        )
    finally:
        await conn.close()
    with pytest.raises(ConfigurationError, match="cannot be loaded"):
        await MemoryEngine(
            make_settings(
                database_url,
                redis_url,
                embedding_model_path=str(folder),
                embedding_dimension=TINY_DIM,
            )
        ).initialize()
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM embedding_jobs") == 0
    finally:
        await conn.close()


async def test_starting_with_the_database_model_again_calls_the_move_off(
    database_url: str, redis_url: str, encoder: OnnxEncoder
) -> None:
    base = make_settings(database_url, redis_url)
    old = MemoryEngine(base, encoder=encoder)
    await old.initialize()
    user = await old.create_user(f"ada{uuid.uuid4().hex[:6]}", None, "user")
    await _store_corpus(old, user.id, 5)
    await old.close()
    moved = make_settings(
        database_url,
        redis_url,
        embedding_max_seq_length=128,
        reembed_in_background=False,
        reembed_batch_size=2,
    )
    new = MemoryEngine(moved, encoder=OnnxEncoder.load(max_seq_length=128))
    await new.initialize()
    try:
        assert (await new.reembed(max_batches=1)).state == "embedding"
    finally:
        await new.close()
    again = MemoryEngine(base, encoder=encoder)
    await again.initialize()
    try:
        status = await again.reembed_status()
        assert (status.state, status.active_model) == ("idle", encoder.model_id)
        assert again.components.reembedding is None
        assert (await again.search(user.id, statement(2), mode="semantic"))[0].memory.text == (
            statement(2)
        )
        await again.store_memory(user.id, Fact(statement="Ada moved the hives to Voss"))
    finally:
        await again.close()
    conn = await asyncpg.connect(database_url)
    try:
        columns = await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'memory_chunks'::regclass"
            " AND attname LIKE 'embedding%' AND NOT attisdropped"
        )
        assert [r["attname"] for r in columns] == ["embedding"]
        assert await conn.fetchval("SELECT to_regclass('memory_chunks_pending')") is None
    finally:
        await conn.close()


async def test_the_model_guard_costs_one_call_per_query(engine: MemoryEngine) -> None:
    """The guard of a search is a one-time filter (evaluated once, not per chunk), in front of
    the same scan as before."""
    from halldyll_ray.storage.sql import bind

    user = await engine.create_user(f"ada{uuid.uuid4().hex[:6]}", None, "user")
    await _store_corpus(engine, user.id, 3)
    vector = (await engine.embed(["bees"]))[0]
    filters = dict.fromkeys(("types", "model_id", "session_id", "tags", "since", "until"))
    for name, extra in (("search_semantic", {}), ("search_fulltext", {"query": "Ada's note"})):
        sql, *args = bind(
            name,
            user_id=user.id,
            vector=np.asarray(vector),
            embedding_model=engine.components.embeddings.encoder.model_id,
            fetch=10,
            include_shared=True,
            **filters,
            **extra,
        )
        async with engine.db.scoped(user.id, readonly=True) as conn:
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
        assert "One-Time Filter: halldyll_embedding_model_is(" in plan, plan
        assert plan.count("halldyll_embedding_model_is") == 1


async def test_searches_answer_while_the_background_job_runs_and_switches(
    database_url: str, redis_url: str, encoder: OnnxEncoder
) -> None:
    old = MemoryEngine(make_settings(database_url, redis_url), encoder=encoder)
    await old.initialize()
    user = await old.create_user(f"ada{uuid.uuid4().hex[:6]}", None, "user")
    await _store_corpus(old, user.id, 20)
    await old.close()
    settings = make_settings(
        database_url,
        redis_url,
        embedding_max_seq_length=128,
        reembed_batch_size=1,
        search_cache_ttl_seconds=0,
    )
    short = OnnxEncoder.load(max_seq_length=128)
    engine = MemoryEngine(settings, encoder=short)
    await engine.initialize()
    try:
        reembedding = engine.components.reembedding
        assert reembedding is not None
        answered, refused, i = 0, 0, 0
        states = set()
        while not reembedding.switched.is_set():
            i += 1
            try:
                hits = await engine.search(user.id, statement(i % 20), mode="semantic")
            except Unavailable:  # a search caught by the switch itself (old query vector)
                refused += 1
                continue
            assert hits[0].memory.text == statement(i % 20)
            answered += 1
            states.add((await engine.reembed_status()).state)
        # Refusals happen only in the instant between the switch's commit and this process
        # following it (searches in flight then); a retry answers.
        assert answered >= 3 and refused <= 5
        assert "embedding" in states
        hits = await engine.search(user.id, statement(4), mode="semantic")
        assert hits[0].memory.text == statement(4)
        assert hits[0].similarity == pytest.approx(1.0, abs=1e-4)
        assert (await engine.reembed_status()).active_model == short.model_id
    finally:
        await engine.close()


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "halldyll_ray.cli",
        "reembed",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_cli_runs_the_job_and_reports_it(
    database_url: str, redis_url: str, encoder: OnnxEncoder
) -> None:
    old = MemoryEngine(make_settings(database_url, redis_url), encoder=encoder)
    await old.initialize()
    user = await old.create_user(f"ada{uuid.uuid4().hex[:6]}", None, "user")
    await _store_corpus(old, user.id, 4)
    await old.close()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "LOG_LEVEL": "warning",
        "EMBEDDING_MAX_SEQ_LENGTH": "128",
    }
    env.pop("REDIS_URL", None)
    code, out, _ = await _cli(env, "--status")
    assert code == 0
    status = json.loads(out)
    assert (status["state"], status["active_model"]) == ("idle", encoder.model_id)

    code, out, err = await _cli(env, "--batch-size", "2", "--report-every", "1")
    assert code == 0, err
    short_id = encoder.model_id.rsplit(":", 1)[0] + ":128"
    assert f"switched to {short_id} (384 dimensions)" in out
    assert "embedding: 2 of 6 chunks embedded" in err  # progress, batch by batch

    code, out, _ = await _cli(env, "--status")
    status = json.loads(out)
    assert (status["state"], status["active_model"], status["done"]) == ("complete", short_id, 6)
    code, out, _ = await _cli(env)  # nothing left to do
    assert code == 0 and "already" in out


async def test_an_erasure_after_the_switch_removes_the_old_models_cached_vectors(
    database_url: str, redis_url: str, encoder: OnnxEncoder
) -> None:
    """Texts embedded (and cached) with the previous model are a user's data too: erasing
    the user after the switch, from a process that started after it, removes them."""
    import redis.asyncio as aioredis

    prefix = f"test-{uuid.uuid4().hex[:12]}"
    old = MemoryEngine(
        make_settings(database_url, redis_url, redis_key_prefix=prefix), encoder=encoder
    )
    await old.initialize()
    user = await old.create_user(f"ada{uuid.uuid4().hex[:6]}", None, "user")
    keep = await old.create_user(f"bob{uuid.uuid4().hex[:6]}", None, "user")
    await _store_corpus(old, user.id, 3)
    await old.store_memory(keep.id, Fact(statement="Bob keeps goats"))
    texts = [r["indexed"] for r in await _chunks(database_url) if r["user_id"] == user.id]
    old_keys = [f"{prefix}:{k}" for k in old.components.embeddings.cache_keys(texts)]
    await old.close()
    short = OnnxEncoder.load(max_seq_length=128)
    moved = make_settings(
        database_url,
        redis_url,
        redis_key_prefix=prefix,
        embedding_max_seq_length=128,
        reembed_in_background=False,
    )
    first = MemoryEngine(moved, encoder=short)
    await first.initialize()
    try:
        assert (await first.reembed()).state == "complete"
    finally:
        await first.close()
    redis = aioredis.Redis.from_url(redis_url)
    engine = MemoryEngine(moved, encoder=short)
    await engine.initialize()
    try:
        assert await redis.exists(*old_keys) == len(old_keys)
        assert encoder.model_id in engine.components.embeddings.retired_models
        await engine.delete_user(user.id)
        assert await redis.exists(*old_keys) == 0
        assert (await engine.search(keep.id, "goats"))[0].memory.text == "Bob keeps goats"
    finally:
        await engine.close()
        await redis.aclose()


async def test_the_job_skips_chunks_a_writer_holds_and_counts_only_what_it_stored(
    database_url: str, redis_url: str, encoder: OnnxEncoder, tmp_path: Path
) -> None:
    """A chunk row another transaction holds (a delete of its memory, say) is skipped, not
    waited for: the job holds the rows of its batch while it writes and would otherwise
    wait with them held. Chunks deleted between a batch's read and its write are not
    counted as done, and ``total`` is what was stored plus what is left."""
    old = MemoryEngine(make_settings(database_url, redis_url), encoder=encoder)
    await old.initialize()
    user = await old.create_user(f"ada{uuid.uuid4().hex[:6]}", None, "user")
    await _store_corpus(old, user.id, 10)  # 12 chunks: 10 facts, 2 messages
    first = await _chunks(database_url)
    assert len(first) == 12
    settings = make_settings(
        database_url,
        redis_url,
        embedding_model_path=str(tiny_model(tmp_path / "tiny")),
        embedding_dimension=TINY_DIM,
        reembed_in_background=False,
        reembed_batch_size=4,
    )
    new = MemoryEngine(settings)
    await new.initialize()
    holder = await asyncpg.connect(database_url)
    try:
        status = await new.reembed(max_batches=1)  # the job's column and index are made
        assert (status.done, status.remaining, status.total) == (4, 8, 12)
        # A writer holds the next chunk's row: the next batch stores the other three, at
        # once (the job's lock_timeout is 10 s: waiting would show as seconds or an error).
        held = first[4]["id"]
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM memory_chunks WHERE id = $1 FOR UPDATE", held)
            status = await asyncio.wait_for(new.reembed(max_batches=1), timeout=5)
        assert (status.done, status.remaining, status.total) == (7, 5, 12)
        pending = await holder.fetch(
            "SELECT id FROM memory_chunks WHERE embedding_next IS NULL ORDER BY id"
        )
        assert pending[0]["id"] == held and len(pending) == 5

        # Two memories of the next batch are deleted while it is being embedded.
        reembedding = new.components.reembedding
        assert reembedding is not None
        embed = reembedding._embed
        doomed = [r["memory_id"] for r in first if r["id"] in {pending[1]["id"], pending[2]["id"]}]

        async def embed_while_deleting(rows: list[asyncpg.Record]) -> np.ndarray:
            vectors = await embed(rows)
            for memory_id in doomed:
                await old.delete_memory(user.id, memory_id)
            return vectors

        reembedding._embed = embed_while_deleting  # type: ignore[method-assign]
        status = await new.reembed(max_batches=1)
        assert (status.done, status.remaining, status.total) == (9, 1, 10)
        reembedding._embed = embed  # type: ignore[method-assign]

        final = await new.reembed()
        assert final.state == "complete" and final.remaining == 0
        assert final.done == final.total == 10 == len(await _chunks(database_url))
    finally:
        await holder.close()
        await new.close()
        await old.close()
