"""The ingress: the HTTP API (FastAPI through ``serve.ingress``) and the handle API.

Authentication (Bearer API key), the permission matrix (through the deployments' authorised
engines), one error shape, request ids, body limits. Memory operations are forwarded to the
Search, Ingestion and Context deployments; users, keys, models and audit are served here.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Mapping
from datetime import datetime
from typing import Any, Literal, TypeVar
from uuid import UUID

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve import metrics
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from halldyll_ray.errors import (
    AuthenticationFailed,
    ConfigurationError,
    Conflict,
    HalldyllError,
    InvalidInput,
    MigrationError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from halldyll_ray.models import (
    Context,
    Memory,
    MemoryUpdate,
    Principal,
    SearchResult,
    StoredMemory,
)
from halldyll_ray.schemas import (
    ApiKeyCreate,
    AppendMessagesRequest,
    ContextRequest,
    Items,
    ListMemoriesRequest,
    ModelCreate,
    PrepareContextRequest,
    SearchRequest,
    SearchResponse,
    TurnRequest,
    UserCreate,
    UserUpdate,
    parse,
    parse_memory,
)
from halldyll_ray.serve.deployments import EngineOwner
from halldyll_ray.serve.settings import SettingsOverrides

log = logging.getLogger("halldyll_ray.http")
_T = TypeVar("_T")

STATUS: dict[type[HalldyllError], int] = {
    InvalidInput: 422,
    NotFound: 404,
    Conflict: 409,
    PermissionDenied: 403,
    AuthenticationFailed: 401,
    Unavailable: 503,
    MigrationError: 503,
    ConfigurationError: 500,
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
DEFAULT_MAX_BODY_BYTES = 1_048_576

api = FastAPI(
    title="halldyll-ray",
    version="1",
    description="Multi-user, multi-model memory for AI agents. Authenticate with "
    "`Authorization: Bearer <API key>`.",
)
api.state.max_body_bytes = DEFAULT_MAX_BODY_BYTES


def _error(status: int, code: str, message: str, request_id: str, **headers: str) -> Response:
    return JSONResponse(
        {"error": {"code": code, "message": message, "request_id": request_id}},
        status_code=status,
        headers=headers,
    )


_ANY: TypeAdapter[Any] = TypeAdapter(Any)


def _json(value: Any, status: int = 200) -> Response:
    """A JSON response serialized by pydantic-core in one pass (models, UUIDs, datetimes).

    Much cheaper than FastAPI's ``jsonable_encoder`` walk over ``model_dump`` output.
    """
    return Response(_ANY.dump_json(value), status_code=status, media_type="application/json")


def _status_of(exc: HalldyllError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


@api.exception_handler(HalldyllError)
async def _halldyll_error(request: Request, exc: HalldyllError) -> Response:
    status = _status_of(exc)
    headers = {"Retry-After": str(exc.fields.get("retry_after", 5))} if status == 503 else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    message = exc.message if status < 500 or status == 503 else "internal configuration error"
    return _error(status, exc.code, message, request.state.request_id, **headers)


# A replica of another deployment died, or none could take the request. Transient: Serve
# replaces dead replicas within seconds and sheds load with BackPressureError.
_NOT_SENT = (BackPressureError, DeploymentUnavailableError)
_LOST = (RayActorError, ReplicaUnavailableError, WorkerCrashedError, NodeDiedError)


def _unavailable(exc: Exception) -> Unavailable:
    """The typed error (HTTP 503, Retry-After: 1) for a call another deployment did not serve."""
    log.warning("replica unavailable: %s", type(exc).__name__)
    if isinstance(exc, _NOT_SENT):
        message = "the service is overloaded or restarting; the request was not applied, retry"
    else:
        message = (
            "a replica of the service stopped while handling the request, which may or may not "
            "have been applied; retry (a repeated fact only reinforces the stored one)"
        )
    return Unavailable(message, retry_after=1)


async def _downstream(call: Awaitable[_T]) -> _T:
    """Await a call to another deployment; Ray's transient failures become :func:`_unavailable`.

    Serve's own handler for BackPressureError (installed on the app after ours) would answer
    a bare text 503, so the translation happens here, where the call is made.
    """
    try:
        return await call
    except (*_NOT_SENT, *_LOST) as exc:
        raise _unavailable(exc) from exc


async def _replica_lost(request: Request, exc: Exception) -> Response:
    # Any other call that a dead replica failed (none is expected outside _downstream).
    return await _halldyll_error(request, _unavailable(exc))


for _cls in _LOST:
    api.add_exception_handler(_cls, _replica_lost)


def _request_id(scope: Any) -> str:
    for name, value in scope.get("headers") or ():
        if name == b"x-request-id":
            given = value.decode("latin-1")
            return given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    return uuid.uuid4().hex


class _RequestContext:
    """Request id, body limit, metrics and the request log, as plain ASGI middleware.

    (Starlette's ``BaseHTTPMiddleware`` runs the app in a task group with memory streams,
    which costs more CPU per request than the rest of a cached search.) The body is counted
    as it streams in, so a chunked upload cannot pass the limit either: past it this answers
    413 itself and tells the app the client went away (FastAPI would turn an exception
    raised while reading the body into a 400).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        limit = api.state.max_body_bytes
        for name, value in scope.get("headers") or ():
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await self._too_large(request_id)(scope, receive, send)
                return
        started = time.perf_counter()
        seen = 0
        answered = False
        status = 500

        async def limited() -> Any:
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request" and not answered:
                seen += len(message.get("body", b""))
                if seen > limit:
                    answered = True
                    await self._too_large(request_id)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            if not answered:
                await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not answered:
                raise  # Starlette's outermost error handler answers 500 (recorded below)
        finally:
            self._record(scope, request_id, 413 if answered else status, started)

    @staticmethod
    def _record(scope: Any, request_id: str, status: int, started: float) -> None:
        # Serve puts the same id (the client's X-Request-ID, or its own) on the response.
        route = getattr(scope.get("route"), "path", "unmatched")
        elapsed_ms = (time.perf_counter() - started) * 1000
        recorder = getattr(api.state, "metrics", None)
        if recorder is not None:
            recorder.record(scope["method"], route, status, elapsed_ms)
        if log.isEnabledFor(logging.DEBUG):  # Serve's access log has them at INFO
            log.debug(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round(elapsed_ms, 2),
                },
            )

    @staticmethod
    def _too_large(request_id: str) -> Response:
        return _error(
            413,
            "payload_too_large",
            f"request body is over {api.state.max_body_bytes} bytes",
            request_id,
        )


api.add_middleware(_RequestContext)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthenticated"}
    return _error(
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        str(exc.detail),
        getattr(request.state, "request_id", ""),
    )


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> Response:
    # Never leak internals; the log keeps the traceback with the request id.
    log.exception("unhandled error", extra={"request_id": request.state.request_id})
    return _error(500, "internal_error", "internal error", request.state.request_id)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(p) for p in first["loc"] if p != "body")
    return _error(422, "invalid_input", f"{field}: {first['msg']}", request.state.request_id)


class _RouteMetrics:
    """Request counts and latencies per route, through Ray's metrics API (Prometheus)."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "halldyll_http_requests",
            description="HTTP requests by route, method and status.",
            tag_keys=("route", "method", "status"),  # type: ignore[arg-type]  # Ray types it as a 1-tuple
        )
        self.latency = metrics.Histogram(
            "halldyll_http_latency_ms",
            description="HTTP request latency in the ingress, by route.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
            tag_keys=("route",),
        )

    def record(self, method: str, route: str, status: int, elapsed_ms: float) -> None:
        self.requests.inc(tags={"route": route, "method": method, "status": str(status)})
        self.latency.observe(elapsed_ms, tags={"route": route})


class Ingress(EngineOwner):
    """The HTTP API and the handle API (served as ``HTTPIngress``, below).

    Its own engine authenticates and serves users, keys, models and audit; memory operations
    go to the Search, Ingestion and Context deployments.

    Args:
        searcher, ingestor, context, embedder: Handles of Search, Ingestion, Context and
            Embedding.
        database: Handle of the EmbeddedDatabase deployment, or None with DATABASE_URL.
        settings: What the builder was given; the rest comes from this replica's environment.
        max_body_bytes: Largest HTTP request body; larger gets 413.
    """

    def __init__(
        self,
        *,
        searcher: Any,
        ingestor: Any,
        context: Any,
        embedder: Any,
        database: Any = None,
        settings: SettingsOverrides | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        super().__init__(embedder, database=database, settings=settings)
        self._searcher = searcher
        self._ingestor = ingestor
        self._context = context
        api.state.max_body_bytes = max_body_bytes
        api.state.metrics = _RouteMetrics()

    # ----------------------------------------------------------------------- helpers
    async def _principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed("send Authorization: Bearer <API key>")
        return await (await self.engine()).authenticate(key.strip())

    async def _api(self, request: Request) -> Any:
        principal = await self._principal(request)
        return (await self.engine()).authorized(principal, request_id=request.state.request_id)

    @staticmethod
    def _user(user_id: str) -> UUID | None:
        return None if user_id == "me" else _parse_uuid(user_id, "user_id")

    # ----------------------------------------------------------------------- health
    @api.get("/healthz", tags=["health"])
    async def healthz(self) -> Response:
        """Liveness: the process answers."""
        return Response(b'{"status":"ok"}', media_type="application/json")

    @api.get("/readyz", tags=["health"])
    async def readyz(self) -> Response:
        """Readiness per dependency: PostgreSQL, Redis, the model (503 only without PostgreSQL)."""
        try:
            report = await (await self.engine()).health()
        except HalldyllError as exc:
            report = {"ok": False, "database": {"ok": False, "error": exc.message}}
        return JSONResponse(
            report,
            status_code=200 if report["ok"] else 503,
            headers={} if report["ok"] else {"Retry-After": "5"},
        )

    # ----------------------------------------------------------------------- users and keys
    @api.get("/v1/me", tags=["users"])
    async def me(self, request: Request) -> Any:
        return _json(await (await self._api(request)).get_user(None))

    @api.post("/v1/users", status_code=201, tags=["users"])
    async def create_user(self, request: Request, body: UserCreate) -> Any:
        user = await (await self._api(request)).create_user(body.username, body.email, body.role)
        return _json(user, 201)

    @api.get("/v1/users", tags=["users"])
    async def list_users(
        self, request: Request, limit: int = 100, cursor: str | None = None
    ) -> Any:
        page = await (await self._api(request)).list_users(limit=limit, cursor=cursor)
        return _json(page)

    @api.get("/v1/users/{user_id}", tags=["users"])
    async def get_user(self, request: Request, user_id: str) -> Any:
        api_ = await self._api(request)
        return _json(await api_.get_user(self._user(user_id)))

    @api.patch("/v1/users/{user_id}", tags=["users"])
    async def update_user(self, request: Request, user_id: str, body: UserUpdate) -> Any:
        api_ = await self._api(request)
        target = self._user(user_id) or api_.principal.user_id
        user = await api_.update_user(target, **body.model_dump(exclude_none=True))
        return _json(user)

    @api.delete("/v1/users/{user_id}", status_code=204, tags=["users"])
    async def delete_user(self, request: Request, user_id: str) -> Response:
        api_ = await self._api(request)
        await api_.delete_user(self._user(user_id) or api_.principal.user_id)
        return Response(status_code=204)

    @api.post("/v1/users/{user_id}/keys", status_code=201, tags=["keys"])
    async def create_key(self, request: Request, user_id: str, body: ApiKeyCreate) -> Any:
        api_ = await self._api(request)
        new = await api_.create_api_key(
            self._user(user_id), name=body.name, expires_at=body.expires_at
        )
        return _json({"key": new.key, **new.api_key.model_dump()}, 201)

    @api.get("/v1/users/{user_id}/keys", tags=["keys"])
    async def list_keys(self, request: Request, user_id: str) -> Any:
        api_ = await self._api(request)
        return _json(Items(items=list(await api_.list_api_keys(self._user(user_id)))))

    @api.post("/v1/keys/{key_id}/rotate", status_code=201, tags=["keys"])
    async def rotate_key(self, request: Request, key_id: str) -> Any:
        new = await (await self._api(request)).rotate_api_key(_parse_uuid(key_id, "key_id"))
        return _json({"key": new.key, **new.api_key.model_dump()}, 201)

    @api.delete("/v1/keys/{key_id}", tags=["keys"])
    async def revoke_key(self, request: Request, key_id: str) -> Any:
        key = await (await self._api(request)).revoke_api_key(_parse_uuid(key_id, "key_id"))
        return _json(key)

    # ----------------------------------------------------------------------- AI models
    @api.post("/v1/models", status_code=201, tags=["models"])
    async def register_model(self, request: Request, body: ModelCreate) -> Any:
        model = await (await self._api(request)).register_model(
            body.name, body.kind, version=body.version, metadata=body.metadata
        )
        return _json(model, 201)

    @api.get("/v1/models", tags=["models"])
    async def list_models(self, request: Request, kind: str | None = None) -> Any:
        models = await (await self._api(request)).list_models(kind=kind)
        return _json(Items(items=list(models)))

    @api.get("/v1/models/{ref:path}", tags=["models"])
    async def get_model(self, request: Request, ref: str) -> Any:
        return _json(await (await self._api(request)).get_model(ref))

    @api.delete("/v1/models/{ref:path}", status_code=204, tags=["models"])
    async def delete_model(self, request: Request, ref: str) -> Response:
        await (await self._api(request)).delete_model(ref)
        return Response(status_code=204)

    # ----------------------------------------------------------------------- memories
    @api.post("/v1/users/{user_id}/memories", status_code=201, tags=["memories"])
    async def store_memory(self, request: Request, user_id: str, body: Memory) -> Any:
        stored = await _downstream(
            self._ingestor.store_memory.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                request_id=request.state.request_id,
            )
        )
        return _json(stored, 201)

    @api.get("/v1/users/{user_id}/memories", tags=["memories"])
    async def list_memories(
        self,
        request: Request,
        user_id: str,
        types: str | None = None,
        model: str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Any:
        # Query parameters, read by FastAPI; lists come comma-separated.
        query = ListMemoriesRequest(
            types=None if types is None else types.split(","),
            model=model,
            include_shared=include_shared,
            session_id=session_id,
            tags=None if tags is None else tags.split(","),
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )
        page = await _downstream(
            self._searcher.list_memories.remote(
                await self._principal(request),
                query,
                user_id=self._user(user_id),
                request_id=request.state.request_id,
            )
        )
        return _json(page)

    @api.get("/v1/users/{user_id}/memories/{memory_id}", tags=["memories"])
    async def get_memory(self, request: Request, user_id: str, memory_id: str) -> Any:
        memory = await _downstream(
            self._searcher.get_memory.remote(
                await self._principal(request),
                user_id=self._user(user_id),
                memory_id=_parse_uuid(memory_id, "memory_id"),
                request_id=request.state.request_id,
            )
        )
        return _json(memory)

    @api.patch("/v1/users/{user_id}/memories/{memory_id}", tags=["memories"])
    async def update_memory(
        self, request: Request, user_id: str, memory_id: str, body: MemoryUpdate
    ) -> Any:
        memory = await _downstream(
            self._ingestor.update_memory.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                memory_id=_parse_uuid(memory_id, "memory_id"),
                request_id=request.state.request_id,
            )
        )
        return _json(memory)

    @api.delete("/v1/users/{user_id}/memories/{memory_id}", status_code=204, tags=["memories"])
    async def delete_memory(self, request: Request, user_id: str, memory_id: str) -> Response:
        await _downstream(
            self._ingestor.delete_memory.remote(
                await self._principal(request),
                user_id=self._user(user_id),
                memory_id=_parse_uuid(memory_id, "memory_id"),
                request_id=request.state.request_id,
            )
        )
        return Response(status_code=204)

    @api.post(
        "/v1/users/{user_id}/memories/{memory_id}/messages", status_code=201, tags=["memories"]
    )
    async def append_messages(
        self, request: Request, user_id: str, memory_id: str, body: AppendMessagesRequest
    ) -> Any:
        stored = await _downstream(
            self._ingestor.append_messages.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                memory_id=_parse_uuid(memory_id, "memory_id"),
                request_id=request.state.request_id,
            )
        )
        return _json(stored, 201)

    @api.post("/v1/users/{user_id}/search", tags=["search"])
    async def search(self, request: Request, user_id: str, body: SearchRequest) -> Any:
        content = await _downstream(
            self._searcher.search_json.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                request_id=request.state.request_id,
            )
        )
        return Response(content, media_type="application/json")

    @api.post("/v1/users/{user_id}/context", tags=["context"])
    async def build_context(self, request: Request, user_id: str, body: ContextRequest) -> Any:
        context = await _downstream(
            self._context.build_context.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                request_id=request.state.request_id,
            )
        )
        return _json(context)

    @api.post("/v1/users/{user_id}/sessions/{session_id}/prepare", tags=["context"])
    async def prepare_context(
        self, request: Request, user_id: str, session_id: str, body: PrepareContextRequest
    ) -> Any:
        context = await _downstream(
            self._context.prepare_context.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                session_id=session_id,
                request_id=request.state.request_id,
            )
        )
        return _json(context)

    @api.post("/v1/users/{user_id}/sessions/{session_id}/turns", status_code=201, tags=["context"])
    async def record_turn(
        self, request: Request, user_id: str, session_id: str, body: TurnRequest
    ) -> Any:
        turn = await _downstream(
            self._ingestor.record_turn.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                session_id=session_id,
                request_id=request.state.request_id,
            )
        )
        return _json(turn, 201)

    # ----------------------------------------------------------------------- audit
    @api.get("/v1/audit", tags=["audit"])
    async def audit(
        self,
        request: Request,
        user_id: str | None = None,
        operation: str | None = None,
        outcome: Literal["ok", "denied", "error"] | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> Any:
        rows = await (await self._api(request)).list_audit(
            user_id=user_id, operation=operation, outcome=outcome, before_id=before_id, limit=limit
        )
        return _json(Items(items=rows))

    # ----------------------------------------------------------------------- handle API
    # For co-located Ray apps: the caller's API key instead of an HTTP header, the same
    # permissions, and the same request models, built here from plain arguments. A bad
    # argument raises InvalidInput, as the HTTP API answers 422.
    async def _handle_principal(self, api_key: str) -> Principal:
        return await (await self.engine()).authenticate(api_key)

    async def handle_store_memory(
        self, api_key: str, user_id: UUID | str | None, memory: Memory | Mapping[str, Any]
    ) -> StoredMemory:
        """Store a memory (a memory model, or its JSON form with a ``type`` key)."""
        principal = await self._handle_principal(api_key)
        return await _downstream(
            self._ingestor.store_memory.remote(
                principal, parse_memory(memory), user_id=_handle_user(user_id), request_id=None
            )
        )

    async def handle_search(
        self,
        api_key: str,
        user_id: UUID | str | None,
        query: str,
        limit: int | None = None,
        **options: Any,
    ) -> list[SearchResult]:
        """Search; ``options`` are the other fields of :class:`SearchRequest`."""
        request = parse(SearchRequest, {"query": query, "limit": limit, **options})
        principal = await self._handle_principal(api_key)
        response: SearchResponse = await _downstream(
            self._searcher.search.remote(
                principal, request, user_id=_handle_user(user_id), request_id=None
            )
        )
        return response.results

    async def handle_build_context(
        self, api_key: str, user_id: UUID | str | None, query: str | None = None, **options: Any
    ) -> Context:
        """A prompt context block; ``options`` are the other fields of :class:`ContextRequest`."""
        request = parse(ContextRequest, {"query": query, **options})
        principal = await self._handle_principal(api_key)
        return await _downstream(
            self._context.build_context.remote(
                principal, request, user_id=_handle_user(user_id), request_id=None
            )
        )


def _handle_user(user_id: UUID | str | None) -> UUID | None:
    """The handle API's ``user_id``: a UUID, its text, or None for the caller."""
    if user_id is None or isinstance(user_id, UUID):
        return user_id
    return _parse_uuid(str(user_id), "user_id")


def _parse_uuid(value: str, field: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise InvalidInput(f"{field} must be a UUID", field=field) from None


# serve.ingress rewrites the FastAPI routes into class-based views on the app object it is
# given; that must happen at import, in every process (driver and replicas), so it cannot be
# applied late in the builder like the other deployments' decorators.
HTTPIngress = serve.ingress(api)(Ingress)

__all__ = ["HTTPIngress", "Ingress", "api"]
