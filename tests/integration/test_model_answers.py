"""What a memory model answers is stored under the rules of what a client stores.

A model's session summaries, roll-ups and facts went into storage as the model gave them:
a NUL was a database error, a lone UTF-16 surrogate (an emoji cut in half) a TypeError of the
tokenizer, a fact of zero-width spaces a bare pydantic ValidationError in the job, and a
summary of invisible characters or past MAX_TEXT_CHARS was stored and then broke later reads
(the export's import, every page of the user's memories). Seen in other projects:
kodus-ai/kodus-ai#1683 (LLM responses carrying U+0000 and unpaired surrogates lost on insert)
and openclaw/openclaw#65782 (a model's split emoji stalling memory indexing for good).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from scripted_model import ScriptedMemoryModel

from halldyll_ray import MemoryEngine
from halldyll_ray.components.consolidation import Consolidation
from halldyll_ray.components.summaries import EMPTY_SUMMARY, Summaries
from halldyll_ray.llm.protocol import Action, Decision, FactCandidate, LLMOutputInvalid
from halldyll_ray.models import MAX_TEXT_CHARS, Conversation, Message


@dataclass
class Saying(ScriptedMemoryModel):
    """A model whose every summary and roll-up is ``text``."""

    text: str = ""

    async def summarize(self, messages: Any, *, max_words: int) -> str:
        return self.text

    async def roll_up(self, summaries: Any, *, max_words: int) -> str:
        return self.text


def _summaries(engine: MemoryEngine, model: ScriptedMemoryModel) -> Summaries:
    c = engine.components
    return Summaries(engine.db, c.embeddings, c.models, c.ingestion, engine.settings, model)


async def _session(engine: MemoryEngine, user_id: UUID, day: datetime) -> UUID:
    stored = await engine.store_memory(
        user_id,
        Conversation(
            session_id="s1",
            messages=[
                Message(role="user", content="I like green tea in the morning.", created_at=day),
                Message(role="assistant", content="Noted.", created_at=day),
            ],
        ),
    )
    return stored.id


async def _round_trip(engine: MemoryEngine, user_id: UUID) -> None:
    """Every read of the user works, and the export imports whole into another user."""
    page = await engine.list_memories(user_id)
    for memory in page.items:
        await engine.get_memory(user_id, memory.id)
    await engine.search(user_id, "green tea")
    lines = [line async for line in engine.export_memories(user_id)]
    other = await engine.create_user(f"o{uuid.uuid4().hex[:8]}", None, "user")
    report = await engine.import_memories(other.id, lines, atomic=True)
    assert report.error_count == 0 and sum(report.created.values()) == len(page.items)


@pytest.mark.parametrize(
    "said",
    ["Ada\x00 likes tea", "likes tea \ud83d", "t" * (MAX_TEXT_CHARS + 1)],
    ids=["nul", "lone-surrogate", "too-long"],
)
async def test_a_summary_no_memory_may_hold_is_refused_and_writes_nothing(
    engine: MemoryEngine, said: str
) -> None:
    user = await engine.create_user(f"a{uuid.uuid4().hex[:8]}", None, "user")
    talk = await _session(engine, user.id, datetime.now(UTC))
    with pytest.raises(LLMOutputInvalid):
        await _summaries(engine, Saying(text=said)).refresh_session(
            user.id, "s1", talk, None, job_id="j"
        )
    assert [m.id for m in (await engine.list_memories(user.id)).items] == [talk]
    await _round_trip(engine, user.id)


@pytest.mark.parametrize("said", ["\u200b\u200b\u200b", "\u3164", " \u2800\u200d "])
async def test_a_summary_with_nothing_visible_is_the_empty_summary(
    engine: MemoryEngine, said: str
) -> None:
    user = await engine.create_user(f"b{uuid.uuid4().hex[:8]}", None, "user")
    talk = await _session(engine, user.id, datetime.now(UTC))
    summary_id = await _summaries(engine, Saying(text=said)).refresh_session(
        user.id, "s1", talk, None, job_id="j"
    )
    assert (await engine.get_memory(user.id, summary_id)).memory.text == EMPTY_SUMMARY
    await _round_trip(engine, user.id)


async def test_a_roll_up_is_held_to_the_same_rules(engine: MemoryEngine) -> None:
    user = await engine.create_user(f"c{uuid.uuid4().hex[:8]}", None, "user")
    talk = await _session(engine, user.id, datetime(2024, 3, 5, 10, tzinfo=UTC))
    await _summaries(engine, ScriptedMemoryModel()).refresh_session(
        user.id, "s1", talk, None, job_id="j"
    )
    before = {m.id for m in (await engine.list_memories(user.id)).items}
    for said in ("March\x00", "t" * (MAX_TEXT_CHARS + 1)):
        with pytest.raises(LLMOutputInvalid):
            await _summaries(engine, Saying(text=said)).roll_up(user.id, job_id="r", model_id=None)
        assert {m.id for m in (await engine.list_memories(user.id)).items} == before
    [period] = await _summaries(engine, Saying(text="\u200b")).roll_up(
        user.id, job_id="r", model_id=None
    )
    stored = await engine.get_memory(user.id, period)
    assert stored.memory.text == EMPTY_SUMMARY and stored.period == "2024-03"
    await _round_trip(engine, user.id)


@pytest.mark.parametrize("statement", ["Ada\x00 likes tea", "\u200b\u200b", "\u3164"])
def test_a_fact_no_client_could_store_is_no_model_answer(statement: str) -> None:
    with pytest.raises(ValueError):
        FactCandidate(statement=statement)


async def test_a_models_session_summary_is_still_written(engine: MemoryEngine) -> None:
    """The rules keep a model's ordinary answer as it was (stripped)."""
    user = await engine.create_user(f"d{uuid.uuid4().hex[:8]}", None, "user")
    talk = await _session(engine, user.id, datetime.now(UTC) - timedelta(minutes=1))
    summary_id = await _summaries(engine, Saying(text="  Likes green tea.  ")).refresh_session(
        user.id, "s1", talk, None, job_id="j"
    )
    assert (await engine.get_memory(user.id, summary_id)).memory.text == "Likes green tea."
    await _round_trip(engine, user.id)


@pytest.mark.parametrize("reason", ["said so\x00", "half an emoji \ud83d"])
async def test_a_models_reason_is_kept_whatever_it_holds(engine: MemoryEngine, reason: str) -> None:
    """A decision's reason is the model's free text, kept with what the turn taught: one
    with a NUL failed the whole turn's learning (a database error on the record)."""
    user = await engine.create_user(f"e{uuid.uuid4().hex[:8]}", None, "user")
    turn = await engine.record_turn(user.id, "s1", "I drink green tea.", "Ok.", extract_facts=False)
    model = ScriptedMemoryModel(
        facts=[FactCandidate(statement="The user drinks green tea")],
        decide=lambda fact, shown: Decision(action=Action.ADD, reason=reason),
    )
    c = engine.components
    learning = Consolidation(engine.db, c.embeddings, c.models, c.ingestion, engine.settings, model)
    [change] = await learning.learn_from_turn(
        user.id, turn.conversation_id, turn.message_seqs, job_id="j", model_id=None
    )
    assert change.fact_id is not None and change.reason == reason[:-1] + "\ufffd"
    await _round_trip(engine, user.id)
