"""``MemoryEngine``: every operation of the product, in-process, without Ray.

The engine is the facade every Ray Serve deployment wraps. It owns the process's storage
(one database pool, the embedded server when DATABASE_URL is unset, one cache, one encoder),
builds the components of :mod:`halldyll_ray.components` over it, and delegates each public
operation to the component of its concern. All state that matters lives in PostgreSQL, so
any number of engines (replicas) can share one database and one Redis.

Size: about 700 lines, over the ~500 of the rest of the package, because this is the public
API reference: one method per operation with the docstring a user reads, each a one-line
delegation to its component. Logic added here belongs in a component instead.

Signatures: the first two arguments are positional (the user, then the subject of the
call); options are keyword-only. ``search(user_id, query, limit)`` and
``create_user(username, email, role)`` keep their third positional arguments as SPEC §1
writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import numpy as np

from halldyll_ray import validation
from halldyll_ray.access import AuthorizedEngine
from halldyll_ray.components.agent_loop import AgentLoop
from halldyll_ray.components.audit import Audit
from halldyll_ray.components.consolidation import Consolidation
from halldyll_ray.components.context import ContextBuilder
from halldyll_ray.components.embeddings import Embeddings
from halldyll_ray.components.events import EventFeed, Recheck, Subscription
from halldyll_ray.components.ingestion import Ingestion
from halldyll_ray.components.jobs import JobQueue
from halldyll_ray.components.keys import ApiKeys
from halldyll_ray.components.learning import Learning, LearningQueue
from halldyll_ray.components.memories import MemoryReader
from halldyll_ray.components.operations import Operations
from halldyll_ray.components.reembedding import (
    ModelSpec,
    Reembedding,
    ReembedStatus,
    abandon,
    meta_rows,
    read_active,
    read_status,
)
from halldyll_ray.components.registry import ModelRegistry
from halldyll_ray.components.search import CachedSearch, Search
from halldyll_ray.components.summaries import Summaries
from halldyll_ray.components.transfer import Transfer
from halldyll_ray.components.users import Users
from halldyll_ray.config import Settings
from halldyll_ray.embedding import TextEncoder, load_encoder
from halldyll_ray.errors import (
    AuthenticationFailed,
    ConfigurationError,
    HalldyllError,
    InvalidInput,
    MigrationError,
    PermissionDenied,
    Unavailable,
)
from halldyll_ray.llm.client import memory_model_from_settings
from halldyll_ray.llm.heuristic import HeuristicMemoryModel
from halldyll_ray.llm.openai_model import LLMMemoryModel
from halldyll_ray.llm.protocol import MemoryModel
from halldyll_ray.models import (
    AIModel,
    ApiKey,
    Context,
    ErasureReceipt,
    Job,
    JobStatus,
    Memory,
    MemoryType,
    MemoryUpdate,
    Message,
    ModelKind,
    NewApiKey,
    Page,
    Principal,
    Role,
    SearchGroup,
    SearchMode,
    SearchResult,
    SearchView,
    StoredMemory,
    StoredMessage,
    TurnRecord,
    User,
)
from halldyll_ray.portability import ImportReport, file_chunks
from halldyll_ray.storage.cache import LocalLRU, RedisTier, TieredCache
from halldyll_ray.storage.database import Database, connect, translate_errors
from halldyll_ray.storage.embedded import EmbeddedPostgres
from halldyll_ray.storage.migrate import apply_migrations, check_schema
from halldyll_ray.storage.sql import q


@dataclass(frozen=True)
class Components:
    """The components of one initialised engine (see :mod:`halldyll_ray.components`)."""

    users: Users
    keys: ApiKeys
    audit: Audit
    models: ModelRegistry
    embeddings: Embeddings
    memories: MemoryReader
    ingestion: Ingestion
    search: Search
    context: ContextBuilder
    agent_loop: AgentLoop
    operations: Operations
    transfer: Transfer
    events: EventFeed
    #: The durable background jobs, and their workers in this process.
    jobs: JobQueue
    #: The handlers of the learning jobs (extract, summarize) with the memory model.
    learning: Learning
    #: The move to the configured embedding model, when the database's vectors are of
    #: another one (None: they are of the configured model).
    reembedding: Reembedding | None = None


class MemoryEngine:
    """The memory system's operations, async, in-process.

    Args:
        settings: Process settings; ``Settings.from_env()`` when omitted.
        encoder: A loaded text encoder to share (tests, several engines in one process);
            loaded from ``EMBEDDING_MODEL_PATH`` by :meth:`initialize` when omitted.
        embedder: A remote embedder (the Ray Serve Embedding deployment) that replaces the
            local model for vectors; the local encoder then only counts tokens.
        memory_model: The LLM-backed memory model the background jobs use; None: the
            heuristic one (:class:`~halldyll_ray.llm.heuristic.HeuristicMemoryModel`).
            MEMORY_EXTRACTION=auto means background with one, inline without.
        run_jobs: Run background job workers in this process (JOBS_WORKERS of them) when
            jobs can be queued; False for an engine that only serves requests (the Ray Serve
            deployments other than Ingestion, short-lived commands).

    Use ``async with MemoryEngine() as engine:`` or call :meth:`initialize` and :meth:`close`.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        encoder: TextEncoder | None = None,
        embedder: Callable[[list[str]], Awaitable[np.ndarray]] | None = None,
        memory_model: MemoryModel | None = None,
        run_jobs: bool = True,
    ) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        self._encoder = encoder
        self._embedder = embedder
        self._memory_model = memory_model
        self._run_jobs = run_jobs
        self._db: Database | None = None
        self._embedded: EmbeddedPostgres | None = None
        self._cache: TieredCache | None = None
        self._components: Components | None = None
        self._dsn = ""
        self._reembed_task: asyncio.Task[None] | None = None
        self._owned_llm: LLMMemoryModel | None = None

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
            conn = await connect(dsn)
            try:
                if migrate:
                    await apply_migrations(conn, embedding_dimension=settings.embedding_dimension)
                else:
                    # The vector size is checked against the model below (_database_model).
                    await check_schema(conn, embedding_dimension=None)
            finally:
                await conn.close()
            await db.open()
            if self._encoder is None:
                self._encoder = await asyncio.to_thread(
                    load_encoder,
                    settings.embedding_model,
                    settings.embedding_model_path,
                    dimension=settings.embedding_dimension,
                    provider=settings.embedding_provider,
                    batch_size=settings.embedding_batch_size,
                    max_seq_length=settings.embedding_max_seq_length,
                    cpu_mem_arena=settings.embedding_cpu_mem_arena,
                )
            elif self._encoder.dimension != settings.embedding_dimension:
                raise InvalidInput(
                    f"the encoder makes {self._encoder.dimension}-d vectors but "
                    f"EMBEDDING_DIMENSION is {settings.embedding_dimension}",
                    field="EMBEDDING_DIMENSION",
                )
            previous = await self._database_model(dsn, self._encoder)
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
        self._components = self._build(db, self._cache, self._encoder, dsn, previous)
        # The cache may still hold vectors of the model the last re-embedding moved away from
        # (for a week): an erasure removes a user's texts' vectors of that model too.
        job = await db.fetchrow(q("embedding_job"), admin=True)
        if job is not None and job["state"] == "complete" and job["source_model"]:
            self._components.embeddings.retired_models.add(job["source_model"])
        reembedding = self._components.reembedding
        if reembedding is not None and settings.reembed_in_background:
            self._reembed_task = asyncio.create_task(
                reembedding.run_in_background(), name="halldyll-reembed"
            )
        # Inline learning queues nothing, but jobs queued before a switch from background
        # still run.
        if (
            self._run_jobs
            and settings.jobs_workers > 0
            and (self.extraction_mode == "background" or await self._components.jobs.pending())
        ):
            self.start_job_workers()
        return self

    @property
    def extraction_mode(self) -> str:
        """``inline`` or ``background``: MEMORY_EXTRACTION, with ``auto`` resolved (background
        when an LLM memory model is configured)."""
        mode = self.settings.memory_extraction
        if mode == "auto":
            llm = self._memory_model is not None or self.settings.llm_provider != "none"
            return "background" if llm else "inline"
        return mode

    def _model_from_settings(self) -> MemoryModel:
        """The memory model LLM_PROVIDER names, or the heuristic one without an LLM.

        Raises:
            ConfigurationError: LLM_PROVIDER=serve in an engine that runs jobs but was given
                no model (the Serve handle's is built inside the Ray cluster:
                :func:`halldyll_ray.serve.llm_handle.serve_memory_model`).
        """
        settings = self.settings
        # The heuristic model merges as a store does, unknown words included.
        unknown = None if self._encoder is None else self._encoder.unknown_spans
        if settings.llm_provider == "serve" and not self._run_jobs:
            # Only job workers call the model; this engine queues jobs and never runs them.
            return HeuristicMemoryModel.from_settings(settings, unknown)
        model = memory_model_from_settings(settings)
        if model is None:
            return HeuristicMemoryModel.from_settings(settings, unknown)
        self._owned_llm = model  # its HTTP client is closed with the engine
        return model

    def _model_spec(self, encoder: TextEncoder) -> ModelSpec:
        path = self.settings.embedding_model_path
        return ModelSpec(
            model_id=encoder.model_id,
            dimension=encoder.dimension,
            path=None if path is None else str(path),
            name=self.settings.embedding_model,
            max_seq_length=int(
                getattr(encoder, "max_seq_length", self.settings.embedding_max_seq_length)
            ),
        )

    async def _database_model(
        self, dsn: str, encoder: TextEncoder
    ) -> tuple[TextEncoder, ModelSpec] | None:
        """The encoder of the database's vectors and the model to move to, when they are not
        those of ``encoder`` (None when they are). A database that names no model yet (built
        before migration 0010) gets the configured one, as its vectors were made by it.

        Raises:
            MigrationError: the database names no model and its vectors have another size.
            ConfigurationError: the database's model cannot be loaded (it must stay where it
                was until the re-embedding completes).
        """
        spec = self._model_spec(encoder)
        with translate_errors():
            conn = await connect(dsn)
            try:
                active, dimension = await read_active(conn)
                if active is None:
                    if dimension != spec.dimension:
                        raise MigrationError(
                            f"EMBEDDING_DIMENSION is {spec.dimension} but the database stores "
                            f"{dimension}-dimensional vectors of an unrecorded model; set "
                            f"EMBEDDING_DIMENSION={dimension} (and the model that made them) "
                            "once, so it is recorded, then change models"
                        )
                    keys, values = meta_rows(spec)
                    try:
                        with translate_errors():
                            await conn.execute(q("adopt_embedding_meta"), keys, values)
                    except PermissionDenied:
                        # A login role that may not write halldyll_meta: the database keeps
                        # naming no model, and accepts vectors of any (as before 0010).
                        return None
                    active, _ = await read_active(conn)
                    assert active is not None
                if active.model_id == spec.model_id:
                    with contextlib.suppress(PermissionDenied):  # then `halldyll reembed`
                        await abandon(conn)
                    return None
            finally:
                await conn.close()
        try:
            previous = await asyncio.to_thread(
                load_encoder,
                active.name,
                active.path,
                dimension=active.dimension,
                provider=self.settings.embedding_provider,
                batch_size=self.settings.embedding_batch_size,
                max_seq_length=active.max_seq_length,
                cpu_mem_arena=self.settings.embedding_cpu_mem_arena,
            )
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"the stored memories are embedded with {active.model_id} "
                f"({active.path or 'the packaged ' + active.name}), which searches use until every "
                f"memory is embedded again with {spec.model_id}; it cannot be loaded: "
                f"{exc.message}",
                setting="EMBEDDING_MODEL_PATH",
            ) from exc
        if previous.model_id != active.model_id:
            raise ConfigurationError(
                f"the stored memories are embedded with {active.model_id} but "
                f"{active.path or 'the packaged ' + active.name} is now {previous.model_id}; "
                "put the original model file back until the re-embedding completes",
                setting="EMBEDDING_MODEL_PATH",
            )
        return previous, spec

    def _build(
        self,
        db: Database,
        cache: TieredCache,
        encoder: TextEncoder,
        dsn: str,
        previous: tuple[TextEncoder, ModelSpec] | None = None,
    ) -> Components:
        settings = self.settings
        audit = Audit(db)
        models = ModelRegistry(db)
        reembedding = None
        if previous is None:
            embeddings = Embeddings(encoder, cache, self._embedder)
        else:
            # Until the switch: the database's model, in this process (the Embedding
            # deployment serves the configured one), for queries and new chunks alike.
            old_encoder, spec = previous
            embeddings = Embeddings(old_encoder, cache, None)
            reembedding = Reembedding(
                dsn,
                embeddings,
                Embeddings(encoder, cache, self._embedder),
                spec,
                batch_size=settings.reembed_batch_size,
            )
        jobs = JobQueue(
            db,
            dsn,
            max_attempts=settings.jobs_max_attempts,
            retry_base_s=settings.jobs_retry_base_seconds,
            lease_s=settings.jobs_lease_seconds,
            timeout_s=settings.jobs_timeout_seconds,
            poll_s=settings.jobs_poll_seconds,
            retention_hours=settings.jobs_retention_hours,
        )
        queueing = None
        if self.extraction_mode == "background":
            queueing = LearningQueue(jobs, summarize_every=settings.session_summary_every_n_turns)
        ingestion = Ingestion(db, embeddings, models, settings, learning=queueing)
        search = Search(db, cache, embeddings, models, settings)
        agent_loop = AgentLoop(db, cache, embeddings, models, ingestion, settings)
        model = self._memory_model or self._model_from_settings()
        learning = Learning(
            Consolidation(db, embeddings, models, ingestion, settings, model),
            Summaries(db, embeddings, models, ingestion, settings, model),
            model,
        )
        learning.register(jobs)
        return Components(
            users=Users(db, cache, embeddings),
            keys=ApiKeys(db, audit, settings),
            audit=audit,
            models=models,
            embeddings=embeddings,
            memories=MemoryReader(db, models, page_max_bytes=settings.page_max_bytes),
            ingestion=ingestion,
            search=search,
            context=ContextBuilder(db, search, encoder, settings),
            agent_loop=agent_loop,
            operations=Operations(db, dsn, settings, embeddings),
            transfer=Transfer(db, embeddings, models, settings),
            events=EventFeed(
                db,
                dsn,
                retention_hours=settings.events_retention_hours,
                idle_check_s=settings.events_recheck_seconds,
                max_subscribers=settings.events_max_streams,
            ),
            jobs=jobs,
            learning=learning,
            reembedding=reembedding,
        )

    async def close(self) -> None:
        """Close the pool and Redis client; leave the embedded server (stops with the last)."""
        task, self._reembed_task = self._reembed_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._components is not None:
            await self._components.jobs.stop()
        components, self._components = self._components, None
        if components is not None:
            await components.events.close()
        llm, self._owned_llm = self._owned_llm, None
        if llm is not None:
            await llm.client.aclose()
        db, self._db = self._db, None
        if db is not None:
            await db.close()
        cache, self._cache = self._cache, None
        if cache is not None:
            await cache.aclose()
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)

    def authorized(
        self, principal: Principal, *, request_id: str | None = None
    ) -> AuthorizedEngine:
        """This engine's operations for ``principal``, checked against the permission matrix."""
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

    @property
    def components(self) -> Components:
        """The components this engine delegates to (Unavailable before :meth:`initialize`)."""
        if self._components is None:
            raise Unavailable("the engine is not initialized; call initialize() first")
        return self._components

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
        if self._components is not None:
            report["events"] = self._components.events.state()
            report["jobs"] = {
                "extraction": self.extraction_mode,
                **self._components.jobs.state(),
            }
        live = self.components.embeddings.encoder
        report["model"] = {"ok": True, "id": live.model_id, "dimension": live.dimension}
        # Redis down means slower, never failing: readiness depends on PostgreSQL and the
        # model only (a 503 here would take every replica out of its load balancer).
        report["ok"] = report["database"]["ok"]
        return report

    # ------------------------------------------------------------------ embeddings
    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` (n x EMBEDDING_DIMENSION, L2-normalised), through the cache."""
        return await self.components.embeddings.embed(texts)

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
        return await self.components.users.create(username, email, role, metadata=metadata)

    async def get_user(self, user_id: UUID | str) -> User:
        """A user by id; NotFound otherwise."""
        return await self.components.users.get(user_id)

    async def get_user_by_username(self, username: str) -> User:
        """A user by name (case-insensitive); NotFound otherwise."""
        return await self.components.users.get_by_username(username)

    async def list_users(self, *, limit: int = 100, cursor: str | None = None) -> Page[User]:
        """Users in creation order, ``limit`` (1-1000) a page."""
        return await self.components.users.page(limit=limit, cursor=cursor)

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
        """Change a user's role, disabled flag, email or metadata; NotFound if absent."""
        return await self.components.users.update(
            user_id,
            role=role,
            disabled=disabled,
            email=email,
            clear_email=clear_email,
            metadata=metadata,
        )

    async def delete_user(self, user_id: UUID | str) -> ErasureReceipt:
        """Erase a user: every memory, message, chunk, API key, grant and turn record of
        theirs, and the cache entries derived from them (:meth:`Users.delete
        <halldyll_ray.components.users.Users.delete>` says what stays, by design).

        Returns:
            The receipt (counts by kind, when, by whom, the request id), also in the audit log.

        Raises:
            InvalidInput: not a UUID. NotFound: no such user. Unavailable: Redis failed and
                nothing was deleted.
        """
        return await self.components.users.delete(user_id)

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
        return await self.components.models.register(name, kind, version=version, metadata=metadata)

    async def get_model(self, ref: UUID | str) -> AIModel:
        """A registered model by id or name."""
        return await self.components.models.get(ref)

    async def list_models(self, *, kind: ModelKind | str | None = None) -> list[AIModel]:
        """The registered models, by name; only those of ``kind`` when given."""
        return await self.components.models.find(kind=kind)

    async def delete_model(self, ref: UUID | str) -> None:
        """Remove a model from the registry; Conflict while memories are scoped to it."""
        await self.components.models.delete(ref)

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
        return await self.components.ingestion.store(user_id, memory, request_id=request_id)

    async def store_memories(
        self,
        user_id: UUID | str,
        memories: Sequence[Memory | dict[str, Any]],
        *,
        request_id: str | None = None,
    ) -> list[StoredMemory]:
        """Store 1 to STORE_BATCH_MAX memories of any types at once, all or nothing; return
        them as stored, in the order given (the bulk path: one embedding call in full
        batches, one transaction with multi-row inserts).

        Facts merge as in :meth:`store_memory`, each in order within the batch's transaction:
        a fact equal or near-equal to a stored fact, or to an earlier fact of the batch,
        reinforces it and comes back with its id.

        Raises:
            InvalidInput: empty, over STORE_BATCH_MAX, or a bad memory; the error's ``field``
                starts with ``memories.i`` and its ``index`` is ``i``. Nothing is stored.
            NotFound: no such user, or memory ``i`` names an unknown model (``index``).
        """
        return await self.components.ingestion.store_many(user_id, memories, request_id=request_id)

    async def append_messages(
        self,
        user_id: UUID | str,
        conversation_id: UUID | str,
        messages: Sequence[Message | dict[str, Any]],
        *,
        request_id: str | None = None,
    ) -> list[StoredMessage]:
        """Append messages to a conversation; returns them with their sequence numbers.

        Raises:
            InvalidInput: ``messages`` is not a list (field ``messages``), holds none or more
                than 1,000, or a bad message (field ``messages.i...``). Nothing is stored.
            NotFound: no such user or conversation.
        """
        return await self.components.ingestion.append_messages(
            user_id, conversation_id, messages, request_id=request_id
        )

    # ------------------------------------------------------------------ reading
    async def get_memory(
        self, user_id: UUID | str, memory_id: UUID | str, *, include_messages: bool = True
    ) -> StoredMemory:
        """One memory of the user (a conversation with its messages). NotFound otherwise."""
        return await self.components.memories.get(
            user_id, memory_id, include_messages=include_messages
        )

    async def fact_history(self, user_id: UUID | str, memory_id: UUID | str) -> list[StoredMemory]:
        """Every version of a fact, oldest first: the statements it replaced and those that
        replaced it (``valid_from``, ``valid_to``, ``superseded_by``), closed or open.

        Raises:
            NotFound: no such memory of the user. InvalidInput: the memory is not a fact.
        """
        return await self.components.memories.history(user_id, memory_id)

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
        """The user's memories, newest first, with cursor pagination and filters.

        A page holds at most ``limit`` memories (1 to 500) and ends early once its memories'
        text and payload pass PAGE_MAX_BYTES (8 MiB; one memory always fits): read on with
        ``next_cursor`` until it is None (see
        :meth:`halldyll_ray.components.memories.MemoryReader.page`).

        Raises:
            InvalidInput: a bad filter, limit or cursor. NotFound: no such user or model.
        """
        return await self.components.memories.page(
            user_id,
            types=types,
            model=model,
            include_shared=include_shared,
            session_id=session_id,
            tags=tags,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )

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
        return await self.components.ingestion.update(
            user_id, memory_id, update, request_id=request_id
        )

    async def delete_memory(
        self, user_id: UUID | str, memory_id: UUID | str, *, request_id: str | None = None
    ) -> None:
        """Delete one memory of the user (its messages and chunks go with it)."""
        await self.components.ingestion.delete(user_id, memory_id, request_id=request_id)

    def export_memories(
        self,
        user_id: UUID | str,
        *,
        request_id: str | None = None,
        actor_id: UUID | None = None,
    ) -> AsyncIterator[bytes]:
        """Every memory of the user as NDJSON lines (:mod:`halldyll_ray.portability`): a
        header line with the format version and counts, then one memory a line, each
        ``bytes`` ending with a newline. Read from one snapshot through a server-side cursor,
        so memory stays flat for any number of memories; audited as ``memory.export``.

        Raises (at the first line): InvalidInput: not a UUID. NotFound: no such user.
        """
        return self.components.transfer.export(user_id, request_id=request_id, actor_id=actor_id)

    async def import_memories(
        self,
        user_id: UUID | str,
        lines: AsyncIterable[bytes | str] | Iterable[bytes | str],
        *,
        atomic: bool = False,
        request_id: str | None = None,
    ) -> ImportReport:
        """Import an export (:meth:`export_memories`' format) into the user's memories.

        ``lines`` is the file in chunks of any size (bytes or text; an open file works), or
        the whole file as one ``bytes`` or ``str``.
        Idempotent: a line imported before is skipped (``unchanged``). Facts merge with
        stored facts as a store does (``merged``). Bad lines are reported by line number and
        the rest is imported; with ``atomic`` any bad line refuses the whole file.

        Raises:
            InvalidInput: the first line is not an export header of a supported version; with
                ``atomic``, a bad line (``fields["report"]``; nothing stored); ``lines`` or
                one of its chunks that is not bytes or text (field ``lines``); an ``atomic``
                or ``request_id`` of the wrong kind.
            NotFound: no such user.
        """
        return await self.components.transfer.import_lines(
            user_id, file_chunks(lines), atomic=atomic, request_id=request_id
        )

    async def purge_expired(self) -> int:
        """Delete ephemeral facts past their expiry; return how many went."""
        return await self.components.operations.purge_expired()

    async def purge_events(self, *, older_than_hours: float | None = None) -> int:
        """Delete change feed events older than EVENTS_RETENTION_HOURS; return how many went."""
        return await self.components.events.purge(older_than_hours=older_than_hours)

    # ------------------------------------------------------------------ background jobs
    async def list_jobs(
        self,
        user_id: UUID | str,
        *,
        status: JobStatus | str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[Job]:
        """The user's background jobs (fact extraction, session summaries), newest first.

        Args:
            user_id: Whose jobs.
            status: Only jobs in this state (queued, running, done, failed).
            kind: Only jobs of this kind (``extract``, ``summarize`` ...).
            limit: Page size (1-500).
            cursor: ``next_cursor`` of the previous page.

        Raises:
            InvalidInput: a bad filter, limit or cursor. NotFound: no such user.
        """
        return await self.components.jobs.page(
            user_id, status=status, kind=kind, limit=limit, cursor=cursor
        )

    async def get_job(self, user_id: UUID | str, job_id: UUID | str) -> Job:
        """One background job of the user: status, tries, last error, result.

        Raises:
            InvalidInput: not UUIDs. NotFound: no such job of this user, or no such user.
        """
        return await self.components.jobs.get(user_id, job_id)

    async def purge_jobs(self, *, older_than_hours: float | None = None) -> int:
        """Delete done and failed jobs older than JOBS_RETENTION_HOURS; return how many."""
        return await self.components.jobs.purge(older_than_hours=older_than_hours)

    def start_job_workers(self, workers: int | None = None) -> None:
        """Run background jobs in this process: ``workers`` (JOBS_WORKERS) at once, until
        :meth:`stop_job_workers` or :meth:`close`. No effect if they run already."""
        self.components.jobs.start(self.settings.jobs_workers if workers is None else workers)

    async def stop_job_workers(self, *, grace_s: float = 10.0) -> None:
        """Stop this process's job workers; tries still running after ``grace_s`` seconds
        are stopped and given back to the queue (another worker takes them)."""
        if self._components is not None:
            await self._components.jobs.stop(grace_s=grace_s)

    async def run_pending_jobs(self, *, limit: int = 1000) -> int:
        """Run the due jobs in the calling task until none is due; how many ran."""
        return await self.components.jobs.run_pending(limit=limit)

    # ------------------------------------------------------------------ change feed
    async def subscribe_events(
        self,
        user_id: UUID | str,
        *,
        after: int | str | None = None,
        rechecks: list[Recheck] | None = None,
    ) -> Subscription:
        """Follow the changes of the user's memories, from any replica (the change feed).

        Args:
            user_id: Whose changes.
            after: Resume after this event id (an SSE ``Last-Event-ID``): every later event
                of the user comes, none twice. None: changes from now on.
            rechecks: Awaited every EVENTS_RECHECK_SECONDS (30) while the subscription is
                open; one that raises ends it with its error (before anything more is
                delivered).

        Returns:
            An async iterator of :class:`~halldyll_ray.models.MemoryEvent` (memory id, type,
            kind, time; never content), first an
            :class:`~halldyll_ray.models.EventsResync` when ``after`` is older than the
            retention or not this database's. ``position`` is the last id delivered; close
            it with ``aclose()`` or ``async with``.

        Raises:
            InvalidInput: a bad user id or ``after``. NotFound: no such user.
            Unavailable: PostgreSQL is out of reach.
        """
        return await self.components.events.subscribe(user_id, after=after, rechecks=rechecks)

    # ------------------------------------------------------------------ search
    async def search(
        self,
        user_id: UUID | str,
        query: str,
        limit: int | None = None,
        *,
        mode: SearchMode | str | None = None,
        types: Iterable[MemoryType | str] | None = None,
        model: UUID | str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        threshold: float | None = None,
        group: SearchGroup | str = SearchGroup.PART,
        view: SearchView | str | None = None,
    ) -> list[SearchResult]:
        """Search the user's memories (SPEC §4.4).

        Args:
            user_id: Whose memories; nothing of another user is read, ranked or cached.
            query: Natural-language text (1-4000 characters).
            limit: How many results (default SEARCH_TOP_K, at most 100).
            mode: ``hybrid`` (the vector and BM25 full-text lists combined: see the README),
                ``semantic`` (with full-text fallback) or ``fulltext``; None: SEARCH_MODE
                (default ``hybrid``).
            types, model, include_shared, session_id, tags, since, until: Filters. With
                ``model``, the model's memories plus the user's shared ones (unless
                ``include_shared`` is False).
            threshold: Minimum cosine similarity of a semantic hit (SIMILARITY_THRESHOLD).
            group: ``part`` (default): a result per matching part (message, segment ...), so
                one conversation can answer with several turns; ``memory``: a result per
                memory, its best part.
            view: ``full`` (default): each hit's memory as a read by id returns it, without
                a conversation's messages; ``basic``: without a transcription's text and
                segments either (:class:`~halldyll_ray.models.SearchView`): what to ask for
                when long transcriptions may match.

        Returns:
            At most ``limit`` results, best first, each with its score, the matched part
            (``matched.part`` and ``matched.index``: which message, segment ...) and the
            memory.

        Raises:
            InvalidInput: a bad query, limit, mode, threshold, filter, group or view.
            NotFound: the user does not exist.
        """
        return await self.components.search.search(
            user_id,
            query,
            limit,
            mode=mode,
            types=types,
            model=model,
            include_shared=include_shared,
            session_id=session_id,
            tags=tags,
            since=since,
            until=until,
            threshold=threshold,
            group=group,
            view=view,
        )

    async def search_json(
        self,
        user_id: UUID | str,
        query: str,
        limit: int | None = None,
        *,
        mode: SearchMode | str | None = None,
        types: Iterable[MemoryType | str] | None = None,
        model: UUID | str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        threshold: float | None = None,
        group: SearchGroup | str = SearchGroup.PART,
        view: SearchView | str | None = None,
    ) -> bytes:
        """:meth:`search`, answered as the JSON of ``SearchResponse`` (``{"results": [...]}``,
        UTF-8): what the HTTP API sends. The results' JSON is written once, and a cached
        answer is passed on as stored (see
        :meth:`halldyll_ray.components.search.Search.search_json`). Same arguments and
        errors as :meth:`search`."""
        return await self.components.search.search_json(
            user_id,
            query,
            limit,
            mode=mode,
            types=types,
            model=model,
            include_shared=include_shared,
            session_id=session_id,
            tags=tags,
            since=since,
            until=until,
            threshold=threshold,
            group=group,
            view=view,
        )

    async def cached_search_json(
        self, user_id: UUID | str, query: str, limit: int | None = None, **options: Any
    ) -> CachedSearch:
        """:meth:`search_json`'s answer if the result cache holds it (``answer``; None
        otherwise: nothing is searched and no query is embedded), and the cache key for
        :meth:`keep_search_json`. Same arguments (the keywords of :meth:`search`) and errors
        as :meth:`search_json`."""
        return await self.components.search.cached_json(user_id, query, limit, **options)

    def keep_search_json(self, key: str, answer: bytes) -> None:
        """Keep another process's answer to a search that :meth:`cached_search_json` missed
        (``key``) in this process's cache (see
        :meth:`halldyll_ray.components.search.Search.keep_json`)."""
        self.components.search.keep_json(key, answer)

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
            messages: The current conversation's recent turns (rendered as such), a list of
                at most 1,000 (InvalidInput, field ``messages``, otherwise; a bad message's
                field is ``messages.i...``).
            model, include_shared: Model scope of the memories drawn.
            session_id: Adds the session's rolling summary.
            max_tokens: Budget (MAX_CONTEXT_TOKENS), counted with the model's tokenizer.
            limit: How many search hits to consider, 1 to 100 (InvalidInput, field
                ``limit``, otherwise).
        """
        return await self.components.context.build(
            user_id,
            query,
            messages=messages,
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
        return await self.components.context.prepare(
            user_id,
            session_id,
            user_message,
            recent_turns=recent_turns,
            model=model,
            include_shared=include_shared,
            max_tokens=max_tokens,
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
        idempotency_key: str | None = None,
        user_name: str | None = None,
        assistant_name: str | None = None,
    ) -> TurnRecord:
        """After an LLM call: append both messages to the session's conversation, refresh the
        session summary every SESSION_SUMMARY_EVERY_N_TURNS turns, and store candidate facts
        found in the user's message as low-confidence ephemeral facts.

        With MEMORY_EXTRACTION=background the summary and the facts are left to background
        jobs queued in the turn's transaction: the record then has no ``summary_id`` and no
        ``fact_ids`` but the ``job_ids`` (see :meth:`get_job`).

        Args:
            idempotency_key: 1-128 printable ASCII characters. A retry with the key of a
                turn already stored (say after a 503 that may or may not have been applied)
                writes no message and returns that turn's record (conversation, message
                numbers, and the facts, summary or jobs its learning made) with
                ``replayed=True``. Inline learning that the first attempt did not finish (it
                raised after storing the messages) is done by the retry, once; a retry while
                another call of the key is learning waits for it (up to 30 s). The key names
                one request: sent with other messages, names, another session, another AI
                model or another ``extract_facts`` it is InvalidInput (``field``
                ``idempotency_key``) and nothing is written. A key goes with its turn's
                conversation: once that is deleted, the same request is a new turn.
            user_name, assistant_name: Who spoke (at most 200 characters each): stored as
                the messages' ``name`` and indexed with them, so a search that names them
                finds their turns (as for any message with a ``name``).

        Raises:
            InvalidInput: a bad session id, an empty or too long message or name, a bad key,
                an ``extract_facts`` that is not a bool; nothing is written.
            NotFound: the user or the model does not exist.
            Conflict: a retry whose first attempt is still learning from the turn after
                30 s (the IETF Idempotency-Key draft's 409 for a request in progress).
        """
        return await self.components.agent_loop.record_turn(
            user_id,
            session_id,
            user_message,
            assistant_message,
            model=model,
            extract_facts=extract_facts,
            request_id=request_id,
            idempotency_key=idempotency_key,
            user_name=user_name,
            assistant_name=assistant_name,
        )

    # ------------------------------------------------------------------ API keys
    async def create_api_key(
        self,
        user_id: UUID | str,
        *,
        name: str = "",
        expires_at: datetime | None = None,
        replaces: UUID | None = None,
    ) -> NewApiKey:
        """Create a key for a user. The returned ``key`` is shown this once and never stored."""
        return await self.components.keys.create(
            user_id, name=name, expires_at=expires_at, replaces=replaces
        )

    async def get_api_key(self, key_id: UUID | str) -> ApiKey:
        """A key's record (never the key itself); NotFound otherwise."""
        return await self.components.keys.get(key_id)

    async def list_api_keys(self, user_id: UUID | str) -> list[ApiKey]:
        """The user's keys, oldest first, revoked ones included."""
        return await self.components.keys.of_user(user_id)

    async def revoke_api_key(self, key_id: UUID | str) -> ApiKey:
        """Revoke a key at once; revoking twice keeps the first revocation time."""
        return await self.components.keys.revoke(key_id)

    async def rotate_api_key(self, key_id: UUID | str) -> NewApiKey:
        """A new key for the same user and name, replacing (and revoking) the old one."""
        return await self.components.keys.rotate(key_id)

    async def authenticate(self, key: str) -> Principal:
        """The principal behind an API key, or AuthenticationFailed (recorded in the audit)."""
        return await self.components.keys.authenticate(key)

    # ------------------------------------------------------------------ maintenance
    async def ensure_user_indexes(self, *, min_rows: int | None = None) -> dict[str, list[UUID]]:
        """Give each very large user a partial HNSW index of their own; drop stale ones.

        See :meth:`halldyll_ray.components.operations.Operations.ensure_user_indexes`.
        """
        return await self.components.operations.ensure_user_indexes(min_rows=min_rows)

    async def reembed_status(self) -> ReembedStatus:
        """Where the move to another embedding model stands (``state``, models, ``done`` of
        ``total`` chunks, ``remaining``); see :mod:`halldyll_ray.components.reembedding`."""
        async with self.db.scoped(admin=True, readonly=True) as conn:
            return await read_status(conn)

    async def reembed(self, *, max_batches: int | None = None) -> ReembedStatus:
        """Run the re-embedding to the configured model in the foreground, until the switch
        (or ``max_batches`` batches); resumable. Returns the status at once when the
        database's vectors are already of the configured model or another process runs it.

        Raises:
            InvalidInput: ``max_batches`` is not a whole number from 1.
            PermissionDenied: the login role does not own ``memory_chunks``.
            Unavailable: PostgreSQL unreachable or the table's lock not had in 10 s.
        """
        if max_batches is not None:
            validation.count(max_batches, "max_batches")
        reembedding = self.components.reembedding
        if reembedding is None:
            return await self.reembed_status()
        return await reembedding.run(max_batches=max_batches)

    async def purge_audit(self, *, older_than_days: int | None = None) -> int:
        """Delete audit rows past the retention (AUDIT_RETENTION_DAYS), as the table owner."""
        return await self.components.operations.purge_audit(older_than_days=older_than_days)

    # ------------------------------------------------------------------ viewer grants
    async def grant_viewer(self, viewer_id: UUID | str, owner_id: UUID | str) -> None:
        """Let a Viewer read another user's memories."""
        await self.components.users.grant_viewer(viewer_id, owner_id)

    async def revoke_viewer_grant(self, viewer_id: UUID | str, owner_id: UUID | str) -> None:
        """Take a Viewer's read grant back; NotFound if there was none."""
        await self.components.users.revoke_viewer_grant(viewer_id, owner_id)

    async def viewer_grants(self, viewer_id: UUID | str) -> list[UUID]:
        """The owners whose memories a Viewer may read."""
        return await self.components.users.viewer_grants(viewer_id)

    async def users_state(self, user_ids: Sequence[UUID]) -> dict[UUID, tuple[Role, bool]]:
        """(role, disabled) of each existing user among ``user_ids``."""
        return await self.components.users.states(user_ids)

    async def access_state(
        self, user_ids: Sequence[UUID], principal: Principal
    ) -> tuple[dict[UUID, tuple[Role, bool]], bool]:
        """:meth:`users_state`, and whether the principal's API key still authenticates (not
        revoked, rotated or expired; True for a principal made without a key)."""
        if principal.key_id is None:
            return await self.components.users.states(user_ids), True
        return await self.components.users.states_with_key(
            user_ids, principal.user_id, principal.key_id
        )

    async def refuse_dead_key(
        self, principal: Principal, *, reason: str = "revoked or expired key"
    ) -> AuthenticationFailed:
        """Audit (throttled, as :meth:`authenticate`'s refusals) a call made with an
        authenticated principal whose key was revoked, rotated or expired since, or whose
        user was disabled or deleted since (``reason``); the error to raise (what
        :meth:`authenticate` now answers that key)."""
        await self.components.audit.record_denied(
            principal.user_id,
            None,
            "auth",
            "api_key",
            [] if principal.key_id is None else [principal.key_id],
            reason=reason,
            throttle=f"auth:{reason}",
        )
        return AuthenticationFailed("invalid, expired or revoked API key")

    # ------------------------------------------------------------------ audit
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
        await self.components.audit.record_denied(
            actor_id, acting_for, operation, target_type, target_ids, reason=reason, details=details
        )

    async def record_read(
        self, actor_id: UUID, acting_for: UUID, operation: str, target_ids: Sequence[UUID]
    ) -> None:
        """Audit a read of another user's data (by an Admin or a Service)."""
        await self.components.audit.record_read(actor_id, acting_for, operation, target_ids)

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
        return await self.components.audit.rows(
            user_id=user_id, operation=operation, outcome=outcome, before_id=before_id, limit=limit
        )


__all__ = ["Components", "MemoryEngine"]
