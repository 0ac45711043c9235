"""Sizes at their limits, one past them and far past: counted as the README says, the same
on every path (a store, a bulk store, an update, a filter), and a refusal stores nothing."""

from __future__ import annotations

import json
import time
from typing import Any

import asyncpg
import pytest

from halldyll_ray import InvalidInput, MemoryEngine
from halldyll_ray.components import base
from halldyll_ray.models import MAX_METADATA_BYTES, MAX_TAGS


async def _memories(engine: MemoryEngine) -> int:
    return int(await engine.db.fetchval("SELECT count(*) FROM memories", admin=True))


def _metadata_of(size: int, *, char: str = "x") -> dict[str, Any]:
    """One key whose value makes the object ``size`` bytes of compact UTF-8 JSON."""
    room = size - len('{"a":""}')
    assert room % len(char.encode()) == 0
    return {"a": char * (room // len(char.encode()))}


async def test_metadata_is_counted_in_bytes_of_compact_json(engine: MemoryEngine) -> None:
    # What a client measures of what it sends (JSON.stringify, separators=(",", ":")): the
    # count was of Python's spaced form, so 16,384 bytes as sent were 16,385 and refused, and
    # many small keys were refused well under the limit of the caller's own count.
    user = await engine.create_user("ada", None, "user")
    at_limit = _metadata_of(MAX_METADATA_BYTES)
    assert len(json.dumps(at_limit, separators=(",", ":")).encode()) == MAX_METADATA_BYTES
    emoji = _metadata_of(MAX_METADATA_BYTES, char="\U0001f600")  # 4 bytes, 1 character
    keys: dict[str, Any] = {f"k{i:04d}": 1 for i in range(1638)}  # '"k0000":1,' each
    keys["k1637"] = 1000
    assert len(json.dumps(keys, separators=(",", ":")).encode()) == MAX_METADATA_BYTES
    for statement, metadata in [("a", at_limit), ("b", emoji), ("c", keys)]:
        stored = await engine.store_memory(
            user.id, {"type": "fact", "statement": f"fact {statement}", "metadata": metadata}
        )
        assert stored.metadata == metadata
    updated = await engine.update_memory(user.id, stored.id, {"metadata": at_limit})
    assert updated.metadata == at_limit
    count = await _memories(engine)
    over = [
        _metadata_of(MAX_METADATA_BYTES + 1),
        {"a": "\U0001f600" * ((MAX_METADATA_BYTES - 8) // 4) + "x"},  # one byte over
        {**keys, "k1637": 10_000},
        _metadata_of(MAX_METADATA_BYTES * 64),
    ]
    for metadata in over:
        with pytest.raises(InvalidInput) as caught:
            await engine.store_memory(
                user.id, {"type": "fact", "statement": "never stored", "metadata": metadata}
            )
        assert caught.value.field == "fact.metadata"
        assert f"at most {MAX_METADATA_BYTES}" in caught.value.message
        with pytest.raises(InvalidInput):
            await engine.update_memory(user.id, stored.id, {"metadata": metadata})
    assert await _memories(engine) == count
    assert (await engine.get_memory(user.id, stored.id)).metadata == at_limit


async def test_tags_are_counted_once_each_as_they_are_kept(engine: MemoryEngine) -> None:
    # "x" twice, or "café" precomposed and decomposed, is one tag: 33 tags of which two are
    # one were refused as 33 ("at most 32 items after validation, not 33").
    user = await engine.create_user("ada", None, "user")
    tags = [f"t{i}" for i in range(MAX_TAGS - 1)] + ["café", "cafe\u0301", " t0 ", "t0"]
    stored = await engine.store_memory(user.id, {"type": "fact", "statement": "x", "tags": tags})
    assert len(stored.tags) == MAX_TAGS and stored.tags[-1] == "café"
    (bulk,) = await engine.store_memories(
        user.id, [{"type": "fact", "statement": "y", "tags": tags}]
    )
    assert bulk.tags == stored.tags
    assert (await engine.update_memory(user.id, bulk.id, {"tags": tags[::-1]})).tags
    found = await engine.list_memories(user.id, tags=tags)
    assert {m.id for m in found.items} == {stored.id, bulk.id}
    count = await _memories(engine)
    for many in ([f"t{i}" for i in range(MAX_TAGS + 1)], [f"t{i}" for i in range(10_000)]):
        with pytest.raises(InvalidInput) as caught:
            await engine.store_memory(user.id, {"type": "fact", "statement": "z", "tags": many})
        assert caught.value.field == "fact.tags"
        assert f"at most {MAX_TAGS} different tags" in caught.value.message
        with pytest.raises(InvalidInput) as caught:
            await engine.store_memories(user.id, [{"type": "fact", "statement": "z", "tags": many}])
        assert caught.value.field == "memories.0.fact.tags"
        with pytest.raises(InvalidInput):
            await engine.list_memories(user.id, tags=many)
    assert await _memories(engine) == count


async def test_chunks_are_written_in_statements_of_bounded_size(
    engine: MemoryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every chunk row is an HNSW insertion: a transcription at its limit (10,000 segments)
    # was one statement of 10,000 rows, past DB_COMMAND_TIMEOUT_SECONDS on a loaded machine,
    # and a 503 for an input within every limit. (A small bound here, so the test is fast.)
    monkeypatch.setattr(base, "CHUNK_ROWS_PER_STATEMENT", 4, raising=False)
    rows: list[int] = []
    execute = asyncpg.connection.Connection.execute

    async def counted(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> Any:
        if query.lstrip().startswith("INSERT INTO memory_chunks"):
            rows.append(len(args[1]))  # the memory ids, one per row
        return await execute(self, query, *args, **kw)

    monkeypatch.setattr(asyncpg.connection.Connection, "execute", counted)
    user = await engine.create_user("ada", None, "user")
    segments = [
        {"start": float(i), "end": i + 0.5, "text": f"segment {i} of the budget meeting"}
        for i in range(10)
    ]
    started = time.perf_counter()
    stored = await engine.store_memory(user.id, {"type": "transcription", "segments": segments})
    assert rows == [4, 4, 2], rows
    rows.clear()
    await engine.store_memories(
        user.id, [{"type": "fact", "statement": f"Ada owns {n} boats"} for n in ("two", "six")] * 3
    )
    assert max(rows) <= 4 and sum(rows) >= 2, rows
    parts = await engine.db.fetch(
        "SELECT part_index FROM memory_chunks WHERE memory_id = $1 ORDER BY part_index",
        stored.id,
        admin=True,
    )
    assert [r["part_index"] for r in parts] == list(range(10))
    assert time.perf_counter() - started < 120
