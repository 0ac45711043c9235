"""Learning from conversations off the write path (issue #14): the jobs a write queues, and
the handlers that run them with a :class:`~halldyll_ray.llm.protocol.MemoryModel`.

With MEMORY_EXTRACTION=background, a turn (``record_turn``), a stored conversation and an
append queue, in their own transaction, an ``extract`` job (the written messages' seqs), and
a turn of a session queues a ``summarize`` job every SESSION_SUMMARY_EVERY_N_TURNS turns
(:class:`LearningQueue`). :class:`Learning` runs them: ``extract`` consolidates the facts the
model finds with the user's stored facts, ``summarize`` rewrites the session's summary with the
model's and rolls quiet sessions up into period summaries. With the heuristic model (no LLM)
the same jobs run rule-based extraction, merge-by-similarity and extractive summaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from halldyll_ray.components.jobs import JobQueue
from halldyll_ray.errors import InvalidInput
from halldyll_ray.llm.protocol import MemoryModel
from halldyll_ray.models import Job, MessageRole, StoredMessage

if TYPE_CHECKING:
    from halldyll_ray.components.consolidation import Change, Consolidation
    from halldyll_ray.components.summaries import Summaries

#: The job kinds of this module.
EXTRACT = "extract"
SUMMARIZE = "summarize"
#: Messages one consolidation pass reads (a stored conversation can hold thousands; a model's
#: context cannot): a longer job is learned from in windows of this many, in order.
EXTRACT_WINDOW = 20


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    conversation_id: UUID
    model_id: UUID | None = None
    session_id: str | None = None


class ExtractPayload(_Payload):
    """An ``extract`` job's input: which messages of which conversation."""

    seqs: list[int] = Field(min_length=1, max_length=20_000)


class SummarizePayload(_Payload):
    """A ``summarize`` job's input: the session and its log."""

    session_id: str
    turns: int = Field(ge=1, description="The turn count that queued it.")


_P = TypeVar("_P", bound=_Payload)


def _payload(kind: type[_P], job: Job) -> _P:
    try:
        return kind.model_validate(job.payload)
    except ValidationError as exc:
        raise InvalidInput(f"bad {job.kind} job payload: {exc.errors()[0]['msg']}") from None


class LearningQueue:
    """Queues the learning jobs of a write, in the write's transaction (background mode).

    Args:
        jobs: The queue.
        summarize_every: SESSION_SUMMARY_EVERY_N_TURNS.
    """

    def __init__(self, jobs: JobQueue, *, summarize_every: int) -> None:
        self.jobs = jobs
        self.summarize_every = summarize_every

    async def after_write(
        self,
        conn: asyncpg.Connection,
        *,
        user_id: UUID,
        conversation_id: UUID,
        messages: Sequence[StoredMessage],
        model_id: UUID | None,
        session_id: str | None,
        request_id: str | None,
        extract: bool = True,
        session_turn: bool = False,
    ) -> list[UUID]:
        """The jobs for ``messages`` just written to a conversation; their ids.

        Args:
            conn: The write's connection, in its transaction, acting as the user.
            extract: Queue fact extraction (when a user's message is among them).
            session_turn: A turn of a session's log: queue the summary every N turns.
        """
        ids: list[UUID] = []
        if not messages:
            return ids
        common: dict[str, Any] = {
            "conversation_id": str(conversation_id),
            "model_id": None if model_id is None else str(model_id),
            "session_id": session_id,
        }
        if extract and any(m.role is MessageRole.USER for m in messages):
            payload = {**common, "seqs": [m.seq for m in messages]}
            ids.append(
                await self.jobs.enqueue(conn, user_id, EXTRACT, payload, request_id=request_id)
            )
        turns = (messages[-1].seq + 1) // 2
        if session_turn and session_id is not None and turns % self.summarize_every == 0:
            payload = {**common, "turns": turns}
            ids.append(
                await self.jobs.enqueue(conn, user_id, SUMMARIZE, payload, request_id=request_id)
            )
        return ids


class Learning:
    """The handlers of ``extract`` and ``summarize`` jobs.

    ``extract`` runs :meth:`Consolidation.learn_from_turn
    <halldyll_ray.components.consolidation.Consolidation.learn_from_turn>` over the job's
    messages (the model's add / reinforce / update / contradict / ignore, each audited with the
    job and the turn); ``summarize`` rewrites the session's summary with the model
    (:meth:`Summaries.refresh_session
    <halldyll_ray.components.summaries.Summaries.refresh_session>`), then rolls the user's quiet
    sessions up into period summaries (:meth:`Summaries.roll_up
    <halldyll_ray.components.summaries.Summaries.roll_up>`, idempotent).

    Args:
        consolidation: Learns facts from a turn with the memory model.
        summaries: Writes session and period summaries with the memory model.
        model: The memory model (an LLM's, or the heuristic one); named in job results.
    """

    def __init__(
        self, consolidation: Consolidation, summaries: Summaries, model: MemoryModel
    ) -> None:
        self.consolidation = consolidation
        self.summaries = summaries
        self.model = model

    def register(self, jobs: JobQueue) -> None:
        """Run this module's job kinds on ``jobs``' workers."""
        jobs.register(EXTRACT, self.extract)
        jobs.register(SUMMARIZE, self.summarize)

    async def extract(self, job: Job) -> dict[str, Any]:
        """Facts the model finds in the job's messages, consolidated with the user's facts.

        Returns:
            ``{"model", "changes": [Change, ...], "fact_ids"}`` (JSON; ``fact_ids``: the facts
            written or touched, without repeats).

        Raises:
            NotFound: the conversation (or those messages) no longer exists: nothing to do.
            LLMUnavailable, LLMOutputInvalid: from the model (the try is retried).
        """
        payload = _payload(ExtractPayload, job)
        changes: list[Change] = []
        for start in range(0, len(payload.seqs), EXTRACT_WINDOW):
            changes += await self.consolidation.learn_from_turn(
                job.user_id,
                payload.conversation_id,
                payload.seqs[start : start + EXTRACT_WINDOW],
                job_id=job.id,
                model_id=payload.model_id,
                request_id=job.request_id,
            )
        fact_ids = list(dict.fromkeys(str(c.fact_id) for c in changes if c.fact_id is not None))
        return {
            "model": self.model.name,
            "changes": [c.model_dump(mode="json") for c in changes],
            "fact_ids": fact_ids,
        }

    async def summarize(self, job: Job) -> dict[str, Any]:
        """The session's summary, rewritten by the model; then the quiet sessions rolled up.

        Returns:
            ``{"model", "summary_id", "period_ids"}``.

        Raises:
            NotFound: the session's log no longer exists.
            LLMUnavailable, LLMOutputInvalid: from the model (the try is retried).
        """
        payload = _payload(SummarizePayload, job)
        summary_id = await self.summaries.refresh_session(
            job.user_id,
            payload.session_id,
            payload.conversation_id,
            payload.model_id,
            job_id=job.id,
            request_id=job.request_id,
        )
        periods = await self.summaries.roll_up(
            job.user_id, job_id=job.id, model_id=payload.model_id, request_id=job.request_id
        )
        return {
            "model": self.model.name,
            "summary_id": str(summary_id),
            "period_ids": [str(p) for p in periods],
        }
