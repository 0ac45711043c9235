"""The memory model without an LLM: rule-based facts, extractive summaries, similarity merges.

:class:`HeuristicMemoryModel` answers :class:`~halldyll_ray.llm.protocol.MemoryModel` with the
logic the product had before LLMs (:mod:`halldyll_ray.textproc`), so the background jobs run
the same way with or without a configured LLM, and ``record_turn``'s inline path and its
background path with this model write the same facts and the same summary.

Messages are read as the jobs render them: a message's text may start with its role
(``"user: ..."``, ``"assistant: ..."``), which the summaries keep, as the inline summary does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from halldyll_ray.config import Settings
from halldyll_ray.llm.protocol import (
    Action,
    DatedText,
    Decision,
    FactCandidate,
    Neighbour,
    checked,
)
from halldyll_ray.models import FactKind, MessageRole
from halldyll_ray.textproc import (
    Line,
    extract_candidate_facts,
    extractive_summary,
    normalize_statement,
    same_particulars,
)

#: Confidence of a fact found by the patterns: the inline path's (a single mention).
CANDIDATE_CONFIDENCE = 0.3
#: Most candidates one call returns (the protocol's bound).
MAX_CANDIDATES = 20
#: Candidates taken from one message (as record_turn's inline extraction).
PER_MESSAGE = 5
_ROLES = tuple(role.value for role in MessageRole)


#: A rendered message: ``"<role>: <content>"``, or ``"<role> (<name>): <content>"`` for a
#: named speaker (summaries.py renders both).
_RENDERED = re.compile(r"(?P<role>[a-z]+)(?: \((?P<name>[^)\n]*)\))?: (?P<content>.*)", re.DOTALL)


def as_line(text: str) -> Line:
    """A rendered message as the summariser's Line (the speaker's name left out, as the
    inline summary leaves it); a text without a known role prefix is a user's line (what a
    summary most needs to keep). A named assistant's turn was read as the user's when the
    name stood where the role does."""
    match = _RENDERED.fullmatch(text)
    if match is not None and match["role"] in _ROLES:
        return Line(match["role"], match["content"])
    return Line(MessageRole.USER.value, text)


def _limit_words(text: str, max_words: int) -> str:
    """``text`` cut to ``max_words`` words: whole lines first, then the last line's words."""
    kept: list[str] = []
    used = 0
    for line in text.splitlines():
        words = line.split()
        if used + len(words) > max_words:
            room = max_words - used
            if room > 0:
                kept.append(" ".join(words[:room]))
            break
        kept.append(line)
        used += len(words)
    return "\n".join(kept)


class HeuristicMemoryModel:
    """The no-LLM :class:`~halldyll_ray.llm.protocol.MemoryModel`.

    Args:
        merge_similarity: Cosine similarity at or above which a candidate reinforces its
            nearest stored fact (FACT_MERGE_SIMILARITY, the store's own merge rule).
        unknown_spans: The encoder's ``unknown_spans`` (:class:`~halldyll_ray.embedding.
            encoder.TextEncoder`): what it reads as unknown must be the same for a merge, as
            in a store.
    """

    name = "heuristic"

    def __init__(
        self,
        *,
        merge_similarity: float = 0.92,
        unknown_spans: Callable[[str], Sequence[str]] | None = None,
    ) -> None:
        if not 0.0 < merge_similarity <= 1.0:
            raise ValueError("merge_similarity must be in (0, 1]")
        self.merge_similarity = merge_similarity
        self.unknown_spans = unknown_spans

    @classmethod
    def from_settings(
        cls, settings: Settings, unknown_spans: Callable[[str], Sequence[str]] | None = None
    ) -> HeuristicMemoryModel:
        return cls(merge_similarity=settings.fact_merge_similarity, unknown_spans=unknown_spans)

    async def extract_facts(
        self, messages: Sequence[DatedText], *, speaker: str | None = None
    ) -> list[FactCandidate]:
        """First-person statements of ``messages`` as ephemeral, low-confidence facts about
        the user (:func:`~halldyll_ray.textproc.extract_candidate_facts`, at most five per
        message, twenty in all, each statement once). ``speaker`` is not used: the patterns
        read first-person text, so only the user's messages are read (``role`` user or
        unknown): an assistant's "I am glad" is not a fact about the user."""
        found: dict[str, FactCandidate] = {}
        for message in messages:
            if message.role not in (None, "user"):
                continue
            for statement in extract_candidate_facts(message.text, limit=PER_MESSAGE):
                found.setdefault(
                    normalize_statement(statement),
                    FactCandidate(
                        statement=statement,
                        kind=FactKind.EPHEMERAL,
                        confidence=CANDIDATE_CONFIDENCE,
                    ),
                )
                if len(found) >= MAX_CANDIDATES:
                    return list(found.values())
        return list(found.values())

    async def consolidate(self, fact: FactCandidate, neighbours: Sequence[Neighbour]) -> Decision:
        """Reinforce the nearest neighbour when it says the same (the same normalised
        statement, or a similarity of at least ``merge_similarity`` with the same numbers,
        dates, negations and names: :func:`~halldyll_ray.textproc.same_particulars`); else
        add."""
        key = normalize_statement(fact.statement)
        same = [n for n in neighbours if normalize_statement(n.statement) == key]
        if same:
            target = max(same, key=lambda n: n.similarity)
            return checked(
                Decision(action=Action.REINFORCE, target=target.id, reason="same statement"),
                neighbours,
            )
        nearest = max(neighbours, key=lambda n: n.similarity, default=None)
        if (
            nearest is not None
            and nearest.similarity >= self.merge_similarity
            and same_particulars(nearest.statement, fact.statement, self.unknown_spans)
        ):
            return checked(
                Decision(
                    action=Action.REINFORCE,
                    target=nearest.id,
                    reason=f"similarity {nearest.similarity:.3f} >= {self.merge_similarity}",
                ),
                neighbours,
            )
        return Decision(action=Action.ADD, reason="no stored fact says the same")

    async def summarize(self, messages: Sequence[DatedText], *, max_words: int) -> str:
        """The session's most central sentences in their order, ``"<role>: <sentence>"`` a
        line (:func:`~halldyll_ray.textproc.extractive_summary`), at most ``max_words``
        words; empty when no sentence is long enough to keep."""
        text = extractive_summary([as_line(m.text) for m in messages])
        return _limit_words(text, max_words)

    async def roll_up(self, summaries: Sequence[DatedText], *, max_words: int) -> str:
        """One summary of ``summaries``: the most central of their lines, in order."""
        lines = [as_line(line) for s in summaries for line in s.text.splitlines() if line.strip()]
        text = extractive_summary(lines, max_sentences=12, max_chars=3000)
        return _limit_words(text, max_words)
