"""Consolidation (issue #14 §3) against real PostgreSQL: what a model's decisions do to the
stored facts, their history, the audit log, isolation and model scopes.

The model is :class:`ScriptedMemoryModel` (the decisions are the test's input); the
LLM-backed and heuristic models are tested by their own suites.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from uuid import UUID

import numpy as np
import pytest
from scripted_model import ScriptedMemoryModel, act_on_closest, add_or_reinforce

from halldyll_ray import Fact, InvalidInput, MemoryEngine, Message, NotFound
from halldyll_ray.components.consolidation import Consolidation
from halldyll_ray.components.embeddings import model_of
from halldyll_ray.llm.protocol import (
    Action,
    Decision,
    FactCandidate,
    LLMOutputInvalid,
)
from halldyll_ray.models import Conversation
from halldyll_ray.storage.sql import bind


def _consolidation(engine: MemoryEngine, model: ScriptedMemoryModel) -> Consolidation:
    c = engine.components
    return Consolidation(engine.db, c.embeddings, c.models, c.ingestion, engine.settings, model)


async def _turn(engine: MemoryEngine, user_id: UUID, said: str, *, session: str = "s1") -> Any:
    return await engine.record_turn(user_id, session, said, "Noted.", extract_facts=False)


async def _learn(
    engine: MemoryEngine,
    user_id: UUID,
    said: str,
    model: ScriptedMemoryModel,
    *,
    job: str = "job-1",
    scope: str | None = None,
    session: str = "s1",
) -> tuple[Any, list[Any]]:
    turn = await _turn(engine, user_id, said, session=session)
    changes = await _consolidation(engine, model).learn_from_turn(
        user_id,
        turn.conversation_id,
        turn.message_seqs,
        job_id=job,
        model_id=scope,
        request_id=f"req-{job}",
    )
    return turn, changes


def _facts(*statements: str, confidence: float = 0.6) -> list[FactCandidate]:
    return [FactCandidate(statement=s, confidence=confidence) for s in statements]


async def _audit(engine: MemoryEngine, user_id: UUID) -> list[dict[str, Any]]:
    return await engine.list_audit(user_id=user_id, operation="fact.learn")


async def _fact_rows(engine: MemoryEngine, user_id: UUID) -> list[dict[str, Any]]:
    rows = await engine.db.fetch(
        "SELECT id, content, confidence, valid_to, superseded_by, reinforcement_count "
        "FROM memories WHERE user_id = $1 AND type = 'fact' ORDER BY created_at, id",
        user_id,
        admin=True,
    )
    return [dict(r) for r in rows]


async def test_add_then_reinforce_with_audit_of_job_and_turn(engine: MemoryEngine) -> None:
    user = await engine.create_user("ada", None, "user")
    model = ScriptedMemoryModel(facts=_facts("The user lives in Paris"))
    turn, [added] = await _learn(engine, user.id, "I live in Paris.", model, job="job-a")
    assert added.action is Action.ADD and added.fact_id is not None and not added.replayed
    fact = await engine.get_memory(user.id, added.fact_id)
    assert fact.memory.statement == "The user lives in Paris"
    assert fact.memory.confidence == pytest.approx(0.6)
    assert fact.memory.source == f"conversation:{turn.conversation_id}"
    assert fact.tags == ["extracted"] and fact.session_id == "s1"
    assert fact.valid_to is None and fact.superseded_by is None
    said = (await engine.get_memory(user.id, turn.conversation_id)).messages[-1].created_at
    assert fact.valid_from == said  # valid from the turn that taught it
    # The model saw the turn's two messages, and no stored fact yet.
    ((messages, _),) = [args for name, args in model.calls if name == "extract_facts"]
    assert [m.text for m in messages] == ["user: I live in Paris.", "assistant: Noted."]
    assert model.calls[-1] == ("consolidate", (_facts("The user lives in Paris")[0], []))

    model.facts = _facts("The user lives in Paris", confidence=0.5)
    turn2, [again] = await _learn(engine, user.id, "Paris is home.", model, job="job-b")
    shown = model.calls[-1][1][1]
    assert [n.id for n in shown] == [added.fact_id] and shown[0].similarity > 0.99
    assert again.action is Action.REINFORCE and again.fact_id == added.fact_id
    assert again.confidence == pytest.approx(1 - (1 - 0.6) * (1 - 0.25), abs=1e-6)
    stored = await engine.get_memory(user.id, added.fact_id)
    assert stored.reinforcement_count == 1 and len(await _fact_rows(engine, user.id)) == 1

    rows = await _audit(engine, user.id)
    assert [r["details"]["action"] for r in rows] == ["reinforce", "add"]  # newest first
    for row, job, learned in ((rows[0], "job-b", turn2), (rows[1], "job-a", turn)):
        assert row["details"]["job_id"] == job and row["request_id"] == f"req-{job}"
        assert row["details"]["conversation_id"] == str(learned.conversation_id)
        assert row["details"]["seqs"] == learned.message_seqs
        assert row["details"]["model"] == "scripted"
        assert row["target_ids"] == [str(added.fact_id)] and row["acting_for"] == user.id
    assert rows[0]["details"]["confidence_before"] == pytest.approx(0.6)


async def test_update_closes_the_old_fact_and_keeps_it_as_history(engine: MemoryEngine) -> None:
    user = await engine.create_user("bea", None, "user")
    model = ScriptedMemoryModel(facts=_facts("The user lives in Paris"))
    _, [paris] = await _learn(engine, user.id, "I live in Paris.", model)
    model.facts, model.decide = _facts("The user lives in Berlin"), act_on_closest(Action.UPDATE)
    turn, [moved] = await _learn(engine, user.id, "I moved to Berlin.", model, job="job-2")
    assert moved.action is Action.UPDATE and moved.target == paris.fact_id and moved.closed
    said = (await engine.get_memory(user.id, turn.conversation_id)).messages[-1].created_at

    old = await engine.get_memory(user.id, paris.fact_id)  # still readable by id
    new = await engine.get_memory(user.id, moved.fact_id)
    assert old.valid_to == said and old.superseded_by == new.id
    assert new.valid_to is None and new.valid_from == said
    assert new.memory.statement == "The user lives in Berlin"
    history = await engine.fact_history(user.id, old.id)
    assert [m.id for m in history] == [old.id, new.id]
    assert await engine.fact_history(user.id, new.id) == history

    # Closed facts leave lists, searches and contexts.
    listed = {m.id for m in (await engine.list_memories(user.id, types=["fact"])).items}
    assert listed == {new.id}
    for mode in ("semantic", "fulltext", "hybrid"):
        hits = await engine.search(user.id, "the user lives in Paris", 10, mode=mode)
        assert old.id not in {h.memory.id for h in hits}, mode
    context = await engine.build_context(user.id, "Where does the user live?", max_tokens=300)
    assert old.id not in context.sources and new.id in context.sources
    row = (await _audit(engine, user.id))[0]
    assert row["details"]["action"] == "update" and row["details"]["closed"] is True
    assert set(row["target_ids"]) == {str(old.id), str(new.id)}

    # Moving back: a new fact with the closed one's statement, history of three.
    model.facts = _facts("The user lives in Paris")
    _, [back] = await _learn(engine, user.id, "Back in Paris!", model, job="job-3")
    assert back.action is Action.UPDATE and back.fact_id not in {old.id, new.id}
    chain = [m.id for m in await engine.fact_history(user.id, old.id)]
    assert chain == [old.id, new.id, back.fact_id]
    assert [r["valid_to"] is None for r in await _fact_rows(engine, user.id)] == [
        False,
        False,
        True,
    ]


async def test_contradictions_lower_confidence_then_close(engine: MemoryEngine) -> None:
    user = await engine.create_user("cy", None, "user")
    model = ScriptedMemoryModel(facts=_facts("The user is vegetarian", confidence=0.5))
    _, [veg] = await _learn(engine, user.id, "I am vegetarian.", model)
    model.facts = _facts("The user eats meat", confidence=0.6)
    model.decide = act_on_closest(Action.CONTRADICT)
    expected = 0.5
    for n in range(3):
        _, [change] = await _learn(engine, user.id, f"I ate a steak ({n}).", model, job=f"j{n}")
        expected *= 1 - 0.6 / 2
        assert change.action is Action.CONTRADICT and change.fact_id == veg.fact_id
        assert change.confidence == pytest.approx(expected, abs=1e-6)
        assert change.closed is (expected < engine.settings.fact_contradiction_floor)
    stored = await engine.get_memory(user.id, veg.fact_id)
    assert expected < 0.2 and stored.valid_to is not None and stored.superseded_by is None
    assert stored.memory.confidence == pytest.approx(expected, abs=1e-6)
    hits = await engine.search(user.id, "is the user vegetarian", 10)
    assert veg.fact_id not in {h.memory.id for h in hits}
    # Nothing new was stored for the contradicting statements.
    assert [r["id"] for r in await _fact_rows(engine, user.id)] == [veg.fact_id]


async def test_ignore_changes_nothing(engine: MemoryEngine) -> None:
    user = await engine.create_user("di", None, "user")
    model = ScriptedMemoryModel(
        facts=_facts("The user says hello"),
        decide=lambda fact, shown: Decision(action=Action.IGNORE, reason="small talk"),
    )
    turn = await _turn(engine, user.id, "Hello there")
    version = await engine.db.fetchval("SELECT memory_version FROM users WHERE id = $1", user.id)
    [change] = await _consolidation(engine, model).learn_from_turn(
        user.id, turn.conversation_id, turn.message_seqs, job_id=7, model_id=None
    )
    assert change.action is Action.IGNORE and change.fact_id is None
    assert change.reason == "small talk"
    assert await _fact_rows(engine, user.id) == [] and await _audit(engine, user.id) == []
    after = await engine.db.fetchval("SELECT memory_version FROM users WHERE id = $1", user.id)
    assert after == version  # not even the user's cached searches were invalidated


async def test_an_id_the_model_was_not_shown_changes_nothing(engine: MemoryEngine) -> None:
    user = await engine.create_user("eve", None, "user")
    other = await engine.create_user("mallory", None, "user")
    model = ScriptedMemoryModel(facts=_facts("The user plays the cello", "The user likes tea"))
    _, changes = await _learn(engine, user.id, "I play the cello and like tea.", model)
    cello, tea = (c.fact_id for c in changes)
    theirs = await engine.store_memory(other.id, Fact(statement="The user plays the cello"))
    before = await _fact_rows(engine, user.id)
    audit_before = await _audit(engine, user.id)
    # Invented ids, a real fact of the user that was not among those shown (unrelated to the
    # candidate), and another user's fact: all refused before any write.
    for target in (uuid.uuid4(), tea, theirs.id):
        for action in (Action.REINFORCE, Action.UPDATE, Action.CONTRADICT):
            model.facts = _facts("The user plays the cello in an orchestra")
            model.decide = lambda fact, shown, a=action, t=target: Decision(action=a, target=t)
            with pytest.raises(LLMOutputInvalid):
                await _learn(engine, user.id, "I play cello in an orchestra.", model)
            shown = {n.id for n in model.calls[-1][1][1]}
            assert target not in shown and cello in shown
    # A target-less update and an add that names a target are refused too.
    for bad in (Decision(action=Action.UPDATE), Decision(action=Action.ADD, target=cello)):
        model.decide = lambda fact, shown, d=bad: d
        with pytest.raises(LLMOutputInvalid):
            await _learn(engine, user.id, "Cello again.", model)
    assert await _fact_rows(engine, user.id) == before
    assert await _audit(engine, user.id) == audit_before
    assert (await engine.get_memory(other.id, theirs.id)).reinforcement_count == 0


async def test_a_neighbour_of_another_user_is_never_shown(engine: MemoryEngine) -> None:
    ada = await engine.create_user("ada", None, "user")
    bob = await engine.create_user("bob", None, "user")
    for statement in ("The user lives in Lyon", "The user grew up near Lyon"):
        await engine.store_memory(bob.id, Fact(statement=statement, confidence=0.9))
    model = ScriptedMemoryModel(facts=_facts("The user lives in Lyon"))
    _, [change] = await _learn(engine, ada.id, "I live in Lyon.", model)
    assert change.action is Action.ADD  # bob's identical facts were not candidates
    assert model.calls[-1][1][1] == []
    # Row-level security stands behind the query's own user filter: acting for Ada, the
    # search for Bob's neighbours finds nothing although he has the closest facts.
    vectors = await engine.embed(["The user lives in Lyon"])
    rows = await engine.db.fetch(
        *bind(
            "similar_open_facts",
            user_id=bob.id,
            model_id=None,
            vector=np.asarray(vectors[0]),
            embedding_model=model_of(vectors),
            fetch=40,
            min_similarity=-1.0,
            neighbours=5,
        ),
        user_id=ada.id,
    )
    assert rows == []
    rows = await engine.db.fetch(
        *bind(
            "similar_open_facts",
            user_id=bob.id,
            model_id=None,
            vector=np.asarray(vectors[0]),
            embedding_model=model_of(vectors),
            fetch=40,
            min_similarity=-1.0,
            neighbours=5,
        ),
        user_id=bob.id,
    )
    assert len(rows) == 2


async def test_facts_are_consolidated_within_their_model_scope(engine: MemoryEngine) -> None:
    user = await engine.create_user("fay", None, "user")
    await engine.register_model("Qwen2.5-14B-Instruct", "llm")
    await engine.register_model("RealVisXL_V5.0", "image-generation")
    shared = await engine.store_memory(user.id, Fact(statement="The user likes jazz"))
    qwen = await engine.store_memory(
        user.id, Fact(statement="The user likes jazz music", model="Qwen2.5-14B-Instruct")
    )
    await engine.store_memory(
        user.id, Fact(statement="The user likes jazz records", model="RealVisXL_V5.0")
    )
    model = ScriptedMemoryModel(facts=_facts("The user likes jazz a lot"))
    _, [scoped] = await _learn(engine, user.id, "Jazz!", model, scope="Qwen2.5-14B-Instruct")
    assert {n.id for n in model.calls[-1][1][1]} == {qwen.id}
    learned = await engine.get_memory(user.id, scoped.fact_id)
    assert learned.model_id == qwen.model_id
    _, [plain] = await _learn(engine, user.id, "Jazz!", model, scope=None)
    assert {n.id for n in model.calls[-1][1][1]} == {shared.id}
    assert (await engine.get_memory(user.id, plain.fact_id)).model_id is None
    with pytest.raises(NotFound):
        await _learn(engine, user.id, "Jazz!", model, scope="no-such-model")


async def test_a_turn_learned_twice_is_applied_once(engine: MemoryEngine) -> None:
    user = await engine.create_user("gus", None, "user")
    model = ScriptedMemoryModel(facts=_facts("The user has a dog", "The user likes hiking"))
    turn, first = await _learn(engine, user.id, "I have a dog and I like hiking.", model)
    consolidation = _consolidation(engine, model)
    rows = await _fact_rows(engine, user.id)
    calls = model.count("consolidate")
    again = await consolidation.learn_from_turn(
        user.id, turn.conversation_id, turn.message_seqs, job_id="job-1", model_id=None
    )
    assert [c.model_copy(update={"replayed": False}) for c in again] == first
    assert all(c.replayed for c in again)
    assert model.count("consolidate") == calls  # no decision asked again
    assert await _fact_rows(engine, user.id) == rows
    # A job that failed after its first candidate is retried: the first is replayed, the
    # second applied once.
    model.facts = _facts("The user has a cat", "The user likes chess")
    turn2 = await _turn(engine, user.id, "I have a cat and like chess.")
    answers = iter(
        [Decision(action=Action.ADD), Decision(action=Action.IGNORE, target=uuid.uuid4())]
    )
    model.decide = lambda fact, shown: next(answers)
    with pytest.raises(LLMOutputInvalid):
        await consolidation.learn_from_turn(
            user.id, turn2.conversation_id, turn2.message_seqs, job_id="j", model_id=None
        )
    model.decide = add_or_reinforce
    retried = await consolidation.learn_from_turn(
        user.id, turn2.conversation_id, turn2.message_seqs, job_id="j", model_id=None
    )
    assert [c.replayed for c in retried] == [True, False]
    statements = [r["content"] for r in await _fact_rows(engine, user.id)]
    assert statements.count("The user has a cat") == 1 and "The user likes chess" in statements


async def test_bad_input_and_deleted_turns(engine: MemoryEngine) -> None:
    user = await engine.create_user("hal", None, "user")
    model = ScriptedMemoryModel(facts=_facts("The user likes tea"))
    consolidation = _consolidation(engine, model)
    turn = await _turn(engine, user.id, "I like tea")
    for seqs, field in (([], "seqs"), ([-1], "seqs"), ([True], "seqs"), ("01", "seqs")):
        with pytest.raises(InvalidInput) as bad:
            await consolidation.learn_from_turn(
                user.id, turn.conversation_id, seqs, job_id=None, model_id=None
            )
        assert bad.value.field == field
    with pytest.raises(InvalidInput):
        await consolidation.learn_from_turn(user.id, "not-a-uuid", [0], job_id=None, model_id=None)
    with pytest.raises(NotFound):
        await consolidation.learn_from_turn(
            uuid.uuid4(), turn.conversation_id, [0], job_id=None, model_id=None
        )
    # A turn deleted before its job ran: nothing to learn, no model call.
    await engine.delete_memory(user.id, turn.conversation_id)
    assert (
        await consolidation.learn_from_turn(
            user.id, turn.conversation_id, turn.message_seqs, job_id=None, model_id=None
        )
        == []
    )
    assert model.calls == [] and await _fact_rows(engine, user.id) == []


async def _learn_turn(
    engine: MemoryEngine, user_id: UUID, turn: Any, model: ScriptedMemoryModel, job: str
) -> Any:
    [change] = await _consolidation(engine, model).learn_from_turn(
        user_id, turn.conversation_id, turn.message_seqs, job_id=job, model_id=None
    )
    return change


async def test_a_turn_learned_late_goes_into_the_past_of_the_fact_that_holds(
    engine: MemoryEngine,
) -> None:
    """Turns learned out of order (jobs run in any order): Turin's turn, the later one, is
    learned first and replaces Rome; Milan's turn, said before Turin's, is learned next. What
    holds now is still Turin; Milan goes between Rome and Turin in the history."""
    user = await engine.create_user("lin", None, "user")
    model = ScriptedMemoryModel(facts=_facts("The user lives in Rome"))
    _, [rome] = await _learn(engine, user.id, "I live in Rome.", model)
    milan = await _turn(engine, user.id, "I moved to Milan.")
    turin = await _turn(engine, user.id, "I moved to Turin.")
    model.decide = act_on_closest(Action.UPDATE)
    model.facts = _facts("The user lives in Turin")
    moved = await _learn_turn(engine, user.id, turin, model, "Turin")
    assert moved.action is Action.UPDATE and moved.closed and not moved.backdated
    model.facts = _facts("The user lives in Milan")
    late = await _learn_turn(engine, user.id, milan, model, "Milan")
    # Shown the fact that holds (Turin), the model updated it; Turin stays open.
    assert late.action is Action.UPDATE and late.target == moved.fact_id
    assert late.backdated and not late.closed

    chain = await engine.fact_history(user.id, rome.fact_id)
    assert [m.id for m in chain] == [rome.fact_id, late.fact_id, moved.fact_id]
    assert [m.memory.statement for m in chain][-1] == "The user lives in Turin"
    assert [m.valid_to is None for m in chain] == [False, False, True]
    assert [m.superseded_by for m in chain] == [late.fact_id, moved.fact_id, None]
    # Each version ends when the next began, and they began in the turns' order.
    assert chain[0].valid_to == chain[1].valid_from and chain[1].valid_to == chain[2].valid_from
    assert chain[0].valid_from < chain[1].valid_from < chain[2].valid_from  # type: ignore[operator]
    assert await engine.fact_history(user.id, late.fact_id) == chain
    # Only the fact that holds is found.
    open_facts = (await engine.list_memories(user.id, types=["fact"])).items
    assert [f.id for f in open_facts] == [moved.fact_id]
    hits = await engine.search(user.id, "The user lives in Milan", 10)
    assert late.fact_id not in {h.memory.id for h in hits}
    assert moved.fact_id in {h.memory.id for h in hits}


async def test_a_turn_older_than_every_version_begins_the_history(engine: MemoryEngine) -> None:
    user = await engine.create_user("noa", None, "user")
    paris = await _turn(engine, user.id, "I live in Paris.")
    model = ScriptedMemoryModel(facts=_facts("The user lives in Rome"))
    _, [rome] = await _learn(engine, user.id, "I live in Rome.", model)
    model.decide = act_on_closest(Action.UPDATE)
    model.facts = _facts("The user lives in Turin")
    _, [turin] = await _learn(engine, user.id, "I moved to Turin.", model)
    model.facts = _facts("The user lives in Paris")
    late = await _learn_turn(engine, user.id, paris, model, "Paris")
    assert late.backdated and late.target == turin.fact_id
    chain = await engine.fact_history(user.id, turin.fact_id)
    assert [m.id for m in chain] == [late.fact_id, rome.fact_id, turin.fact_id]
    assert chain[0].valid_to == chain[1].valid_from and chain[0].superseded_by == rome.fact_id
    assert [m.valid_to is None for m in chain] == [False, False, True]


async def test_a_late_turn_that_repeats_the_version_of_its_time_adds_nothing(
    engine: MemoryEngine,
) -> None:
    user = await engine.create_user("oli", None, "user")
    model = ScriptedMemoryModel(facts=_facts("The user lives in Rome"))
    _, [rome] = await _learn(engine, user.id, "I live in Rome.", model)
    still = await _turn(engine, user.id, "I still live in Rome.")
    model.decide = act_on_closest(Action.UPDATE)
    model.facts = _facts("The user lives in Turin")
    _, [turin] = await _learn(engine, user.id, "I moved to Turin.", model)
    before = await _fact_rows(engine, user.id)
    model.facts = _facts("The user lives in Rome")
    late = await _learn_turn(engine, user.id, still, model, "still")
    assert late.action is Action.IGNORE and late.backdated and late.fact_id is None
    assert await _fact_rows(engine, user.id) == before
    assert [m.id for m in await engine.fact_history(user.id, rome.fact_id)] == [
        rome.fact_id,
        turin.fact_id,
    ]


async def test_a_late_turn_does_not_contradict_a_fact_that_began_after_it(
    engine: MemoryEngine,
) -> None:
    user = await engine.create_user("pia", None, "user")
    model = ScriptedMemoryModel(facts=_facts("The user lives in Rome"))
    await _learn(engine, user.id, "I live in Rome.", model)
    earlier = await _turn(engine, user.id, "I do not live in Turin.")
    model.decide = act_on_closest(Action.UPDATE)
    model.facts = _facts("The user lives in Turin")
    _, [turin] = await _learn(engine, user.id, "I moved to Turin.", model)
    before = await _fact_rows(engine, user.id)
    model.decide = act_on_closest(Action.CONTRADICT)
    model.facts = _facts("The user does not live in Turin", confidence=1.0)
    late = await _learn_turn(engine, user.id, earlier, model, "earlier")
    assert late.action is Action.IGNORE and late.backdated and late.target == turin.fact_id
    assert await _fact_rows(engine, user.id) == before
    # The same contradiction from a turn after Turin's lowers it.
    _, [now] = await _learn(engine, user.id, "I do not live in Turin any more.", model)
    assert now.action is Action.CONTRADICT and not now.backdated
    assert now.confidence is not None and turin.confidence is not None
    assert now.confidence < turin.confidence


async def test_history_reads(engine: MemoryEngine) -> None:
    user = await engine.create_user("ivy", None, "user")
    other = await engine.create_user("jon", None, "user")
    fact = await engine.store_memory(user.id, Fact(statement="Ivy likes tea"))
    assert [m.id for m in await engine.fact_history(user.id, fact.id)] == [fact.id]
    talk = await engine.store_memory(
        user.id, Conversation(messages=[Message(role="user", content="hi")])
    )
    with pytest.raises(InvalidInput) as not_fact:
        await engine.fact_history(user.id, talk.id)
    assert not_fact.value.field == "memory_id"
    for owner, memory in ((other.id, fact.id), (user.id, uuid.uuid4())):
        with pytest.raises(NotFound):
            await engine.fact_history(owner, memory)
    with pytest.raises(NotFound):
        await engine.fact_history(uuid.uuid4(), fact.id)


async def test_export_and_import_keep_validity_and_history(engine: MemoryEngine) -> None:
    user = await engine.create_user("kim", None, "user")
    model = ScriptedMemoryModel(facts=_facts("The user works at Acme"))
    await _learn(engine, user.id, "I work at Acme.", model)
    model.facts, model.decide = _facts("The user works at Globex"), act_on_closest(Action.UPDATE)
    _, [moved] = await _learn(engine, user.id, "I now work at Globex.", model)
    lines = [line async for line in engine.export_memories(user.id)]
    copy = await engine.create_user("kim2", None, "user")
    report = await engine.import_memories(copy.id, lines)
    assert report.error_count == 0 and report.created["fact"] == 2
    facts = (await engine.list_memories(copy.id, types=["fact"])).items
    assert [f.memory.statement for f in facts] == ["The user works at Globex"]
    [history] = [await engine.fact_history(copy.id, facts[0].id)]
    assert [m.memory.statement for m in history] == [
        "The user works at Acme",
        "The user works at Globex",
    ]
    old, new = history
    assert old.valid_to is not None and old.superseded_by == new.id and new.valid_to is None
    original = await engine.fact_history(user.id, moved.fact_id)
    assert [(m.valid_from, m.valid_to) for m in history] == [
        (m.valid_from, m.valid_to) for m in original
    ]
    hits = await engine.search(copy.id, "where does the user work", 10)
    assert old.id not in {h.memory.id for h in hits}
    # Importing it again changes nothing; a restore into the same user keeps the ids.
    again = await engine.import_memories(copy.id, lines)
    assert again.unchanged == report.lines and again.created == {}


class _TogetherModel(ScriptedMemoryModel):
    """Finds "The user lives in X" in "I moved to X."; holds the first ``together``
    decisions until all of them are made: concurrent jobs decide on the same facts before any
    of them writes."""

    def __init__(self, together: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.together = together
        self.arrived = 0
        self.all_in = asyncio.Event()

    async def extract_facts(self, messages: Any, *, speaker: str | None = None) -> Any:
        city = messages[0].text.removeprefix("user: I moved to ").rstrip(".")
        return _facts(f"The user lives in {city}")

    async def consolidate(self, fact: FactCandidate, neighbours: Any) -> Decision:
        decision = await super().consolidate(fact, neighbours)
        self.arrived += 1
        if self.arrived == self.together:
            self.all_in.set()
        if self.arrived <= self.together:
            await self.all_in.wait()
        return decision


async def test_concurrent_updates_of_one_fact_keep_one_open_and_all_history(
    engine: MemoryEngine,
) -> None:
    user = await engine.create_user("kai", None, "user")
    first = ScriptedMemoryModel(facts=_facts("The user lives in Rome"))
    _, [rome] = await _learn(engine, user.id, "I live in Rome.", first)
    model = _TogetherModel(2, decide=act_on_closest(Action.UPDATE))
    turns = [await _turn(engine, user.id, f"I moved to {city}.") for city in ("Milan", "Turin")]
    results = await asyncio.gather(
        *(
            _consolidation(engine, model).learn_from_turn(
                user.id, turn.conversation_id, turn.message_seqs, job_id="j", model_id=None
            )
            for turn in turns
        )
    )
    # Both were shown Rome and chose to update it; the second to write found it closed and
    # went round again: shown the first one's new fact, it updated that one.
    assert model.count("consolidate") == 3
    assert all(change.action is Action.UPDATE for [change] in results)
    shown = [args[1] for name, args in model.calls if name == "consolidate"]
    assert [n.id for n in shown[0]] == [n.id for n in shown[1]] == [rome.fact_id]
    assert rome.fact_id not in {n.id for n in shown[2]}
    rows = await _fact_rows(engine, user.id)
    assert len(rows) == 3 and sum(r["valid_to"] is None for r in rows) == 1
    chain = await engine.fact_history(user.id, rome.fact_id)
    assert len(chain) == 3 and chain[0].id == rome.fact_id and chain[-1].valid_to is None


async def test_a_target_rewritten_while_the_model_decides_is_decided_again(
    engine: MemoryEngine,
) -> None:
    """The model decides outside any transaction (seconds, for an LLM): a PATCH of the
    target's statement in that time was not seen by the write, which checked only that the
    target was still open. The turn's evidence about Rome contradicted the user's own
    correction to Milan (lowered it below the floor: closed), or a "reinforce" of Rome raised
    Milan. A target whose statement is not the one the model was shown now sends the
    candidate round again, and the model decides on what the fact says now."""
    user = await engine.create_user("quinn", None, "user")
    rome = await engine.store_memory(
        user.id, Fact(statement="The user lives in Rome", confidence=0.3)
    )
    corrected = "The user lives in Rome, Georgia"
    shown: list[list[str]] = []

    def decide(fact: FactCandidate, neighbours: Any) -> Decision:
        shown.append([n.statement for n in neighbours])
        if len(shown) == 1:  # the user corrects the fact while the model is deciding
            task = asyncio.get_running_loop().create_task(
                engine.update_memory(user.id, rome.id, {"statement": corrected})
            )
            pending.append(task)
        said = {n.statement: n.id for n in neighbours}
        if "The user lives in Rome" in said:
            return Decision(action=Action.CONTRADICT, target=said["The user lives in Rome"])
        return Decision(action=Action.IGNORE, reason="about another Rome")

    pending: list[asyncio.Task[Any]] = []

    class _Model(ScriptedMemoryModel):
        async def consolidate(self, fact: FactCandidate, neighbours: Any) -> Decision:
            decision = await super().consolidate(fact, neighbours)
            if pending:
                await pending[0]  # the PATCH commits before the decision is written
            return decision

    model = _Model(
        facts=_facts("The user does not live in Rome any more", confidence=1.0), decide=decide
    )
    _, [change] = await _learn(engine, user.id, "I left Rome.", model)
    [row] = await _fact_rows(engine, user.id)
    assert (row["content"], row["valid_to"]) == (corrected, None)
    assert row["confidence"] == pytest.approx(0.3)
    assert change.action is Action.IGNORE and change.fact_id is None
    assert shown == [["The user lives in Rome"], [corrected]]


@pytest.mark.parametrize("action", [Action.ADD, Action.IGNORE])
async def test_a_conversation_deleted_while_the_model_decides_is_not_found(
    engine: MemoryEngine, action: Action
) -> None:
    """The conversation a turn's facts come from, deleted while the model decides: the write
    failed on the learning record's foreign key ("a row it refers to does not exist"), and
    the job with it, where a turn of a conversation deleted before the job learns nothing.
    Now the conversation is looked up (and held) in the write's transaction: nothing learned,
    nothing kept, no error."""
    user = await engine.create_user(f"gone{action.value}", None, "user")

    def decide(fact: FactCandidate, neighbours: Any) -> Decision:
        return Decision(action=action, reason="scripted")

    class _Model(ScriptedMemoryModel):
        async def consolidate(self, fact: FactCandidate, neighbours: Any) -> Decision:
            decision = await super().consolidate(fact, neighbours)
            await engine.delete_memory(user.id, turn.conversation_id)  # meanwhile
            return decision

    model = _Model(facts=_facts("The user keeps bees"), decide=decide)
    turn = await _turn(engine, user.id, "I keep bees.")
    changes = await _consolidation(engine, model).learn_from_turn(
        user.id, turn.conversation_id, turn.message_seqs, job_id="job-gone", model_id=None
    )
    assert changes == [] and await _fact_rows(engine, user.id) == []
