"""A :class:`~halldyll_ray.llm.protocol.MemoryModel` whose answers a test writes down.

Not a fake of a service: it stands for a model's *decisions*, the pure-logic input of
consolidation and roll-ups, so a test can say "the model finds these facts and decides this"
and check what the storage does with it. The real models (the LLM-backed one, on recorded and
live responses, and the heuristic one) are tested by their own suites. Every call is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from halldyll_ray.llm.protocol import (
    Action,
    DatedText,
    Decision,
    FactCandidate,
    Neighbour,
)

Decide = Callable[[FactCandidate, Sequence[Neighbour]], Decision]


def add_or_reinforce(fact: FactCandidate, neighbours: Sequence[Neighbour]) -> Decision:
    """Reinforce an exact restatement among the neighbours, else add."""
    for neighbour in neighbours:
        if neighbour.statement.casefold() == fact.statement.casefold():
            return Decision(action=Action.REINFORCE, target=neighbour.id, reason="same")
    return Decision(action=Action.ADD, reason="new")


def act_on_closest(action: Action) -> Decide:
    """``action`` on the closest neighbour shown (add when none is shown)."""

    def decide(fact: FactCandidate, neighbours: Sequence[Neighbour]) -> Decision:
        if not neighbours:
            return Decision(action=Action.ADD, reason="nothing close")
        return Decision(action=action, target=neighbours[0].id, reason=f"{action.value} closest")

    return decide


def words(text: str, limit: int) -> str:
    return " ".join(text.split()[:limit])


@dataclass
class ScriptedMemoryModel:
    """Answers from the test's script; ``calls`` lists (method, arguments) in order."""

    facts: list[FactCandidate] = field(default_factory=list)
    decide: Decide = add_or_reinforce
    name: str = "scripted"
    calls: list[tuple[str, Any]] = field(default_factory=list)

    async def extract_facts(
        self, messages: Sequence[DatedText], *, speaker: str | None = None
    ) -> list[FactCandidate]:
        self.calls.append(("extract_facts", (list(messages), speaker)))
        return list(self.facts)

    async def consolidate(self, fact: FactCandidate, neighbours: Sequence[Neighbour]) -> Decision:
        self.calls.append(("consolidate", (fact, list(neighbours))))
        return self.decide(fact, neighbours)

    async def summarize(self, messages: Sequence[DatedText], *, max_words: int) -> str:
        """The session's messages, joined, cut to ``max_words`` words."""
        self.calls.append(("summarize", (list(messages), max_words)))
        return words(" ".join(m.text for m in messages), max_words)

    async def roll_up(self, summaries: Sequence[DatedText], *, max_words: int) -> str:
        """The first six words of each summary, joined, cut to ``max_words`` words."""
        self.calls.append(("roll_up", (list(summaries), max_words)))
        return words(" ; ".join(words(s.text, 6) for s in summaries), max_words)

    def count(self, method: str) -> int:
        return sum(1 for name, _ in self.calls if name == method)
