"""What several components share: the chunk shape, the user lock, chunk and message writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import numpy as np

from halldyll_ray.components.embeddings import model_of
from halldyll_ray.errors import NotFound
from halldyll_ray.models import Message, MessageRole, StoredMessage
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import q, query

_MONTHS = [
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
    date = f"{day.day} {_MONTHS[day.month - 1]} {day.year}"
    speaker = (name or "").strip()
    return f"{speaker} {date}" if speaker else date


async def lock_user(conn: asyncpg.Connection, user_id: UUID) -> None:
    """Lock the user's row (first in the lock order of ``storage/sql/users.sql``) and bump
    their memory version, which invalidates their cached searches. NotFound if absent."""
    if await conn.fetchval(q("bump_version"), user_id) is None:
        raise NotFound(f"user {user_id} not found")


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
    if not chunks:
        return
    embedding_model = model_of(vectors)
    try:  # a closed fact's chunks are closed with it (migration 0012)
        valid_to = row["valid_to"]
    except KeyError:  # a conversation's appended messages: its row in part only
        valid_to = None
    insert = query("insert_chunk")
    await conn.executemany(
        insert.sql,
        [
            insert.args(
                memory_id=row["id"],
                user_id=row["user_id"],
                model_id=row["model_id"],
                session_id=row["session_id"],
                type=row["type"],
                tags=list(row["tags"]),
                created_at=row["created_at"],
                part=c.part,
                part_index=c.part_index,
                chunk_index=c.chunk_index,
                content=c.text,
                label=c.label,
                valid_to=valid_to,
                embedding=np.asarray(vectors[i]),
                embedding_model=embedding_model,
            )
            for i, c in enumerate(chunks)
        ],
    )


async def insert_messages(
    conn: asyncpg.Connection, memory_id: UUID, first: int, messages: Sequence[Message]
) -> list[StoredMessage]:
    """Write ``messages`` of a conversation from sequence number ``first``; return them."""
    now = datetime.now(UTC)
    stored = [
        StoredMessage(
            seq=first + i,
            role=MessageRole(m.role),
            name=m.name,
            content=m.content,
            created_at=m.created_at or now,
        )
        for i, m in enumerate(messages)
    ]
    insert = query("insert_message")
    await conn.executemany(
        insert.sql,
        [
            insert.args(
                memory_id=memory_id,
                seq=m.seq,
                role=m.role.value,
                name=m.name,
                content=m.content,
                created_at=m.created_at,
            )
            for m in stored
        ],
    )
    return stored
