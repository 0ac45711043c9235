"""``MemoryEngine``: every operation of the product, in-process, without Ray.

The engine is the core every Ray Serve deployment wraps. It owns one database pool, one
encoder and one cache per process; all state that matters lives in PostgreSQL, so any number
of engines (replicas) can share one database and one Redis.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
import numpy as np
from pydantic import TypeAdapter, ValidationError

from halldyll_ray import context as ctx
from halldyll_ray import requestctx
from halldyll_ray.cache import LocalLRU, RedisTier, TieredCache
from halldyll_ray.config import Settings
from halldyll_ray.db.database import Database, register_codecs, translate_errors
from halldyll_ray.db.embedded import EmbeddedPostgres
from halldyll_ray.db.migrate import apply_migrations, check_schema
from halldyll_ray.embedding import OnnxEncoder, TextEncoder
from halldyll_ray.errors import (
    AuthenticationFailed,
    Conflict,
    HalldyllError,
    InvalidInput,
    NotFound,
    Unavailable,
)
from halldyll_ray.keys import generate_key, hash_key, key_prefix, verify_key
from halldyll_ray.language import detect_language
from halldyll_ray.models import (
    MAX_MESSAGES_PER_CALL,
    MAX_MESSAGES_PER_CONVERSATION,
    MAX_QUERY_CHARS,
    MAX_SEARCH_LIMIT,
    SESSION_ID_PATTERN,
    AIModel,
    ApiKey,
    Context,
    Conversation,
    Fact,
    FactKind,
    Image,
    MatchedPart,
    Memory,
    MemoryType,
    MemoryUpdate,
    Message,
    MessageRole,
    ModelKind,
    NewApiKey,
    Page,
    Principal,
    Role,
    SearchMode,
    SearchResult,
    StoredMemory,
    StoredMessage,
    Summary,
    Tags,
    Transcription,
    TurnRecord,
    User,
)
from halldyll_ray.sql import q
from halldyll_ray.textproc import Line, chunk_text, extract_candidate_facts, extractive_summary
from halldyll_ray.textproc import fact_key as make_fact_key

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_MEMORY = TypeAdapter(Memory)
_MESSAGES = TypeAdapter(list[Message])
_TAGS = TypeAdapter(Tags)
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,185}\.[^@\s]{2,63}$")
_SESSION = re.compile(SESSION_ID_PATTERN)
# Payload fields kept in columns rather than in the jsonb payload.
_COMMON = {"type", "tags", "metadata", "importance", "session_id", "model"}
_CONTENT_FIELD = {
    MemoryType.CONVERSATION: "title",
    MemoryType.FACT: "statement",
    MemoryType.IMAGE: "prompt",
    MemoryType.TRANSCRIPTION: "text",
    MemoryType.SUMMARY: "text",
}
#: Confidence given to facts extracted from a user's message by record_turn.
CANDIDATE_FACT_CONFIDENCE = 0.3
#: Reciprocal-rank-fusion constant (Cormack et al.); 60 is the value the paper recommends.
RRF_K = 60


def _validate(adapter: TypeAdapter[_T], data: Any, what: str) -> _T:
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or what
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            field = "type"
        raise InvalidInput(f"invalid {what}: {field}: {first['msg']}", field=field) from None


def _uuid(value: UUID | str, field: str) -> UUID:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value))
    except (ValueError, TypeError, AttributeError):
        raise InvalidInput(
            f"{field} must be a UUID, got {str(value)[:60]!r}", field=field
        ) from None


@dataclass(frozen=True)
class _Chunk:
    part: str
    part_index: int
    chunk_index: int
    text: str


@dataclass(frozen=True)
class _Hit:
    memory_id: UUID
    part: str
    part_index: int
    text: str
    similarity: float | None
    rank_score: float


@dataclass(frozen=True)
class _Scope:
    """A resolved model scope: (model id or None, include the user's shared memories)."""

    model_id: UUID | None
    include_shared: bool


def _encode_cursor(created_at: datetime, memory_id: UUID) -> str:
    raw = f"{created_at.isoformat()}|{memory_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, memory_id = raw.split("|")
        return datetime.fromisoformat(stamp), UUID(memory_id)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("cursor is not one this API returned", field="cursor") from None


class MemoryEngine:
    """The memory system's operations, async, in-process.

    Args:
        settings: Process settings; ``Settings.from_env()`` when omitted.
        encoder: A loaded text encoder to share (tests, several engines in one process);
            loaded from ``EMBEDDING_MODEL_PATH`` by :meth:`initialize` when omitted.

    Use ``async with MemoryEngine() as engine:`` or call :meth:`initialize` and :meth:`close`.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        encoder: TextEncoder | None = None,
        embedder: Callable[[list[str]], Awaitable[np.ndarray]] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        self._encoder = encoder
        # A remote embedder (the Ray Serve Embedding deployment) replaces the local model
        # for vectors; the local encoder is then only used for its tokenizer.
        self._embedder = embedder
        self._db: Database | None = None
        self._embedded: EmbeddedPostgres | None = None
        self._cache: TieredCache | None = None
        self._model_ids: dict[str, UUID] = {}
        self._api_key_secret: bytes | None = None
        self._dsn = ""

    # ------------------------------------------------------------------ lifecycle
    async def initialize(self, *, migrate: bool | None = None) -> MemoryEngine:
        """Connect (starting the embedded PostgreSQL if DATABASE_URL is unset), load the model.

        Args:
            migrate: Apply pending migrations. Default: yes for the embedded database; for an
                external one, no (run ``halldyll migrate`` as a deploy step) — the schema is
                then only checked.
        """
        if self._db is not None:
            return self
        settings = self.settings
        if settings.database_url is not None:
            dsn = settings.database_url.get_secret_value()
            migrate = False if migrate is None else migrate
        else:
            self._embedded = EmbeddedPostgres(
                settings.data_dir, database=settings.embedded_database
            )
            dsn = await self._embedded.start_async()
            migrate = True if migrate is None else migrate
        self._dsn = dsn
        db = Database(
            dsn,
            pool_size=settings.db_pool_size,
            command_timeout=settings.db_command_timeout_seconds,
            ef_search=settings.hnsw_ef_search,
            role=settings.db_role,
        )
        try:
            # Schema first, on a plain connection: the pool registers pgvector's codecs on
            # every connection, which needs the extension the migrations create.
            conn = await _connect(dsn)
            try:
                if migrate:
                    await apply_migrations(conn, embedding_dimension=settings.embedding_dimension)
                else:
                    await check_schema(conn, embedding_dimension=settings.embedding_dimension)
            finally:
                await conn.close()
            await db.open()
            if self._encoder is None:
                self._encoder = await asyncio.to_thread(
                    OnnxEncoder.load,
                    settings.embedding_model_path,
                    dimension=settings.embedding_dimension,
                    provider=settings.embedding_provider,
                    batch_size=settings.embedding_batch_size,
                )
            elif self._encoder.dimension != settings.embedding_dimension:
                raise InvalidInput(
                    f"the encoder makes {self._encoder.dimension}-d vectors but "
                    f"EMBEDDING_DIMENSION is {settings.embedding_dimension}",
                    field="EMBEDDING_DIMENSION",
                )
        except BaseException:
            await db.close()
            if self._embedded is not None:
                self._embedded.stop()
                self._embedded = None
            raise
        remote = None
        if settings.redis_url is not None:
            remote = RedisTier(
                settings.redis_url.get_secret_value(), prefix=settings.redis_key_prefix + ":"
            )
        self._cache = TieredCache(LocalLRU(settings.cache_size), remote)
        self._db = db
        return self

    async def close(self) -> None:
        """Close the pool and Redis client; leave the embedded server (stops with the last)."""
        db, self._db = self._db, None
        if db is not None:
            await db.close()
        cache, self._cache = self._cache, None
        if cache is not None:
            await cache.aclose()
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)

    def authorized(self, principal: Principal, *, request_id: str | None = None) -> Any:
        """This engine's operations for ``principal``, checked against the permission matrix.

        Returns an :class:`halldyll_ray.access.AuthorizedEngine`.
        """
        from halldyll_ray.access import AuthorizedEngine

        return AuthorizedEngine(self, principal, request_id=request_id)

    async def __aenter__(self) -> MemoryEngine:
        return await self.initialize()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def db(self) -> Database:
        if self._db is None:
            raise Unavailable("the engine is not initialized; call initialize() first")
        return self._db

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            raise Unavailable("the engine is not initialized; call initialize() first")
        return self._encoder

    @property
    def cache(self) -> TieredCache:
        if self._cache is None:
            raise Unavailable("the engine is not initialized; call initialize() first")
        return self._cache

    async def health(self) -> dict[str, Any]:
        """Per-dependency status: database, redis (or 'not configured') and model."""
        report: dict[str, Any] = {}
        try:
            report["database"] = {"ok": True, "version": await self.db.ping()}
        except HalldyllError as exc:
            report["database"] = {"ok": False, "error": exc.message}
        remote = self.cache.remote
        if remote is None:
            report["redis"] = {"ok": True, "configured": False}
        else:
            report["redis"] = {"ok": await remote.ping(), "configured": True}
        report["model"] = {
            "ok": True,
            "id": self.encoder.model_id,
            "dimension": self.encoder.dimension,
        }
        # Redis down means slower, never failing: readiness depends on PostgreSQL and the
        # model only (a 503 here would take every replica out of its load balancer).
        report["ok"] = report["database"]["ok"]
        return report

    # ------------------------------------------------------------------ embeddings
    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` (n x EMBEDDING_DIMENSION, L2-normalised), through the cache."""
        encoder = self.encoder
        dim = encoder.dimension
        keys = [
            "emb:"
            + encoder.model_id
            + ":"
            + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]
            for text in texts
        ]
        cached = await self.cache.get_many(keys, kind="embedding")
        out = np.empty((len(texts), dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for i, value in enumerate(cached):
            if value is not None and len(value) == dim * 4:
                out[i] = np.frombuffer(value, dtype=np.float32)
            else:
                missing.setdefault(texts[i], []).append(i)
        if missing:
            fresh_texts = list(missing)
            if self._embedder is not None:
                vectors = await self._embedder(fresh_texts)
            else:
                vectors = await asyncio.to_thread(encoder.encode, fresh_texts)
            if vectors.shape != (len(fresh_texts), dim):
                raise Unavailable(f"the embedder returned vectors of shape {vectors.shape}")
            to_store = []
            for text, vector in zip(fresh_texts, vectors, strict=True):
                for i in missing[text]:
                    out[i] = vector
                to_store.append((keys[missing[text][0]], vector.astype(np.float32).tobytes()))
            await self.cache.set_many(to_store, ttl=7 * 86_400)
        return out

    # ------------------------------------------------------------------ users
    async def create_user(
        self,
        username: str,
        email: str | None = None,
        role: Role | str = Role.USER,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> User:
        """Create a user. Raises InvalidInput for a bad field, Conflict for a taken name/email."""
        if not isinstance(username, str) or not _USERNAME.match(username):
            raise InvalidInput(
                "username must be 1-64 characters: letters, digits, '.', '_' or '-', starting "
                "with a letter or digit",
                field="username",
            )
        if email is not None and (not isinstance(email, str) or not _EMAIL.match(email)):
            raise InvalidInput("email is not a valid address", field="email")
        role = self._role(role)
        metadata = self._metadata(metadata)
        try:
            async with self.db.scoped() as conn:
                row = await conn.fetchrow(
                    q("insert_user"), uuid.uuid4(), username, email, role.value, metadata
                )
                await self._audit(conn, "user.create", "user", [row["id"]], row["id"])
        except Conflict:
            raise Conflict(f"a user named {username!r} or with that email already exists") from None
        return User(**dict(row))

    async def get_user(self, user_id: UUID | str) -> User:
        row = await self.db.fetchrow(q("get_user"), _uuid(user_id, "user_id"))
        if row is None:
            raise NotFound(f"user {user_id} not found")
        return User(**dict(row))

    async def get_user_by_username(self, username: str) -> User:
        row = await self.db.fetchrow(q("get_user_by_name"), str(username)[:64])
        if row is None:
            raise NotFound(f"user {username!r} not found")
        return User(**dict(row))

    async def list_users(self, *, limit: int = 100, cursor: str | None = None) -> Page[User]:
        limit = self._limit(limit, 1000)
        after_at, after_id = (None, None) if cursor is None else _decode_cursor(cursor)
        rows = await self.db.fetch(
            q("list_users"), None if after_id is None else str(after_id), after_at, limit + 1
        )
        users = [User(**dict(row)) for row in rows[:limit]]
        next_cursor = (
            _encode_cursor(users[-1].created_at, users[-1].id) if len(rows) > limit else None
        )
        return Page[User](items=users, next_cursor=next_cursor)

    async def update_user(
        self,
        user_id: UUID | str,
        *,
        role: Role | str | None = None,
        disabled: bool | None = None,
        email: str | None = None,
        clear_email: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> User:
        user_id = _uuid(user_id, "user_id")
        role_value = None if role is None else self._role(role).value
        if email is not None and not _EMAIL.match(email):
            raise InvalidInput("email is not a valid address", field="email")
        if disabled is not None and not isinstance(disabled, bool):
            raise InvalidInput("disabled must be true or false", field="disabled")
        async with self.db.scoped() as conn:
            row = await conn.fetchrow(
                q("update_user"),
                user_id,
                role_value,
                disabled,
                email is not None or clear_email,
                email,
                None if metadata is None else self._metadata(metadata),
            )
            if row is None:
                raise NotFound(f"user {user_id} not found")
            await self._audit(conn, "user.update", "user", [user_id], user_id)
        return User(**dict(row))

    async def delete_user(self, user_id: UUID | str) -> None:
        """Delete a user and every memory they own."""
        user_id = _uuid(user_id, "user_id")
        async with self.db.scoped() as conn:
            if await conn.fetchval(q("delete_user"), user_id) is None:
                raise NotFound(f"user {user_id} not found")
            await self._audit(conn, "user.delete", "user", [user_id], user_id)

    # ------------------------------------------------------------------ AI models
    async def register_model(
        self,
        name: str,
        kind: ModelKind | str,
        *,
        version: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> AIModel:
        """Add an AI model to the registry (SPEC §4.3). Raises Conflict if the name exists."""
        if not isinstance(name, str) or not 1 <= len(name.strip()) <= 200:
            raise InvalidInput("model name must be 1-200 characters", field="name")
        try:
            kind = ModelKind(kind)
        except ValueError:
            allowed = ", ".join(k.value for k in ModelKind)
            raise InvalidInput(f"kind must be one of: {allowed}", field="kind") from None
        if version is not None and (not isinstance(version, str) or len(version) > 100):
            raise InvalidInput("version must be at most 100 characters", field="version")
        try:
            async with self.db.scoped() as conn:
                row = await conn.fetchrow(
                    q("insert_model"),
                    uuid.uuid4(),
                    name.strip(),
                    kind.value,
                    version,
                    self._metadata(metadata),
                )
                await self._audit(conn, "model.register", "ai_model", [row["id"]], None)
        except Conflict:
            raise Conflict(f"an AI model named {name!r} is already registered") from None
        return AIModel(**dict(row))

    async def get_model(self, ref: UUID | str) -> AIModel:
        """A registered model by id or name."""
        row = None
        if isinstance(ref, UUID) or _looks_like_uuid(ref):
            row = await self.db.fetchrow(q("get_model_by_id"), _uuid(ref, "model"))
        if row is None and isinstance(ref, str):
            row = await self.db.fetchrow(q("get_model_by_name"), ref.strip())
        if row is None:
            raise NotFound(f"AI model {ref!s} is not registered", field="model")
        return AIModel(**dict(row))

    async def list_models(self, *, kind: ModelKind | str | None = None) -> list[AIModel]:
        if kind is not None:
            try:
                kind = ModelKind(kind)
            except ValueError:
                raise InvalidInput(f"unknown model kind {kind!r}", field="kind") from None
        rows = await self.db.fetch(q("list_models"), None if kind is None else kind.value)
        return [AIModel(**dict(row)) for row in rows]

    async def delete_model(self, ref: UUID | str) -> None:
        """Remove a model from the registry; Conflict while memories are scoped to it."""
        model = await self.get_model(ref)
        async with self.db.scoped() as conn:
            await conn.fetchval(q("delete_model"), model.id)
            await self._audit(conn, "model.delete", "ai_model", [model.id], None)
        self._model_ids.pop(model.name.casefold(), None)

    async def _model_id(self, ref: UUID | str | None) -> UUID | None:
        if ref is None:
            return None
        key = str(ref).strip().casefold()
        cached = self._model_ids.get(key)
        if cached is not None:
            return cached
        model = await self.get_model(ref)
        self._model_ids[key] = model.id
        return model.id

    async def _scope(self, model: UUID | str | None, include_shared: bool) -> _Scope:
        return _Scope(await self._model_id(model), include_shared)

    # ------------------------------------------------------------------ storing
    async def store_memory(
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
        user_id = _uuid(user_id, "user_id")
        if not isinstance(memory, Conversation | Fact | Image | Transcription | Summary):
            memory = _validate(_MEMORY, memory, "memory")
        model_id = await self._model_id(memory.model)
        if isinstance(memory, Transcription) and memory.language is None:
            language = await asyncio.to_thread(detect_language, memory.text)
            memory = memory.model_copy(update={"language": language})
        if isinstance(memory, Fact):
            return await self._store_fact(user_id, memory, model_id, request_id=request_id)
        chunks = self._chunks_of(memory)
        vectors = await self.embed([chunk.text for chunk in chunks])
        memory_id = uuid.uuid4()
        content, payload = self._split(memory)
        async with self.db.scoped(user_id) as conn:
            await self._touch_user(conn, user_id)
            if isinstance(memory, Summary) and memory.covers:
                await self._check_owned(conn, user_id, memory.covers, "covers")
            row = await conn.fetchrow(
                q("insert_memory"),
                memory_id,
                user_id,
                model_id,
                memory.session_id,
                memory.type.value,
                content,
                payload,
                memory.tags,
                memory.metadata,
                memory.importance,
                None,
                None,
                None,
                None,
                None,
            )
            messages: list[StoredMessage] = []
            if isinstance(memory, Conversation) and memory.messages:
                messages = await self._insert_messages(conn, memory_id, 0, memory.messages)
                row = await conn.fetchrow(
                    "UPDATE memories SET message_count = $3 WHERE id = $1 AND user_id = $2 "
                    "RETURNING *",
                    memory_id,
                    user_id,
                    len(messages),
                )
            await self._insert_chunks(conn, row, chunks, vectors)
            await self._audit(
                conn, "memory.store", memory.type.value, [memory_id], user_id, request_id=request_id
            )
        return self._record(row, messages=messages)

    async def _store_fact(
        self, user_id: UUID, fact: Fact, model_id: UUID | None, *, request_id: str | None
    ) -> StoredMemory:
        key = make_fact_key(fact.statement)
        vector = (await self.embed([fact.statement]))[0]
        ttl = timedelta(days=self.settings.ephemeral_fact_ttl_days)
        promote = self.settings.fact_promotion_confidence
        ephemeral = fact.kind is FactKind.EPHEMERAL
        content, payload = self._split(fact)
        payload["sources"] = [fact.source] if fact.source else []
        async with self.db.scoped(user_id) as conn:
            # Locks the user's row: writes of one user are serialised, so the near-duplicate
            # check below cannot race another replica storing a paraphrase at the same time.
            await self._touch_user(conn, user_id)
            row = None
            near = await conn.fetchrow(q("nearest_fact"), user_id, model_id, vector)
            if near is not None and near["similarity"] >= self.settings.fact_merge_similarity:
                row = await conn.fetchrow(
                    q("reinforce_fact"),
                    near["memory_id"],
                    user_id,
                    fact.confidence,
                    fact.kind.value,
                    ttl,
                    promote,
                    fact.tags,
                    payload["sources"],
                )
            if row is None:
                memory_id = uuid.uuid4()
                row = await conn.fetchrow(
                    q("upsert_fact"),
                    memory_id,
                    user_id,
                    model_id,
                    fact.session_id,
                    "fact",
                    content,
                    payload,
                    fact.tags,
                    fact.metadata,
                    fact.importance,
                    key,
                    fact.confidence,
                    fact.kind.value,
                    datetime.now(UTC) + ttl if ephemeral else None,
                    None,
                    ttl,
                    promote,
                )
                if not row["reinforced"]:
                    await self._insert_chunks(
                        conn, row, [_Chunk("statement", 0, 0, fact.statement)], vector[None, :]
                    )
            else:
                await conn.execute(q("update_chunk_filters"), row["id"], user_id, row["tags"])
            operation = "fact.reinforce" if row["reinforced"] else "memory.store"
            await self._audit(conn, operation, "fact", [row["id"]], user_id, request_id=request_id)
        return self._record(row)

    async def append_messages(
        self,
        user_id: UUID | str,
        conversation_id: UUID | str,
        messages: Sequence[Message | dict[str, Any]],
        *,
        request_id: str | None = None,
    ) -> list[StoredMessage]:
        """Append messages to a conversation; returns them with their sequence numbers."""
        user_id = _uuid(user_id, "user_id")
        conversation_id = _uuid(conversation_id, "conversation_id")
        checked = _validate(_MESSAGES, list(messages), "messages")
        if not 1 <= len(checked) <= MAX_MESSAGES_PER_CALL:
            raise InvalidInput(
                f"send 1 to {MAX_MESSAGES_PER_CALL} messages per call", field="messages"
            )
        vectors_for = await self._message_vectors(checked)
        async with self.db.scoped(user_id) as conn:
            reserved = await conn.fetchrow(
                q("reserve_messages"), conversation_id, user_id, len(checked)
            )
            if reserved is None:
                raise NotFound(f"conversation {conversation_id} not found")
            if reserved["message_count"] > MAX_MESSAGES_PER_CONVERSATION:
                raise InvalidInput(
                    f"a conversation holds at most {MAX_MESSAGES_PER_CONVERSATION} messages",
                    field="messages",
                )
            await self._touch_user(conn, user_id)
            first = reserved["message_count"] - len(checked)
            stored = await self._insert_messages(conn, conversation_id, first, checked)
            chunks, vectors = vectors_for(first)
            row = {
                **dict(reserved),
                "id": conversation_id,
                "user_id": user_id,
                "type": "conversation",
            }
            await self._insert_chunks(conn, row, chunks, vectors)
            await self._audit(
                conn,
                "conversation.append",
                "conversation",
                [conversation_id],
                user_id,
                request_id=request_id,
                details={"messages": len(stored)},
            )
        return stored

    async def _message_vectors(self, messages: Sequence[Message]) -> Any:
        """Embed messages before the transaction; return a function placing them at seq n."""
        pieces = [
            (i, j, text)
            for i, m in enumerate(messages)
            for j, text in enumerate(chunk_text(m.content))
        ]
        vectors = await self.embed([text for _, _, text in pieces])

        def at(first_seq: int) -> tuple[list[_Chunk], np.ndarray]:
            chunks = [_Chunk("message", first_seq + i, j, text) for i, j, text in pieces]
            return chunks, vectors

        return at

    # ------------------------------------------------------------------ reading
    async def get_memory(
        self, user_id: UUID | str, memory_id: UUID | str, *, include_messages: bool = True
    ) -> StoredMemory:
        """One memory of the user (a conversation with its messages). NotFound otherwise."""
        user_id = _uuid(user_id, "user_id")
        memory_id = _uuid(memory_id, "memory_id")
        row = await self.db.fetchrow(q("get_memory"), memory_id, user_id, user_id=user_id)
        if row is None or _expired(row):
            raise NotFound(f"memory {memory_id} not found")
        messages: list[StoredMessage] = []
        if include_messages and row["type"] == "conversation":
            messages = [
                StoredMessage(**dict(m))
                for m in await self.db.fetch(q("get_messages"), memory_id, user_id, user_id=user_id)
            ]
        return self._record(row, messages=messages)

    async def list_memories(
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
        """The user's memories, newest first, with cursor pagination and filters."""
        user_id = _uuid(user_id, "user_id")
        limit = self._limit(limit, 500)
        scope = await self._scope(model, include_shared)
        after_at, after_id = (None, None) if cursor is None else _decode_cursor(cursor)
        rows = await self.db.fetch(
            q("list_memories"),
            user_id,
            self._types(types),
            scope.model_id,
            scope.include_shared,
            self._session(session_id),
            None if tags is None else _validate(_TAGS, list(tags), "tags"),
            self._time(since, "since"),
            self._time(until, "until"),
            after_at,
            after_id,
            limit + 1,
            user_id=user_id,
        )
        items = [self._record(row) for row in rows[:limit]]
        next_cursor = (
            _encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > limit else None
        )
        return Page[StoredMemory](items=items, next_cursor=next_cursor)

    async def update_memory(
        self,
        user_id: UUID | str,
        memory_id: UUID | str,
        update: MemoryUpdate | dict[str, Any],
        *,
        request_id: str | None = None,
    ) -> StoredMemory:
        """Change tags, metadata, importance, a conversation's title, a fact's statement,
        confidence or kind, or the text of a summary or transcription (re-embedded)."""
        user_id = _uuid(user_id, "user_id")
        memory_id = _uuid(memory_id, "memory_id")
        if not isinstance(update, MemoryUpdate):
            update = _validate(TypeAdapter(MemoryUpdate), update, "update")
        current = await self.db.fetchrow(q("get_memory"), memory_id, user_id, user_id=user_id)
        if current is None or _expired(current):
            raise NotFound(f"memory {memory_id} not found")
        kind = MemoryType(current["type"])
        allowed = {
            MemoryType.CONVERSATION: {"title"},
            MemoryType.FACT: {"statement", "confidence", "kind"},
            MemoryType.SUMMARY: {"text"},
            MemoryType.TRANSCRIPTION: {"text"},
            MemoryType.IMAGE: set(),
        }[kind]
        for name in ("title", "statement", "confidence", "kind", "text"):
            if getattr(update, name) is not None and name not in allowed:
                raise InvalidInput(f"a {kind.value} has no field {name!r} to update", field=name)
        new_content: str | None = None
        payload: dict[str, Any] | None = None
        new_key: str | None = None
        chunks: list[_Chunk] = []
        part = ""
        if update.title is not None:
            new_content, part = update.title, "title"
            chunks = [_Chunk("title", 0, 0, update.title)] if update.title.strip() else []
        elif update.statement is not None:
            new_content, part = update.statement, "statement"
            new_key = make_fact_key(update.statement)
            chunks = [_Chunk("statement", 0, 0, update.statement)]
        elif update.text is not None:
            new_content = update.text
            if kind is MemoryType.TRANSCRIPTION:
                # New text replaces the segments, whose timings no longer hold.
                payload = {**current["payload"], "segments": []}
                part = "segment"
            else:
                part = "text"
            chunks = [_Chunk("text", 0, i, t) for i, t in enumerate(chunk_text(update.text))]
        vectors = await self.embed([c.text for c in chunks]) if chunks else None
        expiry_change = update.kind is not None
        expires_at = None
        if update.kind is FactKind.EPHEMERAL:
            expires_at = datetime.now(UTC) + timedelta(days=self.settings.ephemeral_fact_ttl_days)
        async with self.db.scoped(user_id) as conn:
            await self._touch_user(conn, user_id)
            try:
                row = await conn.fetchrow(
                    q("update_memory"),
                    memory_id,
                    user_id,
                    update.tags,
                    update.metadata,
                    update.importance,
                    new_content,
                    payload,
                    update.confidence,
                    None if update.kind is None else update.kind.value,
                    expiry_change,
                    expires_at,
                    new_key,
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
                    await self._insert_chunks(conn, row, chunks, vectors)
            if update.tags is not None:
                await conn.execute(q("update_chunk_filters"), memory_id, user_id, row["tags"])
            await self._audit(
                conn,
                "memory.update",
                kind.value,
                [memory_id],
                user_id,
                request_id=request_id,
                details={"fields": sorted(update.model_dump(exclude_none=True))},
            )
        return self._record(row)

    async def delete_memory(
        self, user_id: UUID | str, memory_id: UUID | str, *, request_id: str | None = None
    ) -> None:
        """Delete one memory of the user (its messages and chunks go with it)."""
        user_id = _uuid(user_id, "user_id")
        memory_id = _uuid(memory_id, "memory_id")
        async with self.db.scoped(user_id) as conn:
            await self._touch_user(conn, user_id)
            row = await conn.fetchrow(q("delete_memory"), memory_id, user_id)
            if row is None:
                raise NotFound(f"memory {memory_id} not found")
            await self._audit(
                conn, "memory.delete", row["type"], [memory_id], user_id, request_id=request_id
            )

    async def purge_expired(self) -> int:
        """Delete ephemeral facts past their expiry; return how many went."""
        async with self.db.scoped(admin=True) as conn:
            rows = await conn.fetch(q("purge_expired"))
            for owner in sorted({row["user_id"] for row in rows}):
                await conn.execute(q("bump_version"), owner)
            if rows:
                await self._audit(
                    conn,
                    "memory.purge_expired",
                    "fact",
                    [r["id"] for r in rows],
                    None,
                    details={"count": len(rows)},
                )
        return len(rows)

    # ------------------------------------------------------------------ search
    async def search(
        self,
        user_id: UUID | str,
        query: str,
        limit: int | None = None,
        *,
        mode: SearchMode | str = SearchMode.SEMANTIC,
        types: Iterable[MemoryType | str] | None = None,
        model: UUID | str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        threshold: float | None = None,
    ) -> list[SearchResult]:
        """Search the user's memories (SPEC §4.4).

        Args:
            user_id: Whose memories; nothing of another user is read, ranked or cached.
            query: Natural-language text (1-4000 characters).
            limit: How many results (default SEARCH_TOP_K, at most 100).
            mode: ``semantic`` (with full-text fallback), ``hybrid`` (rank fusion) or
                ``fulltext``.
            types, model, include_shared, session_id, tags, since, until: Filters. With
                ``model``, the model's memories plus the user's shared ones (unless
                ``include_shared`` is False).
            threshold: Minimum cosine similarity of a semantic hit (SIMILARITY_THRESHOLD).
        """
        user_id = _uuid(user_id, "user_id")
        if not isinstance(query, str) or not query.strip():
            raise InvalidInput("query must be a non-empty string", field="query")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidInput(f"query is longer than {MAX_QUERY_CHARS} characters", field="query")
        limit = self._limit(
            self.settings.search_top_k if limit is None else limit, MAX_SEARCH_LIMIT
        )
        try:
            mode = SearchMode(mode)
        except ValueError:
            raise InvalidInput("mode must be semantic, hybrid or fulltext", field="mode") from None
        threshold = self.settings.similarity_threshold if threshold is None else threshold
        if not isinstance(threshold, int | float) or not -1.0 <= threshold <= 1.0:
            raise InvalidInput("threshold must be between -1 and 1", field="threshold")
        scope = await self._scope(model, include_shared)
        filters = (
            self._types(types),
            scope.model_id,
            scope.include_shared,
            self._session(session_id),
            None if tags is None else _validate(_TAGS, list(tags), "tags"),
            self._time(since, "since"),
            self._time(until, "until"),
        )
        state = await self.db.fetchrow(q("user_state"), user_id)
        if state is None:
            raise NotFound(f"user {user_id} not found")
        params = json.dumps(
            [query, limit, mode.value, float(threshold), [str(f) for f in filters]],
            ensure_ascii=False,
        )
        cache_key = TieredCache.user_key(
            "search",
            user_id,
            str(state["memory_version"]),
            self.encoder.model_id,
            hashlib.sha256(params.encode()).hexdigest()[:40],
        )
        cached = await self.cache.get(cache_key, kind="search")
        if cached is not None:
            results = _RESULTS.validate_json(cached)
            return [r for r in results if not _expired_record(r.memory)]
        results = await self._search(user_id, query, limit, mode, float(threshold), filters)
        ttl = self.settings.search_cache_ttl_seconds
        if ttl > 0:
            await self.cache.set(cache_key, _RESULTS.dump_json(results), ttl=ttl)
        return results

    async def _search(
        self,
        user_id: UUID,
        query: str,
        limit: int,
        mode: SearchMode,
        threshold: float,
        filters: tuple[Any, ...],
    ) -> list[SearchResult]:
        fetch = min(limit * 4, 400)
        # The vector first, so no connection is held while the Embedding deployment works;
        # then every read of this search in one transaction (fewer round trips).
        vector = None if mode is SearchMode.FULLTEXT else (await self.embed([query]))[0]
        async with self.db.scoped(user_id, readonly=True) as conn:
            fused, source = await self._retrieve(
                conn, user_id, query, vector, mode, threshold, filters, fetch
            )
            if not fused:
                return []
            wanted = [hit.memory_id for hit, _ in fused[: limit * 2]]
            rows = await conn.fetch(q("get_memories"), user_id, wanted)
        by_id = {row["id"]: row for row in rows if not _expired(row)}
        results = []
        for hit, score in fused:
            row = by_id.get(hit.memory_id)
            if row is None:
                continue
            results.append(
                SearchResult(
                    memory=self._record(row),
                    score=round(score, 6),
                    similarity=None if hit.similarity is None else round(hit.similarity, 6),
                    source=source,  # type: ignore[arg-type]
                    matched=MatchedPart(part=hit.part, index=hit.part_index, text=hit.text),
                )
            )
            if len(results) == limit:
                break
        return results

    @staticmethod
    async def _retrieve(
        conn: asyncpg.Connection,
        user_id: UUID,
        query: str,
        vector: np.ndarray | None,
        mode: SearchMode,
        threshold: float,
        filters: tuple[Any, ...],
        fetch: int,
    ) -> tuple[list[tuple[_Hit, float]], str]:
        """Ranked hits (semantic, full-text fallback or fused) and where they came from."""
        semantic: list[_Hit] = []
        if vector is not None:
            rows = await conn.fetch(q("search_semantic"), user_id, vector, *filters, fetch)
            semantic = [
                _Hit(
                    r["memory_id"],
                    r["part"],
                    r["part_index"],
                    r["content"],
                    1.0 - float(r["distance"]),
                    1.0 - float(r["distance"]),
                )
                for r in rows
                if 1.0 - float(r["distance"]) >= threshold
            ]
        source = "semantic"
        fused: list[tuple[_Hit, float]]
        if mode is SearchMode.SEMANTIC and semantic:
            fused = [(hit, hit.rank_score) for hit in _best_per_memory(semantic)]
        else:
            rows = await conn.fetch(q("search_fulltext"), user_id, query, *filters, fetch, vector)
            text_hits = [
                _Hit(
                    r["memory_id"],
                    r["part"],
                    r["part_index"],
                    r["content"],
                    None if r["similarity"] is None else float(r["similarity"]),
                    float(r["rank"]),
                )
                for r in rows
            ]
            if mode is SearchMode.HYBRID:
                source = "hybrid"
                fused = _rrf(_best_per_memory(semantic), _best_per_memory(text_hits))
            else:
                source = "fulltext"
                fused = [(hit, hit.rank_score) for hit in _best_per_memory(text_hits)]
        return fused, source

    # ------------------------------------------------------------------ context
    async def build_context(
        self,
        user_id: UUID | str,
        query: str | None = None,
        *,
        messages: Sequence[Message | dict[str, Any]] | None = None,
        model: UUID | str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        max_tokens: int | None = None,
        limit: int = 30,
    ) -> Context:
        """The context block for a prompt (SPEC §4.5), never over ``max_tokens``.

        Args:
            query: What the next prompt is about; defaults to the last messages' text.
            messages: The current conversation's recent turns (rendered as such).
            model, include_shared: Model scope of the memories drawn.
            session_id: Adds the session's rolling summary.
            max_tokens: Budget (MAX_CONTEXT_TOKENS), counted with the model's tokenizer.
            limit: How many search hits to consider.
        """
        user_id = _uuid(user_id, "user_id")
        recent = [] if messages is None else _validate(_MESSAGES, list(messages), "messages")
        if query is None:
            query = " ".join(m.content for m in recent[-3:]) if recent else ""
        if not query.strip():
            raise InvalidInput("give a query or recent messages", field="query")
        return await self._context(
            user_id,
            query[:MAX_QUERY_CHARS],
            recent=[
                ctx.Candidate(ctx.RECENT, f"{m.role.value}: {m.content}", type="message")
                for m in recent
            ],
            current=None,
            model=model,
            include_shared=include_shared,
            session_id=session_id,
            max_tokens=max_tokens,
            limit=limit,
        )

    async def prepare_context(
        self,
        user_id: UUID | str,
        session_id: str,
        user_message: str,
        *,
        recent_turns: int = 6,
        model: UUID | str | None = None,
        include_shared: bool = True,
        max_tokens: int | None = None,
    ) -> Context:
        """Before an LLM call: summary, relevant memories, the session's recent turns and the
        message, as one deterministic block with labelled sections."""
        user_id = _uuid(user_id, "user_id")
        session_id = self._session(session_id) or ""
        if not isinstance(user_message, str) or not user_message.strip():
            raise InvalidInput("user_message must be a non-empty string", field="user_message")
        if not 0 <= recent_turns <= 100:
            raise InvalidInput("recent_turns must be between 0 and 100", field="recent_turns")
        recent: list[ctx.Candidate] = []
        log_row = await self.db.fetchrow(
            q("session_memory"), user_id, session_id, "log", user_id=user_id
        )
        if log_row is not None and recent_turns:
            rows = await self.db.fetch(
                q("recent_messages"), log_row["id"], user_id, recent_turns * 2, user_id=user_id
            )
            recent = [
                ctx.Candidate(ctx.RECENT, f"{r['role']}: {r['content']}", type="message")
                for r in rows
            ]
        return await self._context(
            user_id,
            user_message[:MAX_QUERY_CHARS],
            recent=recent,
            current=ctx.Candidate(ctx.CURRENT, f"user: {user_message}", type="message"),
            model=model,
            include_shared=include_shared,
            session_id=session_id,
            max_tokens=max_tokens,
            limit=30,
            exclude_memory=None if log_row is None else log_row["id"],
        )

    async def _context(
        self,
        user_id: UUID,
        query: str,
        *,
        recent: list[ctx.Candidate],
        current: ctx.Candidate | None,
        model: UUID | str | None,
        include_shared: bool,
        session_id: str | None,
        max_tokens: int | None,
        limit: int,
        exclude_memory: UUID | None = None,
    ) -> Context:
        budget = self.settings.max_context_tokens if max_tokens is None else max_tokens
        if not isinstance(budget, int) or not 16 <= budget <= 1_000_000:
            raise InvalidInput("max_tokens must be between 16 and 1000000", field="max_tokens")
        session_id = self._session(session_id)
        summary_row = None
        if session_id is not None:
            summary_row = await self.db.fetchrow(
                q("session_memory"), user_id, session_id, "summary", user_id=user_id
            )
        hits = await self.search(
            user_id,
            query,
            min(limit, MAX_SEARCH_LIMIT),
            mode=SearchMode.HYBRID,
            model=model,
            include_shared=include_shared,
        )
        now = datetime.now(UTC)
        candidates = []
        for hit in hits:
            stored = hit.memory
            if stored.id == exclude_memory or (
                summary_row is not None and stored.id == summary_row["id"]
            ):
                continue  # already in the recent turns / the summary section
            payload = stored.memory
            if isinstance(payload, Fact):
                section, salience, text = ctx.FACTS, payload.confidence, payload.statement
            else:
                section, salience = ctx.MEMORIES, stored.importance
                text = _describe(stored, hit.matched)
            candidates.append(
                ctx.Candidate(
                    section=section,
                    text=text,
                    memory_id=stored.id,
                    type=stored.type.value,
                    similarity=max(0.0, hit.similarity or 0.0),
                    created_at=stored.created_at,
                    salience=salience,
                )
            )
        ranked = ctx.rank(
            candidates,
            now=now,
            weights=self.settings.context_weights,
            half_life_days=self.settings.context_recency_half_life_days,
        )
        summary = None
        if summary_row is not None and summary_row["content"]:
            summary = ctx.Candidate(
                ctx.SUMMARY, summary_row["content"], memory_id=summary_row["id"], type="summary"
            )
        encoder = self.encoder
        return ctx.assemble(
            summary=summary,
            relevant=ranked,
            recent=recent,
            current=current,
            max_tokens=budget,
            count_tokens=encoder.count_tokens,
            truncate=encoder.truncate_to_tokens,
        )

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
    ) -> TurnRecord:
        """After an LLM call: append both messages to the session's conversation, refresh the
        session summary every SESSION_SUMMARY_EVERY_N_TURNS turns, and store candidate facts
        found in the user's message as low-confidence ephemeral facts."""
        user_id = _uuid(user_id, "user_id")
        session = self._session(session_id)
        if session is None:
            raise InvalidInput("session_id is required", field="session_id")
        conversation_id = await self._session_log(user_id, session, model)
        try:
            stored = await self.append_messages(
                user_id,
                conversation_id,
                [
                    Message(role=MessageRole.USER, content=user_message),
                    Message(role=MessageRole.ASSISTANT, content=assistant_message),
                ]
                if isinstance(user_message, str) and isinstance(assistant_message, str)
                else [
                    {"role": "user", "content": user_message},
                    {"role": "assistant", "content": assistant_message},
                ],
                request_id=request_id,
            )
        except NotFound:
            # The cached log was deleted meanwhile: forget it and start a new one.
            await self.cache.delete(self._session_key(user_id, session))
            conversation_id = await self._session_log(user_id, session, model)
            stored = await self.append_messages(
                user_id,
                conversation_id,
                [
                    Message(role=MessageRole.USER, content=user_message),
                    Message(role=MessageRole.ASSISTANT, content=assistant_message),
                ],
                request_id=request_id,
            )
        turns = (stored[-1].seq + 1) // 2
        summary_id = None
        if turns % self.settings.session_summary_every_n_turns == 0:
            summary_id = await self._refresh_summary(user_id, session, conversation_id, model)
        fact_ids: list[UUID] = []
        if extract_facts:
            for statement in extract_candidate_facts(user_message):
                fact = await self.store_memory(
                    user_id,
                    Fact(
                        statement=statement,
                        confidence=CANDIDATE_FACT_CONFIDENCE,
                        kind=FactKind.EPHEMERAL,
                        source=f"conversation:{conversation_id}",
                        session_id=session,
                        model=None if model is None else str(model),
                        tags=["extracted"],
                    ),
                    request_id=request_id,
                )
                fact_ids.append(fact.id)
        return TurnRecord(
            conversation_id=conversation_id,
            message_seqs=[m.seq for m in stored],
            summary_id=summary_id,
            fact_ids=fact_ids,
        )

    def _session_key(self, user_id: UUID, session_id: str) -> str:
        return TieredCache.user_key("session", user_id, session_id)

    async def _session_log(self, user_id: UUID, session_id: str, model: UUID | str | None) -> UUID:
        """The id of the session's conversation log, created on first use (session state)."""
        key = self._session_key(user_id, session_id)
        cached = await self.cache.get(key, kind="session")
        if cached is not None:
            return UUID(cached.decode())
        model_id = await self._model_id(model)
        async with self.db.scoped(user_id) as conn:
            await self._touch_user(conn, user_id)
            row = await conn.fetchrow(
                q("create_session_log"),
                uuid.uuid4(),
                user_id,
                model_id,
                session_id,
                f"Session {session_id}",
            )
            if row is None:
                row = await conn.fetchrow(q("session_memory"), user_id, session_id, "log")
            else:
                await self._audit(conn, "memory.store", "conversation", [row["id"]], user_id)
        conversation_id: UUID = row["id"]
        await self.cache.set(key, str(conversation_id).encode(), ttl=86_400)
        return conversation_id

    async def _refresh_summary(
        self, user_id: UUID, session_id: str, conversation_id: UUID, model: UUID | str | None
    ) -> UUID:
        rows = await self.db.fetch(q("get_messages"), conversation_id, user_id, user_id=user_id)
        text = extractive_summary([Line(r["role"], r["content"]) for r in rows])
        if not text:
            text = "(no content yet)"
        model_id = await self._model_id(model)
        chunks = [_Chunk("text", 0, i, t) for i, t in enumerate(chunk_text(text))]
        vectors = await self.embed([c.text for c in chunks])
        payload = {"covers": [str(conversation_id)]}
        async with self.db.scoped(user_id) as conn:
            await self._touch_user(conn, user_id)
            row = await conn.fetchrow(q("session_memory"), user_id, session_id, "summary")
            if row is None:
                row = await conn.fetchrow(
                    q("insert_memory"),
                    uuid.uuid4(),
                    user_id,
                    model_id,
                    session_id,
                    "summary",
                    text,
                    payload,
                    [],
                    {},
                    0.7,
                    None,
                    None,
                    None,
                    None,
                    "summary",
                )
            else:
                row = await conn.fetchrow(
                    q("update_memory"),
                    row["id"],
                    user_id,
                    None,
                    None,
                    None,
                    text,
                    payload,
                    None,
                    None,
                    False,
                    None,
                    None,
                )
                await conn.execute(q("delete_chunks_of_part"), row["id"], user_id, "text")
            await self._insert_chunks(conn, row, chunks, vectors)
            await self._audit(conn, "summary.refresh", "summary", [row["id"]], user_id)
        summary_id: UUID = row["id"]
        return summary_id

    # ------------------------------------------------------------------ API keys
    async def _key_secret(self) -> bytes:
        if self._api_key_secret is None:
            configured = self.settings.api_key_secret
            if configured is not None:
                self._api_key_secret = configured.get_secret_value().encode()
            else:
                stored = await self.db.fetchval(q("meta_value"), "api_key_secret")
                if stored is None:
                    raise Unavailable("the API key secret is missing: run `halldyll migrate`")
                self._api_key_secret = bytes.fromhex(stored)
        return self._api_key_secret

    async def create_api_key(
        self,
        user_id: UUID | str,
        *,
        name: str = "",
        expires_at: datetime | None = None,
        replaces: UUID | None = None,
    ) -> NewApiKey:
        """Create a key for a user. The returned ``key`` is shown this once and never stored."""
        user_id = _uuid(user_id, "user_id")
        if not isinstance(name, str) or len(name) > 100:
            raise InvalidInput("key name must be at most 100 characters", field="name")
        expires_at = self._time(expires_at, "expires_at")
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise InvalidInput("expires_at must be in the future", field="expires_at")
        prefix, key = generate_key()
        digest = hash_key(await self._key_secret(), key)
        async with self.db.scoped() as conn:
            if await conn.fetchrow(q("get_user"), user_id) is None:
                raise NotFound(f"user {user_id} not found")
            row = await conn.fetchrow(
                q("insert_api_key"),
                uuid.uuid4(),
                user_id,
                prefix,
                digest,
                name,
                expires_at,
                replaces,
            )
            await self._audit(
                conn,
                "key.create",
                "api_key",
                [row["id"]],
                user_id,
                details={"prefix": prefix},
            )
        return NewApiKey(key=key, api_key=ApiKey(**dict(row)))

    async def get_api_key(self, key_id: UUID | str) -> ApiKey:
        row = await self.db.fetchrow(q("get_api_key"), _uuid(key_id, "key_id"))
        if row is None:
            raise NotFound(f"API key {key_id} not found")
        return ApiKey(**dict(row))

    async def list_api_keys(self, user_id: UUID | str) -> list[ApiKey]:
        rows = await self.db.fetch(q("list_api_keys"), _uuid(user_id, "user_id"))
        return [ApiKey(**dict(row)) for row in rows]

    async def revoke_api_key(self, key_id: UUID | str) -> ApiKey:
        """Revoke a key at once; revoking twice keeps the first revocation time."""
        key_id = _uuid(key_id, "key_id")
        async with self.db.scoped() as conn:
            row = await conn.fetchrow(q("revoke_api_key"), key_id)
            if row is None:
                raise NotFound(f"API key {key_id} not found")
            await self._audit(conn, "key.revoke", "api_key", [key_id], row["user_id"])
        return ApiKey(**dict(row))

    async def rotate_api_key(self, key_id: UUID | str) -> NewApiKey:
        """A new key for the same user and name, replacing (and revoking) the old one."""
        old = await self.get_api_key(key_id)
        if old.revoked_at is not None:
            raise Conflict("a revoked key cannot be rotated; create a new one")
        new = await self.create_api_key(
            old.user_id, name=old.name, expires_at=None, replaces=old.id
        )
        await self.revoke_api_key(old.id)
        return new

    async def authenticate(self, key: str) -> Principal:
        """The principal behind an API key, or AuthenticationFailed (recorded in the audit)."""
        prefix = key_prefix(key)
        reason = "malformed key"
        row = None
        if prefix is not None:
            row = await self.db.fetchrow(q("api_key_for_auth"), prefix)
            reason = "unknown key"
        if row is not None:
            if not verify_key(await self._key_secret(), key, row["hash"]):
                reason = "wrong key"
            elif row["revoked_at"] is not None:
                reason = "revoked key"
            elif row["expires_at"] is not None and row["expires_at"] <= datetime.now(UTC):
                reason = "expired key"
            elif row["disabled"]:
                reason = "disabled user"
            else:
                if row["stale"]:  # last_used_at is kept to the minute: no write per request
                    async with self.db.scoped() as conn:
                        await conn.execute(q("touch_api_key"), row["id"])
                return Principal(
                    user_id=row["user_id"],
                    username=row["username"],
                    role=Role(row["role"]),
                    key_id=row["id"],
                )
        await self.record_denied(
            None if row is None else row["user_id"],
            None,
            "auth",
            "api_key",
            [] if row is None else [row["id"]],
            reason=reason,
            details={"prefix": prefix},
        )
        raise AuthenticationFailed("invalid, expired or revoked API key")

    # ------------------------------------------------------------------ index maintenance
    async def ensure_user_indexes(self, *, min_rows: int | None = None) -> dict[str, list[UUID]]:
        """Give each very large user a partial HNSW index of their own; drop stale ones.

        A per-user filter on the shared HNSW index is slow for a user with tens of thousands
        of rows when few of them are near the query: the iterative scan walks other users'
        rows up to hnsw.max_scan_tuples (benchmarks/search_scale.py measured p99 30-100 ms at
        1M rows). A partial index ``WHERE user_id = ...`` answers those in a few ms, and the
        planner picks it by itself. Small users are served exactly by the btree and need none.

        Runs as the table owner (DDL), ``CREATE/DROP INDEX CONCURRENTLY`` so writes go on.
        Indexes of users that fell under half the threshold (or are gone) are dropped.
        """
        threshold = self.settings.large_user_index_rows if min_rows is None else min_rows
        if not isinstance(threshold, int) or threshold < 1:
            raise InvalidInput("min_rows must be a positive integer", field="min_rows")
        conn = await _connect(self._dsn)
        created: list[UUID] = []
        dropped: list[UUID] = []
        try:
            counts = {
                row["user_id"]: row["n"]
                for row in await conn.fetch(q("chunk_counts"), max(1, threshold // 2))
            }
            existing = {
                UUID(row["indexname"].removeprefix(_USER_INDEX)): row["indexname"]
                for row in await conn.fetch(q("user_indexes"), _USER_INDEX + "%")
            }
            for user_id, rows in sorted(counts.items()):
                if rows >= threshold and user_id not in existing:
                    # DDL takes no bind parameters; the name and literal come from a UUID.
                    await conn.execute(
                        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {_USER_INDEX}{user_id.hex} "
                        "ON memory_chunks USING hnsw (embedding vector_cosine_ops) "
                        f"WITH (m = 16, ef_construction = 64) WHERE user_id = '{user_id}'",
                        timeout=None,
                    )
                    created.append(user_id)
            for user_id, name in sorted(existing.items()):
                if user_id not in counts:
                    await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
                    dropped.append(user_id)
            if created or dropped:
                await conn.execute("ANALYZE memory_chunks")
        except asyncpg.InsufficientPrivilegeError as exc:
            raise Unavailable(
                "creating indexes needs the table owner's connection (run `halldyll "
                "index-users` with the migration user's DATABASE_URL)"
            ) from exc
        finally:
            await conn.close()
        return {"created": created, "dropped": dropped}

    # ------------------------------------------------------------------ viewer grants
    async def grant_viewer(self, viewer_id: UUID | str, owner_id: UUID | str) -> None:
        """Let a Viewer read another user's memories."""
        viewer_id = _uuid(viewer_id, "viewer_id")
        owner_id = _uuid(owner_id, "owner_id")
        if viewer_id == owner_id:
            raise InvalidInput("a user always reads their own memories", field="owner_id")
        viewer = await self.get_user(viewer_id)
        if viewer.role is not Role.VIEWER:
            raise InvalidInput("read grants are for users with the viewer role", field="viewer_id")
        await self.get_user(owner_id)
        async with self.db.scoped() as conn:
            await conn.execute(
                q("grant_viewer"), viewer_id, owner_id, requestctx.current().actor_id
            )
            await self._audit(conn, "grant.create", "user", [owner_id], viewer_id)

    async def revoke_viewer_grant(self, viewer_id: UUID | str, owner_id: UUID | str) -> None:
        viewer_id = _uuid(viewer_id, "viewer_id")
        owner_id = _uuid(owner_id, "owner_id")
        async with self.db.scoped() as conn:
            if await conn.fetchval(q("revoke_viewer_grant"), viewer_id, owner_id) is None:
                raise NotFound("no such grant")
            await self._audit(conn, "grant.revoke", "user", [owner_id], viewer_id)

    async def viewer_grants(self, viewer_id: UUID | str) -> list[UUID]:
        """The owners whose memories a Viewer may read."""
        rows = await self.db.fetch(q("viewer_grants"), _uuid(viewer_id, "viewer_id"))
        return [row["owner_id"] for row in rows]

    async def users_state(self, user_ids: Sequence[UUID]) -> dict[UUID, tuple[Role, bool]]:
        """(role, disabled) of each existing user among ``user_ids``."""
        rows = await self.db.fetch(q("users_state"), list(dict.fromkeys(user_ids)))
        return {row["id"]: (Role(row["role"]), row["disabled"]) for row in rows}

    async def record_denied(
        self,
        actor_id: UUID | None,
        acting_for: UUID | None,
        operation: str,
        target_type: str | None,
        target_ids: Sequence[UUID],
        *,
        reason: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Write one audit row for a refused call (in its own transaction)."""
        async with self.db.scoped() as conn:
            await self._audit(
                conn,
                operation,
                target_type,
                target_ids,
                acting_for,
                actor_id=actor_id,
                outcome="denied",
                details={"reason": reason, **(details or {})},
            )

    async def record_read(
        self, actor_id: UUID, acting_for: UUID, operation: str, target_ids: Sequence[UUID]
    ) -> None:
        """Audit a read of another user's data (by an Admin or a Service)."""
        async with self.db.scoped() as conn:
            await self._audit(conn, operation, "memory", target_ids, acting_for, actor_id=actor_id)

    async def purge_audit(self, *, older_than_days: int | None = None) -> int:
        """Delete audit rows past the retention (AUDIT_RETENTION_DAYS), as the table owner.

        The application role has no DELETE privilege on the audit log, so this opens its own
        connection with the login role (the database owner for the embedded default).
        """
        days = self.settings.audit_retention_days if older_than_days is None else older_than_days
        if not isinstance(days, int) or days < 1:
            raise InvalidInput(
                "older_than_days must be a positive integer", field="older_than_days"
            )
        cutoff = datetime.now(UTC) - timedelta(days=days)
        conn = await _connect(self._dsn)
        try:
            await register_codecs(conn)
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('halldyll.audit_purge_before', $1, true)",
                    cutoff.isoformat(),
                )
                status = await conn.execute(q("purge_audit"), cutoff)
                await self._audit(
                    conn, "audit.purge", None, [], None, details={"before": cutoff.isoformat()}
                )
        except asyncpg.InsufficientPrivilegeError as exc:
            raise Unavailable(
                "purging the audit log needs the table owner's connection (run "
                "`halldyll purge-audit` with the migration user's DATABASE_URL)"
            ) from exc
        finally:
            await conn.close()
        return int(status.split()[-1])

    # ------------------------------------------------------------------ audit
    async def list_audit(
        self,
        *,
        user_id: UUID | str | None = None,
        operation: str | None = None,
        outcome: str | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Audit rows, newest first (an Admin operation once access control is on)."""
        rows = await self.db.fetch(
            q("list_audit"),
            None if user_id is None else _uuid(user_id, "user_id"),
            operation,
            outcome,
            before_id,
            self._limit(limit, 1000),
        )
        return [dict(row) for row in rows]

    async def _audit(
        self,
        conn: asyncpg.Connection,
        operation: str,
        target_type: str | None,
        target_ids: Sequence[UUID],
        acting_for: UUID | None,
        *,
        actor_id: UUID | None = None,
        outcome: str = "ok",
        request_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        context = requestctx.current()
        await conn.execute(
            q("insert_audit"),
            actor_id if actor_id is not None else context.actor_id,
            acting_for,
            operation,
            target_type,
            [str(t) for t in target_ids],
            outcome,
            request_id if request_id is not None else context.request_id,
            details or {},
        )

    # ------------------------------------------------------------------ helpers
    async def _touch_user(self, conn: asyncpg.Connection, user_id: UUID) -> None:
        """Bump the user's memory version (invalidating cached searches) and lock the row."""
        if await conn.fetchval(q("bump_version"), user_id) is None:
            raise NotFound(f"user {user_id} not found")

    async def _check_owned(
        self, conn: asyncpg.Connection, user_id: UUID, ids: Sequence[UUID], field: str
    ) -> None:
        unique = list(dict.fromkeys(ids))
        owned = await conn.fetchval(q("count_owned"), user_id, unique)
        if owned != len(unique):
            raise InvalidInput(
                f"{field} names memories that do not exist or belong to someone else", field=field
            )

    async def _insert_messages(
        self, conn: asyncpg.Connection, memory_id: UUID, first: int, messages: Sequence[Message]
    ) -> list[StoredMessage]:
        now = datetime.now(UTC)
        rows = [
            (memory_id, first + i, m.role.value, m.name, m.content, m.created_at or now)
            for i, m in enumerate(messages)
        ]
        await conn.executemany(q("insert_message"), rows)
        return [
            StoredMessage(
                seq=seq, role=MessageRole(role), name=name, content=content, created_at=created
            )
            for _, seq, role, name, content, created in rows
        ]

    async def _insert_chunks(
        self, conn: asyncpg.Connection, row: Any, chunks: Sequence[_Chunk], vectors: np.ndarray
    ) -> None:
        if not chunks:
            return
        await conn.executemany(
            q("insert_chunk"),
            [
                (
                    row["id"],
                    row["user_id"],
                    row["model_id"],
                    row["session_id"],
                    row["type"],
                    list(row["tags"]),
                    row["created_at"],
                    c.part,
                    c.part_index,
                    c.chunk_index,
                    c.text,
                    vectors[i],
                )
                for i, c in enumerate(chunks)
            ],
        )

    @staticmethod
    def _chunks_of(memory: Memory) -> list[_Chunk]:
        chunks: list[_Chunk] = []
        if isinstance(memory, Conversation):
            if memory.title and memory.title.strip():
                chunks.append(_Chunk("title", 0, 0, memory.title))
            for seq, message in enumerate(memory.messages):
                for j, text in enumerate(chunk_text(message.content)):
                    chunks.append(_Chunk("message", seq, j, text))
        elif isinstance(memory, Image):
            chunks.append(_Chunk("prompt", 0, 0, memory.prompt))
        elif isinstance(memory, Transcription):
            if memory.segments:
                for i, segment in enumerate(memory.segments):
                    for j, text in enumerate(chunk_text(segment.text)):
                        chunks.append(_Chunk("segment", i, j, text))
            else:
                for j, text in enumerate(chunk_text(memory.text)):
                    chunks.append(_Chunk("text", 0, j, text))
        elif isinstance(memory, Summary):
            for j, text in enumerate(chunk_text(memory.text)):
                chunks.append(_Chunk("text", 0, j, text))
        elif isinstance(memory, Fact):
            chunks.append(_Chunk("statement", 0, 0, memory.statement))
        return chunks

    @staticmethod
    def _split(memory: Memory) -> tuple[str, dict[str, Any]]:
        """(content column, jsonb payload) of a memory."""
        content_field = _CONTENT_FIELD[memory.type]
        exclude = _COMMON | {content_field, "messages"}
        if isinstance(memory, Fact):
            exclude |= {"confidence", "kind"}
        payload = memory.model_dump(mode="json", exclude=exclude)
        return getattr(memory, content_field) or "", payload

    @staticmethod
    def _record(row: Any, *, messages: Sequence[StoredMessage] = ()) -> StoredMemory:
        kind = MemoryType(row["type"])
        data = dict(row["payload"])
        sources = data.pop("sources", None)
        data.update(
            type=kind.value,
            tags=list(row["tags"]),
            metadata=row["metadata"],
            importance=row["importance"],
            session_id=row["session_id"],
            model=None if row["model_id"] is None else str(row["model_id"]),
        )
        data[_CONTENT_FIELD[kind]] = row["content"] or (
            None if kind is MemoryType.CONVERSATION else row["content"]
        )
        if kind is MemoryType.FACT:
            data["confidence"] = round(float(row["confidence"]), 6)
            data["kind"] = row["fact_kind"]
            if sources:
                data["source"] = sources[-1]
        if kind is MemoryType.CONVERSATION:
            data["messages"] = []
        payload = _MEMORY.validate_python(data)
        metadata = dict(row["metadata"])
        if sources and kind is MemoryType.FACT:
            metadata = {**metadata, "sources": sources}
        return StoredMemory(
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
            memory=payload,
            messages=list(messages),
        )

    @staticmethod
    def _role(role: Role | str) -> Role:
        try:
            return Role(role)
        except ValueError:
            raise InvalidInput(
                "role must be one of: admin, user, service, viewer", field="role"
            ) from None

    @staticmethod
    def _metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
        from halldyll_ray.models import _check_metadata

        if metadata is None:
            return {}
        if not isinstance(metadata, dict):
            raise InvalidInput("metadata must be a JSON object", field="metadata")
        try:
            return _check_metadata(metadata)
        except ValueError as exc:
            raise InvalidInput(str(exc), field="metadata") from None

    @staticmethod
    def _limit(limit: int, maximum: int) -> int:
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= maximum:
            raise InvalidInput(f"limit must be an integer from 1 to {maximum}", field="limit")
        return limit

    @staticmethod
    def _types(types: Iterable[MemoryType | str] | None) -> list[str] | None:
        if types is None:
            return None
        if isinstance(types, str):
            types = [types]
        try:
            values = sorted({MemoryType(t).value for t in types})
        except ValueError:
            allowed = ", ".join(t.value for t in MemoryType)
            raise InvalidInput(f"types must be among: {allowed}", field="types") from None
        return values or None

    @staticmethod
    def _session(session_id: str | None) -> str | None:
        if session_id is None:
            return None
        if not isinstance(session_id, str) or not _SESSION.match(session_id):
            raise InvalidInput(
                "session_id must be 1-128 characters of letters, digits and . _ : @ -",
                field="session_id",
            )
        return session_id

    @staticmethod
    def _time(value: datetime | None, field: str) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise InvalidInput(f"{field} must be a datetime", field=field)
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_RESULTS = TypeAdapter(list[SearchResult])
_USER_INDEX = "memory_chunks_user_hnsw_"


async def _connect(dsn: str) -> asyncpg.Connection:
    with translate_errors():
        return await asyncpg.connect(dsn)


def _looks_like_uuid(value: object) -> bool:
    try:
        UUID(str(value))
    except ValueError:
        return False
    return True


def _expired(row: Any) -> bool:
    expires = row["expires_at"]
    return expires is not None and expires <= datetime.now(UTC)


def _expired_record(memory: StoredMemory) -> bool:
    return memory.expires_at is not None and memory.expires_at <= datetime.now(UTC)


def _best_per_memory(hits: Sequence[_Hit]) -> list[_Hit]:
    """The best-ranked part of each memory, in rank order (hits arrive best first)."""
    seen: set[UUID] = set()
    best = []
    for hit in hits:
        if hit.memory_id not in seen:
            seen.add(hit.memory_id)
            best.append(hit)
    return best


def _rrf(*lists: Sequence[_Hit]) -> list[tuple[_Hit, float]]:
    """Reciprocal rank fusion of ranked lists: score = sum of 1 / (k + rank)."""
    scores: dict[UUID, float] = {}
    first: dict[UUID, _Hit] = {}
    for hits in lists:
        for rank_, hit in enumerate(hits, start=1):
            scores[hit.memory_id] = scores.get(hit.memory_id, 0.0) + 1.0 / (RRF_K + rank_)
            current = first.get(hit.memory_id)
            # Prefer the part that carries a similarity (semantic list) for reporting.
            if current is None or (current.similarity is None and hit.similarity is not None):
                first[hit.memory_id] = hit
    order = sorted(scores, key=lambda mid: (-scores[mid], str(mid)))
    return [(first[mid], scores[mid]) for mid in order]


def _describe(stored: StoredMemory, matched: MatchedPart) -> str:
    """One line for a non-fact memory in a context block."""
    day = stored.created_at.date().isoformat()
    payload = stored.memory
    if isinstance(payload, Conversation):
        title = f" '{payload.title}'" if payload.title else ""
        return f"({day}, conversation{title}) {matched.text}"
    if isinstance(payload, Image):
        made = f" by {payload.generator}" if payload.generator else ""
        return f"({day}, image{made}) prompt: {payload.prompt}"
    if isinstance(payload, Transcription):
        lang = f", {payload.language}" if payload.language else ""
        return f"({day}, transcription{lang}) {matched.text}"
    if isinstance(payload, Summary):
        return f"({day}, summary) {payload.text}"
    return f"({day}) {matched.text}"


__all__ = ["MemoryEngine"]
