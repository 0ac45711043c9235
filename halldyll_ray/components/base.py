"""What several components share: the chunk shape, the user lock, chunk and message writes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import numpy as np
from pgvector import Vector

from halldyll_ray.components.audit import write_audit
from halldyll_ray.components.embeddings import Embeddings, model_of
from halldyll_ray.errors import NotFound
from halldyll_ray.models import Message, MessageRole, StoredMessage
from halldyll_ray.storage.cache import TieredCache
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q

_log = logging.getLogger(__name__)

#: English month names, as message labels write them (whatever the locale).
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
#: How the service names a conversation as the source of a fact learned from it
#: (``conversation:<id>``): :func:`forget` removes it, an import re-points it.
CONVERSATION_SOURCE = "conversation:"

#: Most chunk rows one ``insert_chunks`` statement writes (:func:`insert_chunk_rows`).
CHUNK_ROWS_PER_STATEMENT = 1_000


@dataclass(frozen=True)
class Chunk:
    """One embedded piece of a memory: which part (``message``, ``title``, ``text`` ...),
    which instance of it (a message's seq, a segment's index) and which chunk of that part.

    A message's chunks carry a ``label``, who said it and when ("Caroline 8 May 2023"), that
    the embedding reads before the text (:attr:`indexed`) and the full-text index reads with
    it (migration 0007); ``text`` alone is what a search reports as matched. Measured on the
    LoCoMo development split (``benchmarks/locomo.py``, semantic recall@10): text alone 0.30,
    with the speaker 0.48, with the speaker and the date 0.53.
    """

    part: str
    part_index: int
    chunk_index: int
    text: str
    label: str | None = None

    @property
    def indexed(self) -> str:
        """What the encoder embeds: ``"<label>: <text>"``, or the text without a label."""
        return f"{self.label}: {self.text}" if self.label else self.text


def message_label(name: str | None, said_at: datetime) -> str:
    """The label of a message's chunks: its speaker's name (if any) and its UTC
    date, e.g. ``"Caroline 8 May 2023"``; English month names, whatever the locale.
    Migration 0007 writes the same for messages stored before it."""
    day = said_at.astimezone(UTC)
    date = f"{day.day} {MONTHS[day.month - 1]} {day.year}"
    speaker = (name or "").strip()
    return f"{speaker} {date}" if speaker else date


async def lock_user(conn: asyncpg.Connection, user_id: UUID) -> None:
    """Lock the user's row (first in the lock order of ``storage/sql/users.sql``) and bump
    their memory version, which invalidates their cached searches. NotFound if absent.

    Every write of the user's memories starts here, so this is where a fact past its expiry
    that ``purge_expired`` has not reached yet goes: deleted (an ``expired`` event, audited as
    ``memory.purge_expired``) and forgotten (:func:`forget`), as the purge would. Otherwise
    the dead row still held its key: the same statement stored again reinforced it (its old
    confidence, count and sources came back), a PATCH read before the lock could bring it
    back, and a PATCH to its statement was refused as a duplicate of a fact nobody sees.
    (Their cached embeddings stay until they expire, within a week: there is no cache at
    hand here, unlike in ``purge_expired`` and a deletion.)
    """
    row = await conn.fetchrow(q("lock_writer"), user_id)
    if row is None:
        raise NotFound(f"user {user_id} not found")
    if row["expired"]:
        ids = [r["id"] for r in await conn.fetch(q("purge_expired"), [user_id])]
        if ids:
            await forget(conn, user_id, ids)
            await write_audit(
                conn,
                "memory.purge_expired",
                "fact",
                ids,
                user_id,
                details={"count": len(ids)},
            )


@dataclass(frozen=True)
class Forgotten:
    """What :func:`forget` deleted with memories: the service's summaries of them, and the
    texts those summaries' chunks were embedded from (for :func:`drop_cached`)."""

    summaries: list[UUID]
    texts: list[str]


async def chunk_texts(conn: asyncpg.Connection, user_id: UUID, ids: Sequence[UUID]) -> list[str]:
    """The texts the chunks of memories ``ids`` were embedded from (:attr:`Chunk.indexed`):
    read before the memories are deleted, so that :func:`drop_cached` can remove their
    cached embeddings once the deletion committed."""
    return [r["indexed"] for r in await conn.fetch(q("chunk_texts"), list(ids), user_id)]


async def forget(
    conn: asyncpg.Connection,
    user_id: UUID,
    ids: Sequence[UUID],
    *,
    request_id: str | None = None,
) -> Forgotten:
    """What stays of memories ``ids`` of the user once they are deleted, in the transaction
    that deleted them: nothing that names them or repeats their words.

    The service's own summaries of them (a session's summary of a deleted conversation, and
    a month's period summary over that one) repeat their words: they are deleted too
    (audited, ``memory.delete``), and the next summary job or roll-up writes them again from
    what is left. Their ids, and the deleted memories', leave the ``covers`` of the user's
    other summaries (those the user wrote) and the ``sources`` of the facts learned from a
    deleted conversation (``conversation:<id>``: the facts stay, without it), and the
    statements and reasons of the job results that came of them (a deleted conversation's
    extraction, a change to a deleted fact) become null (``storage/sql/jobs.sql``:
    forget_in_jobs), as do those of what consolidation keeps of each statement it learned to
    replay a retried job (forget_in_learnings).

    The cache is not the database's: the caller reads the deleted memories' texts first
    (:func:`chunk_texts`) and, after the commit, hands them with :attr:`Forgotten.texts` to
    :func:`drop_cached`.

    Returns:
        The summaries deleted with them, and their chunks' texts.
    """
    gone = [str(i) for i in ids]
    rows = await conn.fetch(q("delete_derived_summaries"), gone, user_id)
    derived: list[UUID] = [r["id"] for r in rows]
    if derived:
        await write_audit(
            conn,
            "memory.delete",
            "summary",
            derived,
            user_id,
            request_id=request_id,
            details={"reason": "summarised deleted memories", "of": gone},
        )
        gone += [str(i) for i in derived]
    await conn.execute(q("uncover_memory"), gone, user_id)
    await conn.execute(q("unsource_memory"), [f"{CONVERSATION_SOURCE}{i}" for i in gone], user_id)
    await conn.execute(q("forget_in_jobs"), gone, user_id)
    await conn.execute(q("forget_in_learnings"), gone, user_id)
    return Forgotten(derived, [text for r in rows for text in r["texts"]])


async def drop_cached(embeddings: Embeddings, texts: Sequence[str]) -> None:
    """After a deletion committed: remove the cached embeddings of the deleted memories'
    texts (``texts``, from :func:`chunk_texts` and :attr:`Forgotten.texts`), under the
    current model and every retired one, from this process's LRU and from Redis, as an
    erasure does for all of a user's texts; a vector of a text says much of its words.
    (The key is the text's hash and model, shared by every user: another user's identical
    text is embedded again on its next use, nothing more.) Best effort: the deletion has
    committed; a Redis failure is logged and those entries expire within a week."""
    keys = embeddings.erasure_keys(list(dict.fromkeys(texts)))
    if not keys:
        return
    cache = embeddings.cache
    for key in keys:
        cache.local.delete(key)
    if cache.remote is None:
        return
    try:
        await cache.remote.delete_many(keys)
    except Exception:
        _log.warning(
            "could not remove %d cached embeddings of deleted memories from Redis", len(keys)
        )


async def cache_for_user(
    db: Database, cache: TieredCache, user_id: UUID, key: str, value: bytes, *, ttl: float
) -> None:
    """Cache ``value`` (derived from the user's data: a search's results, a session's state)
    under ``key`` (:meth:`~halldyll_ray.storage.cache.TieredCache.user_key`), then check that
    the user still exists, and remove it again if not.

    The value was read before it is written here, so an erasure can commit in between: its
    sweep of the user's keys (in its transaction, and once more after the commit) came before
    this write, and the entry stayed in Redis after the erasure said the user was gone (a
    search's results, their memories' text, for up to SEARCH_CACHE_TTL_SECONDS). Read after
    the write, the user's row is there only if the erasure had not committed yet, and then
    its sweep after the commit removes the entry; otherwise the entry goes here."""
    await cache.set(key, value, ttl=ttl)
    if await db.fetchrow(q("user_state"), user_id) is None:
        await cache.delete(key)


async def require_user(db: Database, user_id: UUID) -> None:
    """NotFound("user ... not found") unless the user exists: the one answer every path gives
    for a missing or deleted user. Called on the miss path only (no cost on a hit)."""
    if await db.fetchrow(q("user_state"), user_id) is None:
        raise NotFound(f"user {user_id} not found")


async def insert_chunks(
    conn: asyncpg.Connection, row: Any, chunks: Sequence[Chunk], vectors: np.ndarray
) -> None:
    """Write ``chunks`` of the memory ``row`` with ``vectors`` (len(chunks) x dimension, from
    :meth:`~halldyll_ray.components.embeddings.Embeddings.embed`, which names their model).

    Raises:
        Unavailable: the vectors are of another model than the one the database searches
            (a re-embedding switched models since they were made); nothing is written.
    """
    await insert_chunk_rows(conn, row["user_id"], [(row["id"], c) for c in chunks], vectors)


async def insert_chunk_rows(
    conn: asyncpg.Connection,
    user_id: UUID,
    chunks: Sequence[tuple[UUID, Chunk]],
    vectors: np.ndarray,
) -> None:
    """Write chunks of any number of the user's memories in one statement (query
    ``insert_chunks``): ``chunks[i]`` is (memory id, chunk), embedded as ``vectors[i]``.

    The filter columns (model, session, type, tags, creation time) and ``valid_to`` (a
    closed fact's chunks are closed with it, migration 0012) are copied from each chunk's
    memory row, which must already be written in this transaction.

    Raises:
        Unavailable: the vectors are of another model than the one the database searches
            (SQLSTATE HL001 from ``halldyll_embedding_for_write``); nothing is written.
        NotFound: a memory id is not a memory of the user (a caller's bug).
    """
    model = model_of(vectors)
    # In statements of at most CHUNK_ROWS_PER_STATEMENT rows, all in the caller's transaction:
    # each row is an HNSW insertion (about 1.5 ms here, more under load), so one statement of
    # a transcription at its limit (10,000 segments) or of a bulk store of long conversations
    # passed DB_COMMAND_TIMEOUT_SECONDS and an input within every limit was a 503.
    for start in range(0, len(chunks), CHUNK_ROWS_PER_STATEMENT):
        part = chunks[start : start + CHUNK_ROWS_PER_STATEMENT]
        status = await conn.execute(
            *bind(
                "insert_chunks",
                user_id=user_id,
                memory_ids=[memory_id for memory_id, _ in part],
                parts=[c.part for _, c in part],
                part_indexes=[c.part_index for _, c in part],
                chunk_indexes=[c.chunk_index for _, c in part],
                contents=[c.text for _, c in part],
                labels=[c.label for _, c in part],
                # Vector objects: a list of arrays would be read as a two-dimensional array.
                embeddings=[
                    Vector(np.asarray(vector)) for vector in vectors[start : start + len(part)]
                ],
                embedding_model=model,
            )
        )
        if int(status.rsplit(" ", 1)[-1]) != len(part):
            raise NotFound("a chunk names a memory the user does not have")


async def insert_messages(
    conn: asyncpg.Connection, memory_id: UUID, first: int, messages: Sequence[Message]
) -> list[StoredMessage]:
    """Write ``messages`` of a conversation from sequence number ``first``; return them."""
    return (await insert_message_rows(conn, [(memory_id, first, messages)]))[0]


async def insert_message_rows(
    conn: asyncpg.Connection, conversations: Sequence[tuple[UUID, int, Sequence[Message]]]
) -> list[list[StoredMessage]]:
    """Write the messages of several conversations in one statement (query
    ``insert_messages``): each item is (conversation id, first sequence number, messages).
    Returns each conversation's messages as stored, in the order given; a message without
    ``created_at`` gets now."""
    now = datetime.now(UTC)
    stored = [
        [
            StoredMessage(
                seq=first + i,
                role=MessageRole(m.role),
                name=m.name,
                content=m.content,
                created_at=m.created_at or now,
            )
            for i, m in enumerate(messages)
        ]
        for _, first, messages in conversations
    ]
    rows = [
        (memory_id, m)
        for (memory_id, _, _), written in zip(conversations, stored, strict=True)
        for m in written
    ]
    if rows:
        await conn.execute(
            *bind(
                "insert_messages",
                memory_ids=[memory_id for memory_id, _ in rows],
                seqs=[m.seq for _, m in rows],
                roles=[m.role.value for _, m in rows],
                names=[m.name for _, m in rows],
                contents=[m.content for _, m in rows],
                created_ats=[m.created_at for _, m in rows],
            )
        )
    return stored
