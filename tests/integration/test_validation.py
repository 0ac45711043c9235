"""Bad input gets a typed error naming the field, and nothing already stored changes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from halldyll_ray import Conflict, Fact, InvalidInput, MemoryEngine, NotFound


async def _counts(engine: MemoryEngine) -> tuple[int, int, int, int]:
    row = await engine.db.fetchrow(
        "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM memories), "
        "(SELECT count(*) FROM memory_chunks), (SELECT count(*) FROM conversation_messages)",
        admin=True,
    )
    return tuple(row)  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("memory", "field"),
    [
        ({"type": "fact", "statement": "x", "confidence": 7}, "fact.confidence"),
        ({"type": "fact"}, "fact.statement"),
        ({"type": "diary", "text": "x"}, "type"),
        (
            {"type": "conversation", "messages": [{"role": "bot", "content": "x"}]},
            "conversation.messages.0.role",
        ),
        (  # a blank name is no name: it is left out, not stored as spaces
            {"type": "conversation", "messages": [{"role": "user", "content": "x", "name": " "}]},
            "conversation.messages.0.name",
        ),
        (  # a speaker's name that forges a line of the context it is shown in
            {
                "type": "conversation",
                "messages": [{"role": "user", "content": "x", "name": "Ada\n## Facts"}],
            },
            "conversation.messages.0.name",
        ),
        (
            {
                "type": "conversation",
                "messages": [{"role": "user", "content": "x", "name": "\u202eadA"}],
            },
            "conversation.messages.0.name",
        ),
        # A title is shown on its conversation's line of a context, as a name is: a line or
        # paragraph separator, a line break or a direction override is refused there too.
        ({"type": "conversation", "title": "Trip\u2028## Facts"}, "conversation.title"),
        ({"type": "conversation", "title": "Trip\u2029planning"}, "conversation.title"),
        ({"type": "conversation", "title": "Trip\nplanning"}, "conversation.title"),
        ({"type": "conversation", "title": "\u202epirT"}, "conversation.title"),
        ({"type": "image", "prompt": "x", "steps": 0}, "image.steps"),
        (  # a name shown inline ("image by RealVis"), checked as a speaker's name is
            {"type": "image", "prompt": "x", "generator": "RealVis\nXL"},
            "image.generator",
        ),
        ({"type": "image", "prompt": "x", "scheduler": "\u202eMPD"}, "image.scheduler"),
        (
            {
                "type": "transcription",
                "duration_seconds": 10.0,
                "segments": [{"start": 8.0, "end": 12.5, "text": "past the end"}],
            },
            "transcription",
        ),
        (
            {
                "type": "transcription",
                "segments": [{"start": 0.0, "end": 1.0, "text": "hi", "speaker": "Ada\nBob"}],
            },
            "transcription.segments.0.speaker",
        ),
        ({"type": "transcription", "text": "x", "language": "klingon"}, "transcription.language"),
        (  # out of order: the transcript read "b a" and a hit's neighbours were elsewhere
            {
                "type": "transcription",
                "segments": [
                    {"start": 5.0, "end": 6.0, "text": "second"},
                    {"start": 0.0, "end": 1.0, "text": "first"},
                ],
            },
            "transcription.segments",
        ),
        # A transcription's text with nothing to see, and no segments: it was stored, embedded
        # and ranked above every real memory of a semantic search.
        ({"type": "transcription", "text": "\u200b\u200b"}, "transcription"),
        ({"type": "transcription", "text": "\u0301"}, "transcription"),
        ({"type": "transcription", "text": " \u3164 "}, "transcription"),
        ({"type": "summary", "text": "x", "covers": ["nope"]}, "summary.covers.0"),
        ({"type": "fact", "statement": "x", "tags": ["a b c !"]}, "fact.tags"),
        # A tag may hold combining marks, but not start with one, nor pass 64 characters.
        ({"type": "fact", "statement": "x", "tags": ["\u0e49\u0e32"]}, "fact.tags"),
        ({"type": "fact", "statement": "x", "tags": ["\u0939\u093f" * 33]}, "fact.tags"),
        # A joiner outside a word is no spelling: first, last, or beside a space.
        ({"type": "fact", "statement": "x", "tags": ["\u200cab"]}, "fact.tags"),
        ({"type": "fact", "statement": "x", "tags": ["ab\u200d"]}, "fact.tags"),
        ({"type": "fact", "statement": "x", "tags": ["a \u200cb"]}, "fact.tags"),
        ({"type": "fact", "statement": "x", "importance": -1}, "fact.importance"),
    ],
)
async def test_bad_memories(engine: MemoryEngine, memory: dict, field: str) -> None:
    user = await engine.create_user("ada", None, "user")
    await engine.store_memory(user.id, Fact(statement="something to keep"))
    before = await _counts(engine)
    with pytest.raises(InvalidInput) as err:
        await engine.store_memory(user.id, memory)
    assert err.value.field == field
    assert await _counts(engine) == before


@pytest.mark.parametrize(
    "tag",
    [
        "ข้าว",
        "हिंदी",
        "தமிழ்",
        "שָׁלוֹם",
        "مَدْرَسَة",
        "ភាសាខ្មែរ",
        "ကော်ဖီ",
        "می\u200cخواهم",  # Persian: a zero-width non-joiner inside the word
        "क्\u200dष",  # Devanagari: a zero-width joiner asks for the half form
    ],
)
async def test_tags_spelled_with_combining_marks_are_kept(engine: MemoryEngine, tag: str) -> None:
    """Thai, Devanagari, Tamil, Khmer and Burmese spell words with combining marks that no
    precomposed letter holds (and Hebrew and Arabic write vowel points with them): ``\\w``
    takes none, so a tag in Hindi or Thai was refused ("not allowed") while one in Chinese or
    French was kept. Inspired by PCRE2Project/pcre2#885 and mrabarnett/mrab-regex#451 (Unicode's
    ``\\w`` takes marks; Python's ``re`` does not). Kept as written, and found by the list
    and search filters."""
    user = await engine.create_user(f"tg{uuid.uuid4().hex[:8]}", None, "user")
    stored = await engine.store_memory(user.id, Fact(statement="Ada drinks espresso", tags=[tag]))
    assert stored.tags == [tag]
    await engine.store_memory(user.id, Fact(statement="Ada drinks tea", tags=["other"]))
    found = await engine.list_memories(user.id, tags=[tag])
    assert [m.id for m in found.items] == [stored.id]
    hits = await engine.search(user.id, "what does Ada drink", tags=[tag])
    assert [h.memory.id for h in hits] == [stored.id]


async def test_overlapping_segments_in_order_are_kept_as_given(engine: MemoryEngine) -> None:
    """Two speakers at once overlap; segments that start together keep their order."""
    user = await engine.create_user("ada", None, "user")
    segments = [
        {"start": 0.0, "end": 4.0, "text": "We ship on Monday.", "speaker": "Ada"},
        {"start": 1.0, "end": 2.0, "text": "Agreed.", "speaker": "Bob"},
        {"start": 1.0, "end": 1.5, "text": "Yes.", "speaker": "Eve"},
    ]
    stored = await engine.store_memory(user.id, {"type": "transcription", "segments": segments})
    read = await engine.get_memory(user.id, stored.id)
    assert [s.text for s in read.memory.segments] == ["We ship on Monday.", "Agreed.", "Yes."]  # type: ignore[union-attr]
    assert read.memory.text == "We ship on Monday. Agreed. Yes."  # type: ignore[union-attr]


async def test_tags_that_differ_only_in_unicode_form_are_one_tag(engine: MemoryEngine) -> None:
    """A tag typed decomposed ("e" + U+0301, as macOS and some keyboards give it) was refused
    while its precomposed twin was taken; a fullwidth tag was kept beside its ASCII twin and
    filtered apart from it. Tags are NFKC-normalised, as search text and fact keys are, on
    every path: a store, a bulk store, an update, a filter."""
    user = await engine.create_user("ada", None, "user")
    nfc, nfd = "café", "cafe\u0301"
    stored = await engine.store_memory(
        user.id, Fact(statement="Ada drinks espresso", tags=[nfd, nfc, "ＶＩＰ", "VIP"])
    )
    assert stored.tags == [nfc, "VIP"]
    assert (await engine.get_memory(user.id, stored.id)).tags == [nfc, "VIP"]
    (bulk,) = await engine.store_memories(
        user.id, [{"type": "fact", "statement": "Ada walks to work", "tags": [nfd]}]
    )
    assert bulk.tags == [nfc]
    for tag in (nfc, nfd):
        found = await engine.list_memories(user.id, tags=[tag])
        assert {m.id for m in found.items} == {stored.id, bulk.id}
    updated = await engine.update_memory(user.id, bulk.id, {"tags": ["ＶＩＰ", nfd]})
    assert updated.tags == ["VIP", nfc]
    found = await engine.list_memories(user.id, tags=["ＶＩＰ"])
    assert {m.id for m in found.items} == {stored.id, bulk.id}
    # A row stored before the rule is read as it was written, even where NFKC would refuse it.
    async with engine.db.scoped(admin=True) as conn:
        await conn.execute("UPDATE memories SET tags = $1 WHERE id = $2", ["a½"], stored.id)
    assert (await engine.get_memory(user.id, stored.id)).tags == ["a½"]


async def test_invisible_transcription_text_gives_way_to_segments(engine: MemoryEngine) -> None:
    user = await engine.create_user("ada", None, "user")
    stored = await engine.store_memory(
        user.id,
        {
            "type": "transcription",
            "text": "\u200b",
            "segments": [{"start": 0.0, "end": 1.0, "text": "Budget review on Monday."}],
        },
    )
    assert stored.memory.text == "Budget review on Monday."  # type: ignore[union-attr]
    read = await engine.get_memory(user.id, stored.id)
    assert read.memory.text == "Budget review on Monday."  # type: ignore[union-attr]
    # A row stored before the check (blank text, no segments) is still read as it is.
    old = await engine.store_memory(user.id, {"type": "transcription", "text": "kept"})
    async with engine.db.scoped(admin=True) as conn:
        await conn.execute(
            "UPDATE memories SET content = $1, payload = payload - 'segments' WHERE id = $2",
            "\u200b",
            old.id,
        )
    assert (await engine.get_memory(user.id, old.id)).memory.text == "\u200b"  # type: ignore[union-attr]
    assert [m.id for m in (await engine.list_memories(user.id)).items] == [old.id, stored.id]


async def test_rows_stored_before_a_text_rule_are_read_and_found_as_written(
    engine: MemoryEngine,
) -> None:
    """A segment's text or speaker, an image's generator and metadata read back from storage
    are not checked again (they were when written, or were written before a rule): a read of
    a row the rules now refuse must not fail, in a get, a list or a search."""
    user = await engine.create_user("ada", None, "user")
    talk = await engine.store_memory(
        user.id,
        {
            "type": "transcription",
            "text": "Budget review on Monday.",
            "segments": [
                {"start": 0.0, "end": 1.0, "text": "Budget review on Monday.", "speaker": "Ana"}
            ],
            "metadata": {"room": "B2"},
        },
    )
    picture = await engine.store_memory(
        user.id, {"type": "image", "prompt": "a red kite over the budget", "generator": "sd"}
    )
    async with engine.db.scoped(admin=True) as conn:
        await conn.execute(
            "UPDATE memories SET payload = jsonb_set(jsonb_set(payload, '{segments,0,speaker}',"
            " to_jsonb($1::text)), '{segments,0,text}', to_jsonb($2::text)) WHERE id = $3",
            "Ana\u2028Bo",  # a line separator: refused in a name since
            "\u200b",  # nothing visible: refused in a segment since
            talk.id,
        )
        await conn.execute(
            "UPDATE memories SET payload = jsonb_set(payload, '{generator}', to_jsonb($1::text))"
            " WHERE id = $2",
            "sd\u202e",  # a right-to-left override
            picture.id,
        )
    read = await engine.get_memory(user.id, talk.id)
    segment = read.memory.segments[0]  # type: ignore[union-attr]
    assert (segment.speaker, segment.text) == ("Ana\u2028Bo", "\u200b")
    assert (await engine.get_memory(user.id, picture.id)).memory.generator == "sd\u202e"  # type: ignore[union-attr]
    found = await engine.search(user.id, "budget review", mode="fulltext", limit=10)
    assert {r.memory.id for r in found} == {talk.id, picture.id}
    assert {m.id for m in (await engine.list_memories(user.id)).items} == {talk.id, picture.id}


async def test_a_title_with_nothing_visible_is_no_title(engine: MemoryEngine) -> None:
    """A conversation titled with zero-width spaces (or a Hangul filler, or blanks) had that
    title indexed as a part of its own that says nothing; stored, or set by an update."""
    user = await engine.create_user("ada", None, "user")
    message = {"role": "user", "content": "The ferry leaves at nine"}
    titled = []
    for title in ("\u200b\u200b", "\u3164", "   ", "\u2028"):
        stored = await engine.store_memory(
            user.id, {"type": "conversation", "title": title, "messages": [message]}
        )
        assert stored.memory.title is None  # type: ignore[union-attr]
        titled.append(stored.id)
    kept = await engine.store_memory(
        user.id, {"type": "conversation", "title": "Ferry times", "messages": [message]}
    )
    updated = await engine.update_memory(user.id, kept.id, {"title": "\u200b"})
    assert not updated.memory.title  # type: ignore[union-attr]
    async with engine.db.scoped(user.id, readonly=True) as conn:
        parts = await conn.fetch(
            "SELECT DISTINCT part FROM memory_chunks WHERE user_id = $1", user.id
        )
    assert {r["part"] for r in parts} == {"message"}


async def test_an_update_refuses_a_title_that_breaks_its_line(engine: MemoryEngine) -> None:
    """An update's title is checked as a store's is (the one Title type): a line separator
    (U+2028) or a right-to-left override is InvalidInput on ``title``; the title stays."""
    user = await engine.create_user("ada", None, "user")
    kept = await engine.store_memory(
        user.id,
        {
            "type": "conversation",
            "title": "Ferry times",
            "messages": [{"role": "user", "content": "x"}],
        },
    )
    before = await _counts(engine)
    for title in ("Ferry\u2028times", "\u202eFerry", "Ferry\u2029times"):
        with pytest.raises(InvalidInput) as err:
            await engine.update_memory(user.id, kept.id, {"title": title})
        assert err.value.field == "title"
    assert await _counts(engine) == before
    stored = await engine.get_memory(user.id, kept.id)
    assert stored.memory.title == "Ferry times"  # type: ignore[union-attr]


async def test_a_time_with_an_offset_is_answered_as_every_read_shows_it(
    engine: MemoryEngine,
) -> None:
    user = await engine.create_user("ada", None, "user")
    stored = await engine.store_memory(
        user.id,
        {
            "type": "conversation",
            "messages": [
                {"role": "user", "content": "east", "created_at": "2024-01-01T00:00:00+14:00"},
                {"role": "user", "content": "west", "created_at": "2024-01-01T00:00:00-12:00"},
            ],
        },
    )
    read = await engine.get_memory(user.id, stored.id)
    assert [m.created_at for m in stored.messages] == [m.created_at for m in read.messages]
    assert (
        [m.created_at.isoformat() for m in stored.messages]
        == [m.created_at.isoformat() for m in read.messages]
        == ["2023-12-31T10:00:00+00:00", "2024-01-01T12:00:00+00:00"]
    )


async def test_bad_users_and_ids(engine: MemoryEngine) -> None:
    user = await engine.create_user("ada", "ada@example.com", "user")
    before = await _counts(engine)
    for kwargs, field in [
        ({"username": ""}, "username"),
        ({"username": "has space"}, "username"),
        ({"username": "x" * 65}, "username"),
        ({"username": "ok", "email": "not-an-email"}, "email"),
        # Addresses that read as another one: a right-to-left override, a zero-width space,
        # a soft hyphen, a control character.
        ({"username": "ok", "email": "ada@\u202emoc.elpmaxe"}, "email"),
        ({"username": "ok", "email": "ada\u200b@example.com"}, "email"),
        ({"username": "ok", "email": "ad\u00ada@example.com"}, "email"),
        ({"username": "ok", "email": "ada\x07@example.com"}, "email"),
        ({"username": "ok", "email": "ada@example..com"}, "email"),
        ({"username": "ok", "email": "ada..l@example.com"}, "email"),
        ({"username": "ok", "email": ".ada@example.com"}, "email"),
        ({"username": "ok", "email": "ada@-example.com"}, "email"),
        ({"username": "ok", "role": "superuser"}, "role"),
        ({"username": "ok", "metadata": {"x": "y" * 20_000}}, "metadata"),
    ]:
        with pytest.raises(InvalidInput) as err:
            await engine.create_user(**kwargs)
        assert err.value.field == field
    with pytest.raises(Conflict):
        await engine.create_user("ADA", None, "user")
    with pytest.raises(Conflict):
        await engine.create_user("other", "Ada@Example.com", "user")
    with pytest.raises(InvalidInput) as err:  # an update is checked as a creation is
        await engine.update_user(user.id, email="ada@\u202emoc.elpmaxe")
    assert err.value.field == "email"
    assert (await engine.get_user(user.id)).email == "ada@example.com"
    # Letters of any script are fine.
    intl = await engine.create_user("jose", "josé@exämple.com", "user")
    assert intl.email == "josé@exämple.com"
    await engine.delete_user(intl.id)
    with pytest.raises(InvalidInput) as err:
        await engine.get_memory(user.id, "12345")
    assert err.value.field == "memory_id"
    with pytest.raises(NotFound):
        await engine.store_memory(uuid.uuid4(), Fact(statement="orphan"))
    with pytest.raises(NotFound):
        await engine.append_messages(user.id, uuid.uuid4(), [{"role": "user", "content": "x"}])
    with pytest.raises(InvalidInput) as err:
        await engine.append_messages(user.id, uuid.uuid4(), [])
    assert err.value.field == "messages"
    with pytest.raises(InvalidInput):
        await engine.update_user(user.id, role="god")
    with pytest.raises(InvalidInput):
        await engine.build_context(user.id, "x", max_tokens=3)
    with pytest.raises(InvalidInput):
        await engine.list_memories(user.id, limit=0)
    assert await _counts(engine) == before


async def test_user_lifecycle(engine: MemoryEngine) -> None:
    user = await engine.create_user("ada", None, "viewer")
    assert (await engine.get_user_by_username("ADA")).id == user.id
    # A name no user can have is refused as such: with NUL it reached SQL as field-less
    # "not valid text", and a name over 64 characters was cut and found its first 64.
    longest = await engine.create_user("a" * 64, None, "user")
    assert (await engine.get_user_by_username("a" * 64)).id == longest.id
    for name in ("a" * 65, "ada\x00", "\ud800", "ada lovelace", ""):
        with pytest.raises(InvalidInput) as err:
            await engine.get_user_by_username(name)
        assert err.value.field == "username"
    await engine.delete_user(longest.id)
    updated = await engine.update_user(user.id, role="user", disabled=True, email="a@b.io")
    assert (updated.role.value, updated.disabled, updated.email) == ("user", True, "a@b.io")
    cleared = await engine.update_user(user.id, clear_email=True, disabled=False)
    assert cleared.email is None and cleared.disabled is False
    for i in range(4):
        await engine.create_user(f"user{i}", None, "user")
    page = await engine.list_users(limit=3)
    rest = await engine.list_users(limit=3, cursor=page.next_cursor)
    assert len(page.items) == 3 and len(rest.items) == 2 and rest.next_cursor is None
    assert {u.id for u in page.items}.isdisjoint({u.id for u in rest.items})
    await engine.delete_user(user.id)
    with pytest.raises(NotFound):
        await engine.get_user(user.id)
    audit = await engine.list_audit(user_id=user.id)
    assert [row["operation"] for row in audit] == [
        "user.delete",
        "user.update",
        "user.update",
        "user.create",
    ]


_DAY = datetime(2025, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        # the window's ends swapped: an empty answer said nothing was wrong
        ({"since": _DAY, "until": _DAY - timedelta(days=1)}, "until"),
        ({"since": _DAY, "until": (_DAY - timedelta(seconds=1)).replace(tzinfo=None)}, "until"),
        # a string is truthy: it reached SQL and came back with no field
        ({"include_shared": "no"}, "include_shared"),
        ({"include_shared": None}, "include_shared"),
        # a lone string was read as its characters ("p", "e", "t", "s"): nothing matched
        ({"tags": "pets"}, "tags"),
        ({"tags": 5}, "tags"),
        # a lone type was taken as a list of one, where the HTTP API refuses it; an int
        # was a TypeError
        ({"types": "fact"}, "types"),
        ({"types": 5}, "types"),
        # named as the HTTP API names it, not "0"
        ({"tags": ["pets", 1]}, "tags.1"),
        # what the HTTP API refuses with 422 was a NotFound (404) here
        ({"model": ""}, "model"),
        ({"model": "   "}, "model"),
        ({"model": "m" * 201}, "model"),
    ],
)
async def test_search_and_list_refuse_bad_filters_as_http_does(
    engine: MemoryEngine, filters: dict[str, Any], field: str
) -> None:
    """The filters search and list share: the same typed error naming the same field as the
    HTTP API's 422 (schemas.SearchRequest), and nothing stored changes."""
    user = await engine.create_user("ada", None, "user")
    await engine.store_memory(user.id, Fact(statement="Ada's bike is red", tags=["pets"]))
    before = await _counts(engine)
    with pytest.raises(InvalidInput) as err:
        await engine.search(user.id, "bike", **filters)
    assert err.value.field == field
    with pytest.raises(InvalidInput) as err:
        await engine.search_json(user.id, "bike", **filters)
    assert err.value.field == field
    with pytest.raises(InvalidInput) as err:
        await engine.list_memories(user.id, **filters)
    assert err.value.field == field
    assert await _counts(engine) == before


async def test_a_search_threshold_is_a_number_not_a_bool(engine: MemoryEngine) -> None:
    """True is an int in Python; the HTTP API (StrictFloat) refuses it, so does the engine."""
    user = await engine.create_user("ada", None, "user")
    await engine.store_memory(user.id, Fact(statement="Ada's bike is red"))
    for threshold in (True, False):
        with pytest.raises(InvalidInput) as err:
            await engine.search(user.id, "bike", threshold=threshold)
        assert err.value.field == "threshold"
    await engine.search(user.id, "bike", threshold=1)  # an int is a number
    # an empty window's edge is fine: since == until finds nothing, without an error
    assert await engine.search(user.id, "bike", since=_DAY, until=_DAY) == []
