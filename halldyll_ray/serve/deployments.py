"""The Ray Serve deployments: thin adapters over the core (undecorated here).

Classes are plain Python so they can be built and unit-tested without Ray; ``build_app``
decorates them with ``serve.deployment`` late and wires the graph. The one decorator here is
``serve.batch`` on :meth:`Embedder.embed_batch`, configured through its own setters.

Every memory operation runs through :meth:`MemoryEngine.authorized` for the caller's
principal, in whichever deployment serves it, so the handle path and the HTTP path share one
permission model.

Size: about 610 lines, over the package's ~500, because each of the eleven typed
operations keeps its signature and docstring (the handle API's reference); the logic is in
the components.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from uuid import UUID

import numpy as np
from opentelemetry.context import Context as TraceContext
from pydantic import SecretStr
from ray import serve
from ray.serve import metrics

from halldyll_ray import tracing
from halldyll_ray.config import Settings
from halldyll_ray.embedding import MergingCaller, MergingEncoder, load_encoder
from halldyll_ray.engine import MemoryEngine
from halldyll_ray.errors import HalldyllError, Unavailable
from halldyll_ray.models import (
    Context,
    Memory,
    MemoryUpdate,
    Page,
    Principal,
    Role,
    SearchResult,
    StoredMemory,
    StoredMessage,
    TurnRecord,
)
from halldyll_ray.schemas import (
    AppendMessagesRequest,
    ContextRequest,
    Items,
    ListMemoriesRequest,
    PrepareContextRequest,
    SearchRequest,
    SearchResponse,
    StoredMemories,
    StoreMemoriesRequest,
    TurnRequest,
    parse,
    parse_memory,
)
from halldyll_ray.serve.http import status_of
from halldyll_ray.serve.llm_handle import serve_memory_model
from halldyll_ray.serve.settings import SettingsOverrides
from halldyll_ray.storage.embedded import EmbeddedPostgres
from halldyll_ray.storage.migrate import apply_migrations
from halldyll_ray.tracing import handle_method

if TYPE_CHECKING:
    from halldyll_ray.access import AuthorizedEngine

log = logging.getLogger(__name__)


def use_serve_logging(level: str, *, access_log: bool = True) -> None:
    """Send the product's log records where the replica's Serve records go, from ``level`` up.

    In a replica Ray Serve sets up only the ``ray.serve`` logger: the replica's log file (JSON
    or text, per ``logging_config``, with the request id) and, with RAY_SERVE_LOG_TO_STDERR,
    stderr. Records of ``halldyll_ray`` loggers would reach the root logger, which has no
    handler there: INFO and DEBUG records were lost, LOG_LEVEL did nothing, and warnings came
    out as bare stderr text that Serve logs at INFO. Each deployment calls this at start.

    Args:
        level: The product's records from this level up (LOG_LEVEL).
        access_log: False drops Serve's access log records of this replica (one per call it
            serves) at the logger, before they are formatted and written; its other records
            and the product's are kept. (Serve's ``logging_config.enable_access_log: false``
            drops them too, but a deployment's own ``logging_config`` replaces the
            application's, encoding and level included.)
    """
    ours = logging.getLogger("halldyll_ray")
    ours.setLevel(level.upper())
    ours.propagate = False
    ours.handlers[:] = [_ToServeLogger()]
    serve_logger = logging.getLogger("ray.serve")
    if _client_errors_as_info not in serve_logger.filters:
        serve_logger.addFilter(_client_errors_as_info)
    if access_log:
        serve_logger.removeFilter(_no_access_log)
    elif _no_access_log not in serve_logger.filters:
        serve_logger.addFilter(_no_access_log)


def _client_errors_as_info(record: logging.LogRecord) -> bool:
    """Serve's "Request failed." record for a call that raised a product error answered with
    a 4xx (bad input, not found, refused) becomes one INFO line without the traceback: the
    caller's mistake, not the replica's, and an ERROR with a stack for each would flood logs
    and alerts. 5xx errors and anything else stay as Serve logs them. Always kept."""
    error = record.exc_info[1] if record.exc_info else None
    if record.msg == "Request failed." and isinstance(error, HalldyllError):
        status = status_of(error)
        if status < 500:
            record.msg = "Request refused (%s %s): %s"
            record.args = (status, error.code, error.message)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
    return True


def _no_access_log(record: logging.LogRecord) -> bool:
    """False for Serve's access log records (Serve marks them ``serve_access_log``)."""
    return not getattr(record, "serve_access_log", False)


def start_tracing(fallback: str) -> None:
    """Tracing on in this replica if its ``OTEL_*`` variables say so (:mod:`halldyll_ray.tracing`),
    under the replica's deployment name (``fallback`` outside a replica)."""
    try:
        component = serve.get_replica_context().deployment
    except Exception:  # not in a replica (RayServeException)
        component = fallback
    tracing.configure(component)


class _ToServeLogger(logging.Handler):
    """Hands each record to the ``ray.serve`` logger's handlers as they are at that moment
    (Serve replaces them when a new ``logging_config`` is deployed)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("ray.serve").handle(record)


class EmbeddedDatabase:
    """Owns the embedded PostgreSQL for the app's lifetime (local development only).

    With a config file, Serve calls the app builder in a short-lived worker, so nothing the
    builder starts survives; a deployment does. It starts (or joins) the server, applies the
    migrations and hands its URL to the other deployments.
    """

    def __init__(self, settings: SettingsOverrides | None = None) -> None:
        self.settings = (settings or SettingsOverrides()).resolve()
        use_serve_logging(self.settings.log_level)
        start_tracing("EmbeddedDatabase")
        self.server = EmbeddedPostgres(
            self.settings.data_dir, database=self.settings.embedded_database
        )
        self._url: str | None = None
        self._lock = asyncio.Lock()

    @handle_method
    async def url(self) -> str:
        async with self._lock:
            if self._url is None:
                url = await self.server.start_async()
                await apply_migrations(url, embedding_dimension=self.settings.embedding_dimension)
                await self._bootstrap_admin(url)
                self._url = url
        return self._url

    async def _bootstrap_admin(self, url: str) -> None:
        """First start: create an Admin and write its key to DATA_DIR/admin_api_key (0600)."""
        key_file = self.settings.data_dir / "admin_api_key"
        settings = self.settings.model_copy(update={"database_url": SecretStr(url)})
        async with MemoryEngine(settings, run_jobs=False) as engine:
            admins = [
                u for u in (await engine.list_users(limit=1000)).items if u.role is Role.ADMIN
            ]
            if admins:
                return
            admin = await engine.create_user("admin", None, Role.ADMIN)
            new = await engine.create_api_key(admin.id, name="bootstrap")
        key_file.touch(mode=0o600, exist_ok=True)
        key_file.chmod(0o600)
        key_file.write_text(new.key + "\n")
        # The key itself never goes to a log.
        log.warning("created the first Admin user 'admin'; its API key is in %s", key_file)

    async def check_health(self) -> None:
        if self._url is not None:
            await apply_migrations(self._url, embedding_dimension=self.settings.embedding_dimension)

    def __del__(self) -> None:
        self.server.stop()


def _not_the_concurrent_batches_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("`max_batch_size` (")


#: Calls to Embedding a replica keeps in flight for small requests (:func:`remote_engine`):
#: two keep a remote model busy, one encoding while the next travels.
REMOTE_EMBEDDING_CALLS = 2
UNBOUNDED_BATCHES = 1 << 20  # serve.batch's max_concurrent_batches: see Embedder.embed_batch


class Embedder:
    """ONNX Runtime text encoder behind ``serve.batch``; served as the Embedding deployment.

    Each request carries a list of texts. ``serve.batch`` merges concurrent requests into
    batches; a :class:`MergingEncoder` then runs one model call at a time and merges the
    batches that queued during a call into the next one (``serve.batch`` alone cuts a new
    batch whenever its wait ends, busy model or not, so under load its batches stay tiny).
    ``serve.batch`` needs a Serve replica (it reads the replica's context).

    Args:
        settings: What the builder was given; the rest comes from this replica's environment.
        max_batch_size: Most requests one batch merges.
        batch_wait_timeout_s: How long a batch waits to fill.
        access_log: Serve's access log line for each call (see :func:`use_serve_logging`).
    """

    def __init__(
        self,
        settings: SettingsOverrides | None = None,
        *,
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.0,
        access_log: bool = True,
    ) -> None:
        # serve.batch's own setters: its queue is made at the first call, in this replica.
        self.embed_batch.set_max_batch_size(max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.settings = (settings or SettingsOverrides()).resolve()
        use_serve_logging(self.settings.log_level, access_log=access_log)
        start_tracing("Embedding")
        self.encoder = load_encoder(
            self.settings.embedding_model,
            self.settings.embedding_model_path,
            dimension=self.settings.embedding_dimension,
            provider=self.settings.embedding_provider,
            batch_size=self.settings.embedding_batch_size,
            max_seq_length=self.settings.embedding_max_seq_length,
            cpu_mem_arena=self.settings.embedding_cpu_mem_arena,
        )
        self.batch_sizes: list[int] = []  # requests per model call, the last 1000
        self.texts = 0
        self._batch_size_metric = metrics.Histogram(
            "halldyll_embedding_batch_size",
            description="Requests merged into one embedding model call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
        )
        self._texts_metric = metrics.Counter(
            "halldyll_embedded_texts", description="Texts embedded by the model."
        )
        self.model = MergingEncoder(
            self.encoder.encode, max_texts=self.encoder.batch_size, observe=self._observe
        )
        # serve.batch warns that max_batch_size x max_concurrent_batches exceeds
        # max_ongoing_requests; with the MergingEncoder as the real limit, that is by design.
        logging.getLogger("ray.serve").addFilter(_not_the_concurrent_batches_warning)

    def _observe(self, requests: int, texts: int) -> None:
        self.batch_sizes.append(requests)
        del self.batch_sizes[:-1000]
        self.texts += texts
        self._batch_size_metric.observe(requests)
        self._texts_metric.inc(texts)

    # Batches may overlap without limit: the MergingEncoder runs one model call at a time and
    # merges the batches that wait for it. With Serve's default of one batch at a time,
    # batches that formed while the model was busy would each wait their turn, one small
    # model call apiece (a mean of 1.04 requests per call under load). Serve 2.60 has no
    # setter for this one, and it never changes: it stays in the decorator.
    # Each request comes with its trace context (None with tracing off): the batch runs in
    # serve.batch's own task, outside every request's context.
    @serve.batch(max_concurrent_batches=UNBOUNDED_BATCHES)
    async def embed_batch(
        self, requests: list[tuple[list[str], TraceContext | None]]
    ) -> list[np.ndarray]:
        with tracing.batch_span(
            "Embedding.embed_batch",
            [trace_context for _, trace_context in requests],
            **{
                "halldyll.batch.requests": len(requests),
                "halldyll.batch.texts": sum(len(texts) for texts, _ in requests),
            },
        ):
            return await asyncio.gather(*(self.model.encode(texts) for texts, _ in requests))

    @handle_method
    async def embed(self, texts: list[str]) -> np.ndarray:
        """One request; ``serve.batch`` merges concurrent ones into one ``embed_batch`` call."""
        vectors: np.ndarray = await self.embed_batch((texts, tracing.current_context()))
        return vectors

    async def stats(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            # As serve.batch holds them (its getters are private; Ray's tests read them too).
            "max_batch_size": self.embed_batch._get_max_batch_size(),
            "batch_wait_timeout_s": self.embed_batch._get_batch_wait_timeout_s(),
            "texts": self.texts,
            "model_id": self.encoder.model_id,
            "provider": self.encoder.provider,
        }

    async def check_health(self) -> None:
        """Serve's health check: the model encodes a text. Not through the merger, whose
        statistics and metrics count requests (a probe every few seconds skewed them)."""
        await asyncio.to_thread(self.encoder.encode, ["health"])


def pickled(handle: Any) -> Any:
    """``handle`` (or None) whose calls pickle their arguments and answers with the standard
    library's pickle instead of cloudpickle, Serve's default.

    cloudpickle builds a Python-level pickler per call: for a search's arguments (principal
    and request models) it took about 3x as long as pickle (45 against 16 us to dump), on
    every hop in the caller and again for the answer in the replica. What the app's own
    calls carry is all picklable by reference, as pickle needs: pydantic models of
    :mod:`halldyll_ray.models` and :mod:`halldyll_ray.schemas` (generic ones parametrized at
    module level), UUIDs, strings, bytes, numpy arrays, and the errors of
    :mod:`halldyll_ray.errors`. The serialization options apply to Serve's gRPC transport
    (``halldyll_ray.serve_env``); elsewhere Ray serializes as it always does.
    """
    if handle is None:
        return None
    return handle.options(request_serialization="pickle", response_serialization="pickle")


async def remote_engine(
    settings: Settings,
    *,
    database: Any,
    embedder: Any,
    local_max_texts: int = 0,
    remote_calls: int = REMOTE_EMBEDDING_CALLS,
    run_jobs: bool = False,
) -> MemoryEngine:
    """A MemoryEngine whose vectors come from the Embedding deployment's handle.

    Args:
        settings: This replica's settings.
        database: Handle of the EmbeddedDatabase deployment, or None with DATABASE_URL.
        embedder: Handle of the Embedding deployment.
        local_max_texts: Requests of at most this many texts (a search query, a short fact)
            are embedded by this replica's own copy of the model (loaded anyway: it counts
            tokens), in a thread; larger ones go to Embedding. On a CPU cluster the hop costs
            more than encoding one text (``benchmarks/serve_http.py``); 0 sends everything to
            Embedding (GPU replicas).
        remote_calls: Calls to Embedding this replica keeps in flight for requests smaller
            than a batch: more concurrent requests wait and leave merged, up to
            EMBEDDING_BATCH_SIZE texts a call (:class:`MergingCaller`), instead of one Ray
            request per query. Requests of a batch or more go as they are.
        run_jobs: Run background job workers in this replica (the Ingestion deployment).
    """
    if database is not None:
        url = await database.url.remote()
        settings = settings.model_copy(update={"database_url": SecretStr(url)})

    local: MergingEncoder | None = None
    batch = settings.embedding_batch_size

    async def call(texts: list[str]) -> np.ndarray:
        result: np.ndarray = await embedder.embed.remote(texts)
        return result

    remote = MergingCaller(call, max_texts=batch, max_calls=remote_calls)

    async def embed(texts: list[str]) -> np.ndarray:
        if local is not None and len(texts) <= local_max_texts:
            with tracing.span("embedding.local", **{"halldyll.batch.texts": len(texts)}):
                return await local.encode(texts)
        if len(texts) >= batch:
            return await call(texts)
        return await remote.encode(texts)

    # Only the replicas that run jobs call the LLM (through its handle or its URL).
    model = serve_memory_model(settings) if run_jobs else None
    engine = MemoryEngine(settings, embedder=embed, memory_model=model, run_jobs=run_jobs)
    await engine.initialize(migrate=False)
    if local_max_texts > 0:
        # Concurrent queries share model calls instead of racing in threads for two cores.
        local = MergingEncoder(engine.encoder.encode, max_texts=engine.encoder.batch_size)
    return engine


def search_options(request: SearchRequest) -> dict[str, Any]:
    """A search request's fields but the query, as they are (``model_dump`` would copy them
    into new containers on every request)."""
    return {name: value for name, value in request if name != "query"}


# Parametrized at module level, so that pydantic registers the class in this module, where
# pickle finds it by name on the hop back to the Ingress (one made inside a method does not
# pickle).
_StoredMessages = Items[StoredMessage]


class EngineOwner:
    """Holds the replica's MemoryEngine, built once by Serve's first health check.

    Args:
        embedder: Handle of the Embedding deployment.
        database: Handle of the EmbeddedDatabase deployment, or None with DATABASE_URL.
        settings: What the builder was given; the rest comes from this replica's environment.
        local_embedding_max_texts: See :func:`remote_engine`.
        remote_embedding_calls: See :func:`remote_engine` (``remote_calls``).
        access_log: Serve's access log line for each call (see :func:`use_serve_logging`).
    """

    #: Whether this deployment's replicas run the background job workers.
    RUNS_JOBS = False

    def __init__(
        self,
        embedder: Any,
        *,
        database: Any = None,
        settings: SettingsOverrides | None = None,
        local_embedding_max_texts: int = 0,
        remote_embedding_calls: int = REMOTE_EMBEDDING_CALLS,
        access_log: bool = True,
    ) -> None:
        self.settings = (settings or SettingsOverrides()).resolve()
        use_serve_logging(self.settings.log_level, access_log=access_log)
        start_tracing(type(self).__name__)
        self._embedder = tracing.traced_handle(pickled(embedder), "Embedding")
        self._local_max_texts = local_embedding_max_texts
        self._remote_calls = remote_embedding_calls
        self._database = tracing.traced_handle(pickled(database), "EmbeddedDatabase")
        self._engine: MemoryEngine | None = None
        self._lock = asyncio.Lock()
        self._unreachable = False  # PostgreSQL failed the last health check

    async def engine(self) -> MemoryEngine:
        if self._engine is not None:  # every request asks: no lock once it exists
            return self._engine
        async with self._lock:
            if self._engine is None:
                self._engine = await remote_engine(
                    self.settings,
                    database=self._database,
                    embedder=self._embedder,
                    local_max_texts=self._local_max_texts,
                    remote_calls=self._remote_calls,
                    run_jobs=self.RUNS_JOBS,
                )
        return self._engine

    async def check_health(self) -> None:
        """Serve's health check; also the eager start of the engine.

        The first check builds the engine, so the database (and, for local development, the
        embedded server and first Admin key) is ready before the first request rather than
        made by it. PostgreSQL out of reach does not fail the check: Serve would kill and
        restart every engine replica of the app, which cures nothing (the same server is
        still down) and turns quick 503s into requests waiting for replicas. Meanwhile
        requests answer 503 with Retry-After, ``/readyz`` says why, and the pool reconnects
        once the server is back. Anything else, such as a wrong configuration or a missing
        migration, fails the check.
        """
        try:
            await (await self.engine()).db.ping()
        except Unavailable as exc:
            if not self._unreachable:
                log.warning("health check: %s; serving 503 until it is back", exc.message)
            self._unreachable = True
        else:
            if self._unreachable:
                log.warning("health check: PostgreSQL is reachable again")
            self._unreachable = False


class EngineDeployment(EngineOwner):
    """An engine deployment: typed operations, each run for the caller's principal.

    Every method takes the principal the Ingress authenticated and a request model of
    :mod:`halldyll_ray.schemas` (validated again here as pydantic validates it, since a
    handle can be called from any app with anything), and runs through
    :meth:`MemoryEngine.authorized`, the permission matrix. Takes :class:`EngineOwner`'s
    arguments.
    """

    HIT_RATIO_EVERY_S = 1.0  # the cache hit ratio gauge is refreshed at most this often

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hit_ratio = metrics.Gauge(
            "halldyll_cache_hit_ratio",
            description="Share of cache lookups answered by the LRU or Redis, by kind.",
            tag_keys=("kind",),
        )
        self._hit_ratio_at = 0.0

    @contextlib.asynccontextmanager
    async def _authorized(
        self, principal: Principal, request_id: str | None
    ) -> AsyncIterator[AuthorizedEngine]:
        """The engine's operations for ``principal``; refreshes the hit ratio gauge after.

        The principal must carry the proof that :meth:`MemoryEngine.authenticate` gave it
        (AuthenticationFailed otherwise): a handle can be called by any app in the cluster,
        and a principal made up there would otherwise act as whoever it names.
        """
        engine = await self.engine()
        principal = await engine.components.keys.verify(principal)
        try:
            yield engine.authorized(principal, request_id=request_id)
        finally:
            now = time.monotonic()
            if now - self._hit_ratio_at >= self.HIT_RATIO_EVERY_S:
                self._hit_ratio_at = now
                for kind, (local, remote, missed) in engine.cache.stats.by_kind.items():
                    total = local + remote + missed
                    if total:
                        self._hit_ratio.set((local + remote) / total, tags={"kind": kind})

    async def health(self) -> dict[str, Any]:
        return await (await self.engine()).health()


class Searcher(EngineDeployment):
    """Search: semantic, full-text and hybrid search, and reading memories."""

    @handle_method
    async def search(
        self,
        principal: Principal,
        request: SearchRequest,
        *,
        user_id: UUID | None,
        request_id: str | None,
    ) -> SearchResponse:
        """The memories most relevant to ``request.query``, best first.

        Args:
            principal: Who asks (authenticated by the Ingress).
            request: The search.
            user_id: Whose memories; None: the principal's own.
            request_id: Carried into the audit log.
        """
        results = await self._search(principal, request, user_id=user_id, request_id=request_id)
        return SearchResponse.model_construct(results=results)

    @handle_method
    async def search_json(
        self,
        principal: Principal,
        request: SearchRequest,
        *,
        user_id: UUID | None,
        request_id: str | None,
    ) -> bytes:
        """:meth:`search` for the HTTP API: the response body (:meth:`MemoryEngine.search_json`).

        Bytes cross the hop to the ingress instead of pickled models that it would unpickle
        only to serialize them again, and a cached answer is not even read here
        (``benchmarks/serve_http.py``).
        """
        request = parse(SearchRequest, request)
        async with self._authorized(principal, request_id) as api:
            return await api.search_json(user_id, request.query, **search_options(request))

    async def _search(
        self,
        principal: Principal,
        request: SearchRequest,
        *,
        user_id: UUID | None,
        request_id: str | None,
    ) -> list[SearchResult]:
        request = parse(SearchRequest, request)
        async with self._authorized(principal, request_id) as api:
            return await api.search(user_id, request.query, **search_options(request))

    @handle_method
    async def get_memory(
        self,
        principal: Principal,
        *,
        user_id: UUID | None,
        memory_id: UUID,
        request_id: str | None,
    ) -> StoredMemory:
        """One memory, with a conversation's messages."""
        async with self._authorized(principal, request_id) as api:
            return await api.get_memory(user_id, memory_id)

    @handle_method
    async def fact_history(
        self,
        principal: Principal,
        *,
        user_id: UUID | None,
        memory_id: UUID,
        request_id: str | None,
    ) -> list[StoredMemory]:
        """Every version of a fact, oldest first."""
        async with self._authorized(principal, request_id) as api:
            return await api.fact_history(user_id, memory_id)

    @handle_method
    async def list_memories(
        self,
        principal: Principal,
        request: ListMemoriesRequest,
        *,
        user_id: UUID | None,
        request_id: str | None,
    ) -> Page[StoredMemory]:
        """One page of memories, newest first."""
        request = parse(ListMemoriesRequest, request)
        async with self._authorized(principal, request_id) as api:
            return await api.list_memories(user_id, **request.model_dump())


class Ingestor(EngineDeployment):
    """Ingestion: storing, changing and deleting memories, conversations and turns; its
    replicas also run the background jobs (JOBS_WORKERS each), so the writes and the jobs
    they queue scale together."""

    RUNS_JOBS = True

    def __del__(self) -> Any:
        """Serve's graceful shutdown awaits this: running jobs get a few seconds, then go
        back to the queue for another replica instead of waiting out their lease."""
        engine = getattr(self, "_engine", None)
        if engine is None or getattr(self, "_jobs_stopped", False):
            return None
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # garbage-collected outside an event loop: nothing to await
            return None
        self._jobs_stopped = True
        return engine.stop_job_workers(grace_s=5.0)

    @handle_method
    async def store_memory(
        self,
        principal: Principal,
        memory: Memory,
        *,
        user_id: UUID | None,
        request_id: str | None,
    ) -> StoredMemory:
        """Store a conversation, fact, image, transcription or summary."""
        memory = parse_memory(memory)
        async with self._authorized(principal, request_id) as api:
            return await api.store_memory(user_id, memory)

    @handle_method
    async def store_memories(
        self,
        principal: Principal,
        request: StoreMemoriesRequest,
        *,
        user_id: UUID | None,
        request_id: str | None,
    ) -> StoredMemories:
        """Store a batch of memories, all or nothing (the bulk path: one embedding request to
        the Embedding deployment, one transaction)."""
        request = parse(StoreMemoriesRequest, request)
        async with self._authorized(principal, request_id) as api:
            stored = await api.store_memories(user_id, request.memories)
        return StoredMemories.model_construct(memories=stored)

    @handle_method
    async def update_memory(
        self,
        principal: Principal,
        update: MemoryUpdate,
        *,
        user_id: UUID | None,
        memory_id: UUID,
        request_id: str | None,
    ) -> StoredMemory:
        """Change a memory's tags, metadata, importance or text."""
        update = parse(MemoryUpdate, update)
        async with self._authorized(principal, request_id) as api:
            return await api.update_memory(user_id, memory_id, update)

    @handle_method
    async def delete_memory(
        self,
        principal: Principal,
        *,
        user_id: UUID | None,
        memory_id: UUID,
        request_id: str | None,
    ) -> None:
        """Delete a memory."""
        async with self._authorized(principal, request_id) as api:
            await api.delete_memory(user_id, memory_id)

    @handle_method
    async def append_messages(
        self,
        principal: Principal,
        request: AppendMessagesRequest,
        *,
        user_id: UUID | None,
        memory_id: UUID,
        request_id: str | None,
    ) -> _StoredMessages:
        """Append messages to a stored conversation."""
        request = parse(AppendMessagesRequest, request)
        async with self._authorized(principal, request_id) as api:
            stored = await api.append_messages(user_id, memory_id, request.messages)
        return _StoredMessages.model_construct(items=list(stored))

    @handle_method
    async def record_turn(
        self,
        principal: Principal,
        request: TurnRequest,
        *,
        user_id: UUID | None,
        session_id: str,
        request_id: str | None,
    ) -> TurnRecord:
        """After an LLM call: store the exchange in the session's conversation."""
        request = parse(TurnRequest, request)
        async with self._authorized(principal, request_id) as api:
            return await api.record_turn(user_id, session_id, **request.model_dump())


class ContextBuilder(EngineDeployment):
    """Context: prompt context blocks under a token budget."""

    @handle_method
    async def build_context(
        self,
        principal: Principal,
        request: ContextRequest,
        *,
        user_id: UUID | None,
        request_id: str | None,
    ) -> Context:
        """A prompt context block with its sources."""
        request = parse(ContextRequest, request)
        async with self._authorized(principal, request_id) as api:
            return await api.build_context(
                user_id, request.query, **request.model_dump(exclude={"query"})
            )

    @handle_method
    async def prepare_context(
        self,
        principal: Principal,
        request: PrepareContextRequest,
        *,
        user_id: UUID | None,
        session_id: str,
        request_id: str | None,
    ) -> Context:
        """Before an LLM call: summary, relevant memories, recent turns and the message."""
        request = parse(PrepareContextRequest, request)
        async with self._authorized(principal, request_id) as api:
            return await api.prepare_context(user_id, session_id, **request.model_dump())
