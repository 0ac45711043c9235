"""Hierarchical summaries (issue #14 §4): sessions summarised by a model, quiet sessions
rolled up into period summaries that cover them.

A session's summary is one row per user and session (``session_role`` ``summary``, the row
the agent loop's extractive summary also writes, :func:`write_session_summary`), covering the
session's conversation. Once a session has been quiet for SUMMARY_ROLLUP_AFTER_DAYS, its
summary is rolled up with the other quiet sessions of the same calendar month (UTC, by the
session's first message) and model scope into one period summary (``period`` ``YYYY-MM``)
whose ``covers`` are those session summaries. The context builder then shows a long history
in a small budget: a period's one summary rather than its sessions' many when the budget is
tight, never both (:mod:`halldyll_ray.context`).

Roll-ups are idempotent: a period whose sessions and their summaries are unchanged since it
was written is not asked of the model again; one whose sessions changed is rewritten in place
(one row per user, scope and month: a unique index of migration 0012); one left with no quiet
session (its sessions deleted, or active again) is deleted.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import numpy as np

from halldyll_ray import validation
from halldyll_ray.components.audit import write_audit
from halldyll_ray.components.base import Chunk, insert_chunks, lock_user, require_user
from halldyll_ray.components.embeddings import Embeddings
from halldyll_ray.components.ingestion import Ingestion
from halldyll_ray.components.registry import ModelRegistry
from halldyll_ray.config import Settings
from halldyll_ray.errors import InvalidInput, NotFound
from halldyll_ray.llm.protocol import DatedText, LLMOutputInvalid, MemoryModel
from halldyll_ray.models import MAX_TEXT_CHARS, check_text, visible
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q

#: Importance of session and period summaries.
SUMMARY_IMPORTANCE = 0.7
#: The most recent messages of a session a model summarises; before them, the session's
#: previous summary stands for the rest.
SESSION_SUMMARY_MAX_MESSAGES = 200
#: Summaries one roll-up call reads at most; a month with more is rolled up in batches,
#: then the batches' summaries are rolled up together.
ROLLUP_BATCH = 20
#: The text of a summary of nothing worth keeping (a session of greetings).
EMPTY_SUMMARY = "(no content yet)"


def summary_text(said: str) -> str:
    """A model's summary (of a session, or a roll-up) as it is stored: stripped, and
    :data:`EMPTY_SUMMARY` when nothing in it is visible (blanks, zero-width spaces, a Hangul
    filler: what :func:`~halldyll_ray.models.visible` refuses in a summary a client stores).

    The model's text was stored as it came, unlike every text a client sends: a NUL was a
    database error, a lone UTF-16 surrogate (an emoji cut in half) a TypeError of the
    tokenizer, and a summary of zero-width spaces or of more than MAX_TEXT_CHARS characters
    was stored, and then broke the user's export (its import refused the line) or every
    page of ``list_memories`` and the export itself (a stored summary over the bound fails to
    read back). Seen elsewhere: kodus-ai/kodus-ai#1683 (LLM responses carrying U+0000 and
    unpaired surrogates lost on insert), openclaw/openclaw#65782 (a split emoji from a model
    stalling memory indexing for good).

    Raises:
        LLMOutputInvalid: a NUL or a lone surrogate, or more than MAX_TEXT_CHARS characters
            (nothing is written; the job fails as for any answer of the wrong shape).
    """
    text = said.strip() if isinstance(said, str) else None
    if text is None:
        raise LLMOutputInvalid("the model's summary is not text")
    try:
        check_text(text)
    except ValueError as exc:
        raise LLMOutputInvalid(f"the model's summary is not storable: {exc}") from None
    if len(text) > MAX_TEXT_CHARS:
        raise LLMOutputInvalid(
            f"the model's summary is longer than {MAX_TEXT_CHARS} characters ({len(text)})"
        )
    return text if visible(text) else EMPTY_SUMMARY


async def write_session_summary(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    session_id: str,
    model_id: UUID | None,
    conversation_id: UUID,
    text: str,
    chunks: Sequence[Chunk],
    vectors: np.ndarray,
    through_seq: int,
) -> tuple[Any, bool]:
    """Write (or rewrite) a session's summary row and its chunks; return the row, and
    whether this call wrote it.

    The caller holds the user's row lock (:func:`~halldyll_ray.components.base.lock_user`)
    and audits what it wrote. ``through_seq``: the ``seq`` of the last message summarised
    (-1: none); the summary's span is the earliest and the latest time of the messages up to
    it, read here (a caller dates the messages it stores or imports, in any order: the first
    and the last one's times were a span that ended before it started, and the user's export
    no longer imported, "span_end is before span_start"). Writers read the messages
    before the lock and a model takes seconds, so two refreshes of one session can finish
    in either order: a summary already there that covers the same conversation through a
    later message is kept (and returned, with False), not overwritten by an older reading.

    Raises:
        NotFound: the conversation was deleted since its messages were read (the caller reads
            them before taking the lock): a summary would cover a memory that is gone and
            repeat what it said.
    """
    if await conn.fetchval(q("count_owned"), user_id, [conversation_id]) != 1:
        raise NotFound(f"conversation {conversation_id} not found")
    span = await conn.fetchrow(q("message_span"), conversation_id, user_id, through_seq)
    row = await conn.fetchrow(
        *bind(
            "upsert_session_summary",
            id=uuid.uuid4(),
            user_id=user_id,
            model_id=model_id,
            session_id=session_id,
            content=text,
            payload={"covers": [str(conversation_id)], "through_seq": through_seq},
            importance=SUMMARY_IMPORTANCE,
            span_start=span["first_at"],
            span_end=span["last_at"],
        )
    )
    if row is None:  # a later reading of the same conversation is there: kept
        return await conn.fetchrow(q("session_memory"), user_id, session_id, "summary"), False
    await conn.execute(q("delete_chunks_of_part"), row["id"], user_id, "text")
    await insert_chunks(conn, row, chunks, vectors)
    return row, True


def reading(members: Sequence[Any]) -> str:
    """A fingerprint of a month's session summaries as read (``quiet_session_summaries``
    rows): which ones, and each one's ``updated_at``. A period summary keeps the one it was
    written from; it is up to date while its month's summaries read the same, and a roll-up
    whose reading differs from the month's under the user's lock writes nothing."""
    said = "|".join(sorted(f"{m['id']}@{m['updated_at'].isoformat()}" for m in members))
    return hashlib.sha256(said.encode()).hexdigest()


def month_of(at: datetime) -> str:
    """The calendar month (UTC) a time falls in, as a period: ``"2025-03"``."""
    return at.astimezone(UTC).strftime("%Y-%m")


class Summaries:
    """Session summaries and period roll-ups written by a :class:`MemoryModel`.

    Args:
        db: The database (each call acts for its user: row-level security).
        embeddings: Embeds the summaries' text.
        registry: Resolves model scopes.
        ingestion: Its chunker splits summaries as a store does.
        settings: SESSION_SUMMARY_MAX_WORDS, PERIOD_SUMMARY_MAX_WORDS,
            SUMMARY_ROLLUP_AFTER_DAYS.
        model: Writes the summaries.
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

    async def refresh_session(
        self,
        user_id: UUID | str,
        session_id: str | None,
        conversation_id: UUID | str,
        model_id: UUID | str | None,
        *,
        job_id: UUID | int | str | None,
        request_id: str | None = None,
    ) -> UUID:
        """Summarise a session's conversation with the model; return the summary's id.

        The summary replaces the session's previous one (the agent loop's extractive summary
        included). A conversation longer than :data:`SESSION_SUMMARY_MAX_MESSAGES` is read from
        its previous summary plus its latest messages.

        Args:
            user_id: Whose session.
            session_id: The session (None: the conversation's own session).
            conversation_id: The session's conversation (the agent loop's session log, or a
                stored conversation of that session).
            model_id: The AI model scope of the summary (name or id; None: shared).
            job_id: The background job doing this, kept in the audit row.
            request_id: Carried into the audit row.

        Raises:
            InvalidInput: a bad id, or no session given and the conversation has none.
            NotFound: no such user, conversation or AI model.
            LLMUnavailable, LLMOutputInvalid: from the model; nothing written.
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        conversation_id = validation.parse_uuid(conversation_id, "conversation_id")
        session = validation.session_id(session_id)
        scope = await self.registry.resolve(model_id)
        async with self.db.scoped(user_id, readonly=True) as conn:
            conversation = await conn.fetchrow(q("get_memory"), conversation_id, user_id)
            if conversation is None or conversation["type"] != "conversation":
                rows: list[Any] = []
            else:
                session = session or conversation["session_id"]
                rows = list(
                    await conn.fetch(
                        q("recent_messages"),
                        conversation_id,
                        user_id,
                        SESSION_SUMMARY_MAX_MESSAGES,
                    )
                )
            earlier = None
            first_at = rows[0]["created_at"] if rows else None
            if rows and rows[0]["seq"] > 0:  # older messages left out: their time, summary
                first_at = await conn.fetchval(q("first_message_at"), conversation_id, user_id)
                if session is not None:
                    earlier = await conn.fetchrow(q("session_memory"), user_id, session, "summary")
        if conversation is None or conversation["type"] != "conversation":
            await require_user(self.db, user_id)
            raise NotFound(f"conversation {conversation_id} not found")
        if session is None:
            raise InvalidInput(
                "the conversation belongs to no session: name the session", field="session_id"
            )
        texts = [
            DatedText(
                text=f"{r['role']} ({r['name']}): {r['content']}"
                if r["name"]
                else f"{r['role']}: {r['content']}",
                start=r["created_at"],
                end=r["created_at"],
                role=r["role"],
            )
            for r in rows
        ]
        if earlier is not None:
            texts.insert(
                0,
                DatedText(
                    text=f"(summary of the earlier messages) {earlier['content']}",
                    start=first_at,
                    end=rows[0]["created_at"],
                ),
            )
        text = EMPTY_SUMMARY
        if texts:
            said = await self.model.summarize(
                texts, max_words=self.settings.session_summary_max_words
            )
            text = summary_text(said)
        chunks = self.chunker.part("text", 0, text)
        vectors = await self.embeddings.embed([c.indexed for c in chunks])
        async with self.db.scoped(user_id) as conn:
            await lock_user(conn, user_id)
            row, written = await write_session_summary(
                conn,
                user_id=user_id,
                session_id=session,
                model_id=scope,
                conversation_id=conversation_id,
                text=text,
                chunks=chunks,
                vectors=vectors,
                through_seq=rows[-1]["seq"] if rows else -1,
            )
            if written:
                await write_audit(
                    conn,
                    "summary.refresh",
                    "summary",
                    [row["id"]],
                    user_id,
                    request_id=request_id,
                    details={
                        "job_id": None if job_id is None else str(job_id),
                        "conversation_id": str(conversation_id),
                        "messages": len(rows),
                        "model": self.model.name,
                    },
                )
        summary_id: UUID = row["id"]
        return summary_id

    async def roll_up(
        self,
        user_id: UUID | str,
        *,
        job_id: UUID | int | str | None,
        model_id: UUID | str | None,
        request_id: str | None = None,
    ) -> list[UUID]:
        """Roll the user's quiet sessions of one model scope up into period summaries.

        First the agent loop's session logs quiet for SUMMARY_ROLLUP_AFTER_DAYS whose summary
        is missing or older than their last message are summarised
        (:meth:`refresh_session`); then the quiet session summaries are grouped by the month
        of their first message, and each month whose period summary is missing or out of date
        (other sessions, or a session summary rewritten since) is rolled up by the model.

        Returns:
            The ids of the period summaries written by this call, oldest month first (empty
            when everything was up to date: running it again changes nothing).

        Raises:
            InvalidInput: a bad id. NotFound: no such user or AI model.
            LLMUnavailable, LLMOutputInvalid: from the model; months rolled up before the
                failure stay written, the rest is done by the next run.
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        scope = await self.registry.resolve(model_id)
        await require_user(self.db, user_id)
        cutoff = datetime.now(UTC) - timedelta(days=self.settings.summary_rollup_after_days)
        logs = await self.db.fetch(
            *bind("unsummarised_quiet_logs", user_id=user_id, model_id=scope, cutoff=cutoff),
            user_id=user_id,
        )
        for log in logs:
            await self.refresh_session(
                user_id,
                log["session_id"],
                log["id"],
                scope,
                job_id=job_id,
                request_id=request_id,
            )
        async with self.db.scoped(user_id, readonly=True) as conn:
            sessions = await conn.fetch(
                *bind("quiet_session_summaries", user_id=user_id, model_id=scope, cutoff=cutoff)
            )
            periods = {
                r["period"]: r for r in await conn.fetch(q("period_summaries"), user_id, scope)
            }
        months: dict[str, list[Any]] = defaultdict(list)
        for session in sessions:
            months[month_of(session["span_start"])].append(session)
        written: list[UUID] = []
        for month in sorted(months):
            members = months[month]
            current = periods.get(month)
            if current is not None and (
                current["reading"] == reading(members)
                if current["reading"] is not None  # written before readings were kept
                else {str(m["id"]) for m in members} == set(current["covers"] or [])
                and all(m["updated_at"] <= current["updated_at"] for m in members)
            ):
                continue  # up to date: nothing to ask the model
            period = await self._write_period(
                user_id, scope, month, members, cutoff, job_id, request_id
            )
            if period is not None:
                written.append(period)
        for month, period in periods.items():
            if month not in months:
                await self._drop_period(user_id, period["id"], month, job_id, request_id)
        return written

    async def _roll(self, texts: list[DatedText]) -> str:
        """One summary of ``texts`` (oldest first), in batches of :data:`ROLLUP_BATCH`."""
        words = self.settings.period_summary_max_words
        while len(texts) > ROLLUP_BATCH:
            batches = [texts[i : i + ROLLUP_BATCH] for i in range(0, len(texts), ROLLUP_BATCH)]
            texts = [
                DatedText(
                    text=summary_text(await self.model.roll_up(batch, max_words=words)),
                    start=batch[0].start,
                    end=batch[-1].end,
                )
                for batch in batches
            ]
        return summary_text(await self.model.roll_up(texts, max_words=words))

    async def _write_period(
        self,
        user_id: UUID,
        scope: UUID | None,
        month: str,
        members: Sequence[Any],
        cutoff: datetime,
        job_id: UUID | int | str | None,
        request_id: str | None,
    ) -> UUID | None:
        """Roll ``members`` (a month's session summaries, quiet before ``cutoff``) up into
        its period summary; None when the month's summaries changed meanwhile (nothing
        written)."""
        text = await self._roll(
            [
                DatedText(text=m["content"], start=m["span_start"], end=m["span_end"])
                for m in members
            ]
        )
        chunks = self.chunker.part("text", 0, text)
        vectors = await self.embeddings.embed([c.indexed for c in chunks])
        start = min(m["span_start"] for m in members)
        end = max(m["span_end"] for m in members)
        covers = [str(m["id"]) for m in members]
        read = reading(members)
        async with self.db.scoped(user_id) as conn:
            await lock_user(conn, user_id)
            now = await conn.fetch(
                *bind("quiet_session_summaries", user_id=user_id, model_id=scope, cutoff=cutoff)
            )
            if reading([m for m in now if month_of(m["span_start"]) == month]) != read:
                # The month's session summaries changed while the model wrote (they were read
                # before the lock): one deleted (the period would cover a memory that is
                # gone), rewritten, or another one quiet, and a concurrent roll-up may have
                # written the newer reading already. The next run rolls the month up.
                return None
            row = await conn.fetchrow(
                *bind(
                    "upsert_period_summary",
                    id=uuid.uuid4(),
                    user_id=user_id,
                    model_id=scope,
                    content=text,
                    payload={"covers": covers, "reading": read},
                    metadata={"period": month, "sessions": len(covers)},
                    importance=SUMMARY_IMPORTANCE,
                    period=month,
                    span_start=start,
                    span_end=end,
                )
            )
            await conn.execute(q("delete_chunks_of_part"), row["id"], user_id, "text")
            await insert_chunks(conn, row, chunks, vectors)
            await write_audit(
                conn,
                "summary.rollup",
                "summary",
                [row["id"]],
                user_id,
                request_id=request_id,
                details={
                    "job_id": None if job_id is None else str(job_id),
                    "period": month,
                    "covers": len(covers),
                    "model": self.model.name,
                },
            )
        period_id: UUID = row["id"]
        return period_id

    async def _drop_period(
        self,
        user_id: UUID,
        period_id: UUID,
        month: str,
        job_id: UUID | int | str | None,
        request_id: str | None,
    ) -> None:
        """Delete a period summary none of whose sessions is quiet any more (audited)."""
        async with self.db.scoped(user_id) as conn:
            await lock_user(conn, user_id)
            if await conn.fetchrow(q("delete_memory"), period_id, user_id) is None:
                return
            await write_audit(
                conn,
                "summary.rollup",
                "summary",
                [period_id],
                user_id,
                request_id=request_id,
                details={
                    "job_id": None if job_id is None else str(job_id),
                    "period": month,
                    "removed": True,
                },
            )
