"""What background memory jobs ask of a language model, and the shapes of its answers (#14).

Two implementations answer :class:`MemoryModel`: the LLM-backed one (``halldyll_ray.llm``'s
client behind an OpenAI-compatible endpoint or a Ray Serve handle) and the heuristic one (the
rule-based extraction and extractive summaries the product has without an LLM). Jobs call only
this protocol, so both are driven by the same queue, permission checks and audit trail.

Every answer is validated on our side whatever the server claims about structured output: a
:class:`~halldyll_ray.llm.protocol.Decision` naming a memory the model was not shown is refused
(:class:`LLMOutputInvalid`), because peers corrupt or drop memories when an LLM invents an id.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Protocol
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

from halldyll_ray.errors import HalldyllError, Unavailable
from halldyll_ray.models import FactKind, FactText, check_text, storable
from halldyll_ray.textproc import article


class LLMUnavailable(Unavailable):
    """The LLM endpoint could not be reached or kept failing (timeouts, 5xx, 429): retry later."""


class LLMOutputInvalid(HalldyllError):
    """The model answered, but not in the required shape (bad JSON, schema, or an unknown id)."""

    code = "llm_output_invalid"


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: A fact's statement as a model gives it: what a client's must be (stripped, 1 to
#: MAX_FACT_CHARS characters, something visible: :data:`~halldyll_ray.models.FactText`) and
#: storable (no NUL, no lone UTF-16 surrogate). Only the length was checked: a statement of
#: zero-width spaces or holding a NUL passed here and broke the job that stored it with a
#: bare pydantic ValidationError instead of LLMOutputInvalid (kodus-ai/kodus-ai#1683: LLM
#: answers carry U+0000).
Statement = Annotated[FactText, AfterValidator(check_text)]


def _as_storable(value: object) -> object:
    return storable(value) if isinstance(value, str) else value


#: A model's free text kept only as a record (a decision's reason, stored with what the turn
#: taught): a NUL or a lone surrogate in it is replaced (:func:`~halldyll_ray.models.storable`),
#: not refused, so that the decision stands. A NUL failed the whole turn's learning with a
#: database error on the record.
Reason = Annotated[str, BeforeValidator(_as_storable), StringConstraints(max_length=500)]


class FactCandidate(_Answer):
    """A fact a model found in a conversation, about the user, before consolidation."""

    statement: Statement
    kind: FactKind = FactKind.PERMANENT
    confidence: float = Field(default=0.7, ge=0.0, le=1.0)


class Neighbour(_Answer):
    """A stored fact similar to a candidate, shown to the model as a consolidation target."""

    id: UUID
    statement: str
    confidence: float
    similarity: float = Field(description="Cosine similarity to the candidate, in [-1, 1].")


class Action(StrEnum):
    """What consolidation does with a candidate (mem0's ADD/UPDATE/DELETE/NONE, refined)."""

    ADD = "add"  # new knowledge: stored as a new fact
    REINFORCE = "reinforce"  # the target says the same: its confidence rises
    UPDATE = "update"  # the target is superseded: closed (valid_to), the new statement stored
    CONTRADICT = "contradict"  # the target is contradicted: its confidence lowered or closed
    IGNORE = "ignore"  # nothing worth keeping


class Decision(_Answer):
    """The consolidation decision for one candidate.

    ``target`` is required for reinforce/update/contradict and must be the id of one of the
    neighbours shown; ``statement`` is the text to store for add/update (defaults to the
    candidate's). :func:`checked` enforces both.
    """

    action: Action
    target: UUID | None = None
    statement: Statement | None = None
    reason: Reason = ""


def checked(decision: Decision, neighbours: Sequence[Neighbour]) -> Decision:
    """``decision`` if its target is one of ``neighbours``' ids, else raise LLMOutputInvalid."""
    needs_target = decision.action in (Action.REINFORCE, Action.UPDATE, Action.CONTRADICT)
    if needs_target:
        if decision.target is None:
            raise LLMOutputInvalid(
                f"{article(decision.action.value)} decision must name its target"
            )
        if decision.target not in {n.id for n in neighbours}:
            raise LLMOutputInvalid(
                f"the {decision.action.value} target is not one of the facts shown",
                target=str(decision.target),
            )
    elif decision.target is not None:
        raise LLMOutputInvalid(f"{article(decision.action.value)} decision takes no target")
    return decision


class DatedText(_Answer):
    """A summary (or a message) with the time it covers, as the roll-up sees it."""

    text: str
    start: datetime | None = None
    end: datetime | None = None
    role: str | None = Field(
        default=None,
        description="Who wrote a message (user, assistant, system, tool); None: not a message "
        "or not known. Models that read first-person text about the user read the user's only.",
    )


class Usage(_Answer):
    """Tokens one call consumed, as the server reported them (0 when it reports none)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class MemoryModel(Protocol):
    """What the background jobs need from a model; both implementations are real.

    ``name`` identifies the implementation in audit rows and job results (``heuristic`` or the
    served model's id). Methods raise :class:`LLMUnavailable` (retryable) or
    :class:`LLMOutputInvalid` (counts as a failed try of the job).
    """

    name: str

    async def extract_facts(
        self, messages: Sequence[DatedText], *, speaker: str | None = None
    ) -> list[FactCandidate]:
        """Facts about the user stated in ``messages`` (oldest first), at most 20."""
        ...

    async def consolidate(self, fact: FactCandidate, neighbours: Sequence[Neighbour]) -> Decision:
        """Decide what ``fact`` does to the stored ``neighbours``; the result is :func:`checked`."""
        ...

    async def summarize(self, messages: Sequence[DatedText], *, max_words: int) -> str:
        """A summary of one session's messages in at most ``max_words`` words."""
        ...

    async def roll_up(self, summaries: Sequence[DatedText], *, max_words: int) -> str:
        """One period summary covering ``summaries`` (oldest first) in at most ``max_words``."""
        ...
