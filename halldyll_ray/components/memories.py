"""Reading memories, and the one mapping between a ``memories`` row and :class:`StoredMemory`.

Every component that writes or returns memories uses :func:`split` (model -> columns) and
:func:`to_record` (row -> model) from here, so a stored row always reads back through the
same model that validated it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from halldyll_ray import validation
from halldyll_ray.components.base import require_user
from halldyll_ray.components.registry import ModelRegistry
from halldyll_ray.config import Settings
from halldyll_ray.embedding.encoder import TextEncoder
from halldyll_ray.errors import InvalidInput, NotFound
from halldyll_ray.models import (
    MAX_PAGE_SIZE,
    PAGE_MAX_BYTES,
    STORED,
    Fact,
    Memory,
    MemoryType,
    Page,
    StoredMemory,
    StoredMessage,
    Tags,
)
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q
from halldyll_ray.textproc import article, same_particulars

MEMORY: TypeAdapter[Memory] = TypeAdapter(Memory)
TAGS: TypeAdapter[list[str]] = TypeAdapter(Tags)
# Payload fields kept in columns rather than in the jsonb payload.
_COMMON = {"type", "tags", "metadata", "importance", "session_id", "model"}
#: Keys of a row's jsonb payload that are the service's bookkeeping, not the memory's own
#: fields: a session summary's ``through_seq`` (the last message it summarised, see
#: :func:`halldyll_ray.components.summaries.write_session_summary`) and a period summary's
#: ``reading`` (of its sessions' summaries, see :func:`halldyll_ray.components.summaries.
#: reading`). A fact's ``sources`` are shown as ``StoredMemory.sources``.
BOOKKEEPING = ("through_seq", "reading")
#: A page of memories. Parametrized at module level, so that pydantic registers the class
#: here, where pickle finds it by name: a page crosses the hop from Search to the Ingress,
#: which pickles (``serve.deployments.pickled``); one parametrized inside a method does not
#: pickle, and cloudpickle sent the class itself, about 16 kB, with every page.
MemoryPage = Page[StoredMemory]
#: The field of each memory type stored in the ``content`` column (searched, summarised).
CONTENT_FIELD = {
    MemoryType.CONVERSATION: "title",
    MemoryType.FACT: "statement",
    MemoryType.IMAGE: "prompt",
    MemoryType.TRANSCRIPTION: "text",
    MemoryType.SUMMARY: "text",
}


def split(memory: Memory) -> tuple[str, dict[str, Any]]:
    """(content column, jsonb payload) of a memory."""
    content_field = CONTENT_FIELD[memory.type]
    exclude = _COMMON | {content_field, "messages"}
    if isinstance(memory, Fact):
        exclude |= {"confidence", "kind"}
    payload = memory.model_dump(mode="json", exclude=exclude)
    return getattr(memory, content_field) or "", payload


def to_record(row: Any, *, messages: Sequence[StoredMessage] = ()) -> StoredMemory:
    """The :class:`StoredMemory` of a ``memories`` row (with a conversation's messages)."""
    kind = MemoryType(row["type"])
    data = dict(row["payload"])
    sources = data.pop("sources", None)
    for key in BOOKKEEPING:
        data.pop(key, None)
    data.update(
        type=kind.value,
        tags=list(row["tags"]),
        metadata=row["metadata"],
        importance=row["importance"],
        session_id=row["session_id"],
        model=None if row["model_id"] is None else str(row["model_id"]),
    )
    data[CONTENT_FIELD[kind]] = row["content"] or (
        None if kind is MemoryType.CONVERSATION else row["content"]
    )
    if kind is MemoryType.FACT:
        data["confidence"] = round(float(row["confidence"]), 6)
        data["kind"] = row["fact_kind"]
        if sources:
            data["source"] = sources[-1]
    if kind is MemoryType.CONVERSATION:
        data["messages"] = []
    payload = MEMORY.validate_python(data, context=STORED)
    metadata = dict(row["metadata"])
    facts_sources = list(sources or []) if kind is MemoryType.FACT else []
    if facts_sources and "sources" not in metadata:  # the caller's own key is theirs
        metadata["sources"] = facts_sources
    # Constructed, not validated again: every value is the row's, typed by asyncpg, or was
    # validated just above (pydantic ran the payload's model checks a second time on an
    # instance given to StoredMemory: a long transcription's segments were joined twice).
    return StoredMemory.model_construct(
        id=row["id"],
        user_id=row["user_id"],
        type=kind,
        model_id=row["model_id"],
        session_id=row["session_id"],
        tags=list(row["tags"]),
        metadata=metadata,
        importance=float(row["importance"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        reinforcement_count=row["reinforcement_count"],
        message_count=row["message_count"],
        valid_from=(row["valid_from"] or row["created_at"]) if kind is MemoryType.FACT else None,
        valid_to=row["valid_to"],
        superseded_by=row["superseded_by"],
        period=row["period"],
        sources=facts_sources,
        memory=payload,
        messages=list(messages),
    )


def near_duplicate(near: Any, statement: str, settings: Settings, encoder: TextEncoder) -> bool:
    """Whether ``statement`` says the same as its nearest stored fact (a ``nearest_fact``
    row: ``content``, ``similarity``) and so reinforces it: a cosine similarity of at least
    FACT_MERGE_SIMILARITY and the same numbers, dates, negations, names and words ``encoder``
    cannot read (:func:`halldyll_ray.textproc.same_particulars`)."""
    return near["similarity"] >= settings.fact_merge_similarity and same_particulars(
        near["content"], statement, encoder.unknown_spans
    )


def expired(expires_at: datetime | None) -> bool:
    """Whether an ephemeral memory's expiry has passed (purged rows may linger until then)."""
    return expires_at is not None and expires_at <= datetime.now(UTC)


def tags_filter(tags: Sequence[str] | None) -> list[str] | None:
    """The tags a filter asks for, checked as a stored memory's are, or InvalidInput naming
    the field as the HTTP API's 422 does (``tags.3`` for the fourth); a list
    (:func:`~halldyll_ray.validation.filter_list`)."""
    if tags is None:
        return None
    try:
        return TAGS.validate_python(validation.filter_list(tags, "tags"))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = validation.error_location(["tags", *first["loc"]])
        raise InvalidInput(
            validation.invalid_message("tags", field, validation.error_message(first)),
            field=field,
        ) from None


class MemoryReader:
    """One memory by id, or a page of a user's memories with filters."""

    def __init__(
        self, db: Database, registry: ModelRegistry, *, page_max_bytes: int = PAGE_MAX_BYTES
    ) -> None:
        self.db = db
        self.registry = registry
        self.page_max_bytes = page_max_bytes

    async def get(
        self, user_id: UUID | str, memory_id: UUID | str, *, include_messages: bool = True
    ) -> StoredMemory:
        """One memory of the user (a conversation with its messages). NotFound otherwise.

        The memory and its messages are read from one snapshot: read in two transactions, a
        conversation read while a turn was appended to it (or while it was deleted) came back
        with messages that its ``message_count`` did not count (or with none).
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        memory_id = validation.parse_uuid(memory_id, "memory_id")
        include_messages = validation.flag(include_messages, "include_messages")
        messages: list[StoredMessage] = []
        async with self.db.scoped(user_id, readonly=True, snapshot=True) as conn:
            row = await conn.fetchrow(q("get_memory"), memory_id, user_id)
            if row is not None and include_messages and row["type"] == "conversation":
                messages = [
                    StoredMessage(**dict(m))
                    for m in await conn.fetch(q("get_messages"), memory_id, user_id)
                ]
        if row is None or expired(row["expires_at"]):
            await require_user(self.db, user_id)
            raise NotFound(f"memory {memory_id} not found")
        return to_record(row, messages=messages)

    async def history(self, user_id: UUID | str, memory_id: UUID | str) -> list[StoredMemory]:
        """Every version of a fact, oldest first: the statements it replaced and the ones that
        replaced it (``superseded_by`` links), closed or open, ``memory_id``'s among them. The
        order is the links' (each version before the one that replaced it), so the last is
        the one that holds now even when a turn learned late replaced a newer statement.

        Raises:
            NotFound: no such memory of the user (or it expired). InvalidInput: it is not a
                fact (only facts have versions).
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        memory_id = validation.parse_uuid(memory_id, "memory_id")
        rows = await self.db.fetch(q("fact_history"), memory_id, user_id, user_id=user_id)
        if not any(row["id"] == memory_id for row in rows):
            row = await self.db.fetchrow(q("get_memory"), memory_id, user_id, user_id=user_id)
            if row is None or expired(row["expires_at"]):
                await require_user(self.db, user_id)
                raise NotFound(f"memory {memory_id} not found")
            raise InvalidInput(
                f"memory {memory_id} is {article(row['type'])}: only facts have a history",
                field="memory_id",
            )
        return [to_record(row) for row in rows]

    async def page(
        self,
        user_id: UUID | str,
        *,
        types: Iterable[MemoryType | str] | None = None,
        model: UUID | str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[StoredMemory]:
        """The user's memories, newest first, with cursor pagination and filters.

        A page holds at most ``limit`` memories, and ends early once its memories' text and
        payload (as stored: a compressed payload counts compressed) pass ``page_max_bytes``
        (PAGE_MAX_BYTES; the memory that passes it is the page's last, so a page is never
        empty while memories are left): follow ``next_cursor`` until it is None. The cut is
        DynamoDB's (a Query page ends at 1 MB): 500 long transcriptions were one answer of
        hundreds of megabytes. The rows after the cut are read without their text.
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        limit = validation.limit(limit, MAX_PAGE_SIZE)
        scope = await self.registry.scope(model, include_shared)
        after_at, after_id = validation.decode_cursor(cursor, listing=f"memories/{user_id}")
        since, until = validation.time_range(since, until)
        rows = await self.db.fetch(
            *bind(
                "list_memories",
                user_id=user_id,
                types=validation.memory_types(types),
                model_id=scope.model_id,
                include_shared=scope.include_shared,
                session_id=validation.session_id(session_id),
                tags=tags_filter(tags),
                since=since,
                until=until,
                after_at=after_at,
                after_id=after_id,
                limit=limit + 1,
                max_bytes=self.page_max_bytes,
            ),
            user_id=user_id,
        )
        if not rows:
            await require_user(self.db, user_id)
        # The rule of list_memories, which sends the rows after the cut without their text.
        kept, size = 0, 0
        for row in rows[:limit]:
            kept += 1
            size += row["record_bytes"]
            if size > self.page_max_bytes:
                break
        items = [to_record(row) for row in rows[:kept]]
        next_cursor = (
            validation.encode_cursor(
                items[-1].created_at, items[-1].id, listing=f"memories/{user_id}"
            )
            if len(rows) > kept
            else None
        )
        return MemoryPage(items=items, next_cursor=next_cursor)
