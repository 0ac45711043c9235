"""Learning from conversations off the write path (issue #14): the jobs a write queues, and
the handlers that run them with a :class:`~halldyll_ray.llm.protocol.MemoryModel`.

With MEMORY_EXTRACTION=background, a turn (``record_turn``), a stored conversation and an
append queue, in their own transaction, an ``extract`` job (the written messages' seqs), and
a turn of a session queues a ``summarize`` job every SESSION_SUMMARY_EVERY_N_TURNS turns
(:class:`LearningQueue`). :class:`Learning` runs them: ``extract`` stores the facts the model
finds in the user's messages as ``record_turn`` stores its inline candidates, ``summarize``
rewrites the session's rolling summary with the model's summary. With the heuristic model
both write what the inline path writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from halldyll_ray.components.jobs import JobQueue
from halldyll_ray.errors import InvalidInput, NotFound
from halldyll_ray.llm.protocol import DatedText, FactCandidate, MemoryModel
from halldyll_ray.models import Fact, Job, MessageRole, StoredMessage
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import q

if TYPE_CHECKING:
    from halldyll_ray.components.agent_loop import AgentLoop
    from halldyll_ray.components.ingestion import Ingestion

#: The job kinds of this module.
EXTRACT = "extract"
SUMMARIZE = "summarize"
#: Messages one extract_facts call reads (a stored conversation can hold thousands).
EXTRACT_WINDOW = 20
#: Words a session summary may have (the inline one is at most 1500 characters).
SUMMARY_MAX_WORDS = 300


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


def render(role: str, content: str) -> str:
    """A message as the models read it: ``"<role>: <content>"``."""
    return f"{role}: {content}"


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

    Args:
        db: The pool (reads act as the job's user).
        ingestion: Stores the extracted facts (merging, reinforcement and audit as any store).
        agent_loop: Rewrites a session's summary.
        model: The memory model (an LLM's, or the heuristic one).
    """

    def __init__(
        self, db: Database, ingestion: Ingestion, agent_loop: AgentLoop, model: MemoryModel
    ) -> None:
        self.db = db
        self.ingestion = ingestion
        self.agent_loop = agent_loop
        self.model = model

    def register(self, jobs: JobQueue) -> None:
        """Run this module's job kinds on ``jobs``' workers."""
        jobs.register(EXTRACT, self.extract)
        jobs.register(SUMMARIZE, self.summarize)

    async def extract(self, job: Job) -> dict[str, Any]:
        """Facts the model finds in the user's messages of the job, stored.

        Returns:
            ``{"model", "candidates", "fact_ids"}``.

        Raises:
            NotFound: the conversation (or those messages) no longer exists: nothing to do.
            LLMUnavailable, LLMOutputInvalid: from the model (the try is retried).
        """
        payload = _payload(ExtractPayload, job)
        seqs = payload.seqs
        conversation_id = payload.conversation_id
        rows = await self.db.fetch(
            q("messages_at"), conversation_id, job.user_id, seqs, user_id=job.user_id
        )
        if not rows:
            raise NotFound(f"conversation {payload.conversation_id} or its messages not found")
        said = [r for r in rows if r["role"] == MessageRole.USER.value]
        texts = [
            DatedText(text=r["content"], start=r["created_at"], end=r["created_at"]) for r in said
        ]
        speaker = next((r["name"] for r in said if r["name"]), None)
        candidates: list[FactCandidate] = []
        for start in range(0, len(texts), EXTRACT_WINDOW):
            window = texts[start : start + EXTRACT_WINDOW]
            candidates += await self.model.extract_facts(window, speaker=speaker)
        fact_ids = await self.store_candidates(job, payload, candidates)
        return {
            "model": self.model.name,
            "candidates": len(candidates),
            "fact_ids": [str(i) for i in fact_ids],
        }

    async def store_candidates(
        self, job: Job, payload: ExtractPayload, candidates: Sequence[FactCandidate]
    ) -> list[UUID]:
        """Store each candidate as ``record_turn``'s inline path does: a fact of the
        conversation's session and model, tagged ``extracted``, merged into a near-duplicate.
        (Consolidation with the model's add/update/contradict decisions replaces this.)"""
        fact_ids: list[UUID] = []
        for candidate in candidates:
            stored = await self.ingestion.store(
                job.user_id,
                Fact(
                    statement=candidate.statement,
                    confidence=candidate.confidence,
                    kind=candidate.kind,
                    source=f"conversation:{payload.conversation_id}",
                    session_id=payload.session_id,
                    model=None if payload.model_id is None else str(payload.model_id),
                    tags=["extracted"],
                ),
                request_id=job.request_id,
            )
            fact_ids.append(stored.id)
        return fact_ids

    async def summarize(self, job: Job) -> dict[str, Any]:
        """The session's rolling summary, rewritten with the model's summary of its log.

        Returns:
            ``{"model", "summary_id"}``.

        Raises:
            NotFound: the session's log no longer exists.
            LLMUnavailable, LLMOutputInvalid: from the model (the try is retried).
        """
        payload = _payload(SummarizePayload, job)

        async def summary(rows: Sequence[Any]) -> str:
            if not rows:
                raise NotFound(f"conversation {payload.conversation_id} not found")
            messages = [
                DatedText(
                    text=render(r["role"], r["content"]),
                    start=r["created_at"],
                    end=r["created_at"],
                )
                for r in rows
            ]
            return await self.model.summarize(messages, max_words=SUMMARY_MAX_WORDS)

        summary_id = await self.agent_loop.refresh_summary(
            job.user_id,
            payload.session_id,
            payload.conversation_id,
            payload.model_id,
            summarize=summary,
        )
        return {"model": self.model.name, "summary_id": str(summary_id)}
