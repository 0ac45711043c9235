"""Every memory type round-trips through PostgreSQL; get, list, update, delete, append."""

from __future__ import annotations

import base64
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from support import make_settings

from halldyll_ray import (
    Conversation,
    Fact,
    Image,
    InvalidInput,
    MemoryEngine,
    MemoryType,
    Message,
    NotFound,
    Segment,
    Summary,
    Transcription,
)
from halldyll_ray.models import ImageSize
from halldyll_ray.storage.sql import bind


@pytest.fixture
async def user(engine: MemoryEngine):
    return await engine.create_user("ada", "ada@example.com", "user")


async def test_conversation_round_trip(engine: MemoryEngine, user) -> None:
    stored = await engine.store_memory(
        user.id,
        Conversation(
            title="Kyoto trip",
            session_id="s-1",
            tags=["travel", "japan"],
            metadata={"channel": "web"},
            messages=[
                Message(role="user", content="I want to visit Kyoto in April."),
                Message(role="assistant", content="Cherry blossoms peak in early April."),
                Message(role="tool", name="weather", content="Kyoto, April: 15°C, dry."),
            ],
        ),
    )
    assert stored.type is MemoryType.CONVERSATION
    assert stored.message_count == 3
    got = await engine.get_memory(user.id, stored.id)
    assert got.memory.title == "Kyoto trip"
    assert [m.seq for m in got.messages] == [0, 1, 2]
    assert [m.role.value for m in got.messages] == ["user", "assistant", "tool"]
    assert got.messages[2].name == "weather"
    assert got.tags == ["travel", "japan"]
    assert got.metadata == {"channel": "web"}
    assert got.session_id == "s-1"

    appended = await engine.append_messages(
        user.id, stored.id, [Message(role="user", content="Book a ryokan near Gion, please.")]
    )
    assert [m.seq for m in appended] == [3]
    got = await engine.get_memory(user.id, stored.id)
    assert got.message_count == 4
    assert got.messages[-1].content == "Book a ryokan near Gion, please."
    # The appended message is searchable and the hit names it.
    hits = await engine.search(user.id, "traditional inn reservation in Gion", limit=3)
    assert hits and hits[0].memory.id == stored.id
    assert hits[0].matched.part == "message" and hits[0].matched.index == 3


async def test_fact_round_trip(engine: MemoryEngine, user) -> None:
    stored = await engine.store_memory(
        user.id,
        Fact(statement="Ada is allergic to peanuts", confidence=0.95, source="doctor visit"),
    )
    got = await engine.get_memory(user.id, stored.id)
    assert got.memory.statement == "Ada is allergic to peanuts"
    assert got.memory.confidence == pytest.approx(0.95)
    assert got.memory.kind.value == "permanent"
    assert got.memory.source == "doctor visit"
    assert got.expires_at is None


async def test_image_round_trip(engine: MemoryEngine, user) -> None:
    image = Image(
        prompt="portrait of an astronaut in a sunflower field, golden hour",
        negative_prompt="blurry, lowres",
        generator="RealVisXL_V5.0",
        seed=987654321,
        steps=35,
        guidance_scale=5.5,
        size=ImageSize(width=832, height=1216),
        scheduler="DPM++ 2M Karras",
        controlnet={"type": "openpose", "strength": 0.8},
        instantid={"face_image": "s3://faces/ada.png", "ip_adapter_scale": 0.6},
        uri="s3://images/astronaut.png",
        sha256="a" * 64,
    )
    stored = await engine.store_memory(user.id, image)
    got = await engine.get_memory(user.id, stored.id)
    assert got.memory == image.model_copy(update={"model": None})
    hits = await engine.search(user.id, "the astronaut picture among flowers")
    assert hits[0].memory.id == stored.id and hits[0].matched.part == "prompt"


async def test_transcription_detects_language(engine: MemoryEngine, user) -> None:
    stored = await engine.store_memory(
        user.id,
        Transcription(
            segments=[
                Segment(start=0.0, end=2.5, text="Guten Morgen, hier spricht Ada."),
                Segment(
                    start=2.5, end=6.0, text="Ich möchte meinen Termin am Freitag verschieben."
                ),
            ],
            duration_seconds=6.0,
            audio_uri="s3://audio/call.wav",
        ),
    )
    assert stored.memory.language == "de"
    got = await engine.get_memory(user.id, stored.id)
    assert got.memory.text.startswith("Guten Morgen")
    assert [s.end for s in got.memory.segments] == [2.5, 6.0]
    given = await engine.store_memory(
        user.id, Transcription(text="Hello there, this is a test call.", language="EN-gb")
    )
    assert given.memory.language == "en-GB"
    # all-MiniLM-L6-v2 is an English model: German text is found by its own words.
    hits = await engine.search(user.id, "Termin Freitag", limit=1, mode="hybrid")
    assert hits[0].memory.id == stored.id
    assert hits[0].matched.part == "segment" and hits[0].matched.index == 1


@pytest.mark.parametrize("given_text", [None, "A short call about a delivery."])
async def test_segments_are_held_to_the_text_limit(engine: MemoryEngine, user, given_text) -> None:
    """Segments joined into a transcription's text were not held to MAX_TEXT_CHARS: ten
    segments of 30,000 characters were stored, and every read of the memory then failed on
    that limit. Segments together are the text, so they are held to it with or without one."""
    from halldyll_ray.models import MAX_MESSAGE_CHARS, MAX_TEXT_CHARS

    per = MAX_MESSAGE_CHARS - 2_000
    count = MAX_TEXT_CHARS // per + 1
    over = [{"start": float(i), "end": i + 1.0, "text": "w" * per} for i in range(count)]
    body = {"type": "transcription", "segments": over}
    if given_text is not None:
        body["text"] = given_text
    with pytest.raises(InvalidInput) as err:
        await engine.store_memory(user.id, body)
    assert "at most 200000" in err.value.message
    assert (await engine.list_memories(user.id)).items == []
    # Exactly at the limit is a transcription (validated only: embedding it is slow).
    last = MAX_TEXT_CHARS - (count - 1) * (per + 1)  # count - 1 spaces join count segments
    at = [*over[:-1], {"start": float(count), "end": count + 1.0, "text": "w" * last}]
    model = Transcription.model_validate({"segments": at})
    assert len(model.text) == MAX_TEXT_CHARS


async def test_summary_covers_only_own_memories(engine: MemoryEngine, user) -> None:
    fact = await engine.store_memory(user.id, Fact(statement="Ada plays the cello"))
    summary = await engine.store_memory(
        user.id, Summary(text="Ada is a musician who plays cello.", covers=[fact.id])
    )
    got = await engine.get_memory(user.id, summary.id)
    assert got.memory.covers == [fact.id]
    other = await engine.create_user("bob", None, "user")
    bobs = await engine.store_memory(other.id, Fact(statement="Bob plays drums"))
    with pytest.raises(InvalidInput) as err:
        await engine.store_memory(user.id, Summary(text="sneaky", covers=[bobs.id]))
    assert err.value.field == "covers"
    # A deleted memory leaves every summary's covers, the others keep their order.
    first = await engine.store_memory(user.id, Fact(statement="Ada tunes pianos"))
    last = await engine.store_memory(user.id, Fact(statement="Ada sings alto"))
    wide = await engine.store_memory(
        user.id, Summary(text="Ada and music.", covers=[first.id, fact.id, last.id])
    )
    await engine.delete_memory(user.id, fact.id)
    assert (await engine.get_memory(user.id, summary.id)).memory.covers == []
    assert (await engine.get_memory(user.id, wide.id)).memory.covers == [first.id, last.id]
    assert (await engine.get_memory(other.id, bobs.id)).memory.statement == "Bob plays drums"


async def test_long_text_is_chunked(engine: MemoryEngine, user) -> None:
    filler = " ".join(f"word{i}" for i in range(400))
    text = f"{filler} The secret launch code phrase is violet harbor lighthouse. {filler}"
    stored = await engine.store_memory(user.id, Summary(text=text))
    chunks = await engine.db.fetchval(
        "SELECT count(*) FROM memory_chunks WHERE memory_id = $1", stored.id, admin=True
    )
    assert chunks >= 5
    hits = await engine.search(user.id, "violet harbor lighthouse", mode="fulltext")
    assert hits[0].memory.id == stored.id
    assert "violet harbor lighthouse" in hits[0].matched.text


async def test_list_filters_and_pagination(engine: MemoryEngine, user) -> None:
    model = await engine.register_model("Qwen2.5-14B-Instruct", "llm")
    ids = []
    for i in range(7):
        memory = await engine.store_memory(
            user.id,
            Fact(
                statement=f"Numbered fact {i} about topic {i}",
                tags=["even"] if i % 2 == 0 else ["odd"],
                model=model.name if i < 2 else None,
                session_id="s-a" if i < 3 else None,
            ),
        )
        ids.append(memory.id)
    await engine.store_memory(user.id, Image(prompt="a lighthouse at night"))

    seen = []
    cursor = None
    while True:
        page = await engine.list_memories(user.id, types=["fact"], limit=3, cursor=cursor)
        seen.extend(m.id for m in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen)) == 7
    assert seen == list(reversed(ids))  # newest first

    even = await engine.list_memories(user.id, tags=["even"])
    assert {m.id for m in even.items} == {ids[0], ids[2], ids[4], ids[6]}
    session = await engine.list_memories(user.id, session_id="s-a")
    assert {m.id for m in session.items} == set(ids[:3])
    only_model = await engine.list_memories(user.id, model=model.name, include_shared=False)
    assert {m.id for m in only_model.items} == set(ids[:2])
    with_shared = await engine.list_memories(user.id, model=model.id, types=["fact"])
    assert {m.id for m in with_shared.items} == set(ids)
    images = await engine.list_memories(user.id, types=["image"])
    assert [m.type for m in images.items] == [MemoryType.IMAGE]
    future = await engine.list_memories(user.id, since=datetime.now(UTC) + timedelta(hours=1))
    assert future.items == []
    with pytest.raises(InvalidInput):
        await engine.list_memories(user.id, cursor="not-a-cursor")


async def test_update_and_delete(engine: MemoryEngine, user) -> None:
    fact = await engine.store_memory(user.id, Fact(statement="Ada lives in Paris"))
    updated = await engine.update_memory(
        user.id,
        fact.id,
        {"statement": "Ada lives in Lyon", "tags": ["home"], "confidence": 0.9},
    )
    assert updated.memory.statement == "Ada lives in Lyon"
    assert updated.tags == ["home"]
    hits = await engine.search(user.id, "which city is Ada's home?", tags=["home"])
    assert hits and hits[0].memory.id == fact.id
    assert hits[0].matched.text == "Ada lives in Lyon"
    with pytest.raises(InvalidInput) as err:
        await engine.update_memory(user.id, fact.id, {"title": "nope"})
    assert err.value.field == "title"
    # An update that names nothing to change changes nothing, updated_at included.
    audited = len(await engine.list_audit(operation="memory.update"))
    assert audited >= 1  # the update above
    unchanged = await engine.update_memory(user.id, fact.id, {})
    assert unchanged.updated_at == updated.updated_at and unchanged.tags == ["home"]
    assert len(await engine.list_audit(operation="memory.update")) == audited

    await engine.delete_memory(user.id, fact.id)
    with pytest.raises(NotFound):
        await engine.get_memory(user.id, fact.id)
    with pytest.raises(NotFound):
        await engine.delete_memory(user.id, fact.id)
    assert (
        await engine.db.fetchval(
            "SELECT count(*) FROM memory_chunks WHERE memory_id = $1", fact.id, admin=True
        )
        == 0
    )


async def test_model_registry(engine: MemoryEngine) -> None:
    from halldyll_ray import Conflict

    for name, kind in [
        ("Qwen2.5-14B-Instruct", "llm"),
        ("Qwen2.5-VL-7B-Instruct", "vision-language"),
        ("RealVisXL_V5.0", "image-generation"),
        ("InstantID", "control"),
        ("InsightFace", "face-recognition"),
    ]:
        await engine.register_model(name, kind, version="1")
    names = [m.name for m in await engine.list_models()]
    assert names == sorted(names, key=str.casefold) and len(names) == 5
    assert [m.name for m in await engine.list_models(kind="control")] == ["InstantID"]
    with pytest.raises(Conflict):
        await engine.register_model("qwen2.5-14b-instruct", "llm")
    with pytest.raises(InvalidInput) as err:
        await engine.register_model("X", "toaster")
    assert err.value.field == "kind"
    # A name that reads as an id (another model's, or any) could never be reached by name.
    qwen = (await engine.list_models(kind="llm"))[0]
    for name in (str(qwen.id), f" {uuid.uuid4()} "):
        with pytest.raises(InvalidInput, match="UUID") as err:
            await engine.register_model(name, "llm")
        assert err.value.field == "name"
    assert len(await engine.list_models()) == 5
    # One name in any Unicode form: "Café" with a combining accent is "Café".
    cafe = await engine.register_model("Cafe\u0301-LLM", "llm")
    assert cafe.name == "Caf\u00e9-LLM"
    with pytest.raises(Conflict):
        await engine.register_model("CAF\u00c9-llm", "llm")
    assert (await engine.get_model("cafe\u0301-llm")).id == cafe.id
    await engine.delete_model(cafe.id)
    # Compatibility forms too: full-width letters and a ligature read as the same name; they
    # used to register a second model, a scope of its own under a name one cannot tell apart.
    for name in ("ＱＷＥＮ２.５-14B-Instruct", "ＲｅａｌＶｉｓＸＬ_V5.0"):
        with pytest.raises(Conflict):
            await engine.register_model(name, "llm")
    assert (await engine.get_model("ｑｗｅｎ2.5-14b-instruct")).name == "Qwen2.5-14B-Instruct"
    fish = await engine.register_model("\ufb01sh-LLM", "llm")  # "ﬁ", one character
    with pytest.raises(Conflict):
        await engine.register_model("FISH-llm", "llm")
    assert (await engine.get_model("fish-llm")).id == fish.id
    await engine.delete_model(fish.id)
    for name in ("..", " . "):  # unreachable by URL: normalisation removes the segment
        with pytest.raises(InvalidInput) as err:
            await engine.register_model(name, "llm")
        assert err.value.field == "name"
    for name in ("gpt\u200b-4o", "line\nbreak", "\u202eo4-tpg", "tab\there"):
        with pytest.raises(InvalidInput) as err:
            await engine.register_model(name, "llm")
        assert err.value.field == "name"
        with pytest.raises(InvalidInput) as err:
            await engine.register_model("gpt-4o", "llm", version=name)
        assert err.value.field == "version"
    assert len(await engine.list_models()) == 5
    user = await engine.create_user("carol", None, "user")
    await engine.store_memory(user.id, Fact(statement="uses face id", model="InsightFace"))
    with pytest.raises(Conflict):
        await engine.delete_model("InsightFace")
    await engine.delete_model("InstantID")
    with pytest.raises(NotFound):
        await engine.get_model("InstantID")
    with pytest.raises(NotFound):
        await engine.store_memory(user.id, Fact(statement="x", model="NoSuchModel"))
    # A model reference with what no text column holds is the caller's error, named as such
    # (it reached SQL and came back as a field-less "not valid text").
    for ref in ("\x00", "Insight\x00Face", "\ud800"):
        for call in (engine.get_model, engine.delete_model):
            with pytest.raises(InvalidInput) as err:
                await call(ref)
            assert err.value.field == "model"
        with pytest.raises(InvalidInput) as err:
            await engine.search(user.id, "face id", model=ref)
        assert err.value.field == "model"
    assert len(await engine.list_models()) == 4


async def test_two_forms_of_one_model_name_registered_at_once_are_one_model(
    engine: MemoryEngine,
) -> None:
    """Registering "Qwen" and "ＱＷＥＮ" (full-width) at the same instant: each looked for the
    other before either had inserted, and the unique index (lower(name)) could not tell them
    apart, so both were registered: two scopes under one name. One wins, the other is a
    Conflict, every time."""
    import asyncio
    import unicodedata

    for i in range(8):
        plain = f"Qwen-race-{i}"
        wide = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in plain)
        results = await asyncio.gather(
            engine.register_model(plain, "llm"),
            engine.register_model(wide, "llm"),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["AIModel", "Conflict"], results
    names = [unicodedata.normalize("NFKC", m.name) for m in await engine.list_models()]
    races = [n for n in names if n.startswith("Qwen-race-")]
    assert len(races) == 8


async def test_an_edited_cursor_without_a_zone_is_refused_not_read_in_the_servers_zone(
    engine: MemoryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cursor is (created_at, id) of its list; one whose time has no zone (edited by hand)
    was read in the server's own zone (asyncpg's naive datetime), so in New York it skipped
    five hours of memories. A cursor is taken only as the API wrote it: refused."""
    user = await engine.create_user("ada", None, "user")
    await engine.store_memories(user.id, [Fact(statement=f"fact {i}") for i in range(4)])
    first = await engine.list_memories(user.id, limit=2)
    last = first.items[-1]
    stamp = last.created_at.astimezone(UTC).replace(tzinfo=None).isoformat()
    raw = f"memories/{user.id}|{stamp}|{last.id}"
    naive = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        ours = await engine.list_memories(user.id, limit=2, cursor=first.next_cursor)
        with pytest.raises(InvalidInput) as edited:
            await engine.list_memories(user.id, limit=2, cursor=naive)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert len(ours.items) == 2
    assert edited.value.field == "cursor"


async def test_a_cursor_pages_only_the_list_that_returned_it(engine: MemoryEngine) -> None:
    """Another user's cursor, the users list's or the jobs list's was read as a position in
    this list (paged from wherever its time fell); a cursor with a character added was
    taken too (base64 dropped it). Each is InvalidInput on ``cursor`` on every list."""
    ada = await engine.create_user("ada", None, "user")
    bob = await engine.create_user("bob", None, "user")
    await engine.create_user("cy", None, "user")
    for user in (ada, bob):
        await engine.store_memories(user.id, [Fact(statement=f"fact {i}") for i in range(3)])
    ada_page = await engine.list_memories(ada.id, limit=1)
    bob_page = await engine.list_memories(bob.id, limit=1)
    users_page = await engine.list_users(limit=1)
    assert ada_page.next_cursor and bob_page.next_cursor and users_page.next_cursor
    for cursor in (bob_page.next_cursor, users_page.next_cursor, ada_page.next_cursor + "!"):
        with pytest.raises(InvalidInput) as caught:
            await engine.list_memories(ada.id, limit=1, cursor=cursor)
        assert caught.value.field == "cursor"
    for call in (
        lambda: engine.list_users(limit=1, cursor=ada_page.next_cursor),
        lambda: engine.list_jobs(ada.id, limit=1, cursor=ada_page.next_cursor),
    ):
        with pytest.raises(InvalidInput) as caught:
            await call()
        assert caught.value.field == "cursor"
    # Its own list's cursor still pages on, as the API promised.
    rest = await engine.list_memories(ada.id, limit=5, cursor=ada_page.next_cursor)
    assert len(rest.items) == 2 and rest.next_cursor is None


async def test_a_cursor_whose_memory_was_deleted_pages_on_without_gap_or_repeat(
    engine: MemoryEngine,
) -> None:
    """Keyset pages: the cursor names a position, not a row, so the memory it was taken
    from may go (or others arrive) between pages; the pages still hold each memory that
    stayed exactly once."""
    user = await engine.create_user("ada", None, "user")
    for i in range(6):
        await engine.store_memory(user.id, Fact(statement=f"fact number {i} about tea"))
    first = await engine.list_memories(user.id, limit=3)
    await engine.delete_memory(user.id, first.items[-1].id)
    await engine.store_memory(user.id, Fact(statement="a fact stored between pages"))
    rest = await engine.list_memories(user.id, limit=10, cursor=first.next_cursor)
    seen = [m.id for m in first.items] + [m.id for m in rest.items]
    assert len(seen) == len(set(seen)) == 6
    kept = (await engine.list_memories(user.id, limit=10)).items
    assert {m.id for m in kept} - set(seen) == {kept[0].id}  # only the newer one


async def test_a_page_of_memories_ends_past_page_max_bytes_and_reads_on(
    database_url: str, redis_url: str, encoder
) -> None:
    """A page held ``limit`` memories whatever their size (500 transcriptions of 200,000
    characters made one answer of hundreds of megabytes): it ends once its memories pass
    PAGE_MAX_BYTES, with a cursor that reads on, and holds one memory however big."""
    settings = make_settings(database_url, redis_url, page_max_bytes=64 * 1024)
    async with MemoryEngine(settings, encoder=encoder) as engine:
        user = await engine.create_user(f"pages{uuid.uuid4().hex[:6]}", None, "user")
        big = [
            await engine.store_memory(
                user.id, {"type": "transcription", "text": f"recording {i}. " + "words " * 5_000}
            )
            for i in range(3)
        ]
        huge = await engine.store_memory(
            user.id, {"type": "transcription", "text": "long recording. " + "talk " * 20_000}
        )
        small = [
            await engine.store_memory(user.id, {"type": "fact", "statement": f"fact number {i}"})
            for i in range(5)
        ]
        pages, cursor = [], None
        while True:
            page = await engine.list_memories(user.id, limit=50, cursor=cursor)
            pages.append([m.id for m in page.items])
            cursor = page.next_cursor
            if cursor is None:
                break
        # Newest first: the 5 facts, then the 100 KB recording passes 64 KiB and ends the
        # page; the three 30 KB recordings pass it at the third, the last memory.
        assert pages == [
            [m.id for m in reversed(small)] + [huge.id],
            [big[2].id, big[1].id, big[0].id],
        ]
        # The rows read after the cut (to know there are more) come without their text.
        rows = await engine.db.fetch(
            *bind(
                "list_memories",
                user_id=user.id,
                types=None,
                model_id=None,
                include_shared=True,
                session_id=None,
                tags=None,
                since=None,
                until=None,
                after_at=None,
                after_id=None,
                limit=51,
                max_bytes=64 * 1024,
            ),
            user_id=user.id,
        )
        assert [r["content"] is None for r in rows] == [False] * 6 + [True] * 3
        assert [r["payload"] is None for r in rows] == [False] * 6 + [True] * 3
        # Under the budget, the limit is what ends a page, as before.
        page = await engine.list_memories(user.id, limit=3)
        assert len(page.items) == 3 and page.next_cursor is not None
