"""Hierarchical summaries (issue #14 §4) against real PostgreSQL: session summaries written
by a model, idempotent roll-ups into period summaries, and the context builder's history
under a token budget. The model is :class:`ScriptedMemoryModel`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from scripted_model import ScriptedMemoryModel
from support import make_settings

from halldyll_ray import MemoryEngine, Message, NotFound
from halldyll_ray.components import summaries as summaries_module
from halldyll_ray.components.summaries import Summaries
from halldyll_ray.models import Conversation
from halldyll_ray.portability import ExportedMemory, ExportedUser, ExportHeader

TOPICS = [
    "sailing",
    "pottery",
    "chess",
    "baking",
    "astronomy",
    "gardening",
    "cycling",
    "painting",
    "birdwatching",
    "climbing",
    "knitting",
    "photography",
]


def _summaries(engine: MemoryEngine, model: ScriptedMemoryModel) -> Summaries:
    c = engine.components
    return Summaries(engine.db, c.embeddings, c.models, c.ingestion, engine.settings, model)


async def _session(
    engine: MemoryEngine,
    summaries: Summaries,
    user_id: UUID,
    session: str,
    day: datetime,
    topic: str,
    *,
    model: str | None = None,
) -> UUID:
    """A stored conversation of ``session`` said on ``day``, and its model-written summary."""
    said = (
        f"Let's talk about {topic} today. I have been into {topic} for years and I would like "
        f"to plan a whole weekend around {topic} with my two closest friends from school."
    )
    stored = await engine.store_memory(
        user_id,
        Conversation(
            title=f"about {topic}",
            session_id=session,
            model=model,
            messages=[
                Message(role="user", content=said, created_at=day),
                Message(
                    role="assistant",
                    content=f"Sure, {topic} is a fine subject for a weekend.",
                    created_at=day + timedelta(minutes=5),
                ),
            ],
        ),
    )
    return await summaries.refresh_session(user_id, session, stored.id, model, job_id="sum")


def _months(*months: int, per_month: int = 3) -> list[tuple[str, datetime, str]]:
    """Sessions (id, day, topic): ``per_month`` in each month of 2024 given."""
    out = []
    for month in months:
        for n in range(per_month):
            topic = TOPICS[len(out) % len(TOPICS)]
            out.append((f"m{month}-{n}", datetime(2024, month, 3 + 7 * n, 10, tzinfo=UTC), topic))
    return out


async def test_a_model_writes_the_session_summary(database_url: str, redis_url: str, encoder):
    settings = make_settings(database_url, redis_url, session_summary_every_n_turns=3)
    async with MemoryEngine(settings, encoder=encoder) as engine:
        user = await engine.create_user("ada", None, "user")
        turns = [
            await engine.record_turn(
                user.id, "chat-1", f"I like {t}.", "Noted.", extract_facts=False
            )
            for t in ("tea", "jazz")
        ]
        assert turns[-1].summary_id is None
        model = ScriptedMemoryModel()
        summary_id = await _summaries(engine, model).refresh_session(
            user.id, "chat-1", turns[0].conversation_id, None, job_id="job-9", request_id="r-9"
        )
        summary = await engine.get_memory(user.id, summary_id)
        assert summary.memory.text == (
            "user: I like tea. assistant: Noted. user: I like jazz. assistant: Noted."
        )
        assert summary.memory.covers == [turns[0].conversation_id]
        assert summary.session_id == "chat-1" and summary.period is None
        [(messages, words)] = [args for name, args in model.calls if name == "summarize"]
        assert len(messages) == 4 and words == engine.settings.session_summary_max_words
        [row] = await engine.list_audit(user_id=user.id, operation="summary.refresh")
        assert row["details"]["job_id"] == "job-9" and row["request_id"] == "r-9"
        assert row["details"]["model"] == "scripted" and row["target_ids"] == [str(summary_id)]
        context = await engine.prepare_context(user.id, "chat-1", "What do I like?")
        section = next(s for s in context.sections if s.name == "Session summary")
        assert "I like jazz" in section.items[0].text
        # The agent loop's own (extractive) refresh rewrites the same row, and the model's
        # next one again: one summary per session.
        third = await engine.record_turn(user.id, "chat-1", "I like chess.", "Ok.")
        assert third.summary_id == summary_id
        assert "chess" in (await engine.get_memory(user.id, summary_id)).memory.text
        again = await _summaries(engine, model).refresh_session(
            user.id, None, turns[0].conversation_id, None, job_id=None
        )
        assert again == summary_id
        summaries = (await engine.list_memories(user.id, types=["summary"])).items
        assert [s.id for s in summaries] == [summary_id]


async def test_roll_up_covers_quiet_months_and_is_idempotent(engine: MemoryEngine) -> None:
    user = await engine.create_user("bea", None, "user")
    model = ScriptedMemoryModel()
    summaries = _summaries(engine, model)
    by_month: dict[str, set[UUID]] = {}
    for session, day, topic in _months(1, 2, 3):
        made = await _session(engine, summaries, user.id, session, day, topic)
        by_month.setdefault(day.strftime("%Y-%m"), set()).add(made)
    recent = await _session(
        engine, summaries, user.id, "now", datetime.now(UTC) - timedelta(hours=1), "rowing"
    )
    written = await summaries.roll_up(user.id, job_id="roll-1", model_id=None)
    assert len(written) == 3 and model.count("roll_up") == 3
    periods = [await engine.get_memory(user.id, p) for p in written]
    assert [p.period for p in periods] == ["2024-01", "2024-02", "2024-03"]
    for period in periods:
        assert set(period.memory.covers) == by_month[period.period]
        assert period.metadata == {"period": period.period, "sessions": 3}
        assert period.session_id is None and recent not in period.memory.covers
    # The session summaries were given to the model oldest first, with their times.
    (first_batch, _), *_ = [args for name, args in model.calls if name == "roll_up"]
    assert [t.start.day for t in first_batch] == [3, 10, 17]
    assert periods[0].memory.text.startswith("user: Let's talk about sailing")
    rows = await engine.list_audit(user_id=user.id, operation="summary.rollup")
    assert {r["details"]["job_id"] for r in rows} == {"roll-1"} and len(rows) == 3

    # Nothing changed: nothing asked, nothing written.
    assert await summaries.roll_up(user.id, job_id="roll-2", model_id=None) == []
    assert model.count("roll_up") == 3
    count = len((await engine.list_memories(user.id, types=["summary"], limit=100)).items)
    assert count == 3 + 9 + 1

    # A new quiet session in February, and a January session summarised again: those two
    # months are rolled up again, in place.
    feb = await _session(
        engine, summaries, user.id, "late-feb", datetime(2024, 2, 26, tzinfo=UTC), "rowing"
    )
    jan_session = next(iter(by_month["2024-01"]))
    jan = await engine.get_memory(user.id, jan_session)
    await summaries.refresh_session(
        user.id, jan.session_id, jan.memory.covers[0], None, job_id="again"
    )
    assert await summaries.roll_up(user.id, job_id="roll-3", model_id=None) == written[:2]
    february = await engine.get_memory(user.id, written[1])
    assert set(february.memory.covers) == by_month["2024-02"] | {feb}
    # A month whose sessions are all deleted loses its period summary.
    for session in by_month["2024-03"]:
        await engine.delete_memory(user.id, session)
    assert await summaries.roll_up(user.id, job_id="roll-4", model_id=None) == []
    with pytest.raises(NotFound):
        await engine.get_memory(user.id, written[2])

    # February's period was rewritten to cover a session summary newer than itself: an export
    # (summaries after what they cover) brings all its covers back into another user.
    file = b"".join([line async for line in engine.export_memories(user.id)])
    twin = await engine.create_user("bea-twin", None, "user")
    report = await engine.import_memories(twin.id, [file])
    assert report.error_count == 0 and report.missing == 0
    periods = [
        m
        for m in (await engine.list_memories(twin.id, types=["summary"], limit=100)).items
        if m.period == "2024-02"
    ]
    assert len(periods) == 1 and len(periods[0].memory.covers) == 4


async def test_a_period_is_not_written_over_a_session_summary_deleted_meanwhile(
    engine: MemoryEngine,
) -> None:
    """The month's session summaries are read before the model writes (seconds for an LLM)
    and before the lock: one deleted meanwhile would be covered by the period, its text
    repeated. Nothing is written for that month; the next run rolls it up without it."""
    user = await engine.create_user("racy", None, "user")
    made = [
        await _session(engine, _summaries(engine, ScriptedMemoryModel()), user.id, s, d, t)
        for s, d, t in _months(1)
    ]

    class DeletesWhileWriting(ScriptedMemoryModel):
        async def roll_up(self, summaries: Any, *, max_words: int) -> str:
            if self.count("roll_up") == 0:
                await engine.delete_memory(user.id, made[0])
            return await super().roll_up(summaries, max_words=max_words)

    summaries = _summaries(engine, DeletesWhileWriting())
    assert await summaries.roll_up(user.id, job_id="r1", model_id=None) == []
    kinds = (await engine.list_memories(user.id, types=["summary"], limit=100)).items
    assert all(m.period is None for m in kinds) and len(kinds) == 2
    [period_id] = await summaries.roll_up(user.id, job_id="r2", model_id=None)
    period = await engine.get_memory(user.id, period_id)
    assert set(period.memory.covers) == set(made[1:])


async def test_a_slow_summary_does_not_overwrite_a_later_one(engine: MemoryEngine) -> None:
    """Two refreshes of one session read its messages before the lock and finish in either
    order (a model takes seconds): the one that read fewer messages and finishes last keeps
    the later summary, writes nothing and is not audited; it answers the summary's id."""
    user = await engine.create_user("slowpoke", None, "user")
    first = await engine.record_turn(user.id, "s1", "I like tea.", "Noted.", extract_facts=False)
    conversation = first.conversation_id

    class AppendsWhileWriting(ScriptedMemoryModel):
        async def summarize(self, messages: Any, *, max_words: int) -> str:
            if self.count("summarize") == 0:  # the next turn and its summary, meanwhile
                await engine.record_turn(user.id, "s1", "I like jazz.", "Ok.", extract_facts=False)
                await _summaries(engine, ScriptedMemoryModel()).refresh_session(
                    user.id, "s1", conversation, None, job_id="later"
                )
            return await super().summarize(messages, max_words=max_words)

    slow = AppendsWhileWriting()
    summary_id = await _summaries(engine, slow).refresh_session(
        user.id, "s1", conversation, None, job_id="earlier"
    )
    [(read, _)] = [args for name, args in slow.calls if name == "summarize"]
    assert len(read) == 2  # it read the first turn only
    summary = await engine.get_memory(user.id, summary_id)
    assert "I like jazz" in summary.memory.text and "through_seq" not in summary.memory.text
    audited = await engine.list_audit(user_id=user.id, operation="summary.refresh")
    assert [row["details"].get("job_id") for row in audited] == ["later"]
    # The same reading again (nothing new) still rewrites it: a model's summary replaces the
    # agent loop's of the same messages.
    again = await _summaries(engine, ScriptedMemoryModel()).refresh_session(
        user.id, "s1", conversation, None, job_id="same"
    )
    assert again == summary_id
    audited = await engine.list_audit(user_id=user.id, operation="summary.refresh")
    assert sorted(row["details"].get("job_id") for row in audited) == ["later", "same"]
    [stored] = (await engine.list_memories(user.id, types=["summary"])).items
    assert stored.id == summary_id and stored.memory.covers == [conversation]


async def test_a_slow_roll_up_does_not_write_over_a_newer_reading(engine: MemoryEngine) -> None:
    """Two roll-ups of one user run at once (a summary job per session): the slow one read
    the month's session summaries before one was rewritten and the other roll-up wrote the
    month from the new text. It writes nothing (its reading is not the month's under the
    lock), and the month stays up to date: a third run asks the model nothing."""
    user = await engine.create_user("rolly", None, "user")
    made = [
        await _session(engine, _summaries(engine, ScriptedMemoryModel()), user.id, s, d, t)
        for s, d, t in _months(1)
    ]

    class RewritesWhileRolling(ScriptedMemoryModel):
        async def roll_up(self, summaries: Any, *, max_words: int) -> str:
            if self.count("roll_up") == 0:
                await engine.update_memory(user.id, made[0], {"text": "Sailing was cancelled."})
                newer = _summaries(engine, ScriptedMemoryModel())
                assert len(await newer.roll_up(user.id, job_id="newer", model_id=None)) == 1
            return await super().roll_up(summaries, max_words=max_words)

    slow = RewritesWhileRolling()
    assert await _summaries(engine, slow).roll_up(user.id, job_id="older", model_id=None) == []
    assert slow.count("roll_up") == 1
    kept = (await engine.list_memories(user.id, types=["summary"], limit=100)).items
    [period] = [m for m in kept if m.period is not None]
    assert "Sailing was cancelled" in period.memory.text
    rollups = await engine.list_audit(user_id=user.id, operation="summary.rollup")
    assert [row["details"]["job_id"] for row in rollups] == ["newer"]
    third = ScriptedMemoryModel()
    assert await _summaries(engine, third).roll_up(user.id, job_id="third", model_id=None) == []
    assert third.count("roll_up") == 0


async def test_deleting_a_conversation_deletes_the_summaries_that_repeat_it(
    engine: MemoryEngine,
) -> None:
    """A session summary and the month's period summary over it repeat a conversation's
    words: deleting the conversation deletes both (audited), keeps the other sessions'
    summaries and a summary the user wrote (its covers lose the id), and the next roll-up
    writes the month from what is left."""
    user = await engine.create_user("forgetful", None, "user")
    summaries = _summaries(engine, ScriptedMemoryModel())
    made = [await _session(engine, summaries, user.id, s, d, t) for s, d, t in _months(1)]
    [period_id] = await summaries.roll_up(user.id, job_id="r1", model_id=None)
    conversation = (await engine.get_memory(user.id, made[0])).memory.covers[0]
    own = await engine.store_memory(
        user.id, {"type": "summary", "text": "My notes on sailing.", "covers": [str(conversation)]}
    )
    await engine.delete_memory(user.id, conversation)
    left = {m.id for m in (await engine.list_memories(user.id, types=["summary"])).items}
    assert left == {made[1], made[2], own.id}
    assert (await engine.get_memory(user.id, own.id)).memory.covers == []
    [row] = [
        r
        for r in await engine.list_audit(user_id=user.id, operation="memory.delete")
        if r["target_type"] == "summary"
    ]
    assert set(row["target_ids"]) == {str(made[0]), str(period_id)}
    hits = await engine.search(user.id, "sailing", mode="fulltext", types=["summary"])
    assert [h.memory.id for h in hits] == [own.id]
    [again] = await summaries.roll_up(user.id, job_id="r2", model_id=None)
    period = await engine.get_memory(user.id, again)
    assert set(period.memory.covers) == {made[1], made[2]}
    assert "sailing" not in period.memory.text


async def test_a_named_assistant_stays_the_assistant_in_its_session_summary(
    engine: MemoryEngine,
) -> None:
    """Messages went to the model as "<name or role>: text": the no-LLM summariser read
    "Halbot: Tea it is" as a line of the user's."""
    from halldyll_ray.llm.heuristic import HeuristicMemoryModel

    user = await engine.create_user("named", None, "user")
    turn = await engine.record_turn(
        user.id,
        "tea",
        "I prefer tea over coffee in the morning",
        "Tea it is, I will remember your morning tea",
        user_name="Carol",
        assistant_name="Halbot",
    )
    summaries = _summaries(engine, HeuristicMemoryModel())
    summary_id = await summaries.refresh_session(
        user.id, "tea", turn.conversation_id, None, job_id="named"
    )
    text = (await engine.get_memory(user.id, summary_id)).memory.text
    assert "user: Halbot" not in text and "user: Carol" not in text, text
    assert "assistant: Tea it is" in text and "user: I prefer tea" in text, text


async def _import_log(
    engine: MemoryEngine, user_id: Any, session: str, *, said_at: datetime, stored_at: datetime
) -> None:
    """Import one session log of two messages said at ``said_at``, the log's own times
    (created, updated) being ``stored_at``, as an export of an earlier installation holds it."""
    header = ExportHeader(user=ExportedUser(id=uuid.uuid4(), username="old"), exported_at=said_at)
    line = ExportedMemory(
        id=uuid.uuid4(),
        memory=Conversation(title=f"Session {session}", session_id=session),
        messages=[
            Message(role="user", content="We adopted a kitten named Miso.", created_at=said_at),
            Message(role="assistant", content="Congratulations!", created_at=said_at),
        ],
        created_at=stored_at,
        updated_at=stored_at,
        session_role="log",
    )
    report = await engine.import_memories(
        user_id, [header.model_dump_json() + "\n", line.model_dump_json() + "\n"]
    )
    assert report.created == {"conversation": 1}, report


async def test_quiet_session_logs_are_summarised_before_the_roll_up(engine: MemoryEngine) -> None:
    user = await engine.create_user("cy", None, "user")
    day = datetime(2024, 5, 2, 9, tzinfo=UTC)
    await _import_log(engine, user.id, "old-chat", said_at=day, stored_at=day)
    model = ScriptedMemoryModel()
    summaries = _summaries(engine, model)
    [period_id] = await summaries.roll_up(user.id, job_id="r", model_id=None)
    assert model.count("summarize") == 1 and model.count("roll_up") == 1
    period = await engine.get_memory(user.id, period_id)
    [session_summary] = period.memory.covers
    summary = await engine.get_memory(user.id, session_summary)
    assert summary.session_id == "old-chat" and "Miso" in summary.memory.text
    assert period.period == "2024-05"
    assert await summaries.roll_up(user.id, job_id="r2", model_id=None) == []
    assert model.count("summarize") == 1


async def test_roll_ups_are_per_model_scope(engine: MemoryEngine) -> None:
    user = await engine.create_user("dan", None, "user")
    await engine.register_model("Qwen2.5-14B-Instruct", "llm")
    model = ScriptedMemoryModel()
    summaries = _summaries(engine, model)
    day = datetime(2024, 6, 4, tzinfo=UTC)
    shared = await _session(engine, summaries, user.id, "a", day, "sailing")
    scoped = await _session(
        engine, summaries, user.id, "b", day, "chess", model="Qwen2.5-14B-Instruct"
    )
    [qwen_period] = await summaries.roll_up(user.id, job_id="q", model_id="Qwen2.5-14B-Instruct")
    [shared_period] = await summaries.roll_up(user.id, job_id="s", model_id=None)
    qwen = await engine.get_memory(user.id, qwen_period)
    plain = await engine.get_memory(user.id, shared_period)
    assert qwen.memory.covers == [scoped] and plain.memory.covers == [shared]
    assert qwen.period == plain.period == "2024-06" and qwen.model_id is not None
    assert plain.model_id is None


async def test_a_large_month_is_rolled_up_in_batches(
    engine: MemoryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(summaries_module, "ROLLUP_BATCH", 2)
    user = await engine.create_user("eli", None, "user")
    model = ScriptedMemoryModel()
    summaries = _summaries(engine, model)
    for session, day, topic in _months(7, per_month=5):
        await _session(engine, summaries, user.id, session, day, topic)
    [period_id] = await summaries.roll_up(user.id, job_id="b", model_id=None)
    # 5 summaries -> 3 batches -> 2 batches -> the period: 3 + 2 + 1 calls.
    sizes = [len(args[0]) for name, args in model.calls if name == "roll_up"]
    assert sizes == [2, 2, 1, 2, 1, 2]
    period = await engine.get_memory(user.id, period_id)
    assert len(period.memory.covers) == 5


def _history(context: Any) -> list[Any]:
    return next((s.items for s in context.sections if s.name == "Earlier sessions"), [])


async def test_period_summaries_give_a_long_history_in_a_small_budget(
    database_url: str, redis_url: str, encoder
) -> None:
    settings = make_settings(database_url, redis_url, context_history_share=0.5)
    async with MemoryEngine(settings, encoder=encoder) as engine:
        user = await engine.create_user("fay", None, "user")
        model = ScriptedMemoryModel()
        summaries = _summaries(engine, model)
        sessions: dict[UUID, str] = {}
        for session, day, topic in _months(1, 2, 3, 4):
            sessions[await _session(engine, summaries, user.id, session, day, topic)] = session
        query = "what should we plan next?"

        before = await engine.build_context(user.id, query, max_tokens=400)
        shown = _history(before)
        assert shown and all(item.memory_id in sessions for item in shown)
        assert not any("(2024-01" in item.text for item in shown)  # too far back

        periods = await summaries.roll_up(user.id, job_id="r", model_id=None)
        covers = {p: set((await engine.get_memory(user.id, p)).memory.covers) for p in periods}
        small = await engine.build_context(user.id, query, max_tokens=400)
        # Every month is reached, each by its period's one line.
        assert [item.memory_id for item in _history(small)] == periods
        assert _history(small)[0].text.startswith("[1] (2024-01, 3 sessions) user: ")
        large = await engine.build_context(user.id, query, max_tokens=4000)
        # A budget that holds them all: the sessions themselves, oldest first.
        assert [item.memory_id for item in _history(large)] == list(sessions)
        assert _history(large)[0].text.startswith("[1] (2024-01-03, session 'm1-0') user: ")

        for budget in (64, 128, 200, 400, 600, 800, 1200, 1600, 2400, 4000):
            context = await engine.build_context(user.id, query, max_tokens=budget)
            assert context.token_count <= budget
            cited = set(context.sources)
            for period, covered in covers.items():
                assert not (period in cited and covered & cited), budget


async def test_a_log_dated_ahead_is_summarised_once_by_the_roll_ups(engine: MemoryEngine) -> None:
    """Whether a quiet session's log needed its summary was read from the log's updated_at
    (newer than the summary's): a log imported with times ahead of the server's clock (an
    import keeps them; its updated_at is never set back) was summarised again by every
    roll-up, one model call a run for ever. What the summary covers is its through_seq."""
    user = await engine.create_user("ahead", None, "user")
    await _import_log(
        engine,
        user.id,
        "far-chat",
        said_at=datetime(2024, 5, 2, 9, tzinfo=UTC),
        stored_at=datetime(2090, 1, 1, tzinfo=UTC),
    )
    model = ScriptedMemoryModel()
    summaries = _summaries(engine, model)
    await summaries.roll_up(user.id, job_id="r1", model_id=None)
    assert model.count("summarize") == 1
    await summaries.roll_up(user.id, job_id="r2", model_id=None)
    await summaries.roll_up(user.id, job_id="r3", model_id=None)
    assert model.count("summarize") == 1
