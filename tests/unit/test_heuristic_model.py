"""The no-LLM memory model (issue #14 §5): the inline path's rules behind the protocol."""

from __future__ import annotations

import uuid

import pytest

from halldyll_ray.config import Settings
from halldyll_ray.llm.heuristic import (
    CANDIDATE_CONFIDENCE,
    MAX_CANDIDATES,
    HeuristicMemoryModel,
    as_line,
)
from halldyll_ray.llm.protocol import (
    Action,
    DatedText,
    FactCandidate,
    LLMOutputInvalid,
    MemoryModel,
    Neighbour,
    checked,
)
from halldyll_ray.models import FactKind
from halldyll_ray.textproc import Line, extract_candidate_facts, extractive_summary

MODEL = HeuristicMemoryModel(merge_similarity=0.9)


def _said(*texts: str) -> list[DatedText]:
    return [DatedText(text=t) for t in texts]


def test_it_is_a_memory_model() -> None:
    model: MemoryModel = MODEL  # mypy checks the protocol; this checks the attributes
    assert model.name == "heuristic"
    settings = Settings.from_env(fact_merge_similarity=0.95)
    assert HeuristicMemoryModel.from_settings(settings).merge_similarity == 0.95


async def test_facts_are_the_inline_candidates() -> None:
    message = "My name is Ada and I live in Lyon. Maybe I like jazz? I really love green tea."
    found = await MODEL.extract_facts(_said(message), speaker="Ada")
    assert [c.statement for c in found] == extract_candidate_facts(message)
    assert [c.statement for c in found] == [
        "The user's name is Ada",
        "The user lives in Lyon",
        "The user loves green tea",
    ]
    assert {(c.kind, c.confidence) for c in found} == {(FactKind.EPHEMERAL, CANDIDATE_CONFIDENCE)}


async def test_facts_are_deduplicated_across_messages_and_bounded() -> None:
    found = await MODEL.extract_facts(_said("I live in Lyon.", "i live in lyon!", "Hello there."))
    assert [c.statement for c in found] == ["The user lives in Lyon"]
    many = _said(*(f"I live in town number {i}. I work at shop {i}." for i in range(30)))
    assert len(await MODEL.extract_facts(many)) == MAX_CANDIDATES
    assert await MODEL.extract_facts([]) == []


def _near(statement: str, similarity: float) -> Neighbour:
    return Neighbour(id=uuid.uuid4(), statement=statement, confidence=0.5, similarity=similarity)


async def test_consolidate_reinforces_the_nearest_close_enough_fact_else_adds() -> None:
    fact = FactCandidate(statement="The user lives in Lyon")
    close, closer = _near("User lives in Lyon, France", 0.91), _near("The user is in Lyon", 0.95)
    decision = await MODEL.consolidate(fact, [close, _near("The user likes tea", 0.2), closer])
    assert (decision.action, decision.target) == (Action.REINFORCE, closer.id)
    far = await MODEL.consolidate(fact, [_near("The user lives in Paris", 0.89)])
    assert (far.action, far.target, far.statement) == (Action.ADD, None, None)
    assert (await MODEL.consolidate(fact, [])).action is Action.ADD
    # The same statement in another form reinforces, whatever the similarity says.
    same = _near("the user LIVES in Lyon.", 0.5)
    decision = await MODEL.consolidate(fact, [_near("x", 0.99), same])
    assert (decision.action, decision.target) == (Action.REINFORCE, same.id)
    # Its decisions pass the protocol's target check (an invented target would not).
    assert checked(decision, [same]) == decision
    with pytest.raises(LLMOutputInvalid):
        checked(decision, [close])


async def test_consolidate_compares_what_the_encoder_cannot_read() -> None:
    """As a store does: words the encoder reads as unknown are particulars."""

    def unknown(text: str) -> list[str]:  # what all-MiniLM-L6-v2 does to emoji
        return [c for c in text if ord(c) > 0xFFFF]

    reading = HeuristicMemoryModel(merge_similarity=0.92, unknown_spans=unknown)
    pizza = _near("I love \U0001f355", 1.0)
    burger = FactCandidate(statement="I love \U0001f354")
    assert (await reading.consolidate(burger, [pizza])).action is Action.ADD
    again = FactCandidate(statement="I really love \U0001f355")
    assert (await reading.consolidate(again, [pizza])).target == pizza.id
    # Without the encoder's view the two read alike and merge.
    assert (await MODEL.consolidate(burger, [pizza])).target == pizza.id


async def test_summaries_are_the_inline_extractive_summary() -> None:
    conversation = [
        ("user", "I am planning a trip to Japan next spring with my sister."),
        ("assistant", "Japan in spring is lovely; the cherry blossoms peak in early April."),
        ("user", "We want to see the cherry blossoms in Kyoto and eat ramen in Tokyo."),
        ("assistant", "Book Kyoto hotels early, cherry blossom season fills them fast."),
    ]
    rendered = _said(*(f"{role}: {text}" for role, text in conversation))
    expected = extractive_summary([Line(role, text) for role, text in conversation])
    assert await MODEL.summarize(rendered, max_words=300) == expected
    assert expected.startswith("user: I am planning a trip")
    short = await MODEL.summarize(rendered, max_words=12)
    assert len(short.split()) == 12 and expected.startswith(short)
    assert await MODEL.summarize(_said("user: hi"), max_words=50) == ""


async def test_roll_up_keeps_the_central_lines_of_the_summaries() -> None:
    first = "user: I am planning a trip to Japan with my sister.\nassistant: Kyoto in spring."
    second = "user: The trip to Japan is booked for April with my sister."
    rolled = await MODEL.roll_up(_said(first, second), max_words=200)
    assert rolled.splitlines()[0] == "user: I am planning a trip to Japan with my sister."
    assert all(line.split(": ", 1)[0] in {"user", "assistant"} for line in rolled.splitlines())
    assert len((await MODEL.roll_up(_said(first, second), max_words=5)).split()) == 5


def test_rendered_lines() -> None:
    assert as_line("assistant: fine") == Line("assistant", "fine")
    assert as_line("Note: not a role") == Line("user", "Note: not a role")
    # A named speaker keeps the role: "Halbot: Tea it is" was read as the user's line.
    assert as_line("assistant (Halbot): Tea it is") == Line("assistant", "Tea it is")
    assert as_line("user (Carol): I prefer tea") == Line("user", "I prefer tea")
    assert as_line("user (Carol): a\nb: c") == Line("user", "a\nb: c")
    with pytest.raises(ValueError):
        HeuristicMemoryModel(merge_similarity=0)
