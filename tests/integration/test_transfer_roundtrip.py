"""The export/import round trip as a property: what one user exported, imported into another
user, exports again field by field the same (ids remapped), and a second import of the file
changes nothing. Awkward but valid values throughout: emoji and ZWJ sequences, combining
marks, right-to-left text, text at its size limits, nested metadata with unicode keys, times
at the edges of the allowed range and with odd offsets, fact versions, model scopes, session
logs and summaries from record_turn."""

from __future__ import annotations

import contextlib
import copy
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from support import export_header, export_lines, fact_line, ndjson

from halldyll_ray import (
    Conversation,
    Fact,
    Image,
    InvalidInput,
    MemoryEngine,
    Message,
    NotFound,
    Settings,
    Summary,
    Transcription,
)
from halldyll_ray.components.transfer import IMPORT_BATCH
from halldyll_ray.models import (
    MAX_FACT_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_METADATA_BYTES,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    MAX_TEXT_CHARS,
    MAX_TITLE_CHARS,
    ImageSize,
    Segment,
    plain,
)

# Pieces of awkward but valid text: ZWJ emoji sequences, a flag, combining marks NFC does and
# does not compose, right-to-left scripts (with direction marks), CJK, fullwidth, a ligature.
PIECES = [
    "👩\u200d👩\u200d👧\u200d👦",
    "🏳️\u200d🌈",
    "🇵🇹",
    "e\u0301",
    "ข้าว",
    "हिंदी",
    "שָׁלוֹם",
    "مرحبا",
    "\u200fעברית\u200f",
    "日本語",
    "ＡＢＣ",
    "ﬁ",
    "Ω",
    "ß",
    "😀",
    "a\u0308\u0301",
    "👍🏽",
]
TAG_PIECES = ["café", "ข้าว", "हिंदी", "日本", "naïve", "עב", "a.b:c/d+e#f@g-h"]
OFFSETS = [
    timezone(timedelta(hours=14)),
    timezone(timedelta(hours=-12)),
    timezone(timedelta(hours=5, minutes=45)),
    UTC,
]

awkward = st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map(" ".join)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    awkward,
    st.floats(allow_nan=False, allow_infinity=False, width=32).filter(lambda f: f != 0.0),
)
metadata = st.dictionaries(
    awkward,
    st.recursive(
        json_leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(awkward, inner, max_size=3),
        max_leaves=8,
    ),
    max_size=4,
)
tags = st.lists(st.sampled_from(TAG_PIECES), max_size=len(TAG_PIECES), unique=True)
instants = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from(OFFSETS),
)


async def _imported(settings_: Settings, user_id: uuid.UUID) -> dict[str, str]:
    """What each exported id became in ``user_id`` (memory_imports), as text: here -> there."""
    conn = await asyncpg.connect(settings_.database_url.get_secret_value())
    try:
        rows = await conn.fetch(
            "SELECT source_id, memory_id FROM memory_imports WHERE user_id = $1", user_id
        )
    finally:
        await conn.close()
    return {str(r["memory_id"]): str(r["source_id"]) for r in rows}


def _canonical(lines: list[dict[str, Any]], back: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The memory lines by their original id, every id they name mapped back through
    ``back`` (here -> original; ids not in it are kept)."""

    def to(value: str | None) -> str | None:
        return None if value is None else back.get(value, value)

    def source(value: str | None) -> str | None:
        if value is None or not value.startswith("conversation:"):
            return value
        return "conversation:" + str(to(value.removeprefix("conversation:")))

    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        line = copy.deepcopy(line)
        line["id"] = to(line["id"])
        line["superseded_by"] = to(line.get("superseded_by"))
        memory = line["memory"]
        if memory["type"] == "summary":
            memory["covers"] = [to(c) for c in memory["covers"]]
        if memory["type"] == "fact":
            memory["source"] = source(memory.get("source"))
            line["sources"] = [source(s) for s in line["sources"]]
        out[line["id"]] = line
    return out


def _same(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> None:
    """Every line of ``before`` is in ``after``, field by field."""
    assert set(after) == set(before)
    for key, line in before.items():
        for field in line:
            assert after[key][field] == line[field], (line["memory"]["type"], field)


def _at(value: datetime) -> str:
    return value.isoformat()


async def _populate(engine: MemoryEngine, user: uuid.UUID, data: dict[str, Any]) -> None:
    """Store, reinforce, update and record turns for ``user``, then import hand-written lines
    (closed fact versions, edge times, period summaries) as another user's file."""
    model = f"model-{uuid.uuid4().hex[:8]}"
    await engine.register_model(model, "llm")
    text = data["text"]
    talk = await engine.store_memory(
        user,
        Conversation(
            # A title is one line's worth of text (plain): the text without its direction
            # marks and line breaks.
            title="".join(c for c in text * 300 if plain(c))[:MAX_TITLE_CHARS],
            tags=data["tags"],
            metadata=data["metadata"],
            importance=data["importance"],
            session_id="s.1:emoji@x-1",
            messages=[
                Message(role="user", content=text, name="Zoë 👩\u200d💻", created_at=data["t1"]),
                Message(role="assistant", content=f"{text} ✓", name="عمر", created_at=data["t2"]),
                Message(role="tool", content='{"ok": true}', name="lookup"),
            ],
        ),
    )
    fact = await engine.store_memory(
        user,
        Fact(
            statement=f"Zoë has 3 cats {text}",
            confidence=0.6,
            source="chat 1",
            tags=data["tags"],
            metadata=data["metadata"],
            model=model,
        ),
    )
    for n in range(data["reinforce"]):
        await engine.store_memory(
            user, Fact(statement=f"Zoë has 3 cats {text}", source=f"chat {n + 2}", model=model)
        )
    long_fact = await engine.store_memory(
        user, Fact(statement=("🇵🇹 " + text + " 7 ")[:1] + "x" * (MAX_FACT_CHARS - 1))
    )
    await engine.update_memory(
        user, long_fact.id, {"tags": ["t" * MAX_TAG_LENGTH], "importance": 1.0}
    )
    eph = await engine.store_memory(
        user, Fact(statement=f"Zoë is in Kathmandu 9 {text}", kind="ephemeral", confidence=0.3)
    )
    await engine.store_memory(
        user,
        Image(
            prompt=text,
            negative_prompt=text,
            generator="RealVisXL_V5.0",
            seed=2**63 - 1,
            steps=10_000,
            guidance_scale=100.0,
            size=ImageSize(width=32_768, height=1),
            controlnet=data["metadata"],
            scheduler="DPM++ 2M",
            model=model,
            tags=[f"t{i}" for i in range(MAX_TAGS)],
        ),
    )
    voice = await engine.store_memory(
        user,
        Transcription(
            segments=[
                Segment(start=0.0, end=0.5, text=text, speaker="Ана"),
                Segment(start=0.5, end=1e7, text=f"{text}!", speaker="李"),
            ],
            duration_seconds=1e7,
            metadata=data["metadata"],
        ),
    )
    await engine.store_memory(
        user,
        Summary(text=f"Summary {text}", covers=[talk.id, fact.id, voice.id, eph.id], model=model),
    )
    for turn in range(data["turns"]):
        await engine.record_turn(
            user,
            "session-u.1@x",
            f"I live in Lisbon and my cat is Mia {turn} {text}",
            f"Noted {text}",
            user_name="Zoë",
            assistant_name="🤖 bot",
            model=model,
        )
    # Hand-written history: a fact replaced twice (closed versions linked by their ids), a
    # period summary with its span, times at the range's edges with odd offsets.
    first, second, third = (str(uuid.uuid4()) for _ in range(3))
    early, late = data["early"], data["late"]
    lines = [
        {
            "id": first,
            "memory": {"type": "fact", "statement": f"Zoë lives in Rome 1 {text}"},
            "created_at": _at(early),
            "updated_at": _at(early),
            "valid_from": _at(early),
            "valid_to": _at(early + timedelta(days=1)),
            "superseded_by": second,
            "sources": ["conversation:" + str(talk.id), "by hand"],
            "reinforcement_count": 4,
        },
        {
            "id": second,
            "memory": {"type": "fact", "statement": f"Zoë lives in Milan 2 {text}"},
            "created_at": _at(early + timedelta(days=1)),
            "updated_at": _at(late),
            "valid_from": _at(early + timedelta(days=1)),
            "valid_to": _at(late),
            "superseded_by": third,
        },
        {
            "id": third,
            "memory": {
                "type": "fact",
                "statement": f"Zoë lives in Rome 1 {text}",
                "metadata": data["metadata"],
                "tags": data["tags"],
            },
            "created_at": _at(late),
            "updated_at": _at(late),
            "valid_from": _at(late),
        },
        {
            "id": str(uuid.uuid4()),
            "memory": {
                "type": "summary",
                "text": f"The month {text}",
                "covers": [first, third],
                "model": model,
            },
            "created_at": _at(early),
            "updated_at": _at(late),
            "period": "9999-12",
            "span_start": _at(early),
            "span_end": _at(late),
        },
    ]
    header = {
        "format": "halldyll-export",
        "version": 1,
        "user": {"id": str(uuid.uuid4()), "username": "elsewhere"},
        "exported_at": datetime.now(UTC).isoformat(),
    }
    report = await engine.import_memories(user, [ndjson([header, *lines])], atomic=True)
    assert report.error_count == 0, report


async def _round_trip(engine: MemoryEngine, settings_: Settings, data: dict[str, Any]) -> None:
    source = (await engine.create_user(f"a{uuid.uuid4().hex[:8]}", None, "user")).id
    target = (await engine.create_user(f"b{uuid.uuid4().hex[:8]}", None, "user")).id
    await _populate(engine, source, data)
    exported = await export_lines(engine, source)
    header, lines = exported[0], exported[1:]
    assert sum(header["memories"].values()) == len(lines)
    types = {line["memory"]["type"] for line in lines}
    assert types == {"conversation", "fact", "image", "transcription", "summary"}
    roles = {line["session_role"] for line in lines}
    assert "log" in roles if data["turns"] else True
    assert "summary" in roles if data["turns"] >= settings_.session_summary_every_n_turns else True
    file = ndjson(exported)

    report = await engine.import_memories(target, [file])
    assert report.error_count == 0 and report.merged == 0, report
    assert sum(report.created.values()) == len(lines), report
    again = await export_lines(engine, target)
    assert again[0]["memories"] == header["memories"]
    assert again[0]["messages"] == header["messages"]
    back = await _imported(settings_, target)
    _same(_canonical(lines, {}), _canonical(again[1:], back))

    second = await engine.import_memories(target, [file])
    assert second.created == {} and second.merged == 0 and second.error_count == 0, second
    assert second.unchanged == len(lines)
    assert (await export_lines(engine, target))[1:] == again[1:]


ROUND_TRIP_DATA = st.fixed_dictionaries(
    {
        "text": awkward,
        "tags": tags,
        "metadata": metadata,
        "importance": st.sampled_from([0.0, 1.0, 0.123456789, 5e-324]),
        "t1": instants,
        "t2": instants,
        "early": instants.filter(lambda t: t.astimezone(UTC).year < 5000),
        "late": instants.filter(lambda t: t.astimezone(UTC).year >= 5000),
        "reinforce": st.integers(0, 3),
        "turns": st.integers(0, 3),
    }
)


@examples(
    max_examples=8,
    deadline=None,
    derandomize=True,
    # No shrinking: an example costs a second or so of stores and embeddings, and shrinking one
    # took minutes; a failure names its field and memory type.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=ROUND_TRIP_DATA)
async def test_every_memory_round_trips_into_another_user_field_by_field(
    engine: MemoryEngine, settings: Settings, data: dict[str, Any]
) -> None:
    await _round_trip(engine, settings, data)


FIXED = {
    "text": "👩\u200d👩\u200d👧 e\u0301 שָׁלוֹם ข้าว",
    "tags": ["café", "हिंदी"],
    "metadata": {"κλειδί": {"🔑": [1, "ب", {"x": None}]}, "": 0.5},
    "importance": 0.25,
    "t1": datetime(1, 1, 1, 23, 0, tzinfo=timezone(timedelta(hours=-12))),
    "t2": datetime(9999, 12, 31, 0, 0, tzinfo=timezone(timedelta(hours=5, minutes=45))),
    "early": datetime(1, 1, 2, 13, 59, tzinfo=timezone(timedelta(hours=14))),
    "late": datetime(9999, 12, 30, 1, 2, 3, 456789, tzinfo=timezone(timedelta(hours=-12))),
    "reinforce": 2,
    "turns": 5,
}


def _reordered(file: bytes) -> bytes:
    header, *lines = file.splitlines(keepends=True)
    return header + b"".join(reversed(lines))


@pytest.mark.parametrize(
    "reshape",
    [
        pytest.param(_reordered, id="lines-reversed"),
        pytest.param(lambda f: f.replace(b"\n", b"\r\n"), id="crlf"),
        pytest.param(lambda f: "\ufeff".encode() + f.replace(b"\n", b"\r\n"), id="bom-crlf"),
    ],
)
async def test_a_reshaped_file_imports_the_same_memories(
    engine: MemoryEngine, settings: Settings, reshape: Any
) -> None:
    source = (await engine.create_user(f"a{uuid.uuid4().hex[:8]}", None, "user")).id
    target = (await engine.create_user(f"b{uuid.uuid4().hex[:8]}", None, "user")).id
    await _populate(engine, source, FIXED)
    exported = await export_lines(engine, source)
    file = reshape(ndjson(exported))
    for atomic in (True, False):  # the second time: nothing changes
        report = await engine.import_memories(target, [file], atomic=atomic)
        assert report.error_count == 0 and report.merged == 0, report
    again = await export_lines(engine, target)
    _same(_canonical(exported[1:], {}), _canonical(again[1:], await _imported(settings, target)))
    assert report.unchanged == len(exported) - 1 and report.created == {}


@pytest.mark.parametrize("gap", [1, IMPORT_BATCH + 3], ids=["same-batch", "next-batch"])
async def test_the_same_memory_twice_in_a_file_is_reported_wherever_it_falls(
    engine: MemoryEngine, gap: int
) -> None:
    user = (await engine.create_user(f"d{uuid.uuid4().hex[:8]}", None, "user")).id
    lines = [fact_line(f"Noor has {n} plants") for n in range(gap + 1)]
    twice = {**fact_line("Noor has a cat 🐈"), "id": lines[0]["id"]}
    file = ndjson([export_header(), *lines, twice])
    with pytest.raises(InvalidInput) as caught:
        await engine.import_memories(user, [file], atomic=True)
    report = caught.value.fields["report"]
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(gap + 3, "id")]
    assert (await engine.list_memories(user)).items == []
    for _ in range(2):  # imported, then the same file again: the same line is at fault
        report = await engine.import_memories(user, [file])
        assert [(e.line, e.field) for e in report.errors] == [(gap + 3, "id")]
    facts = (await engine.list_memories(user, limit=500)).items
    assert "Noor has a cat 🐈" not in {f.text for f in facts}


async def test_an_atomic_import_reports_every_bad_line_and_stores_nothing(
    engine: MemoryEngine,
) -> None:
    user = (await engine.create_user(f"e{uuid.uuid4().hex[:8]}", None, "user")).id
    good = [fact_line(f"Omar reads {n} books") for n in range(2 * IMPORT_BATCH)]
    duplicate = {**fact_line("Omar swims"), "id": good[3]["id"]}
    bad_model = fact_line("Omar sings")
    bad_model["memory"]["model"] = f"nope-{uuid.uuid4().hex[:6]}"
    bad_value = fact_line("Omar runs")
    bad_value["memory"]["confidence"] = 1.5
    body = [
        *good[:10],
        bad_value,
        *good[10 : IMPORT_BATCH + 20],
        duplicate,
        *good[IMPORT_BATCH + 20 :],
    ]
    file = ndjson([export_header(), *body]) + b"{cut sh\n" + ndjson([bad_model])
    with pytest.raises(InvalidInput) as caught:
        await engine.import_memories(user, [file], atomic=True)
    report = caught.value.fields["report"]
    assert report["committed"] is False and report["created"] == {}
    assert [(e["line"], e["field"]) for e in report["errors"]] == [
        (12, "memory.fact.confidence"),
        (IMPORT_BATCH + 23, "id"),
        (len(body) + 2, "line"),
        (len(body) + 3, "memory.model"),
    ]
    assert (await engine.list_memories(user)).items == []


async def test_an_export_of_no_memories_round_trips(engine: MemoryEngine) -> None:
    empty = (await engine.create_user(f"z{uuid.uuid4().hex[:8]}", None, "user")).id
    target = (await engine.create_user(f"t{uuid.uuid4().hex[:8]}", None, "user")).id
    exported = await export_lines(engine, empty)
    assert len(exported) == 1 and exported[0]["memories"] == {} and exported[0]["messages"] == 0
    for atomic in (True, False):
        report = await engine.import_memories(target, [ndjson(exported)], atomic=atomic)
        assert (report.lines, report.error_count, report.missing, report.committed) == (
            0,
            0,
            0,
            True,
        )
    assert (await export_lines(engine, target))[1:] == []


async def test_memories_dated_ahead_still_export_a_file_that_imports_after_writes(
    engine: MemoryEngine,
) -> None:
    """An import keeps a memory's times, ahead of this clock too (year 9999 is a time). The
    service's own writes on such memories (an update, a reinforcement, appended messages, a
    session summary of a log whose first message is dated ahead) left an updated_at before
    its created_at and a summary span ending before it started: the user's next export was a
    file that no import took."""
    user = (await engine.create_user(f"f{uuid.uuid4().hex[:8]}", None, "user")).id
    ahead = "9999-12-30T00:00:00Z"
    fact = {**fact_line("Ines grows basil"), "created_at": ahead, "updated_at": ahead}
    note = {
        "id": str(uuid.uuid4()),
        "memory": {"type": "summary", "text": "Ines planned a garden"},
        "created_at": ahead,
        "updated_at": ahead,
    }
    log = {
        "id": str(uuid.uuid4()),
        "memory": {"type": "conversation", "session_id": "garden-1"},
        "messages": [{"role": "user", "content": "Basil needs sun", "created_at": ahead}],
        "session_role": "log",
        "created_at": ahead,
        "updated_at": ahead,
    }
    report = await engine.import_memories(user, [ndjson([export_header(user), fact, note, log])])
    assert report.created == {"fact": 1, "summary": 1, "conversation": 1}, report
    stored = {m.type.value: m.id for m in (await engine.list_memories(user)).items}
    await engine.update_memory(user, stored["summary"], {"tags": ["garden"]})
    await engine.store_memory(user, Fact(statement="Ines grows basil"))  # reinforced
    for turn in range(engine.settings.session_summary_every_n_turns):
        await engine.record_turn(user, "garden-1", f"Is basil fine? {turn}", "Yes, water it")
    exported = await export_lines(engine, user)
    assert exported[0]["memories"]["summary"] == 2  # the note and the session's summary
    at = datetime.fromisoformat
    for line in exported[1:]:
        assert at(line["updated_at"]) >= at(line["created_at"]), line
        if line["span_start"] is not None:
            assert at(line["span_start"]) <= at(line["span_end"]), line
    other = (await engine.create_user(f"g{uuid.uuid4().hex[:8]}", None, "user")).id
    report = await engine.import_memories(other, [ndjson(exported)], atomic=True)
    assert report.error_count == 0 and report.lines == len(exported) - 1, report


@pytest.mark.parametrize("cut", [-40, -1], ids=["mid-line", "last-byte"])
async def test_a_file_cut_mid_line_reports_that_line_and_refuses_atomic(
    engine: MemoryEngine, cut: int
) -> None:
    source = (await engine.create_user(f"c{uuid.uuid4().hex[:8]}", None, "user")).id
    target = (await engine.create_user(f"t{uuid.uuid4().hex[:8]}", None, "user")).id
    for n in range(3):
        await engine.store_memory(source, Fact(statement=f"Pia climbed {n} peaks ⛰️ שָׁלוֹם"))
    data = ndjson(await export_lines(engine, source))
    # Cut inside the last line (with -1: only its newline and closing brace are lost; with
    # -40, through a multi-byte character if one is there).
    file = data[: len(data) + cut - 1]
    with pytest.raises(InvalidInput) as caught:
        await engine.import_memories(target, [file], atomic=True)
    assert [e["line"] for e in caught.value.fields["report"]["errors"]] == [4]
    assert (await engine.list_memories(target)).items == []
    report = await engine.import_memories(target, [file])
    assert [(e.line, e.field) for e in report.errors] == [(4, "line")]
    assert report.created == {"fact": 2}


async def test_memories_at_their_size_limits_round_trip(
    engine: MemoryEngine, settings: Settings
) -> None:
    source = (await engine.create_user(f"l{uuid.uuid4().hex[:8]}", None, "user")).id
    target = (await engine.create_user(f"m{uuid.uuid4().hex[:8]}", None, "user")).id
    emoji = "👩\u200d👩\u200d👧\u200d👦"  # 7 code points
    # Metadata of exactly MAX_METADATA_BYTES of compact JSON, with a unicode key.
    base = json.dumps({"ключ": ""}, ensure_ascii=False, separators=(",", ":")).encode()
    meta = {"ключ": "x" * (MAX_METADATA_BYTES - len(base))}
    talk = await engine.store_memory(
        source,
        Conversation(
            metadata=meta,
            messages=[
                Message(role="user", content=(emoji * MAX_MESSAGE_CHARS)[:MAX_MESSAGE_CHARS])
            ],
        ),
    )
    await engine.store_memory(
        source, Summary(text=("مرحبا " * MAX_TEXT_CHARS)[:MAX_TEXT_CHARS], covers=[talk.id])
    )
    exported = await export_lines(engine, source)
    report = await engine.import_memories(target, [ndjson(exported)], atomic=True)
    assert report.error_count == 0 and sum(report.created.values()) == 2
    again = await export_lines(engine, target)
    _same(_canonical(exported[1:], {}), _canonical(again[1:], await _imported(settings, target)))


async def test_a_restore_after_everything_was_deleted_brings_back_the_same_memories(
    engine: MemoryEngine,
) -> None:
    user = (await engine.create_user(f"r{uuid.uuid4().hex[:8]}", None, "user")).id
    await _populate(engine, user, FIXED)
    exported = await export_lines(engine, user)
    for line in exported[1:]:
        with contextlib.suppress(NotFound):  # a session's summary goes with its log
            await engine.delete_memory(user, line["id"])
    assert (await export_lines(engine, user))[1:] == []
    file = _reordered(ndjson(exported))
    report = await engine.import_memories(user, [file], atomic=True)
    assert report.error_count == 0 and sum(report.created.values()) == len(exported) - 1
    _same(_canonical(exported[1:], {}), _canonical((await export_lines(engine, user))[1:], {}))
