"""Storing memories (SPEC §4.2): validation, chunking, embedding, deduplication, storage.

Every write takes the user's row lock first (:func:`~halldyll_ray.components.base.lock_user`,
the lock order of ``storage/sql/users.sql``), embeds before its transaction so no connection
waits on the model, and writes its audit row in the same transaction.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg
import numpy as np
from pydantic import TypeAdapter

from halldyll_ray import validation
from halldyll_ray.components.audit import write_audit
from halldyll_ray.components.base import (
    Chunk,
    chunk_texts,
    drop_cached,
    forget,
    insert_chunk_rows,
    insert_chunks,
    insert_message_rows,
    insert_messages,
    lock_user,
    message_label,
    require_user,
)
from halldyll_ray.components.embeddings import Embeddings, model_of
from halldyll_ray.components.memories import MEMORY, expired, near_duplicate, split, to_record
from halldyll_ray.components.registry import ModelRegistry
from halldyll_ray.config import Settings
from halldyll_ray.embedding import TextEncoder
from halldyll_ray.errors import Conflict, HalldyllError, InvalidInput, NotFound
from halldyll_ray.language import detect_language
from halldyll_ray.models import (
    MAX_FACT_SOURCES,
    MAX_MESSAGES_PER_CALL,
    MAX_MESSAGES_PER_CONVERSATION,
    MAX_TAGS,
    Conversation,
    Fact,
    FactKind,
    Image,
    Memory,
    MemoryType,
    MemoryUpdate,
    Message,
    StoredMemory,
    StoredMessage,
    Summary,
    Transcription,
)
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q
from halldyll_ray.textproc import CHUNK_TOKENS, article, token_windows
from halldyll_ray.textproc import fact_key as make_fact_key

if TYPE_CHECKING:
    from halldyll_ray.components.learning import LearningQueue

MESSAGES: TypeAdapter[list[Message]] = TypeAdapter(list[Message])
_UPDATE: TypeAdapter[MemoryUpdate] = TypeAdapter(MemoryUpdate)
#: The fields an update may change, per memory type (tags, metadata, importance: all).
_UPDATABLE = {
    MemoryType.CONVERSATION: {"title"},
    MemoryType.FACT: {"statement", "confidence", "kind"},
    MemoryType.SUMMARY: {"text"},
    MemoryType.TRANSCRIPTION: {"text"},
    MemoryType.IMAGE: set(),
}


@dataclass(frozen=True)
class Appended:
    """What an append stored, or (``replayed``) what an earlier call with its key stored."""

    conversation_id: UUID
    messages: list[StoredMessage]
    replayed: bool
    #: Background jobs the append queued (MEMORY_EXTRACTION=background).
    job_ids: list[UUID] = field(default_factory=list)
    #: Replayed: what the first attempt's learning made (its facts and session summary), and
    #: whether it finished (False: it failed or is still running; see AgentLoop.record_turn).
    fact_ids: list[UUID] = field(default_factory=list)
    summary_id: UUID | None = None
    learned: bool = True


@dataclass(frozen=True)
class SessionLog:
    """The session whose log a turn appends to (``record_turn``).

    Attributes:
        session_id: The session; an idempotency key's earlier request is compared on it and
            on ``model_id``, not on the log's id (another call may have opened a new log).
        model_id: The AI model of the turn (None: shared).
        reopen: Called with the append's connection (the user's row locked) when the log
            looked up before the transaction was deleted since: returns the session's log,
            found or created in that transaction, so that no deletion can come in between.
    """

    session_id: str
    model_id: UUID | None
    reopen: Callable[[asyncpg.Connection], Awaitable[UUID]]


@dataclass(frozen=True)
class _Prepared:
    """A validated memory of a store: its model scope, its chunks, and the prefix of the
    fields its errors name (``""`` for a single store, ``"memories.i."`` in a batch)."""

    memory: Memory
    model_id: UUID | None
    chunks: list[Chunk]
    prefix: str


def _messages(memory: Memory) -> list[Message]:
    return memory.messages if isinstance(memory, Conversation) else []


def _at_index(exc: HalldyllError, index: int) -> HalldyllError:
    """``exc`` raised for item ``index`` of a batch: its message and field name the item."""
    where = f"memories.{index}"
    fields = {**exc.fields, "index": index}
    if isinstance(exc, InvalidInput):
        fields["field"] = f"{where}.{exc.field}" if exc.field else where
    return type(exc)(f"{where}: {exc.message}", **fields)


class Chunker:
    """Splits every part of a memory into chunks of at most CHUNK_TOKENS tokens of the
    encoder's tokenizer, with CHUNK_OVERLAP_TOKENS of overlap (:func:`token_windows`).

    By tokens, not words: the model reads only its first 256 tokens, so a long prompt or fact
    was embedded from its beginning only, and a text without spaces (Chinese, Japanese) was
    one chunk however long. Every part of every memory type is chunked the same way.
    """

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder

    def split(self, text: str) -> list[str]:
        if len(text) <= CHUNK_TOKENS:
            # Every token covers at least one character, so a text this short is one chunk:
            # no tokenizing it here before the model tokenizes it again (most messages).
            stripped = text.strip()
            return [stripped] if stripped else []
        return token_windows(text, self.encoder.token_offsets(text))

    def part(self, part: str, index: int, text: str) -> list[Chunk]:
        return [Chunk(part, index, j, piece) for j, piece in enumerate(self.split(text))]

    def message(self, seq: int, message: Message, now: datetime) -> list[Chunk]:
        """A message's chunks, labelled with its speaker and date (``now`` if it has none)."""
        label = message_label(message.name, message.created_at or now)
        return [
            Chunk("message", seq, j, piece, label)
            for j, piece in enumerate(self.split(message.content))
        ]

    def of(self, memory: Memory) -> list[Chunk]:
        """The embedded pieces of a memory, part by part."""
        chunks: list[Chunk] = []
        if isinstance(memory, Conversation):
            if memory.title and memory.title.strip():
                chunks += self.part("title", 0, memory.title)
            now = datetime.now(UTC)
            for seq, message in enumerate(memory.messages):
                chunks += self.message(seq, message, now)
        elif isinstance(memory, Image):
            chunks += self.part("prompt", 0, memory.prompt)
        elif isinstance(memory, Transcription):
            if memory.segments:
                for i, segment in enumerate(memory.segments):
                    chunks += self.part("segment", i, segment.text)
            else:
                chunks += self.part("text", 0, memory.text)
        elif isinstance(memory, Summary):
            chunks += self.part("text", 0, memory.text)
        elif isinstance(memory, Fact):
            chunks += self.part("statement", 0, memory.statement)
        return chunks


async def _replay(
    conn: asyncpg.Connection,
    user_id: UUID,
    key: str,
    messages: Sequence[Message],
    *,
    conversation_id: UUID | None = None,
    session_id: str | None = None,
    model_id: UUID | None = None,
    extract: bool,
) -> Appended | None:
    """What the request that first sent idempotency ``key`` stored (None for a new key).

    The key names one request (the IETF draft "The Idempotency-Key HTTP Header Field" asks
    a server to refuse its reuse with another payload): a call with other messages (role,
    name, text), for another conversation or session, (a session's turn) of another AI
    model, or that asks otherwise for facts (``extract``; keys stored before migration 0018
    are not compared on it) gets InvalidInput (``field`` ``idempotency_key``), never the
    other request's answer as if it were its own. A session turn of model B replayed model
    A's turn of the same session, answering as stored what B may not write there (a
    Conflict without the key).
    """
    earlier = await conn.fetchrow(q("turn_request"), user_id, key)
    if earlier is None:
        return None
    rows = await conn.fetch(
        q("messages_at"), earlier["conversation_id"], user_id, earlier["message_seqs"]
    )
    stored = [StoredMessage(**dict(r)) for r in rows]
    same = (
        (conversation_id is None or conversation_id == earlier["conversation_id"])
        and (
            session_id is None
            or (session_id == earlier["session_id"] and model_id == earlier["model_id"])
        )
        and earlier["extract_facts"] in (None, extract)
        and [(m.role, m.name, m.content) for m in stored]
        == [(m.role, m.name, m.content) for m in messages]
    )
    if not same:
        raise InvalidInput(
            "this idempotency_key was sent with another request: use a new key for a new request",
            field="idempotency_key",
        )
    return Appended(
        earlier["conversation_id"],
        stored,
        replayed=True,
        job_ids=list(earlier["job_ids"]),
        fact_ids=list(earlier["fact_ids"]),
        summary_id=earlier["summary_id"],
        learned=earlier["learned"],
    )


class Ingestion:
    """Store, append to, update and delete a user's memories.

    Args:
        learning: With background learning (MEMORY_EXTRACTION=background), queues the
            extraction jobs of every conversation written, in the write's transaction.
    """

    def __init__(
        self,
        db: Database,
        embeddings: Embeddings,
        registry: ModelRegistry,
        settings: Settings,
        *,
        learning: LearningQueue | None = None,
    ) -> None:
        self.db = db
        self.embeddings = embeddings
        self.registry = registry
        self.settings = settings
        self.chunker = Chunker(embeddings.encoder)
        self.learning = learning

    async def store(
        self,
        user_id: UUID | str,
        memory: Memory | dict[str, Any],
        *,
        request_id: str | None = None,
    ) -> StoredMemory:
        """Validate, chunk, embed and store one memory of any type; return it as stored.

        A fact whose normalised statement is already stored for the user in the same model
        scope, or whose embedding is within FACT_MERGE_SIMILARITY of one, reinforces that fact
        instead of adding a row (``reinforcement_count`` tells).
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        request_id = validation.request_id(request_id)
        prepared = await self._prepare(memory, None, {})
        return (await self._write_all(user_id, [prepared], request_id=request_id))[0]

    async def store_many(
        self,
        user_id: UUID | str,
        memories: Sequence[Memory | dict[str, Any]],
        *,
        request_id: str | None = None,
    ) -> list[StoredMemory]:
        """Store 1 to STORE_BATCH_MAX memories of any types at once, all or nothing; return
        them as stored, in the order given.

        Every memory is validated and its model resolved before anything is embedded; the
        texts of all of them are embedded in one call (full, length-bucketed batches of the
        encoder, or one request to the Embedding deployment), and everything is written in
        one transaction under the user's lock: one multi-row INSERT each for the memories,
        the messages and the chunks. Facts keep a single store's merge rules: each goes
        through the fact path (nearest fact, reinforce or upsert) in that same transaction,
        in order, so a fact may reinforce a stored fact or an earlier fact of the batch and
        come back with that fact's id. Background learning queues each conversation's jobs
        as a single store does; one ``memory.store`` audit row names every memory added
        (and one ``fact.reinforce`` row the facts reinforced).

        Raises:
            InvalidInput: not a list, empty, more than STORE_BATCH_MAX memories, or a bad
                memory: ``field`` starts with ``memories.i`` and ``index`` is ``i``. Nothing
                is stored.
            NotFound: no such user, or memory ``i`` names an unknown model (``index``).
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        request_id = validation.request_id(request_id)
        memories = validation.items(memories, "memories")
        limit = self.settings.store_batch_max
        if not 1 <= len(memories) <= limit:
            raise InvalidInput(
                f"send 1 to {limit} memories per batch (STORE_BATCH_MAX), got {len(memories)}",
                field="memories",
            )
        models: dict[UUID | str | None, UUID | None] = {}
        prepared = [await self._prepare(m, i, models) for i, m in enumerate(memories)]
        return await self._write_all(user_id, prepared, request_id=request_id, batch=True)

    async def learn(
        self,
        user_id: UUID,
        conversation_id: UUID,
        facts: Sequence[Fact],
        *,
        request_id: str | None = None,
    ) -> list[StoredMemory]:
        """Store ``facts`` learned from the user's conversation ``conversation_id`` (their
        ``source`` names it), as :meth:`store` stores each, in one transaction; nothing when
        the conversation is gone (returns []).

        Checked under the user's row lock, which every deletion of the conversation takes
        first: a turn's candidate facts were stored after its append had committed, each in a
        transaction of its own, so a deletion of the conversation in between left facts of
        its words stored after it, naming it as their source (``forget`` had run already).
        """
        models: dict[UUID | str | None, UUID | None] = {}
        prepared = [await self._prepare(fact, None, models) for fact in facts]
        return await self._write_all(
            user_id, prepared, request_id=request_id, learned_from=conversation_id
        )

    async def _prepare(
        self,
        memory: Memory | dict[str, Any],
        index: int | None,
        models: dict[UUID | str | None, UUID | None],
    ) -> _Prepared:
        """Validate ``memory`` (item ``index`` of a batch, or a single store's with None),
        resolve its model (once per batch: ``models``), detect a transcription's language
        and chunk it. A batch's errors name the item (``memories.i``, ``index``)."""
        try:
            memory = validation.validate(MEMORY, memory, "memory")
            if memory.model not in models:
                models[memory.model] = await self.registry.resolve(memory.model)
        except HalldyllError as exc:
            if index is None:
                raise
            raise _at_index(exc, index) from None
        if isinstance(memory, Transcription) and memory.language is None:
            language = await asyncio.to_thread(detect_language, memory.text)
            memory = memory.model_copy(update={"language": language})
        prefix = "" if index is None else f"memories.{index}."
        return _Prepared(memory, models[memory.model], self.chunker.of(memory), prefix)

    async def _write_all(
        self,
        user_id: UUID,
        items: Sequence[_Prepared],
        *,
        request_id: str | None,
        batch: bool = False,
        learned_from: UUID | None = None,
    ) -> list[StoredMemory]:
        """Embed the chunks of ``items`` in one call, then write them in one transaction;
        with ``learned_from``, only while that conversation of the user exists (:meth:`learn`).

        A model of the batch deleted after it was resolved fails the insert on its foreign key
        (NotFound on ``model``, nothing written): for a batch, it names the first memory
        that gave that model (``index``, ``memories.i`` in the message), as a model unknown
        from the start does. Which one is read after the transaction has ended, from the
        registry, without a lock: a deleted model's id never comes back, and no lock is taken
        on a model row in the write path (users.sql's lock order is unchanged)."""
        try:
            return await self._write_locked(
                user_id, items, request_id=request_id, batch=batch, learned_from=learned_from
            )
        except NotFound as exc:
            if not batch or exc.fields.get("field") != "model":
                raise
            registered: set[UUID] = set()
            for index, item in enumerate(items):
                if item.model_id is None or item.model_id in registered:
                    continue
                try:
                    await self.registry.get(item.model_id)
                except NotFound:
                    raise _at_index(exc, index) from exc
                registered.add(item.model_id)
            raise

    async def _write_locked(
        self,
        user_id: UUID,
        items: Sequence[_Prepared],
        *,
        request_id: str | None,
        batch: bool,
        learned_from: UUID | None,
    ) -> list[StoredMemory]:
        """:meth:`_write_all`'s embedding and transaction."""
        plain = [i for i, item in enumerate(items) if not isinstance(item.memory, Fact)]
        facts = [i for i, item in enumerate(items) if isinstance(item.memory, Fact)]
        # The memories' chunks first, then the facts': one slice of vectors each.
        order = plain + facts
        vectors = await self.embeddings.embed(
            [chunk.indexed for i in order for chunk in items[i].chunks]
        )
        ids = {i: uuid.uuid4() for i in plain}
        records: dict[int, StoredMemory] = {}
        added: dict[int, UUID] = {}  # by position in the batch: the audit lists them in order
        reinforced: dict[int, UUID] = {}
        async with self.db.scoped(user_id) as conn:
            await lock_user(conn, user_id)
            if learned_from is not None and (
                await conn.fetchval(q("lock_learning_source"), learned_from, user_id) is None
            ):
                return []  # deleted since the turn: nothing is learned from it
            for item in items:
                if isinstance(item.memory, Summary) and item.memory.covers:
                    await self._check_owned(
                        conn, user_id, item.memory.covers, item.prefix + "covers"
                    )
            rows = await self._insert_memories(conn, user_id, [(ids[i], items[i]) for i in plain])
            conversations = [
                i
                for i in plain
                if isinstance(conv := items[i].memory, Conversation) and conv.messages
            ]
            written = await insert_message_rows(
                conn, [(ids[i], 0, _messages(items[i].memory)) for i in conversations]
            )
            messages = dict(zip(conversations, written, strict=True))
            placed = [(ids[i], chunk) for i in plain for chunk in items[i].chunks]
            await insert_chunk_rows(conn, user_id, placed, vectors[: len(placed)])
            if self.learning is not None:
                for i in conversations:
                    await self.learning.after_write(
                        conn,
                        user_id=user_id,
                        conversation_id=ids[i],
                        messages=messages[i],
                        model_id=items[i].model_id,
                        session_id=items[i].memory.session_id,
                        request_id=request_id,
                    )
            for i in plain:
                records[i] = to_record(rows[ids[i]], messages=messages.get(i, ()))
                added[i] = ids[i]
            start = len(placed)
            for i in facts:
                end = start + len(items[i].chunks)
                fact = items[i].memory
                assert isinstance(fact, Fact)
                row = await self._write_fact(
                    conn, user_id, fact, items[i].model_id, items[i].chunks, vectors[start:end]
                )
                start = end
                records[i] = to_record(row)
                (reinforced if row["reinforced"] else added)[i] = row["id"]
            types = {items[i].memory.type.value for i in range(len(items))}
            details = {"memories": len(items)} if batch else None
            if added:
                await write_audit(
                    conn,
                    "memory.store",
                    types.pop() if len(types) == 1 else "memory",
                    [added[i] for i in sorted(added)],
                    user_id,
                    request_id=request_id,
                    details=details,
                )
            if reinforced:
                await write_audit(
                    conn,
                    "fact.reinforce",
                    "fact",
                    [reinforced[i] for i in sorted(reinforced)],
                    user_id,
                    request_id=request_id,
                    details=details,
                )
        return [records[i] for i in range(len(items))]

    @staticmethod
    async def _insert_memories(
        conn: asyncpg.Connection, user_id: UUID, items: Sequence[tuple[UUID, _Prepared]]
    ) -> dict[UUID, Any]:
        """Insert the memories (not facts) of ``items`` in one statement; their rows by id."""
        if not items:
            return {}
        columns: dict[str, list[Any]] = {
            name: []
            for name in (
                "ids",
                "model_ids",
                "session_ids",
                "types",
                "contents",
                "payloads",
                "tags",
                "metadata",
                "importances",
                "message_counts",
            )
        }
        for memory_id, item in items:
            memory = item.memory
            content, payload = split(memory)
            for name, value in (
                ("ids", memory_id),
                ("model_ids", item.model_id),
                ("session_ids", memory.session_id),
                ("types", memory.type.value),
                ("contents", content),
                ("payloads", json.dumps(payload)),
                ("tags", json.dumps(list(memory.tags))),
                ("metadata", json.dumps(memory.metadata)),
                ("importances", memory.importance),
                ("message_counts", len(_messages(memory))),
            ):
                columns[name].append(value)
        rows = await conn.fetch(*bind("insert_memories", user_id=user_id, **columns))
        return {row["id"]: row for row in rows}

    async def _write_fact(
        self,
        conn: asyncpg.Connection,
        user_id: UUID,
        fact: Fact,
        model_id: UUID | None,
        chunks: list[Chunk],
        vectors: np.ndarray,
    ) -> Any:
        """Write one fact in the caller's transaction (the user's row locked): reinforce the
        nearest open fact if it says the same (:func:`near_duplicate`) or has the same
        normalised statement, else insert it with its chunks; return its row (``reinforced``
        tells)."""
        key = make_fact_key(fact.statement)
        vector = vectors[0]  # near-duplicates are judged on the statement's first chunk
        ttl = timedelta(days=self.settings.ephemeral_fact_ttl_days)
        promote = self.settings.fact_promotion_confidence
        ephemeral = fact.kind is FactKind.EPHEMERAL
        content, payload = split(fact)
        payload["sources"] = [fact.source] if fact.source else []
        # The user's row is locked: writes of one user are serialised, so the near-duplicate
        # check below cannot race another replica storing a paraphrase at the same time.
        row = None
        near = await conn.fetchrow(
            *bind(
                "nearest_fact",
                user_id=user_id,
                model_id=model_id,
                vector=vector,
                embedding_model=model_of(vectors),
            )
        )
        if near is not None and near_duplicate(
            near, fact.statement, self.settings, self.chunker.encoder
        ):
            row = await conn.fetchrow(
                *bind(
                    "reinforce_fact",
                    id=near["memory_id"],
                    user_id=user_id,
                    confidence=fact.confidence,
                    fact_kind=fact.kind.value,
                    ttl=ttl,
                    promote_at=promote,
                    tags=fact.tags,
                    max_tags=MAX_TAGS,
                    max_sources=MAX_FACT_SOURCES,
                    sources=payload["sources"],
                )
            )
        if row is None:
            row = await conn.fetchrow(
                *bind(
                    "upsert_fact",
                    id=uuid.uuid4(),
                    user_id=user_id,
                    model_id=model_id,
                    session_id=fact.session_id,
                    content=content,
                    payload=payload,
                    tags=fact.tags,
                    max_tags=MAX_TAGS,
                    max_sources=MAX_FACT_SOURCES,
                    metadata=fact.metadata,
                    importance=fact.importance,
                    fact_key=key,
                    confidence=fact.confidence,
                    fact_kind=fact.kind.value,
                    expires_at=datetime.now(UTC) + ttl if ephemeral else None,
                    ttl=ttl,
                    promote_at=promote,
                    valid_from=None,
                )
            )
            if not row["reinforced"]:
                await insert_chunks(conn, row, chunks, vectors)
        if row["reinforced"]:  # by similarity or by the same statement: merged tags
            await conn.execute(q("update_chunk_filters"), row["id"], user_id, row["tags"])
        return row

    async def append_messages(
        self,
        user_id: UUID | str,
        conversation_id: UUID | str,
        messages: Sequence[Message | dict[str, Any]],
        *,
        request_id: str | None = None,
    ) -> list[StoredMessage]:
        """Append messages to a conversation; returns them with their sequence numbers."""
        appended = await self.append(user_id, conversation_id, messages, request_id=request_id)
        return appended.messages

    async def append(
        self,
        user_id: UUID | str,
        conversation_id: UUID | str,
        messages: Sequence[Message | dict[str, Any]],
        *,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        extract: bool = True,
        session_turn: bool = False,
        session: SessionLog | None = None,
    ) -> Appended:
        """:meth:`append_messages`, once per ``idempotency_key`` of the user.

        With a key that an earlier call of the user stored, nothing is written and the
        earlier call's conversation and messages come back (``replayed``). The check runs
        under the user's row lock, so two concurrent calls with one key store once.

        With background learning, the append queues its jobs in its transaction
        (``job_ids``): fact extraction unless ``extract`` is False, and for a
        ``session_turn`` (record_turn) the session summary every N turns.

        With ``session`` (record_turn), ``conversation_id`` is the session's log as looked
        up before; if it was deleted since, or holds MAX_MESSAGES_PER_CONVERSATION messages
        (then it stays a conversation of the session, no longer its log), the turn goes to
        the log that ``session.reopen`` finds or creates in this transaction (the returned
        ``conversation_id`` says which).
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        conversation_id = validation.parse_uuid(conversation_id, "conversation_id")
        request_id = validation.request_id(request_id)
        checked = validation.validate(MESSAGES, validation.items(messages, "messages"), "messages")
        if not 1 <= len(checked) <= MAX_MESSAGES_PER_CALL:
            raise InvalidInput(
                f"send 1 to {MAX_MESSAGES_PER_CALL} messages per call", field="messages"
            )
        key = validation.idempotency_key(idempotency_key)
        vectors_for = await self._message_vectors(checked)
        async with self.db.scoped(user_id) as conn:
            # The user's row first, then the conversation's (storage/sql/users.sql).
            await lock_user(conn, user_id)
            if key is not None:
                earlier = await (
                    _replay(
                        conn,
                        user_id,
                        key,
                        checked,
                        conversation_id=conversation_id,
                        extract=extract,
                    )
                    if session is None
                    else _replay(
                        conn,
                        user_id,
                        key,
                        checked,
                        session_id=session.session_id,
                        model_id=session.model_id,
                        extract=extract,
                    )
                )
                if earlier is not None:
                    return earlier
            reserved = await conn.fetchrow(
                q("reserve_messages"), conversation_id, user_id, len(checked)
            )
            if reserved is None and session is not None:
                # The session's log was deleted after it was looked up: its next one, in this
                # transaction (a lookup and an append in two could each lose such a race).
                conversation_id = await session.reopen(conn)
                reserved = await conn.fetchrow(
                    q("reserve_messages"), conversation_id, user_id, len(checked)
                )
            if reserved is None:
                raise NotFound(f"conversation {conversation_id} not found")
            if reserved["message_count"] > MAX_MESSAGES_PER_CONVERSATION and session is not None:
                # A session's log is full: it stays a conversation of the session (found by
                # its session_id, exported as it is) and the session goes on in a new log.
                await conn.execute(q("retire_full_log"), conversation_id, user_id, len(checked))
                conversation_id = await session.reopen(conn)
                reserved = await conn.fetchrow(
                    q("reserve_messages"), conversation_id, user_id, len(checked)
                )
            if reserved["message_count"] > MAX_MESSAGES_PER_CONVERSATION:
                raise InvalidInput(
                    f"a conversation holds at most {MAX_MESSAGES_PER_CONVERSATION} messages",
                    field="messages",
                )
            first = reserved["message_count"] - len(checked)
            stored = await insert_messages(conn, conversation_id, first, checked)
            chunks, vectors = vectors_for(first)
            row = {
                **dict(reserved),
                "id": conversation_id,
                "user_id": user_id,
                "type": "conversation",
            }
            await insert_chunks(conn, row, chunks, vectors)
            job_ids: list[UUID] = []
            if self.learning is not None:
                job_ids = await self.learning.after_write(
                    conn,
                    user_id=user_id,
                    conversation_id=conversation_id,
                    messages=stored,
                    model_id=reserved["model_id"],
                    session_id=reserved["session_id"],
                    request_id=request_id,
                    extract=extract,
                    session_turn=session_turn,
                )
            if key is not None:
                # Inline learning (AgentLoop.record_turn) comes after this transaction and
                # marks the key's row learned when it is done.
                await conn.execute(
                    *bind(
                        "insert_turn_request",
                        user_id=user_id,
                        idempotency_key=key,
                        conversation_id=conversation_id,
                        message_seqs=[m.seq for m in stored],
                        job_ids=job_ids,
                        learned=self.learning is not None or not session_turn,
                        extract_facts=extract,
                    )
                )
            await write_audit(
                conn,
                "conversation.append",
                "conversation",
                [conversation_id],
                user_id,
                request_id=request_id,
                details={"messages": len(stored)},
            )
        return Appended(conversation_id, stored, replayed=False, job_ids=job_ids)

    async def replay(
        self,
        user_id: UUID,
        key: str,
        messages: Sequence[Message],
        *,
        session_id: str,
        model_id: UUID | None,
        extract: bool,
    ) -> Appended | None:
        """The earlier answer to a turn of ``session_id`` by AI model ``model_id`` with
        idempotency ``key`` (None when the key is new), read before the session's log is
        looked up, so that a repeated key creates nothing. InvalidInput as :meth:`append`."""
        async with self.db.scoped(user_id) as conn:
            return await _replay(
                conn,
                user_id,
                key,
                messages,
                session_id=session_id,
                model_id=model_id,
                extract=extract,
            )

    async def _message_vectors(
        self, messages: Sequence[Message]
    ) -> Callable[[int], tuple[list[Chunk], np.ndarray]]:
        """Embed messages before the transaction; return a function placing them at seq n."""
        now = datetime.now(UTC)
        pieces = [
            (i, chunk) for i, m in enumerate(messages) for chunk in self.chunker.message(0, m, now)
        ]
        vectors = await self.embeddings.embed([chunk.indexed for _, chunk in pieces])

        def at(first_seq: int) -> tuple[list[Chunk], np.ndarray]:
            chunks = [replace(chunk, part_index=first_seq + i) for i, chunk in pieces]
            return chunks, vectors

        return at

    async def update(
        self,
        user_id: UUID | str,
        memory_id: UUID | str,
        update: MemoryUpdate | dict[str, Any],
        *,
        request_id: str | None = None,
    ) -> StoredMemory:
        """Change tags, metadata, importance, a conversation's title, a fact's statement,
        confidence or kind, or the text of a summary or transcription (re-embedded)."""
        user_id = validation.parse_uuid(user_id, "user_id")
        memory_id = validation.parse_uuid(memory_id, "memory_id")
        request_id = validation.request_id(request_id)
        update = validation.validate(_UPDATE, update, "update")
        current = await self.db.fetchrow(q("get_memory"), memory_id, user_id, user_id=user_id)
        if current is None or expired(current["expires_at"]):
            await require_user(self.db, user_id)
            raise NotFound(f"memory {memory_id} not found")
        if not update.model_dump(exclude_none=True):
            return to_record(current)  # nothing to change: nothing written, updated_at kept
        kind = MemoryType(current["type"])
        allowed = _UPDATABLE[kind]
        for name in ("title", "statement", "confidence", "kind", "text"):
            if getattr(update, name) is not None and name not in allowed:
                raise InvalidInput(
                    f"{article(kind.value)} has no field {name!r} to update", field=name
                )
        new_content: str | None = None
        payload: dict[str, Any] | None = None
        new_key: str | None = None
        chunks: list[Chunk] = []
        part = ""
        if update.title is not None:
            new_content, part = update.title, "title"
            chunks = self.chunker.part("title", 0, update.title)
        elif update.statement is not None:
            new_content, part = update.statement, "statement"
            new_key = make_fact_key(update.statement)
            chunks = self.chunker.part("statement", 0, update.statement)
        elif update.text is not None:
            new_content = update.text
            if kind is MemoryType.TRANSCRIPTION:
                # New text replaces the segments, whose timings no longer hold, and its
                # language is detected again: every value derived from a text follows it.
                language = await asyncio.to_thread(detect_language, update.text)
                payload = {**current["payload"], "segments": [], "language": language}
                part = "segment"
            else:
                part = "text"
            chunks = self.chunker.part("text", 0, update.text)
        vectors = await self.embeddings.embed([c.indexed for c in chunks]) if chunks else None
        expires_at = None
        if update.kind is FactKind.EPHEMERAL:
            expires_at = datetime.now(UTC) + timedelta(days=self.settings.ephemeral_fact_ttl_days)
        async with self.db.scoped(user_id) as conn:
            await lock_user(conn, user_id)
            try:
                row = await conn.fetchrow(
                    *bind(
                        "update_memory",
                        id=memory_id,
                        user_id=user_id,
                        tags=update.tags,
                        metadata=update.metadata,
                        importance=update.importance,
                        content=new_content,
                        payload=payload,
                        confidence=update.confidence,
                        fact_kind=None if update.kind is None else update.kind.value,
                        set_expiry=update.kind is not None,
                        expires_at=expires_at,
                        fact_key=new_key,
                    )
                )
            except asyncpg.UniqueViolationError:
                raise Conflict("the user already has this fact in this scope") from None
            if row is None:
                raise NotFound(f"memory {memory_id} not found")
            if part:
                await conn.execute(q("delete_chunks_of_part"), memory_id, user_id, part)
                if part == "segment":
                    await conn.execute(q("delete_chunks_of_part"), memory_id, user_id, "text")
                if chunks and vectors is not None:
                    await insert_chunks(conn, row, chunks, vectors)
            if update.tags is not None:
                await conn.execute(q("update_chunk_filters"), memory_id, user_id, row["tags"])
            await write_audit(
                conn,
                "memory.update",
                kind.value,
                [memory_id],
                user_id,
                request_id=request_id,
                details={"fields": sorted(update.model_dump(exclude_none=True))},
            )
        return to_record(row)

    async def delete(
        self, user_id: UUID | str, memory_id: UUID | str, *, request_id: str | None = None
    ) -> None:
        """Delete one memory of the user: its messages and chunks go with it, the service's
        summaries of it too, its id leaves the ``covers`` of the user's summaries, and the job
        results that came of it lose its words (:func:`~halldyll_ray.components.base.forget`);
        once committed, the cached embeddings of its texts go too
        (:func:`~halldyll_ray.components.base.drop_cached`)."""
        user_id = validation.parse_uuid(user_id, "user_id")
        memory_id = validation.parse_uuid(memory_id, "memory_id")
        request_id = validation.request_id(request_id)
        async with self.db.scoped(user_id) as conn:
            await lock_user(conn, user_id)
            texts = await chunk_texts(conn, user_id, [memory_id])
            row = await conn.fetchrow(q("delete_memory"), memory_id, user_id)
            if row is None:
                raise NotFound(f"memory {memory_id} not found")
            forgotten = await forget(conn, user_id, [memory_id], request_id=request_id)
            await write_audit(
                conn, "memory.delete", row["type"], [memory_id], user_id, request_id=request_id
            )
        await drop_cached(self.embeddings, texts + forgotten.texts)

    @staticmethod
    async def _check_owned(
        conn: asyncpg.Connection, user_id: UUID, ids: Sequence[UUID], field: str
    ) -> None:
        unique = list(dict.fromkeys(ids))
        owned = await conn.fetchval(q("count_owned"), user_id, unique)
        if owned != len(unique):
            raise InvalidInput(
                f"{field} names memories that do not exist or belong to someone else", field=field
            )
