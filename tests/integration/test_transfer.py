"""Export and import of a user's memories: the NDJSON round trip, idempotence, bad lines,
all-or-nothing, and a restore into the same user."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from support import export_header, export_lines, fact_line, ndjson

from halldyll_ray import (
    Conversation,
    Fact,
    Image,
    InvalidInput,
    MemoryEngine,
    Message,
    NotFound,
    Summary,
    Transcription,
)
from halldyll_ray.models import ImageSize, Segment


async def _user(engine: MemoryEngine, prefix: str) -> uuid.UUID:
    return (await engine.create_user(f"{prefix}{uuid.uuid4().hex[:6]}", None, "user")).id


async def _fill(engine: MemoryEngine, user_id: uuid.UUID) -> dict[str, uuid.UUID]:
    model = f"painter-{uuid.uuid4().hex[:6]}"
    await engine.register_model(model, "image-generation", version="1.5")
    said = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
    talk = await engine.store_memory(
        user_id,
        Conversation(
            title="Trip planning",
            session_id="s-1",
            tags=["travel"],
            messages=[
                Message(
                    role="user", content="We go to Lisbon in June", name="Ana", created_at=said
                ),
                Message(role="assistant", content="Book the tram tour early", created_at=said),
            ],
        ),
    )
    fact = await engine.store_memory(
        user_id, Fact(statement="Ana is allergic to peanuts", confidence=0.9, source="chat 1")
    )
    again = Fact(statement="Ana is allergic to peanuts", source="chat 2")
    await engine.store_memory(user_id, again)
    image = await engine.store_memory(
        user_id,
        Image(
            prompt="a lighthouse at dusk, oil painting",
            seed=42,
            steps=30,
            guidance_scale=7.5,
            size=ImageSize(width=768, height=512),
            controlnet={"type": "canny", "weight": 0.8},
            model=model,
        ),
    )
    voice = await engine.store_memory(
        user_id,
        Transcription(
            text="hello there. see you soon.",
            segments=[
                Segment(start=0.0, end=1.2, text="hello there."),
                Segment(start=1.2, end=2.5, text="see you soon.", speaker="B"),
            ],
            language="en",
        ),
    )
    summary = await engine.store_memory(
        user_id, Summary(text="Ana plans Lisbon; peanut allergy.", covers=[talk.id, fact.id])
    )
    return {
        "talk": talk.id,
        "fact": fact.id,
        "image": image.id,
        "voice": voice.id,
        "summary": summary.id,
        "model": model,  # type: ignore[dict-item]
    }


async def test_export_round_trips_into_another_user_and_reimport_changes_nothing(
    engine: MemoryEngine,
) -> None:
    source, target = await _user(engine, "src"), await _user(engine, "dst")
    ids = await _fill(engine, source)
    exported = await export_lines(engine, source)
    header, lines = exported[0], exported[1:]
    assert header["format"] == "halldyll-export" and header["version"] == 1
    assert header["user"]["id"] == str(source)
    assert header["memories"] == {
        "conversation": 1,
        "fact": 1,
        "image": 1,
        "transcription": 1,
        "summary": 1,
    }
    assert header["messages"] == 2
    assert len(lines) == 5 and lines[-1]["memory"]["type"] == "summary"  # summaries last
    by_type = {line["memory"]["type"]: line for line in lines}
    assert by_type["fact"]["reinforcement_count"] == 1
    assert by_type["fact"]["sources"] == ["chat 1", "chat 2"]
    assert by_type["image"]["memory"]["model"] == ids["model"]  # by name, not id
    assert by_type["image"]["memory"]["controlnet"] == {"type": "canny", "weight": 0.8}
    assert [m["name"] for m in by_type["conversation"]["messages"]] == ["Ana", None]
    assert by_type["transcription"]["memory"]["segments"][1]["speaker"] == "B"

    file = ndjson(exported)
    report = await engine.import_memories(target, [file[:100], file[100:]])
    assert report.created == {
        "conversation": 1,
        "fact": 1,
        "image": 1,
        "transcription": 1,
        "summary": 1,
    }
    assert (report.lines, report.unchanged, report.error_count) == (5, 0, 0)

    imported = await export_lines(engine, target)
    assert imported[0]["memories"] == header["memories"]
    again = {line["memory"]["type"]: line for line in imported[1:]}
    for kind in by_type:
        assert again[kind]["id"] != by_type[kind]["id"]  # another user: new ids
        for key in ("memory", "messages", "sources", "created_at", "reinforcement_count"):
            if kind == "summary" and key == "memory":
                continue
            assert again[kind][key] == by_type[kind][key], (kind, key)
    # The summary's covers point at the target's copies, not the source's memories.
    covers = again["summary"]["memory"]["covers"]
    assert sorted(covers) == sorted([again["conversation"]["id"], again["fact"]["id"]])

    # Imported memories are searchable like stored ones (chunks written, with labels).
    hits = await engine.search(target, "Ana Lisbon tram", 5)
    assert any(h.memory.id == uuid.UUID(again["conversation"]["id"]) for h in hits)

    second = await engine.import_memories(target, [file])
    assert second.created == {} and second.unchanged == 5 and second.merged == 0
    assert (await export_lines(engine, target))[1:] == imported[1:]


async def test_restore_into_the_same_user_keeps_ids_and_brings_back_deleted_memories(
    engine: MemoryEngine,
) -> None:
    user = await _user(engine, "restore")
    ids = await _fill(engine, user)
    file = b"".join([line async for line in engine.export_memories(user)])
    await engine.delete_memory(user, ids["image"])
    report = await engine.import_memories(user, [file])
    assert report.created == {"image": 1} and report.unchanged == 4
    restored = await engine.get_memory(user, ids["image"])  # the same id again
    assert restored.memory.seed == 42  # type: ignore[union-attr]


async def test_restoring_a_users_own_file_embeds_only_what_it_lacks(
    engine: MemoryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memories the user still has under their ids are unchanged before they are embedded:
    a restore of a user's own export (the README's export then import) embedded every memory
    of the file (37 s for 5,800 segments), then found each one present."""
    user = await _user(engine, "restore")
    ids = await _fill(engine, user)
    file = b"".join([line async for line in engine.export_memories(user)])
    await engine.delete_memory(user, ids["image"])
    embeddings = engine.components.transfer.embeddings
    embedded: list[str] = []
    real = embeddings.embed

    async def counting(texts: list[str], *args: Any, **kwargs: Any) -> Any:
        embedded.extend(texts)
        return await real(texts, *args, **kwargs)

    monkeypatch.setattr(embeddings, "embed", counting)
    report = await engine.import_memories(user, [file])
    assert report.created == {"image": 1} and report.unchanged == 4
    assert embedded and all("lighthouse" in text for text in embedded), embedded
    embedded.clear()
    again = await engine.import_memories(user, [file], atomic=True)
    assert again.created == {} and again.unchanged == 5 and embedded == []


async def test_a_fact_already_known_is_merged_not_duplicated(engine: MemoryEngine) -> None:
    source, target = await _user(engine, "fsrc"), await _user(engine, "fdst")
    await engine.store_memory(source, Fact(statement="Ben prefers window seats", confidence=0.6))
    await engine.store_memory(target, Fact(statement="Ben prefers window seats", confidence=0.6))
    file = b"".join([line async for line in engine.export_memories(source)])
    report = await engine.import_memories(target, [file])
    assert report.merged == 1 and report.created == {}
    facts = (await engine.list_memories(target, types=["fact"])).items
    assert len(facts) == 1 and facts[0].reinforcement_count == 1
    assert (await engine.import_memories(target, [file])).unchanged == 1
    facts = (await engine.list_memories(target, types=["fact"])).items
    assert facts[0].reinforcement_count == 1  # the re-import reinforced nothing


async def test_bad_lines_are_reported_by_number_and_the_good_ones_imported(
    engine: MemoryEngine,
) -> None:
    user = await _user(engine, "bad")
    good = fact_line("Cleo runs on Sundays")
    bad_value = fact_line(
        "Cleo swims",
    )
    bad_value["memory"]["confidence"] = 7
    unknown_model = fact_line("Cleo paints")
    unknown_model["memory"]["model"] = f"no-such-model-{uuid.uuid4().hex[:6]}"
    expired = fact_line("Cleo is in Rome this week", expires_at="2020-01-01T00:00:00Z")
    expired["memory"]["kind"] = "ephemeral"
    messages_on_a_fact = fact_line("Cleo knits", messages=[{"role": "user", "content": "hi"}])
    nul_source = fact_line("Cleo bakes", sources=["chat\u0000 1"])
    unix_time = fact_line("Cleo rows", created_at=1700000000)  # ISO 8601 only (a naive one is UTC)
    # A conversation as a client stores it (messages inside the memory) is taken as well; a
    # blank speaker name (an export from before names had to be visible) is no name.
    talk = fact_line("unused")
    talk["memory"] = {
        "type": "conversation",
        "messages": [{"role": "user", "content": "Yo", "name": "  "}],
    }
    file = (
        ndjson([export_header(), good])
        + b"{not json\n\n"
        + ndjson([bad_value, unknown_model, expired])
        + ndjson([{"id": "x"}])
        + b"[" * 100_000
        + b"\n"
        + b"\xff\xfe\n"
        + ndjson([messages_on_a_fact, nul_source, unix_time, talk])
    )
    # Times that contradict themselves or that PostgreSQL stores as an infinity.
    edits_before_creation = fact_line("Cleo sews", updated_at="2020-01-01T00:00:00Z")
    at_the_end_of_time = fact_line("Cleo naps", expires_at="9999-12-31T23:59:59.999999Z")
    at_the_start_of_time = fact_line("Cleo hums", created_at="0001-01-01T00:00:00Z")
    year_zero = fact_line("unused")
    year_zero["memory"] = {"type": "summary", "text": "A month of Cleo"}
    year_zero["period"] = "0000-01"
    file += ndjson([edits_before_creation, at_the_end_of_time, at_the_start_of_time, year_zero])
    report = await engine.import_memories(user, [file])
    assert report.created == {"fact": 1, "conversation": 1} and report.expired == 1
    assert [(e.line, e.field) for e in report.errors] == [
        (3, "line"),
        (5, "memory.fact.confidence"),
        (6, "memory.model"),
        (8, "id"),
        (9, "line"),
        (10, "line"),
        (11, "messages"),
        (12, "sources.0"),
        (13, "created_at"),
        (15, "updated_at"),
        (16, "expires_at"),
        (17, "created_at"),
        (18, "period"),
    ]
    assert report.lines == 16 and report.error_count == 13
    facts = (await engine.list_memories(user, types=["fact"])).items
    assert [f.text for f in facts] == ["Cleo runs on Sundays"]
    talks = (await engine.list_memories(user, types=["conversation"])).items
    stored = await engine.get_memory(user, talks[0].id)
    assert [(m.content, m.name) for m in stored.messages] == [("Yo", None)]


async def test_an_id_is_kept_once_per_file_and_never_says_whose_it_is(
    engine: MemoryEngine,
) -> None:
    owner = await _user(engine, "owner")
    theirs = await engine.store_memory(owner, Fact(statement="Eve keeps a diary"))
    user = await _user(engine, "restorer")
    first = fact_line("Finn grows tomatoes")
    twice = {**fact_line("Finn grows peppers"), "id": first["id"]}  # the same id again
    borrowed = {**fact_line("Finn reads maps"), "id": str(theirs.id)}  # another user's memory id
    # A restore (the header names this user) keeps ids, except one that is not the user's.
    report = await engine.import_memories(
        user, [ndjson([export_header(user), first, twice, borrowed])]
    )
    assert [(e.line, e.field) for e in report.errors] == [(3, "id")]
    assert "twice" in report.errors[0].message and report.created == {"fact": 2}
    facts = {f.text: f.id for f in (await engine.list_memories(user, types=["fact"])).items}
    assert facts["Finn grows tomatoes"] == uuid.UUID(first["id"])
    assert facts["Finn reads maps"] != theirs.id and "Finn grows peppers" not in facts
    kept = await engine.get_memory(owner, theirs.id)
    assert kept.memory.statement == "Eve keeps a diary"  # type: ignore[union-attr]


async def test_atomic_import_refuses_the_whole_file_for_one_bad_line(engine: MemoryEngine) -> None:
    user = await _user(engine, "atomic")
    await engine.store_memory(user, Fact(statement="Dan keeps bees"))
    before = await export_lines(engine, user)
    bad = fact_line("Dan fixes clocks")
    bad["memory"]["importance"] = -1
    lines = [fact_line(f"Dan owns {n} bicycles") for n in range(200)] + [bad]
    with pytest.raises(InvalidInput) as caught:
        await engine.import_memories(user, [ndjson([export_header(), *lines])], atomic=True)
    assert caught.value.fields["report"]["errors"][0]["line"] == 202
    assert caught.value.fields["report"]["committed"] is False
    assert (await export_lines(engine, user))[1:] == before[1:]  # nothing changed
    report = await engine.import_memories(
        user, [ndjson([export_header(), *lines[:200]])], atomic=True
    )
    # Near-equal statements merge as stores do: every line is either new or merged.
    assert report.created["fact"] + report.merged == 200 and report.committed
    assert report.created["fact"] == len((await engine.list_memories(user, limit=500)).items) - 1


@pytest.mark.parametrize(
    ("first", "field"),
    [
        (b"", "format"),
        (b"[1, 2]\n", "format"),
        (b'{"format": "halldyll-export", "version": 2}\n', "version"),
        (b'{"format": "halldyll-export", "version": true}\n', "version"),  # true == 1
        (b'{"format": "halldyll-export", "version": 1.0}\n', "version"),
        (b'{"format": "other"}\n', "format"),
    ],
)
async def test_a_file_without_a_valid_header_is_refused_and_changes_nothing(
    engine: MemoryEngine, first: bytes, field: str
) -> None:
    user = await _user(engine, "hdr")
    with pytest.raises(InvalidInput) as caught:
        await engine.import_memories(user, [first + ndjson([fact_line("Eve sings")])])
    assert caught.value.field == field
    assert (await engine.list_memories(user)).items == []


async def test_a_file_cut_short_of_its_header_is_reported_and_refused_when_atomic(
    engine: MemoryEngine,
) -> None:
    user = await _user(engine, "cut")
    header = {**export_header(), "memories": {"fact": 3}}
    file = ndjson([header, fact_line("Dora sails")])
    with pytest.raises(InvalidInput) as caught:
        await engine.import_memories(user, [file], atomic=True)
    assert caught.value.field == "memories"
    assert caught.value.fields["report"]["missing"] == 2
    assert (await engine.list_memories(user)).items == []
    report = await engine.import_memories(user, [file])
    assert report.missing == 2 and report.created == {"fact": 1} and report.error_count == 0
    whole = await engine.import_memories(
        user, [ndjson([header, *(fact_line(f"Dora {n}") for n in "abc")])]
    )
    assert whole.missing == 0


async def test_a_negative_count_in_the_header_cannot_hide_a_file_cut_short(
    engine: MemoryEngine,
) -> None:
    """{"fact": 3, "summary": -2} adds up to the one line a cut file holds: the atomic import
    of that file committed it, as if it were whole."""
    user = await _user(engine, "neg")
    header = {**export_header(), "memories": {"fact": 3, "summary": -2}}
    for atomic in (True, False):
        with pytest.raises(InvalidInput) as caught:
            await engine.import_memories(
                user, [ndjson([header, fact_line("Dora sails")])], atomic=atomic
            )
        assert caught.value.field == "memories.summary"
    assert (await engine.list_memories(user)).items == []


async def test_export_and_import_of_a_missing_user_are_not_found(engine: MemoryEngine) -> None:
    with pytest.raises(NotFound):
        await export_lines(engine, uuid.uuid4())
    with pytest.raises(NotFound):
        await engine.import_memories(uuid.uuid4(), [ndjson([export_header()])])
    # Bad lines only: nothing to write locked the user, and the import said 200 "committed".
    bad = ndjson([export_header(), {"memory": {"type": "fact"}}]) + b"not json\n"
    for atomic in (False, True):
        with pytest.raises(NotFound):
            await engine.import_memories(uuid.uuid4(), [bad], atomic=atomic)


async def test_expired_facts_are_not_exported(engine: MemoryEngine) -> None:
    user = await _user(engine, "exp")
    await engine.store_memory(user, Fact(statement="Finn is in Oslo today", kind="ephemeral"))
    async with engine.db.scoped(user) as conn:
        await conn.execute(
            "UPDATE memories SET expires_at = $2 WHERE user_id = $1",
            user,
            datetime.now(UTC) - timedelta(minutes=1),
        )
    exported = await export_lines(engine, user)
    assert exported[0]["memories"] == {} and len(exported) == 1


async def test_a_model_registered_as_the_export_starts_keeps_its_memories_scoped(
    engine: MemoryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export read the models' names before its snapshot: a model registered and used
    in between (here, while the export's audit row is written) was exported as no model,
    and the file brought the memory back shared by all of the user's models."""
    from halldyll_ray.components import transfer

    user = await _user(engine, "race")
    name = f"late-{uuid.uuid4().hex[:6]}"
    audit = transfer.write_audit

    async def audit_then_register(conn: Any, operation: str, *args: Any, **kw: Any) -> None:
        await audit(conn, operation, *args, **kw)
        if operation == "memory.export":  # committed by other connections meanwhile
            await engine.register_model(name, "llm")
            await engine.store_memory(user, Fact(statement="Only the late model knows", model=name))

    monkeypatch.setattr(transfer, "write_audit", audit_then_register)
    exported = await export_lines(engine, user)
    assert [line["memory"]["model"] for line in exported[1:]] == [name]


async def test_more_concurrent_exports_than_pooled_connections_all_finish(
    settings: Any, encoder: Any
) -> None:
    # Each export holds one connection while it streams; none may wait for a second one
    # while holding it, or a pool that every export holds a connection of deadlocks.
    small = settings.model_copy(update={"db_pool_size": 2})
    async with MemoryEngine(small, encoder=encoder) as engine:
        user = await _user(engine, "pool")
        await engine.store_memory(user, Fact(statement="Kai bakes sourdough"))

        async def slow_export() -> int:
            lines = 0
            async for _ in engine.export_memories(user):
                lines += 1
                await asyncio.sleep(0.05)  # a slow client keeps its stream open
            return lines

        counts = await asyncio.wait_for(asyncio.gather(*(slow_export() for _ in range(4))), 60)
        assert counts == [2, 2, 2, 2]


async def test_more_concurrent_atomic_imports_than_pooled_connections_all_finish(
    settings: Any, encoder: Any
) -> None:
    # An atomic import holds its transaction's connection across batches: what it reads in
    # between (models, lines imported before) must go through that connection.
    small = settings.model_copy(update={"db_pool_size": 2})
    async with MemoryEngine(small, encoder=encoder) as engine:
        users = [await _user(engine, "atom") for _ in range(4)]
        file = ndjson([export_header(), *(fact_line(f"Lena owns {n} kites") for n in range(3))])
        reports = await asyncio.wait_for(
            asyncio.gather(
                *(engine.import_memories(u, [file], atomic=True) for u in [*users, users[0]])
            ),
            90,
        )
        assert all(r.committed and r.error_count == 0 for r in reports)
        assert sum(r.unchanged for r in reports) == 3  # users[0] got the file twice


async def test_a_long_line_sent_in_small_chunks_is_read_in_linear_time(
    engine: MemoryEngine,
) -> None:
    """A 32 MB line (under MAX_LINE_BYTES) arriving in 1 KB chunks: each chunk searched the
    whole line read so far for its end again, 512 GB scanned (9 s of a core, the replica's
    event loop held). Only the new chunk is searched now; the line is reported, the next one
    imported."""
    user = await _user(engine, "chunks")
    padded = json.dumps(fact_line("Dana sails")).encode()
    filler = b"{" + b'"x": "' + b"y" * (32 * 1024 * 1024) + b'"}'

    async def chunks() -> Any:
        yield ndjson([export_header()])
        for start in range(0, len(filler), 1024):
            yield filler[start : start + 1024]
        yield b"\n" + padded + b"\n"

    started = asyncio.get_running_loop().time()
    report = await engine.import_memories(user, chunks())
    elapsed = asyncio.get_running_loop().time() - started
    assert report.lines == 2 and report.created == {"fact": 1}, report
    assert [e.line for e in report.errors] == [2]
    assert elapsed < 3.0, elapsed


async def test_an_import_batch_holds_a_bounded_number_of_bytes(engine: MemoryEngine) -> None:
    """Twelve lines of 1 MiB each (valid facts, padded with JSON whitespace): a batch took
    128 lines whatever their size, so a 1 GiB file of 8 MiB lines was held whole, then its
    parsed models. A batch now ends at IMPORT_BATCH_BYTES: two batches here, one
    ``memory.import`` audit row each, and every line imported."""
    from halldyll_ray.components.transfer import IMPORT_BATCH_BYTES

    user = await _user(engine, "bytes")
    pad = b" " * (1024 * 1024)
    lines = [
        json.dumps(fact_line(f"Eli owns {n} bicycles")).encode()[:-1] + pad + b"}\n"
        for n in range(12)
    ]
    assert sum(len(x) for x in lines) > IMPORT_BATCH_BYTES
    report = await engine.import_memories(user, [ndjson([export_header()]), *lines])
    assert report.created == {"fact": 12} and not report.errors, report
    rows = await engine.list_audit(user_id=user, operation="memory.import")
    assert len(rows) == 2, rows


async def test_an_export_batch_holds_a_bounded_number_of_bytes(
    engine: MemoryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export batch took 200 memories whatever their size: 200 conversations of 1,000
    long messages were held, messages and lines, in one batch of gigabytes. A batch now ends
    once its memories hold EXPORT_BATCH_BYTES (shrunk here): one conversation a batch, and
    the file re-imports whole."""
    from halldyll_ray.components import transfer

    monkeypatch.setattr(transfer, "EXPORT_BATCH_BYTES", 20_000, raising=False)
    user = await _user(engine, "long")
    for n in range(3):
        said = [Message(role="user", content=f"turn {n}.{i} " + "x" * 2_000) for i in range(10)]
        await engine.store_memory(user, Conversation(title=f"chat {n}", messages=said))
    await engine.store_memory(user, Fact(statement="Eli keeps long chats"))
    pieces = [piece async for piece in engine.export_memories(user)]
    assert [piece.count(b"\n") for piece in pieces] == [1, 1, 1, 1, 1]
    copy = await _user(engine, "copy")
    report = await engine.import_memories(copy, pieces, atomic=True)
    assert report.created == {"conversation": 3, "fact": 1} and not report.errors, report
    again = await export_lines(engine, copy)
    assert [r.get("messages") for r in again[1:]] == [
        r.get("messages") for r in (await export_lines(engine, user))[1:]
    ]


async def test_facts_sources_follow_their_conversations_into_another_user(
    engine: MemoryEngine,
) -> None:
    """A fact learned from a conversation names it as a source (``conversation:<id>``):
    imported into another user, the conversation got a new id and the fact still named the
    source user's conversation, which the target's deletion of its copy did not remove. Now
    sources are re-pointed as covers are (also to a conversation later in the file than the
    fact), and one that names a memory the file does not hold is dropped."""
    source, target = await _user(engine, "src"), await _user(engine, "dst")
    first = await engine.store_memory(
        source, Conversation(messages=[Message(role="user", content="I moved to Porto.")])
    )
    porto = await engine.store_memory(
        source, Fact(statement="Ana lives in Porto", source=f"conversation:{first.id}")
    )
    tea = await engine.store_memory(source, Fact(statement="Ana drinks green tea", source="chat"))
    later = await engine.store_memory(
        source, Conversation(messages=[Message(role="user", content="Green tea, always.")])
    )
    await engine.store_memory(
        source, Fact(statement="Ana drinks green tea", source=f"conversation:{later.id}")
    )
    stray = f"conversation:{uuid.uuid4()}"
    await engine.store_memory(source, Fact(statement="Ana has a cat", source=stray))
    exported = await export_lines(engine, source)
    order = [line["id"] for line in exported[1:]]
    assert order.index(str(tea.id)) < order.index(str(later.id))  # the fact comes first

    report = await engine.import_memories(target, [ndjson(exported)])
    assert report.error_count == 0
    mine = {line["id"]: line for line in (await export_lines(engine, target))[1:]}
    copies = {
        line["memory"].get("statement") or line["messages"][0]["content"]: line
        for line in mine.values()
    }
    first_here = copies["I moved to Porto."]["id"]
    later_here = copies["Green tea, always."]["id"]
    assert copies["Ana lives in Porto"]["sources"] == [f"conversation:{first_here}"]
    assert copies["Ana lives in Porto"]["memory"]["source"] == f"conversation:{first_here}"
    assert copies["Ana drinks green tea"]["sources"] == ["chat", f"conversation:{later_here}"]
    assert copies["Ana has a cat"]["sources"] == []
    assert copies["Ana has a cat"]["memory"]["source"] is None
    assert not any(str(source_id) in json.dumps(mine) for source_id in (first.id, later.id))

    # The target's deletion of its copy now leaves its fact's sources, as for a stored one.
    await engine.delete_memory(target, first_here)
    porto_here = await engine.get_memory(target, copies["Ana lives in Porto"]["id"])
    assert porto_here.sources == []
    # A second import changes nothing; a restore into the source keeps its own ids.
    again = await engine.import_memories(target, [ndjson(exported)])
    assert again.created == {"conversation": 1} and again.merged == 0  # the deleted one
    restored = await engine.import_memories(source, [ndjson(exported)])
    assert restored.created == {} and restored.unchanged == len(exported) - 1
    assert (await engine.get_memory(source, porto.id)).sources == [f"conversation:{first.id}"]


def _line(memory: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An export line of ``memory`` (a fresh id, stamped in 2024)."""
    at = "2024-01-01T00:00:00Z"
    return {"id": str(uuid.uuid4()), "memory": memory, "created_at": at, "updated_at": at, **extra}


def _log(session: str, said: str) -> dict[str, Any]:
    return _line(
        {"type": "conversation", "session_id": session},
        session_role="log",
        messages=[{"role": "user", "content": said}],
    )


def _session_summary(session: str, text: str) -> dict[str, Any]:
    return _line({"type": "summary", "text": text, "session_id": session}, session_role="summary")


async def test_a_second_log_or_summary_of_a_session_or_month_in_a_file_is_refused(
    engine: MemoryEngine,
) -> None:
    """A session has one log and one rolling summary, a model scope one summary a month, as
    record_turn and the roll-ups keep them. A file holding two (two exports put together)
    had its second one imported stripped of its role or period without a word: a second
    conversation of the session, and summaries that deleting what they cover left behind.
    The second is reported on its field and not imported; the first is, and nothing else
    changes (atomic: the whole file is refused)."""
    user = await _user(engine, "twice")
    lines = [
        _log("s-1", "We leave at nine"),
        _log("s-1", "We leave at ten"),
        _session_summary("s-1", "Leaving at nine"),
        _session_summary("s-1", "Leaving at ten"),
        _line({"type": "summary", "text": "January: trips"}, period="2024-01"),
        _line({"type": "summary", "text": "January: trains"}, period="2024-01"),
        _log("s-2", "Another session"),  # another session and month are their own
        _line({"type": "summary", "text": "February: trips"}, period="2024-02"),
    ]
    file = ndjson([export_header(), *lines])
    with pytest.raises(InvalidInput) as caught:
        await engine.import_memories(user, [file], atomic=True)
    assert [(e["line"], e["field"]) for e in caught.value.fields["report"]["errors"]] == [
        (3, "session_role"),
        (5, "session_role"),
        (7, "period"),
    ]
    assert (await engine.list_memories(user)).items == []
    report = await engine.import_memories(user, [file])
    assert [(e.line, e.field) for e in report.errors] == [
        (3, "session_role"),
        (5, "session_role"),
        (7, "period"),
    ]
    assert "already has its log" in report.errors[0].message
    assert report.created == {"conversation": 2, "summary": 3}, report
    exported = (await export_lines(engine, user))[1:]
    texts = {
        line["memory"].get("text") or line["messages"][0]["content"]: (
            line["session_role"],
            line["period"],
        )
        for line in exported
    }
    assert texts == {
        "We leave at nine": ("log", None),
        "Another session": ("log", None),
        "Leaving at nine": ("summary", None),
        "January: trips": (None, "2024-01"),
        "February: trips": (None, "2024-02"),
    }
    # Importing the file again changes nothing, and refuses the same lines.
    again = await engine.import_memories(user, [file])
    assert again.unchanged == 5 and [e.line for e in again.errors] == [3, 5, 7]
    assert (await export_lines(engine, user))[1:] == exported
    # A turn of the session goes on in the one log that was imported.
    await engine.record_turn(user, "s-1", "At nine then", "Yes")
    log = next(
        line
        for line in exported
        if line["memory"].get("session_id") == "s-1" and line["session_role"] == "log"
    )
    stored = await engine.get_memory(user, log["id"])
    assert [m.content for m in stored.messages] == ["We leave at nine", "At nine then", "Yes"]


async def test_a_log_or_summary_a_session_or_month_already_has_is_refused_and_kept(
    engine: MemoryEngine,
) -> None:
    """A file's log of a session the user already records (record_turn), or summary of a
    month the user's scope has already, is refused; what is stored does not change."""
    user = await _user(engine, "held")
    await engine.record_turn(user, "s-9", "I live in Porto", "Noted")
    period = {"type": "summary", "text": "March: Porto"}
    await engine.import_memories(user, [ndjson([export_header(), _line(period, period="2024-03")])])
    before = await export_lines(engine, user)
    file = ndjson(
        [
            export_header(),
            _log("s-9", "I live in Braga"),
            _line({"type": "summary", "text": "March: Braga"}, period="2024-03"),
        ]
    )
    report = await engine.import_memories(user, [file])
    assert [(e.line, e.field) for e in report.errors] == [(2, "session_role"), (3, "period")]
    assert report.created == {}
    assert (await export_lines(engine, user))[1:] == before[1:]


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (b"[1, 2]", "line"),
        (b'"a memory"', "line"),
        (b"42", "line"),
        (b"null", "line"),
        (b"true", "line"),
    ],
)
async def test_a_line_that_is_not_a_json_object_is_reported_on_the_line(
    engine: MemoryEngine, line: bytes, field: str
) -> None:
    """A memory line that is JSON but not an object was reported on ``memory (line 2)``,
    which is no field of the line: it is the line's fault, as a line that is not JSON is."""
    user = await _user(engine, "notobj")
    file = ndjson([export_header()]) + line + b"\n" + ndjson([fact_line("Gus sails")])
    report = await engine.import_memories(user, [file])
    assert [(e.line, e.field) for e in report.errors] == [(2, field)]
    assert "not a JSON object" in report.errors[0].message
    assert report.created == {"fact": 1}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"sources": ["chat 1"]}, "sources"),
        ({"valid_from": "2024-01-01T00:00:00Z"}, "valid_from"),
        ({"period": "2024-01"}, "period"),
        ({"span_end": "2024-01-01T00:00:00Z"}, "span_end"),
        ({"session_role": "log"}, "session_role"),
        ({"updated_at": "2023-01-01T00:00:00Z"}, "updated_at"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ],
)
async def test_a_check_across_a_lines_fields_names_the_field_at_fault(
    engine: MemoryEngine, extra: dict[str, Any], field: str
) -> None:
    """The checks that read more than one field of a line (what its type has, times in
    order) named the whole line, ``memory (line 2)``; each names the field at fault."""
    user = await _user(engine, "across")
    image = _line({"type": "image", "prompt": "a red boat"}, **extra)
    report = await engine.import_memories(user, [ndjson([export_header(), image])])
    assert [(e.line, e.field) for e in report.errors] == [(2, field)]
