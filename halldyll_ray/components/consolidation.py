"""Consolidation (issue #14 §3): the facts a model learns from a turn, reconciled with the
user's stored facts.

For each fact a :class:`~halldyll_ray.llm.protocol.MemoryModel` extracts from a turn, the
user's closest open facts of the same model scope are found by vector search and shown to
the model, which decides (:class:`~halldyll_ray.llm.protocol.Action`):

- ``add``: a new fact, valid from the turn's time;
- ``reinforce``: the target's confidence rises (the rule of a repeated store, migration 0004);
- ``update``: the target is closed (``valid_to``, ``superseded_by``) and the new statement
  stored: the old one stays readable in the fact's history. Jobs run in any order: a turn
  older than the target began (a later turn was learned first) puts its statement into the
  target's past instead, closed where the next version began, and the target stays open;
  a contradiction from such a turn changes nothing (``ignore``);
- ``contradict``: the target's confidence falls (migration 0012's mirror of reinforcement),
  and it is closed once below FACT_CONTRADICTION_FLOOR;
- ``ignore``: nothing.

A decision naming a fact the model was not shown is refused before anything is written
(:func:`~halldyll_ray.llm.protocol.checked`, :class:`LLMOutputInvalid`). Each candidate's
change is one transaction under the user's row lock, audited (``fact.learn``) with the job,
the turn (conversation id and message seqs) and the model that caused it, and recorded in
``fact_learnings``: a job retried after a crash gets the changes it already made back instead
of making them twice. The model is never called inside a transaction; a target that another
writer changed meanwhile sends the candidate round again (up to :data:`MAX_ATTEMPTS`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from halldyll_ray import validation
from halldyll_ray.components.audit import write_audit
from halldyll_ray.components.base import Chunk, insert_chunks, lock_user, require_user
from halldyll_ray.components.embeddings import Embeddings, model_of
from halldyll_ray.components.ingestion import Ingestion
from halldyll_ray.components.memories import split
from halldyll_ray.components.registry import ModelRegistry
from halldyll_ray.config import Settings
from halldyll_ray.errors import InvalidInput, NotFound, Unavailable
from halldyll_ray.llm.protocol import (
    Action,
    DatedText,
    Decision,
    FactCandidate,
    MemoryModel,
    Neighbour,
    checked,
)
from halldyll_ray.models import MAX_FACT_SOURCES, MAX_MESSAGES_PER_CALL, MAX_TAGS, Fact, FactKind
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q
from halldyll_ray.textproc import fact_key

#: Facts taken from one turn at most (the protocol's own bound on extract_facts).
MAX_CANDIDATES = 20
#: Rounds of search, decision and write for one candidate whose target another writer
#: changed in between; past them the job fails this try (Unavailable) and is retried.
MAX_ATTEMPTS = 3
#: Tag of facts consolidation adds (as record_turn's heuristic extraction tags its own).
LEARNED_TAG = "extracted"
#: Audit operation of every change consolidation makes.
AUDIT_OPERATION = "fact.learn"


class Change(BaseModel):
    """What consolidation did with one fact found in a turn (a job's result lists them).

    ``fact_id`` is the fact written: the new fact of an ``add`` or ``update``, the target of a
    ``reinforce`` or ``contradict``; None for ``ignore``. ``target`` is the stored fact the
    decision acted on; ``closed`` says it was closed (an update, or a contradiction that took
    it below the floor). ``confidence`` is ``fact_id``'s confidence after the change.
    """

    model_config = ConfigDict(frozen=True)

    action: Action
    statement: str | None = Field(
        description=(
            "The fact as the model found it in the turn; null once the fact it wrote or acted "
            "on is deleted (:func:`~halldyll_ray.components.base.forget`)."
        )
    )
    fact_id: UUID | None = None
    target: UUID | None = None
    closed: bool = False
    confidence: float | None = None
    reason: str | None = Field(
        default="", description="The model's reason, as it gave it (null as ``statement``)."
    )
    replayed: bool = Field(
        default=False, description="Made by an earlier run for this turn; nothing new written."
    )
    backdated: bool = Field(
        default=False,
        description=(
            "An update from a turn older than its target began: the statement was stored as a "
            "closed version before the target in its history, and the target stays open; "
            "or a turn older than its target changed nothing (the version of its time said "
            "the same, or it contradicted a fact that began after it)."
        ),
    )


class _Stale(Exception):
    """The decision's target was changed by another writer since it was shown (rolls back)."""


class _Gone(Exception):
    """The turn's conversation was deleted while the model decided (rolls back)."""


@dataclass(frozen=True)
class _Turn:
    """The turn being learned from, as loaded: ``at`` is its last message's time."""

    user_id: UUID
    conversation_id: UUID
    seqs: list[int]
    session_id: str | None
    at: datetime
    job: str | None
    request_id: str | None

    def predates(self, fact: Any) -> bool:
        """Whether the turn was said before ``fact`` (a memories row) began holding: a later
        turn was learned first (jobs run in any order)."""
        return bool(self.at < (fact["valid_from"] or fact["created_at"]))


def _seqs(values: Sequence[int]) -> list[int]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise InvalidInput("seqs must be a list of message numbers", field="seqs")
    if not 1 <= len(values) <= MAX_MESSAGES_PER_CALL:
        raise InvalidInput(f"give 1 to {MAX_MESSAGES_PER_CALL} message seqs", field="seqs")
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
            raise InvalidInput("a message seq is an integer from 0 to 2^31 - 1", field="seqs")
    return sorted(set(values))


class Consolidation:
    """Learn facts from a conversation's turn with a :class:`MemoryModel`.

    Args:
        db: The database (every read and write acts for the turn's user: row-level security).
        embeddings: Embeds candidates and new statements (the same model as stored chunks).
        registry: Resolves the model scope.
        ingestion: Its chunker splits statements as a store does.
        settings: FACT_CONSOLIDATION_NEIGHBOURS, FACT_CONSOLIDATION_MIN_SIMILARITY,
            FACT_CONTRADICTION_FLOOR, EPHEMERAL_FACT_TTL_DAYS, FACT_PROMOTION_CONFIDENCE.
        model: Extracts candidates and decides what each does.
    """

    def __init__(
        self,
        db: Database,
        embeddings: Embeddings,
        registry: ModelRegistry,
        ingestion: Ingestion,
        settings: Settings,
        model: MemoryModel,
    ) -> None:
        self.db = db
        self.embeddings = embeddings
        self.registry = registry
        self.chunker = ingestion.chunker
        self.settings = settings
        self.model = model

    async def learn_from_turn(
        self,
        user_id: UUID | str,
        conversation_id: UUID | str,
        seqs: Sequence[int],
        *,
        job_id: UUID | int | str | None,
        model_id: UUID | str | None,
        request_id: str | None = None,
    ) -> list[Change]:
        """Extract facts from the messages ``seqs`` of a conversation and consolidate each.

        Args:
            user_id: Whose conversation and facts.
            conversation_id: The conversation the turn is in.
            seqs: The turn's message numbers (a record_turn's ``message_seqs``).
            job_id: The background job doing this, kept in every audit row (None in-process).
            model_id: The AI model scope (name or id) the facts are learned in, None: shared;
                only facts of exactly this scope are compared with.
            request_id: Carried into the audit rows.

        Returns:
            One :class:`Change` per extracted fact, in the model's order; empty when the
            conversation or those messages no longer exist (deleted since the turn, or while
            the model decided: the deletion forgets what was learned from it).

        Raises:
            InvalidInput: a bad id or seqs. NotFound: no such user or AI model.
            LLMOutputInvalid: the model answered out of shape or named a fact it was not
                shown; that candidate changed nothing (earlier ones stay, and are replayed,
                not repeated, when the job runs again). LLMUnavailable: the model is down.
            Unavailable: the user's facts kept changing under this one (retry).
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        conversation_id = validation.parse_uuid(conversation_id, "conversation_id")
        wanted = _seqs(seqs)
        scope = await self.registry.resolve(model_id)
        async with self.db.scoped(user_id, readonly=True) as conn:
            conversation = await conn.fetchrow(q("get_memory"), conversation_id, user_id)
            rows = (
                await conn.fetch(q("messages_at"), conversation_id, user_id, wanted)
                if conversation is not None and conversation["type"] == "conversation"
                else []
            )
        if not rows:
            await require_user(self.db, user_id)
            return []
        assert conversation is not None
        turn = _Turn(
            user_id=user_id,
            conversation_id=conversation_id,
            seqs=[r["seq"] for r in rows],
            session_id=conversation["session_id"],
            at=min(max(r["created_at"] for r in rows), datetime.now(UTC)),
            job=None if job_id is None else str(job_id),
            request_id=request_id,
        )
        messages = [
            DatedText(
                text=f"{r['name'] or r['role']}: {r['content']}",
                start=r["created_at"],
                end=r["created_at"],
                role=r["role"],
            )
            for r in rows
        ]
        speaker = next((r["name"] for r in rows if r["role"] == "user" and r["name"]), None)
        candidates = await self.model.extract_facts(messages, speaker=speaker)
        try:
            return [
                await self._learn(turn, candidate, scope)
                for candidate in candidates[:MAX_CANDIDATES]
            ]
        except _Gone:  # deleted while the model decided: as deleted before (its facts forgotten)
            return []

    async def _learn(self, turn: _Turn, candidate: FactCandidate, scope: UUID | None) -> Change:
        key = fact_key(candidate.statement)
        done = await self.db.fetchrow(
            *bind(
                "learned_change",
                user_id=turn.user_id,
                conversation_id=turn.conversation_id,
                seqs=turn.seqs,
                model_id=scope,
                statement_key=key,
            ),
            user_id=turn.user_id,
        )
        if done is not None:
            return Change.model_validate({**done["change"], "replayed": True})
        chunks = self.chunker.part("statement", 0, candidate.statement)
        vectors = await self.embeddings.embed([c.indexed for c in chunks])
        for _ in range(MAX_ATTEMPTS):
            neighbours = await self._neighbours(turn.user_id, scope, vectors)
            decision = checked(await self.model.consolidate(candidate, neighbours), neighbours)
            statement = decision.statement or candidate.statement
            new_chunks, new_vectors = chunks, vectors
            if statement != candidate.statement and decision.action in (Action.ADD, Action.UPDATE):
                new_chunks = self.chunker.part("statement", 0, statement)
                new_vectors = await self.embeddings.embed([c.indexed for c in new_chunks])
            shown = {n.id: n.statement for n in neighbours}
            try:
                return await self._apply(
                    turn, candidate, decision, shown, scope, key, statement, new_chunks, new_vectors
                )
            except _Stale:
                continue
        raise Unavailable(
            "the user's facts kept changing while a learned fact was consolidated; retry",
            retry_after=1,
        )

    async def _neighbours(
        self, user_id: UUID, scope: UUID | None, vectors: np.ndarray
    ) -> list[Neighbour]:
        """The open facts of exactly ``scope`` closest to the candidate (its first chunk)."""
        count = self.settings.fact_consolidation_neighbours
        rows = await self.db.fetch(
            *bind(
                "similar_open_facts",
                user_id=user_id,
                model_id=scope,
                vector=np.asarray(vectors[0]),
                embedding_model=model_of(vectors),
                fetch=max(4 * count, 40),
                min_similarity=self.settings.fact_consolidation_min_similarity,
                neighbours=count,
            ),
            user_id=user_id,
        )
        return [
            Neighbour(
                id=r["id"],
                statement=r["content"],
                confidence=round(float(r["confidence"]), 6),
                similarity=round(max(-1.0, min(1.0, float(r["similarity"]))), 6),
            )
            for r in rows
        ]

    async def _apply(
        self,
        turn: _Turn,
        candidate: FactCandidate,
        decision: Decision,
        shown: dict[UUID, str],
        scope: UUID | None,
        key: str,
        statement: str,
        chunks: list[Chunk],
        vectors: np.ndarray,
    ) -> Change:
        """Make one decision's change in one transaction (rolled back by _Stale).

        ``shown``: the statements of the facts the model decided on, by id. The decision is
        about its target as it read then: a target closed, deleted or expired since, or whose
        statement another writer changed (a PATCH while the model decided), is stale, and the
        candidate goes round again with what the fact says now. Otherwise the turn's evidence
        about one statement was applied to another (a contradiction of "lives in Rome"
        closed the user's correction to "lives in Milan")."""
        async with self.db.scoped(turn.user_id) as conn:
            if decision.action is not Action.IGNORE:
                await lock_user(conn, turn.user_id)
            elif await conn.fetchval(q("share_learner"), turn.user_id) is None:
                # An "ignore" writes no fact (the user's cached searches stay valid), but its
                # learning record's foreign key takes the user's row: shared first, in the
                # lock order of users.sql, not after the conversation (an erasure takes the
                # user's row, then the conversation: the two deadlocked).
                raise NotFound(f"user {turn.user_id} not found")
            # The turn's conversation, held until the commit (a deletion takes the user's row,
            # then this one). Deleted while the model decided, the learning record's foreign
            # key failed ("a row it refers to does not exist") and the job with it, where a
            # turn of a conversation deleted before the job learns nothing (returns []).
            source = q("lock_learning_source")
            if await conn.fetchval(source, turn.conversation_id, turn.user_id) is None:
                raise _Gone
            done = await conn.fetchrow(
                *bind(
                    "learned_change",
                    user_id=turn.user_id,
                    conversation_id=turn.conversation_id,
                    seqs=turn.seqs,
                    model_id=scope,
                    statement_key=key,
                )
            )
            if done is not None:  # another worker learned it while the model was deciding
                return Change.model_validate({**done["change"], "replayed": True})
            target = None
            if decision.target is not None:
                target = await conn.fetchrow(
                    q("lock_open_fact"), decision.target, turn.user_id, scope
                )
                if target is None or target["content"] != shown.get(target["id"]):
                    raise _Stale
            before = None if target is None else float(target["confidence"])
            if decision.action is Action.IGNORE:
                change = Change(
                    action=Action.IGNORE, statement=candidate.statement, reason=decision.reason
                )
            elif decision.action is Action.ADD:
                change = await self._add(conn, turn, candidate, scope, statement, chunks, vectors)
            elif decision.action is Action.REINFORCE or (
                decision.action is Action.UPDATE
                and target is not None
                and fact_key(statement) == target["fact_key"]
            ):  # an "update" that restates the target says the same thing again
                assert target is not None
                change = await self._reinforce(conn, turn, candidate, target["id"])
            elif decision.action is Action.UPDATE:
                assert target is not None
                change = await self._update(
                    conn, turn, candidate, scope, statement, chunks, vectors, target
                )
            else:
                assert target is not None
                if turn.predates(target):
                    # Said before the target began (a later turn was learned first): no
                    # evidence against what holds since.
                    change = Change(
                        action=Action.IGNORE,
                        statement=candidate.statement,
                        target=target["id"],
                        backdated=True,
                    )
                else:
                    change = await self._contradict(conn, turn, candidate, target["id"])
            change = change.model_copy(update={"reason": decision.reason})
            await conn.execute(
                *bind(
                    "record_learning",
                    user_id=turn.user_id,
                    conversation_id=turn.conversation_id,
                    seqs=turn.seqs,
                    model_id=scope,
                    statement_key=key,
                    change=change.model_dump(mode="json"),
                )
            )
            if change.fact_id is not None:
                await write_audit(
                    conn,
                    AUDIT_OPERATION,
                    "fact",
                    list(dict.fromkeys(i for i in (change.fact_id, change.target) if i)),
                    turn.user_id,
                    request_id=turn.request_id,
                    details={
                        "action": change.action.value,
                        "job_id": turn.job,
                        "conversation_id": str(turn.conversation_id),
                        "seqs": turn.seqs,
                        "model": self.model.name,
                        "closed": change.closed,
                        "confidence_before": before,
                        "confidence": change.confidence,
                    },
                )
            return change

    def _fact_row(
        self, turn: _Turn, candidate: FactCandidate, scope: UUID | None, statement: str
    ) -> dict[str, Any]:
        """The arguments of ``upsert_fact`` for a fact learned from ``turn``."""
        ttl = timedelta(days=self.settings.ephemeral_fact_ttl_days)
        fact = Fact(
            statement=statement,
            confidence=candidate.confidence,
            kind=candidate.kind,
            source=f"conversation:{turn.conversation_id}",
            session_id=turn.session_id,
            tags=[LEARNED_TAG],
        )
        content, payload = split(fact)
        payload["sources"] = [fact.source]
        return {
            "id": uuid.uuid4(),
            "user_id": turn.user_id,
            "model_id": scope,
            "session_id": fact.session_id,
            "content": content,
            "payload": payload,
            "tags": fact.tags,
            "metadata": {},
            "importance": fact.importance,
            "fact_key": fact_key(statement),
            "confidence": fact.confidence,
            "fact_kind": fact.kind.value,
            "expires_at": datetime.now(UTC) + ttl if fact.kind is FactKind.EPHEMERAL else None,
            "ttl": ttl,
            "promote_at": self.settings.fact_promotion_confidence,
            "valid_from": turn.at,
        }

    async def _store(
        self,
        conn: asyncpg.Connection,
        turn: _Turn,
        candidate: FactCandidate,
        scope: UUID | None,
        statement: str,
        chunks: list[Chunk],
        vectors: np.ndarray,
    ) -> Any:
        """Insert a new open fact; an open fact with the same key is reinforced instead."""
        row = await conn.fetchrow(
            *bind(
                "upsert_fact",
                **self._fact_row(turn, candidate, scope, statement),
                max_tags=MAX_TAGS,
                max_sources=MAX_FACT_SOURCES,
            )
        )
        if not row["reinforced"]:
            await insert_chunks(conn, row, chunks, vectors)
        return row

    async def _add(
        self,
        conn: asyncpg.Connection,
        turn: _Turn,
        candidate: FactCandidate,
        scope: UUID | None,
        statement: str,
        chunks: list[Chunk],
        vectors: np.ndarray,
    ) -> Change:
        row = await self._store(conn, turn, candidate, scope, statement, chunks, vectors)
        if row["reinforced"]:  # the statement is stored already (the model did not see it)
            return Change(
                action=Action.REINFORCE,
                statement=candidate.statement,
                fact_id=row["id"],
                target=row["id"],
                confidence=round(float(row["confidence"]), 6),
            )
        return Change(
            action=Action.ADD,
            statement=candidate.statement,
            fact_id=row["id"],
            confidence=round(float(row["confidence"]), 6),
        )

    async def _reinforce(
        self, conn: asyncpg.Connection, turn: _Turn, candidate: FactCandidate, target: UUID
    ) -> Change:
        row = await conn.fetchrow(
            *bind(
                "reinforce_fact",
                id=target,
                user_id=turn.user_id,
                confidence=candidate.confidence,
                fact_kind=candidate.kind.value,
                ttl=timedelta(days=self.settings.ephemeral_fact_ttl_days),
                promote_at=self.settings.fact_promotion_confidence,
                tags=[],
                max_tags=MAX_TAGS,
                max_sources=MAX_FACT_SOURCES,
                sources=[f"conversation:{turn.conversation_id}"],
            )
        )
        return Change(
            action=Action.REINFORCE,
            statement=candidate.statement,
            fact_id=target,
            target=target,
            confidence=round(float(row["confidence"]), 6),
        )

    async def _update(
        self,
        conn: asyncpg.Connection,
        turn: _Turn,
        candidate: FactCandidate,
        scope: UUID | None,
        statement: str,
        chunks: list[Chunk],
        vectors: np.ndarray,
        target: Any,
    ) -> Change:
        """Replace ``target`` (its locked row) with the statement.

        Jobs run in any order, so a turn can be learned after a later turn already replaced
        the fact it speaks of. What such an older turn said held from its time until the next
        version began: it goes into the history there (after the last version that began by
        the turn's time, :meth:`_place`), closed, and the fact that holds now stays open.
        """
        backdated = turn.predates(target)
        if not backdated:
            row = await self._store(conn, turn, candidate, scope, statement, chunks, vectors)
            await self._close(conn, turn, target["id"], superseded_by=row["id"])
        else:
            row = await self._backdate(conn, turn, candidate, scope, statement, target["id"])
            if row is None:  # the version in force at the turn's time says the same
                return Change(
                    action=Action.IGNORE,
                    statement=candidate.statement,
                    target=target["id"],
                    backdated=True,
                )
            await insert_chunks(conn, row, chunks, vectors)
        return Change(
            action=Action.UPDATE,
            statement=candidate.statement,
            fact_id=row["id"],
            target=target["id"],
            closed=not backdated,
            backdated=backdated,
            confidence=round(float(row["confidence"]), 6),
        )

    async def _backdate(
        self,
        conn: asyncpg.Connection,
        turn: _Turn,
        candidate: FactCandidate,
        scope: UUID | None,
        statement: str,
        target: UUID,
    ) -> Any:
        """Write an older turn's statement into ``target``'s history (closed, relinked
        between the version in force at the turn's time and the next one); None, and nothing
        written, when the version in force then says the same."""
        before, successor = await self._place(conn, turn, target)
        values = self._fact_row(turn, candidate, scope, statement)
        if before is not None and before["fact_key"] == values["fact_key"]:
            return None
        del values["ttl"], values["promote_at"]
        row = await conn.fetchrow(
            *bind(
                "insert_past_fact",
                **values,
                valid_to=successor["began"],
                superseded_by=successor["id"],
            )
        )
        if before is not None:
            relinked = await conn.fetchrow(
                *bind(
                    "relink_past_fact",
                    id=before["id"],
                    user_id=turn.user_id,
                    at=turn.at,
                    superseded_by=row["id"],
                )
            )
            await conn.execute(q("close_chunks"), before["id"], turn.user_id, relinked["valid_to"])
        return row

    @staticmethod
    async def _place(conn: asyncpg.Connection, turn: _Turn, fact_id: UUID) -> tuple[Any, Any]:
        """Where a statement of a turn older than ``fact_id`` began goes in its history:
        ``(before, successor)``, the version in force at the turn's time (None when the turn
        is older than every version) and the one after it (``fact_id`` itself or an older
        version), each with ``id``, ``fact_key`` and ``began``."""
        versions = await conn.fetch(q("fact_predecessors"), fact_id, turn.user_id)
        by_successor: dict[UUID, Any] = {}
        for version in versions:  # the latest-starting one, if links were ever merged
            if version["superseded_by"] is not None:
                by_successor.setdefault(version["superseded_by"], version)
        successor = versions[0]
        for _ in versions:  # bounded: links written by hand into a cycle end too
            previous = by_successor.get(successor["id"])
            if previous is None:
                break
            if previous["began"] <= turn.at:
                return previous, successor
            successor = previous
        return None, successor

    async def _contradict(
        self, conn: asyncpg.Connection, turn: _Turn, candidate: FactCandidate, target: UUID
    ) -> Change:
        row = await conn.fetchrow(
            *bind(
                "contradict_fact",
                id=target,
                user_id=turn.user_id,
                evidence=candidate.confidence,
            )
        )
        closed = float(row["confidence"]) < self.settings.fact_contradiction_floor
        if closed:
            await self._close(conn, turn, target, superseded_by=None)
        return Change(
            action=Action.CONTRADICT,
            statement=candidate.statement,
            fact_id=target,
            target=target,
            closed=closed,
            confidence=round(float(row["confidence"]), 6),
        )

    @staticmethod
    async def _close(
        conn: asyncpg.Connection, turn: _Turn, fact_id: UUID, *, superseded_by: UUID | None
    ) -> None:
        """Close an open fact at the turn's time; its chunks leave searches with it."""
        row = await conn.fetchrow(
            *bind(
                "close_fact",
                id=fact_id,
                user_id=turn.user_id,
                at=turn.at,
                superseded_by=superseded_by,
            )
        )
        await conn.execute(q("close_chunks"), fact_id, turn.user_id, row["valid_to"])
