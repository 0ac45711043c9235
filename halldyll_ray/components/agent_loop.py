"""The agent loop's write half (SPEC §4.5): ``record_turn`` after each LLM call.

Both messages go to the session's conversation log (created on first use, its id kept as
session state in the cache), the session summary is refreshed every
SESSION_SUMMARY_EVERY_N_TURNS turns, and candidate facts found in the user's message are
stored as low-confidence ephemeral facts: inline, before ``record_turn`` returns, or, with
MEMORY_EXTRACTION=background, by jobs queued in the turn's transaction
(:mod:`halldyll_ray.components.learning`). The read half is
:meth:`~halldyll_ray.components.context.ContextBuilder.prepare`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

import asyncpg
from pydantic import TypeAdapter

from halldyll_ray import validation
from halldyll_ray.components.audit import write_audit
from halldyll_ray.components.base import cache_for_user, lock_user
from halldyll_ray.components.embeddings import Embeddings
from halldyll_ray.components.ingestion import Appended, Ingestion, SessionLog
from halldyll_ray.components.registry import ModelRegistry
from halldyll_ray.components.summaries import EMPTY_SUMMARY, write_session_summary
from halldyll_ray.config import Settings
from halldyll_ray.errors import Conflict, InvalidInput, NotFound, quoted
from halldyll_ray.models import Fact, FactKind, Message, MessageRole, TurnRecord
from halldyll_ray.storage.cache import TieredCache
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q
from halldyll_ray.textproc import Line, extract_candidate_facts, extractive_summary

MESSAGE: TypeAdapter[Message] = TypeAdapter(Message)
#: Confidence given to facts extracted from a user's message by record_turn.
CANDIDATE_FACT_CONFIDENCE = 0.3
#: How long a session's conversation id stays in the cache, in seconds (a day).
SESSION_STATE_TTL_S = 86_400
#: Writes a session's summary from its messages (rows of ``get_messages``, oldest first).
Summarizer = Callable[[Sequence[Any]], Awaitable[str]]


def _message(
    role: MessageRole, content: object, field: str, name: object, name_field: str
) -> Message:
    """One message of a turn, or InvalidInput naming the argument it came from."""
    try:
        return validation.validate(MESSAGE, {"role": role, "content": content, "name": name}, field)
    except InvalidInput as exc:
        reason = exc.message.rpartition(": ")[2]
        culprit = name_field if exc.fields.get("field") == "name" else field
        raise InvalidInput(f"{culprit}: {reason}", field=culprit) from None


#: Seconds a call's inline learning of a turn (its summary and facts) holds the turn's
#: idempotency key: a retry within them while it runs is a 409; past them, a retry takes the
#: learning over (the first attempt's replica died mid-way). Far above the learning's time (an
#: LLM summary included, whose calls time out at LLM_TIMEOUT_SECONDS), well under a client's
#: patience.
TURN_LEARNING_LEASE_S = 120.0
#: Seconds a retry waits for the learning another call of the same turn is doing, before the
#: 409 (concurrent retries of a turn get its whole record, facts included).
TURN_REPLAY_WAIT_S = 30.0


def _replayed(
    earlier: Appended, summary_id: UUID | None = None, fact_ids: Sequence[UUID] = ()
) -> TurnRecord:
    """The record of a turn an earlier call with the same idempotency key stored: what that
    call's learning made, or (``summary_id``, ``fact_ids``) what this one's did in its place."""
    return TurnRecord(
        conversation_id=earlier.conversation_id,
        message_seqs=[m.seq for m in earlier.messages],
        summary_id=earlier.summary_id if earlier.learned else summary_id,
        fact_ids=earlier.fact_ids if earlier.learned else list(fact_ids),
        job_ids=earlier.job_ids,
        replayed=True,
    )


@dataclass(frozen=True)
class _Learning:
    """What a turn's inline learning needs of its call (``record_turn``'s arguments)."""

    user_id: UUID
    session: str
    model_id: UUID | None
    model: UUID | str | None
    user_message: str
    extract_facts: bool
    request_id: str | None


class AgentLoop:
    """Record a turn of a session: messages, rolling summary, candidate facts."""

    def __init__(
        self,
        db: Database,
        cache: TieredCache,
        embeddings: Embeddings,
        registry: ModelRegistry,
        ingestion: Ingestion,
        settings: Settings,
    ) -> None:
        self.db = db
        self.cache = cache
        self.embeddings = embeddings
        self.registry = registry
        self.ingestion = ingestion
        self.settings = settings

    async def record_turn(
        self,
        user_id: UUID | str,
        session_id: str,
        user_message: str,
        assistant_message: str,
        *,
        model: UUID | str | None = None,
        extract_facts: bool = True,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        user_name: str | None = None,
        assistant_name: str | None = None,
    ) -> TurnRecord:
        """See :meth:`halldyll_ray.engine.MemoryEngine.record_turn`."""
        user_id = validation.parse_uuid(user_id, "user_id")
        session = validation.session_id(session_id)
        if session is None:
            raise InvalidInput("session_id is required", field="session_id")
        # Every input is checked before the first write (the session log is one).
        turn = [
            _message(MessageRole.USER, user_message, "user_message", user_name, "user_name"),
            _message(
                MessageRole.ASSISTANT,
                assistant_message,
                "assistant_message",
                assistant_name,
                "assistant_name",
            ),
        ]
        if not isinstance(extract_facts, bool):  # "no" is truthy: facts were extracted
            raise InvalidInput("extract_facts must be true or false", field="extract_facts")
        key = validation.idempotency_key(idempotency_key)
        request_id = validation.request_id(request_id)
        model_id = await self.registry.resolve(model)
        learning = _Learning(
            user_id, session, model_id, model, user_message, extract_facts, request_id
        )
        if key is not None:  # a repeated turn creates nothing, not even the session's log
            earlier = await self.ingestion.replay(
                user_id, key, turn, session_id=session, model_id=model_id, extract=extract_facts
            )
            if earlier is not None:
                return await self._replay(learning, key, earlier)
        conversation_id, created = await self._session_log(user_id, session, model_id)

        async def reopen(conn: asyncpg.Connection) -> UUID:
            # The log looked up above was deleted since: the session's next one, found or
            # created in the append's transaction, under the user's row lock.
            row, _ = await self._open_log(conn, user_id, session, model_id)
            log_id: UUID = row["id"]
            return log_id

        # With background learning, the append queues the turn's jobs in its transaction.
        try:
            appended = await self.ingestion.append(
                user_id,
                conversation_id,
                turn,
                request_id=request_id,
                idempotency_key=key,
                extract=extract_facts,
                session_turn=True,
                session=SessionLog(session, model_id, reopen),
            )
        except Conflict:
            # Reopened: the session's new log is another AI model's. The cached log is gone.
            await self.cache.delete(self._session_key(user_id, session))
            raise
        except InvalidInput as exc:
            # The key's first use won a race with this one after the check above (another
            # session's turn): the log this call created is still empty and goes again.
            if created and exc.field == "idempotency_key":
                await self._drop_empty_log(user_id, session, conversation_id, request_id)
            raise
        if appended.replayed:
            assert key is not None  # only a key's earlier request is replayed
            return await self._replay(learning, key, appended)
        if appended.conversation_id != conversation_id:  # reopened: remember the new log
            conversation_id = appended.conversation_id
            state = f"{conversation_id}|{'' if model_id is None else model_id}"
            await self._keep_state(user_id, session, state)
        stored = appended.messages
        if self.ingestion.learning is not None:
            return TurnRecord(
                conversation_id=conversation_id,
                message_seqs=[m.seq for m in stored],
                summary_id=None,
                fact_ids=[],
                job_ids=appended.job_ids,
            )
        summary_id, fact_ids = await self._learn_once(learning, key, appended)
        return TurnRecord(
            conversation_id=conversation_id,
            message_seqs=[m.seq for m in stored],
            summary_id=summary_id,
            fact_ids=fact_ids,
        )

    async def _replay(self, learning: _Learning, key: str, earlier: Appended) -> TurnRecord:
        """The answer to a retry of a stored turn: the first attempt's record, with what its
        inline learning made; or, when that learning did not finish (the first attempt
        failed after storing the messages), the learning done now, once.

        While another call is learning from the turn, this one waits for it, up to
        TURN_REPLAY_WAIT_S seconds, and answers with what it made.

        Raises:
            Conflict: the first attempt (or another retry) is still learning from the turn
                after that wait (the IETF Idempotency-Key draft's 409 for a request still in
                progress).
        """
        user_id = learning.user_id
        deadline = asyncio.get_running_loop().time() + TURN_REPLAY_WAIT_S
        pause = 0.02
        while not earlier.learned:
            async with self.db.scoped(user_id) as conn:
                claimed = await conn.fetchval(
                    q("claim_turn_learning"), user_id, key, TURN_LEARNING_LEASE_S
                )
            if claimed is not None:  # this call learns in the first attempt's place
                summary_id, fact_ids = await self._learn_once(learning, key, earlier)
                return _replayed(earlier, summary_id, fact_ids)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
            async with self.db.scoped(user_id) as conn:
                state = await conn.fetchrow(q("turn_learning"), user_id, key)
            if state is None:  # the turn's conversation was deleted meanwhile
                return _replayed(earlier)
            earlier = replace(
                earlier,
                fact_ids=list(state["fact_ids"]),
                summary_id=state["summary_id"],
                learned=state["learned"],
            )
            if not earlier.learned and asyncio.get_running_loop().time() > deadline:
                raise Conflict(
                    "the first request with this idempotency_key is still being processed: "
                    "retry in a few seconds",
                    field="idempotency_key",
                )
        return _replayed(earlier)

    async def _learn_once(
        self, learning: _Learning, key: str | None, appended: Appended
    ) -> tuple[UUID | None, list[UUID]]:
        """:meth:`_learn`, and with an idempotency ``key`` its outcome kept on the key's row
        (learned, or free for a retry to take over at once when it raised)."""
        user_id = learning.user_id
        try:
            summary_id, fact_ids = await self._learn(learning, appended)
        except BaseException:
            if key is not None:
                async with self.db.scoped(user_id) as conn:
                    await conn.execute(q("release_turn_learning"), user_id, key)
            raise
        if key is not None:
            async with self.db.scoped(user_id) as conn:
                await conn.execute(
                    *bind(
                        "finish_turn_learning",
                        user_id=user_id,
                        idempotency_key=key,
                        fact_ids=fact_ids,
                        summary_id=summary_id,
                    )
                )
        return summary_id, fact_ids

    async def _learn(
        self, learning: _Learning, appended: Appended
    ) -> tuple[UUID | None, list[UUID]]:
        """Inline learning from a stored turn: the session summary every
        SESSION_SUMMARY_EVERY_N_TURNS turns, then the candidate facts of the user's message.
        Returns the summary's id (None when none was due) and the facts' ids."""
        user_id, session, model_id = learning.user_id, learning.session, learning.model_id
        model, request_id = learning.model, learning.request_id
        conversation_id = appended.conversation_id
        turns = (appended.messages[-1].seq + 1) // 2
        summary_id = None
        if turns % self.settings.session_summary_every_n_turns == 0:
            try:
                summary_id = await self.refresh_summary(user_id, session, conversation_id, model_id)
            except NotFound:  # the log was deleted after this turn was stored: no summary
                await self.cache.delete(self._session_key(user_id, session))
        fact_ids: list[UUID] = []
        candidates = (
            extract_candidate_facts(learning.user_message) if learning.extract_facts else []
        )
        if candidates:
            # Stored only while the log exists (a deletion since the append: nothing learned).
            learned = await self.ingestion.learn(
                user_id,
                conversation_id,
                [
                    Fact(
                        statement=statement,
                        confidence=CANDIDATE_FACT_CONFIDENCE,
                        kind=FactKind.EPHEMERAL,
                        source=f"conversation:{conversation_id}",
                        session_id=session,
                        model=None if model is None else str(model),
                        tags=["extracted"],
                    )
                    for statement in candidates
                ],
                request_id=request_id,
            )
            fact_ids = [fact.id for fact in learned]
        return summary_id, fact_ids

    @staticmethod
    def _session_key(user_id: UUID, session_id: str) -> str:
        return TieredCache.user_key("session", user_id, session_id)

    async def _keep_state(self, user_id: UUID, session_id: str, state: str) -> None:
        """Cache the session's state (``"<log id>|<model id or nothing>"``), written after
        the transaction that found it: not left behind by an erasure that committed in
        between (:func:`~halldyll_ray.components.base.cache_for_user`)."""
        key = self._session_key(user_id, session_id)
        await cache_for_user(
            self.db, self.cache, user_id, key, state.encode(), ttl=SESSION_STATE_TTL_S
        )

    async def _session_log(
        self, user_id: UUID, session_id: str, model_id: UUID | None
    ) -> tuple[UUID, bool]:
        """The id of the session's conversation log, created on first use (session state),
        and whether this call created it.

        Raises:
            Conflict: the session's log belongs to another AI model (or to none, for a turn
                of a model): a session is one model's, and a turn of another model was filed
                in it, found by that model's searches and summarised with its memories.
        """
        key = self._session_key(user_id, session_id)
        cached = await self.cache.get(key, kind="session")
        if cached is not None and b"|" in cached:  # "<log id>|<model id or nothing>"
            log_id, _, owner = cached.decode().partition("|")
            if (UUID(owner) if owner else None) == model_id:
                return UUID(log_id), False  # a log deleted meanwhile is NotFound on append
            # A refusal is decided on the stored log, not on a copy: the cached log may be
            # deleted (no replica's cache hears of it), and the session free for this model.
        async with self.db.scoped(user_id) as conn:
            await lock_user(conn, user_id)
            row, created = await self._open_log(conn, user_id, session_id, model_id, check=False)
        conversation_id: UUID = row["id"]
        owner = row["model_id"]
        await self._keep_state(
            user_id, session_id, f"{conversation_id}|{'' if owner is None else owner}"
        )
        self._same_model(session_id, owner, model_id)
        return conversation_id, created

    async def _open_log(
        self,
        conn: asyncpg.Connection,
        user_id: UUID,
        session_id: str,
        model_id: UUID | None,
        *,
        check: bool = True,
    ) -> tuple[Any, bool]:
        """The session's log row, created (of AI model ``model_id``, audited) if it has none,
        in the caller's transaction (the user's row locked), and whether it was created.

        Raises:
            Conflict: with ``check``, the log belongs to another AI model.
        """
        row = await conn.fetchrow(
            *bind(
                "create_session_log",
                id=uuid.uuid4(),
                user_id=user_id,
                model_id=model_id,
                session_id=session_id,
                title=f"Session {session_id}",
            )
        )
        created = row is not None
        if row is None:
            row = await conn.fetchrow(q("session_memory"), user_id, session_id, "log")
        else:
            await write_audit(conn, "memory.store", "conversation", [row["id"]], user_id)
        if check:
            self._same_model(session_id, row["model_id"], model_id)
        return row, created

    @staticmethod
    def _same_model(session_id: str, owner: UUID | None, model_id: UUID | None) -> None:
        if owner != model_id:
            whose = "no AI model (shared)" if owner is None else f"AI model {owner}"
            raise Conflict(
                f"session {quoted(session_id)} is the session of {whose}: a session belongs to one "
                "AI model; record this model's turns in a session of its own",
                field="model",
            )

    async def _drop_empty_log(
        self, user_id: UUID, session_id: str, conversation_id: UUID, request_id: str | None
    ) -> None:
        """Delete a session log that holds no message (one a refused turn created)."""
        await self.cache.delete(self._session_key(user_id, session_id))
        async with self.db.scoped(user_id) as conn:
            await lock_user(conn, user_id)
            gone = await conn.fetchval(q("delete_empty_log"), conversation_id, user_id)
            if gone is not None:
                await write_audit(
                    conn,
                    "memory.delete",
                    "conversation",
                    [conversation_id],
                    user_id,
                    request_id=request_id,
                    details={"reason": "empty session log of a refused turn"},
                )

    async def refresh_summary(
        self,
        user_id: UUID,
        session_id: str,
        conversation_id: UUID,
        model_id: UUID | None,
        *,
        summarize: Summarizer | None = None,
    ) -> UUID:
        """Write the session's rolling summary (one per session, replaced each time) from its
        log's messages; return its id. ``summarize`` writes the text (default: the extractive
        summary of :func:`~halldyll_ray.textproc.extractive_summary`; a model's, through
        :meth:`~halldyll_ray.components.summaries.Summaries.refresh_session`, replaces it)."""
        rows = await self.db.fetch(q("get_messages"), conversation_id, user_id, user_id=user_id)
        if summarize is None:
            text = extractive_summary([Line(r["role"], r["content"]) for r in rows])
        else:
            text = await summarize(rows)
        if not text:
            text = EMPTY_SUMMARY
        chunks = self.ingestion.chunker.part("text", 0, text)
        vectors = await self.embeddings.embed([c.indexed for c in chunks])
        async with self.db.scoped(user_id) as conn:
            await lock_user(conn, user_id)
            row, written = await write_session_summary(
                conn,
                user_id=user_id,
                session_id=session_id,
                model_id=model_id,
                conversation_id=conversation_id,
                text=text,
                chunks=chunks,
                vectors=vectors,
                through_seq=rows[-1]["seq"] if rows else -1,
            )
            if written:
                await write_audit(conn, "summary.refresh", "summary", [row["id"]], user_id)
        summary_id: UUID = row["id"]
        return summary_id
