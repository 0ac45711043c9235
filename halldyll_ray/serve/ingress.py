"""The ingress: the HTTP API (FastAPI through ``serve.ingress``) and the handle API.

Authentication (Bearer API key), the permission matrix (through the deployments' authorised
engines), one error shape, request ids, body limits. Memory operations are forwarded to the
Search, Ingestion and Context deployments; users, keys, models and audit are served here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from halldyll_ray import requestctx, tracing, validation
from halldyll_ray.components.events import Subscription
from halldyll_ray.components.jobs import KIND as JOB_KIND
from halldyll_ray.config import Settings
from halldyll_ray.errors import (
    HalldyllError,
    InvalidInput,
)
from halldyll_ray.models import (
    MAX_PAGE_SIZE,
    SESSION_ID_PATTERN,
    UUID_PATTERN,
    Context,
    EventsResync,
    Id,
    JobStatus,
    Memory,
    MemoryUpdate,
    ModelKind,
    Principal,
    SearchResult,
    StoredMemory,
)
from halldyll_ray.schemas import (
    ApiKeyCreate,
    AppendMessagesRequest,
    ContextRequest,
    Grant,
    GrantCreate,
    IsoDateTime,
    Items,
    ListMemoriesRequest,
    ModelCreate,
    PrepareContextRequest,
    QueryBool,
    QueryInt,
    SearchRequest,
    SearchResponse,
    StoredMemories,
    StoreMemoriesRequest,
    TurnRequest,
    UserCreate,
    UserUpdate,
    parse,
    parse_memory,
)
from halldyll_ray.serve.deployments import EngineOwner, pickled, search_options
from halldyll_ray.serve.graphql_api import mount_graphql
from halldyll_ray.serve.http import (
    BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_IMPORT_BYTES,
    IDEMPOTENCY_KEY,
    FastLane,
    RouteMetrics,
    add_fast_lane,
    api,
    downstream,
    halldyll_error_response,
    json_response,
    reserve_literal_segments,
)
from halldyll_ray.serve.mcp_http import mount_mcp
from halldyll_ray.serve.settings import SettingsOverrides
from halldyll_ray.serve.ui import mount_ui

log = logging.getLogger(__name__)
NDJSON = "application/x-ndjson"
JOB_KIND_PATTERN = f"^{JOB_KIND.pattern}$"

#: A user in a path: its id, or ``me`` for the caller.
UserRef = Annotated[
    str,
    Path(
        pattern=f"^(me|{UUID_PATTERN})$",
        description="A user's id (UUID), or `me` for the caller.",
    ),
]
#: Any other id in a path (a memory's, a key's, a job's, an owner's): the one form ids take
#: everywhere (models.UUID_PATTERN); pydantic's UUID alone also took braces, ``urn:uuid:`` and
#: 32 digits without hyphens, which a user id in the same path did not.
IdRef = Annotated[Id, Path()]
#: A session in a path (the engine's rule, validation.SESSION_ID).
SessionRef = Annotated[str, Path(pattern=SESSION_ID_PATTERN, description="The session's id.")]

_EVENTS_DOC = (
    "A stream of Server-Sent Events: `id` (the event id, for Last-Event-ID), `event` (created, "
    "updated, reinforced, deleted, expired; resync; error) and `data` (a MemoryEvent as JSON)."
)


def _bearer(header: str) -> str | None:
    """The API key of an ``Authorization: Bearer <key>`` header value; None for any other."""
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


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
        body_timeout_s: Seconds a client has to send each part of its body; then 408.
        max_import_bytes: Largest import body (an export file); larger gets 413.
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
        body_timeout_s: float = BODY_TIMEOUT_S,
        max_import_bytes: int = DEFAULT_MAX_IMPORT_BYTES,
    ) -> None:
        super().__init__(embedder, database=database, settings=settings)
        # With tracing on (OTEL_* variables), each call carries the trace to the replica.
        self._searcher = tracing.traced_handle(pickled(searcher), "Search")
        self._ingestor = tracing.traced_handle(pickled(ingestor), "Ingestion")
        self._context = tracing.traced_handle(pickled(context), "Context")
        tracing.instrument_fastapi(api)
        api.state.max_body_bytes = max_body_bytes
        api.state.body_timeout_s = body_timeout_s
        api.state.max_import_bytes = max_import_bytes
        api.state.metrics = RouteMetrics()
        # GraphQL's subscriptions follow the change feed through this replica's engine.
        api.state.ingress = self
        # A request refused for its input is refused for its credentials first (http.py).
        api.state.authenticate = self._principal
        add_fast_lane(
            FastLane(
                "POST",
                re.compile(f"/v1/users/(me|{UUID_PATTERN.strip('^$')})/search"),
                "/v1/users/{user_id}/search",
                self._search_lane,
            )
        )

    # ----------------------------------------------------------------------- helpers
    async def _principal(self, request: Request) -> Principal:
        """The caller, from ``Authorization: Bearer <API key>``. A missing or non-Bearer header
        and a bad key are audited (throttled), with the request's id."""
        engine = await self.engine()
        header = request.headers.get("authorization", "")
        key = _bearer(header)
        with requestctx.acting(None, request.state.request_id):
            if key is None:
                reason = "no Authorization header" if not header else "not a Bearer credential"
                raise await engine.components.keys.refuse_credentials(reason)
            return await engine.authenticate(key)

    async def _search_lane(self, scope: Scope, body: bytes, request_id: str) -> Any:
        """The fast lane of ``POST /v1/users/{user_id}/search`` (:class:`FastLane`): a valid
        search with a Bearer key is answered here, authenticated, checked and audited as the
        route does it, from the result cache or, on a miss, by the hop to Search (and the
        answer kept in the cache), with the route's error mapping. None leaves the request to
        the route: a body that is not a valid search, a query string or an Idempotency-Key
        (the route's 422 checks the credentials first), no Bearer credential (the route's 401
        audits it).

        A miss, most of all an uncached query, spent a fifth of the Ingress's CPU in
        FastAPI's request cycle after the lane had declined it (``benchmarks/serve_http.py
        --profile``, 2026-12-01): the hop no longer waits for it."""
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"").split(b";")[0].strip()  # none: not JSON
        key = _bearer(headers.get(b"authorization", b"").decode("latin-1"))
        if (
            kind.lower() != b"application/json"
            or key is None
            or scope.get("query_string")
            or IDEMPOTENCY_KEY.encode() in headers  # the route refuses what it does not take
        ):
            return None
        try:
            search = SearchRequest.model_validate(validation.json_loads(body))
        except Exception:  # not JSON, not a search, nested too deeply: the route says which
            return None
        engine = await self.engine()
        user = self._user(scope["path"].split("/")[3])
        try:
            with requestctx.acting(None, request_id):
                principal = await engine.authenticate(key)
            content = await self._search_json(
                engine.authorized(principal, request_id=request_id), user, search, request_id
            )
        except HalldyllError as exc:
            return await halldyll_error_response(Request(scope), exc)
        return Response(content, media_type="application/json")

    async def _search_json(
        self, api_: Any, user: UUID | None, search: SearchRequest, request_id: str
    ) -> bytes:
        """The search's answer (JSON bytes): the result cache's, or Search's on a miss, which
        is kept here too (without Redis, Search's cache is its own process's). Raises what
        the search raises (HalldyllError), Unavailable when Search cannot be reached."""
        found = await api_.cached_search_json(user, search.query, **search_options(search))
        if found.answer is not None:
            return found.answer  # type: ignore[no-any-return]
        content: bytes = await downstream(
            self._searcher.search_json.remote(
                api_.principal, search, user_id=user, request_id=request_id
            )
        )
        (await self.engine()).keep_search_json(found.key, content)
        return content

    async def _api(self, request: Request) -> Any:
        principal = await self._principal(request)
        return (await self.engine()).authorized(principal, request_id=request.state.request_id)

    @staticmethod
    def _user(user_id: str) -> UUID | None:
        return None if user_id == "me" else validation.parse_uuid(user_id, "user_id")

    # ----------------------------------------------------------------------- health
    @api.get("/healthz", tags=["health"])
    async def healthz(self) -> Response:
        """Liveness: the process answers."""
        return Response(b'{"status":"ok"}', media_type="application/json")

    @api.get("/readyz", tags=["health"])
    async def readyz(self) -> Response:
        """Readiness per dependency: PostgreSQL, Redis, the model (503 only without PostgreSQL).

        It answers without a key (probes), so it says only whether each dependency is ``ok``
        (and its ``error``): versions and counters are ``GET /v1/admin/health``'s."""
        try:
            report = await (await self.engine()).health()
        except HalldyllError as exc:
            report = {"ok": False, "database": {"ok": False, "error": exc.message}}
        public: dict[str, Any] = {"ok": report["ok"]}
        for name in ("database", "redis", "model"):
            if name in report:
                public[name] = {k: v for k, v in report[name].items() if k in ("ok", "error")}
        return JSONResponse(
            public,
            status_code=200 if report["ok"] else 503,
            headers={} if report["ok"] else {"Retry-After": "5"},
        )

    @api.get("/v1/admin/health", tags=["maintenance"])
    async def admin_health(self, request: Request) -> Any:
        """The readiness report in full (Admins): ``/readyz``'s, plus PostgreSQL's server
        ``version``, Redis ``configured``, the model's ``id`` and ``dimension``, and this
        Ingress replica's change feed (``events``: listening, subscribers, reconnects) and
        background jobs (``jobs``: extraction mode, workers, counts)."""
        return json_response(await (await self._api(request)).health())

    # ----------------------------------------------------------------------- users and keys
    @api.get("/v1/me", tags=["users"])
    async def me(self, request: Request) -> Any:
        return json_response(await (await self._api(request)).get_user(None))

    @api.post("/v1/users", status_code=201, tags=["users"])
    async def create_user(self, request: Request, body: UserCreate) -> Any:
        user = await (await self._api(request)).create_user(body.username, body.email, body.role)
        return json_response(user, 201)

    @api.get("/v1/users", tags=["users"])
    async def list_users(
        self,
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000), QueryInt] = 100,
        cursor: str | None = None,
    ) -> Any:
        page = await (await self._api(request)).list_users(limit=limit, cursor=cursor)
        return json_response(page)

    @api.get("/v1/users/{user_id}", tags=["users"])
    async def get_user(self, request: Request, user_id: UserRef) -> Any:
        api_ = await self._api(request)
        return json_response(await api_.get_user(self._user(user_id)))

    @api.patch("/v1/users/{user_id}", tags=["users"])
    async def update_user(self, request: Request, user_id: UserRef, body: UserUpdate) -> Any:
        api_ = await self._api(request)
        target = self._user(user_id) or api_.principal.user_id
        user = await api_.update_user(target, **body.model_dump(exclude_none=True))
        return json_response(user)

    @api.delete("/v1/users/{user_id}", tags=["users"])
    async def delete_user(self, request: Request, user_id: UserRef) -> Any:
        """Erase the user; the answer is the erasure receipt (also in the audit log)."""
        api_ = await self._api(request)
        return json_response(await api_.delete_user(self._user(user_id) or api_.principal.user_id))

    @api.post("/v1/users/{user_id}/keys", status_code=201, tags=["keys"])
    async def create_key(self, request: Request, user_id: UserRef, body: ApiKeyCreate) -> Any:
        api_ = await self._api(request)
        new = await api_.create_api_key(
            self._user(user_id), name=body.name, expires_at=body.expires_at
        )
        return json_response({"key": new.key, **new.api_key.model_dump()}, 201)

    @api.get("/v1/users/{user_id}/keys", tags=["keys"])
    async def list_keys(self, request: Request, user_id: UserRef) -> Any:
        api_ = await self._api(request)
        return json_response(Items(items=list(await api_.list_api_keys(self._user(user_id)))))

    @api.post("/v1/keys/{key_id}/rotate", status_code=201, tags=["keys"])
    async def rotate_key(self, request: Request, key_id: IdRef) -> Any:
        new = await (await self._api(request)).rotate_api_key(key_id)
        return json_response({"key": new.key, **new.api_key.model_dump()}, 201)

    @api.delete("/v1/keys/{key_id}", tags=["keys"])
    async def revoke_key(self, request: Request, key_id: IdRef) -> Any:
        key = await (await self._api(request)).revoke_api_key(key_id)
        return json_response(key)

    # ----------------------------------------------------------------------- viewer grants
    @api.post("/v1/users/{user_id}/grants", status_code=201, tags=["users"])
    async def grant_viewer(self, request: Request, user_id: UserRef, body: GrantCreate) -> Any:
        """Let the Viewer ``user_id`` read the memories of ``owner_id`` (Admins)."""
        api_ = await self._api(request)
        viewer = self._user(user_id) or api_.principal.user_id
        await api_.grant_viewer(viewer, body.owner_id)
        return json_response(Grant(viewer_id=viewer, owner_id=body.owner_id), 201)

    @api.get("/v1/users/{user_id}/grants", tags=["users"])
    async def list_grants(self, request: Request, user_id: UserRef) -> Any:
        """The owners whose memories the Viewer ``user_id`` may read."""
        api_ = await self._api(request)
        viewer = self._user(user_id) or api_.principal.user_id
        owners = await api_.list_viewer_grants(viewer)
        return json_response(
            Items[Grant](items=[Grant(viewer_id=viewer, owner_id=o) for o in owners])
        )

    @api.delete("/v1/users/{user_id}/grants/{owner_id}", status_code=204, tags=["users"])
    async def revoke_grant(self, request: Request, user_id: UserRef, owner_id: IdRef) -> Response:
        api_ = await self._api(request)
        await api_.revoke_viewer_grant(self._user(user_id) or api_.principal.user_id, owner_id)
        return Response(status_code=204)

    # ----------------------------------------------------------------------- AI models
    @api.post("/v1/models", status_code=201, tags=["models"])
    async def register_model(self, request: Request, body: ModelCreate) -> Any:
        model = await (await self._api(request)).register_model(
            body.name, body.kind, version=body.version, metadata=body.metadata
        )
        return json_response(model, 201)

    @api.get("/v1/models", tags=["models"])
    async def list_models(self, request: Request, kind: ModelKind | None = None) -> Any:
        models = await (await self._api(request)).list_models(kind=kind)
        return json_response(Items(items=list(models)))

    @api.get("/v1/models/{ref:path}", tags=["models"])
    async def get_model(self, request: Request, ref: str) -> Any:
        return json_response(await (await self._api(request)).get_model(ref))

    @api.delete("/v1/models/{ref:path}", status_code=204, tags=["models"])
    async def delete_model(self, request: Request, ref: str) -> Response:
        await (await self._api(request)).delete_model(ref)
        return Response(status_code=204)

    # ----------------------------------------------------------------------- memories
    @api.post("/v1/users/{user_id}/memories", status_code=201, tags=["memories"])
    async def store_memory(self, request: Request, user_id: UserRef, body: Memory) -> Any:
        stored = await downstream(
            self._ingestor.store_memory.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                request_id=request.state.request_id,
            )
        )
        return json_response(stored, 201)

    @api.post("/v1/users/{user_id}/memories/batch", status_code=201, tags=["memories"])
    async def store_memories(
        self, request: Request, user_id: UserRef, body: StoreMemoriesRequest
    ) -> Any:
        """Store up to STORE_BATCH_MAX memories of any types, all or nothing: 201 with
        ``{"memories": [...]}`` in the order sent, or an error whose ``field`` names the
        item (``memories.3...``, as FastAPI names a bad body's fields)."""
        stored = await downstream(
            self._ingestor.store_memories.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                request_id=request.state.request_id,
            )
        )
        return json_response(stored, 201)

    @api.get("/v1/users/{user_id}/memories", tags=["memories"])
    async def list_memories(
        self,
        request: Request,
        user_id: UserRef,
        types: str | None = None,
        model: str | None = None,
        include_shared: Annotated[bool, QueryBool] = True,
        session_id: str | None = None,
        tags: str | None = None,
        since: IsoDateTime | None = None,
        until: IsoDateTime | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE), QueryInt] = 50,
        cursor: str | None = None,
    ) -> Any:
        # Query parameters, read by FastAPI; lists come comma-separated.
        query = ListMemoriesRequest(
            types=comma_list(types),
            model=model,
            include_shared=include_shared,
            session_id=session_id,
            tags=comma_list(tags),
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )
        page = await downstream(
            self._searcher.list_memories.remote(
                await self._principal(request),
                query,
                user_id=self._user(user_id),
                request_id=request.state.request_id,
            )
        )
        return json_response(page)

    @api.get("/v1/users/{user_id}/memories/{memory_id}", tags=["memories"])
    async def get_memory(self, request: Request, user_id: UserRef, memory_id: IdRef) -> Any:
        memory = await downstream(
            self._searcher.get_memory.remote(
                await self._principal(request),
                user_id=self._user(user_id),
                memory_id=memory_id,
                request_id=request.state.request_id,
            )
        )
        return json_response(memory)

    @api.get("/v1/users/{user_id}/memories/{memory_id}/history", tags=["memories"])
    async def fact_history(self, request: Request, user_id: UserRef, memory_id: IdRef) -> Any:
        """Every version of a fact, oldest first: the statements it replaced and those that
        replaced it (`valid_from`, `valid_to`, `superseded_by`). 422 for a memory that is not
        a fact."""
        versions = await downstream(
            self._searcher.fact_history.remote(
                await self._principal(request),
                user_id=self._user(user_id),
                memory_id=memory_id,
                request_id=request.state.request_id,
            )
        )
        return json_response(Items(items=list(versions)))

    @api.patch("/v1/users/{user_id}/memories/{memory_id}", tags=["memories"])
    async def update_memory(
        self, request: Request, user_id: UserRef, memory_id: IdRef, body: MemoryUpdate
    ) -> Any:
        memory = await downstream(
            self._ingestor.update_memory.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                memory_id=memory_id,
                request_id=request.state.request_id,
            )
        )
        return json_response(memory)

    @api.delete("/v1/users/{user_id}/memories/{memory_id}", status_code=204, tags=["memories"])
    async def delete_memory(self, request: Request, user_id: UserRef, memory_id: IdRef) -> Response:
        await downstream(
            self._ingestor.delete_memory.remote(
                await self._principal(request),
                user_id=self._user(user_id),
                memory_id=memory_id,
                request_id=request.state.request_id,
            )
        )
        return Response(status_code=204)

    @api.post(
        "/v1/users/{user_id}/memories/{memory_id}/messages", status_code=201, tags=["memories"]
    )
    async def append_messages(
        self, request: Request, user_id: UserRef, memory_id: IdRef, body: AppendMessagesRequest
    ) -> Any:
        stored = await downstream(
            self._ingestor.append_messages.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                memory_id=memory_id,
                request_id=request.state.request_id,
            )
        )
        return json_response(stored, 201)

    @api.get(
        "/v1/users/{user_id}/export",
        tags=["memories"],
        response_class=StreamingResponse,
        responses={200: {"content": {NDJSON: {}}, "description": "The export, NDJSON."}},
    )
    async def export_memories(self, request: Request, user_id: UserRef) -> Response:
        """Every memory of the user as NDJSON (`halldyll_ray.portability`): a header line
        with the format version and counts, then one memory a line. Streamed from one
        database snapshot; served by this replica's engine (a handle call cannot stream)."""
        lines = await (await self._api(request)).export_memories(self._user(user_id))
        first = await anext(lines)  # a missing user is a 404, not a broken stream
        name = f"halldyll-export-{user_id}.ndjson"
        return StreamingResponse(
            _stream(first, lines),
            media_type=NDJSON,
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @api.post(
        "/v1/users/{user_id}/import",
        tags=["memories"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {NDJSON: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def import_memories(
        self,
        request: Request,
        user_id: UserRef,
        atomic: Annotated[
            bool,
            Query(description="All or nothing: one bad line refuses the whole file (422)."),
            QueryBool,
        ] = False,
    ) -> Any:
        """Import an export file (the body, NDJSON, streamed; up to max_import_bytes).
        Idempotent; bad lines are reported by number and the others imported."""
        authorized = await self._api(request)
        report = await authorized.import_memories(
            self._user(user_id), request.stream(), atomic=atomic
        )
        return json_response(report)

    @api.post("/v1/users/{user_id}/search", tags=["search"])
    async def search(self, request: Request, user_id: UserRef, body: SearchRequest) -> Any:
        # Most searches are answered by the fast lane (_search_lane) before FastAPI: this
        # route answers what the lane leaves to it (tracing on, another Content-Type, a
        # query string), the same way. A repeated search is answered here from the result
        # cache, checked and audited as Search would: the hop to Search was most of a cached
        # search's cost (benchmarks/serve_http.py). A miss goes to Search.
        content = await self._search_json(
            await self._api(request), self._user(user_id), body, request.state.request_id
        )
        return Response(content, media_type="application/json")

    @api.post("/v1/users/{user_id}/context", tags=["context"])
    async def build_context(self, request: Request, user_id: UserRef, body: ContextRequest) -> Any:
        context = await downstream(
            self._context.build_context.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                request_id=request.state.request_id,
            )
        )
        return json_response(context)

    @api.post("/v1/users/{user_id}/sessions/{session_id}/prepare", tags=["context"])
    async def prepare_context(
        self,
        request: Request,
        user_id: UserRef,
        session_id: SessionRef,
        body: PrepareContextRequest,
    ) -> Any:
        context = await downstream(
            self._context.prepare_context.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                session_id=session_id,
                request_id=request.state.request_id,
            )
        )
        return json_response(context)

    @api.post("/v1/users/{user_id}/sessions/{session_id}/turns", status_code=201, tags=["context"])
    async def record_turn(
        self,
        request: Request,
        user_id: UserRef,
        session_id: SessionRef,
        body: TurnRequest,
        idempotency_key: Annotated[
            str | None, Header(pattern=r"^[!-~]{1,128}$", description="See the body's field.")
        ] = None,
    ) -> Any:
        if idempotency_key is not None and body.idempotency_key is None:
            body = body.model_copy(update={"idempotency_key": idempotency_key})
        elif idempotency_key is not None and idempotency_key != body.idempotency_key:
            raise InvalidInput(
                "the Idempotency-Key header and the body's idempotency_key differ: send one",
                field="idempotency_key",
            )
        turn = await downstream(
            self._ingestor.record_turn.remote(
                await self._principal(request),
                body,
                user_id=self._user(user_id),
                session_id=session_id,
                request_id=request.state.request_id,
            )
        )
        return json_response(turn, 201)

    # ----------------------------------------------------------------------- background jobs
    @api.get("/v1/users/{user_id}/jobs", tags=["jobs"])
    async def list_jobs(
        self,
        request: Request,
        user_id: UserRef,
        status: JobStatus | None = None,
        kind: Annotated[str | None, Query(pattern=JOB_KIND_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE), QueryInt] = 50,
        cursor: str | None = None,
    ) -> Any:
        """The user's background jobs (fact extraction, session summaries), newest first:
        status, tries, last error, result. Readable by whoever may read the user's memories."""
        page = await (await self._api(request)).list_jobs(
            self._user(user_id), status=status, kind=kind, limit=limit, cursor=cursor
        )
        return json_response(page)

    @api.get("/v1/users/{user_id}/jobs/{job_id}", tags=["jobs"])
    async def get_job(self, request: Request, user_id: UserRef, job_id: IdRef) -> Any:
        """One background job of the user (a ``job_ids`` entry of a recorded turn)."""
        job = await (await self._api(request)).get_job(self._user(user_id), job_id)
        return json_response(job)

    # ----------------------------------------------------------------------- audit
    @api.get("/v1/audit", tags=["audit"])
    async def audit(
        self,
        request: Request,
        user_id: Id | None = None,
        operation: str | None = None,
        outcome: Literal["ok", "denied", "error"] | None = None,
        before_id: Annotated[int | None, Query(ge=1, le=2**63 - 1), QueryInt] = None,
        limit: Annotated[int, Query(ge=1, le=1000), QueryInt] = 100,
    ) -> Any:
        rows = await (await self._api(request)).list_audit(
            user_id=user_id, operation=operation, outcome=outcome, before_id=before_id, limit=limit
        )
        return json_response(Items(items=rows))

    @api.get("/v1/admin/reembedding", tags=["maintenance"])
    async def reembedding(self, request: Request) -> Any:
        """Where a change of embedding model stands (Admins): ``state`` (idle, embedding,
        indexing, complete), ``active_model`` (whose vectors searches read), the target,
        ``done`` of ``total`` chunks and ``remaining``."""
        return json_response(await (await self._api(request)).reembed_status())

    # ----------------------------------------------------------------------- service stats
    @api.get("/v1/stats", tags=["audit"])
    async def stats(self, request: Request) -> Any:
        """This Ingress replica's own request metrics (Admins; ``maintenance``): per route
        since the replica started, and per minute over the last hour. ``{"started_at",
        "window_minutes", "routes": [{method, route, requests, errors, mean_ms, p50_ms,
        p95_ms, max_ms}], "minutes": [{at, requests, errors, mean_ms, p50_ms, p95_ms,
        max_ms}]}``; errors are 5xx answers, p50/p95 are latency bucket bounds (ms), never
        above max_ms. The same requests are exported to Prometheus as ``halldyll_http_*``."""
        await (await self._api(request)).check_service_stats()
        return json_response(api.state.metrics.recent.snapshot())

    # ----------------------------------------------------------------------- change feed
    @api.get(
        "/v1/users/{user_id}/events",
        tags=["events"],
        response_class=EventSourceResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": _EVENTS_DOC}},
    )
    async def events(
        self,
        request: Request,
        user_id: UserRef,
        last_event_id: Annotated[
            str | None,
            Header(description="Resume after this event id: every later event comes, once."),
        ] = None,
    ) -> Any:
        """The user's memory changes as Server-Sent Events, from writes through any replica.

        Each event: ``id`` (the event id), ``event`` (created, updated, reinforced, deleted,
        expired) and ``data`` (JSON: id, user_id, memory_id, memory_type, kind, at; never
        content). ``event: resync`` when ``Last-Event-ID`` is older than EVENTS_RETENTION_HOURS
        or not this database's; ``event: error`` before the server ends a stream.

        A reader that falls behind holds back only what fits in the connection's buffers:
        the stream reads the next events from the database once those went out. A send
        that waits longer than EVENTS_RECHECK_SECONDS (the client reads nothing) ends the
        stream; reconnect with ``Last-Event-ID`` to get every later event.
        """
        api_ = await self._api(request)
        engine = await self.engine()
        key = request.headers.get("authorization", "").partition(" ")[2].strip()

        async def key_still_valid() -> None:
            with requestctx.acting(None, request.state.request_id):
                await engine.authenticate(key)  # AuthenticationFailed ends the stream

        subscription = await api_.subscribe_events(
            self._user(user_id), after=last_event_id, rechecks=[key_still_valid]
        )
        return event_stream_response(subscription, engine.settings)

    # ----------------------------------------------------------------------- handle API
    # For co-located Ray apps: the caller's API key instead of an HTTP header, the same
    # permissions, and the same request models, built here from plain arguments. A bad
    # argument raises InvalidInput, as the HTTP API answers 422.
    async def _handle_principal(self, api_key: str) -> Principal:
        return await (await self.engine()).authenticate(api_key)

    @tracing.handle_method
    async def handle_store_memory(
        self, api_key: str, user_id: UUID | str | None, memory: Memory | Mapping[str, Any]
    ) -> StoredMemory:
        """Store a memory (a memory model, or its JSON form with a ``type`` key)."""
        principal = await self._handle_principal(api_key)
        return await downstream(
            self._ingestor.store_memory.remote(
                principal, parse_memory(memory), user_id=_handle_user(user_id), request_id=None
            )
        )

    @tracing.handle_method
    async def handle_store_memories(
        self,
        api_key: str,
        user_id: UUID | str | None,
        memories: list[Memory | Mapping[str, Any]],
    ) -> list[StoredMemory]:
        """Store memories all or nothing (models, or their JSON forms with a ``type`` key)."""
        request = parse(StoreMemoriesRequest, {"memories": memories})
        principal = await self._handle_principal(api_key)
        stored: StoredMemories = await downstream(
            self._ingestor.store_memories.remote(
                principal, request, user_id=_handle_user(user_id), request_id=None
            )
        )
        return stored.memories

    @tracing.handle_method
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
        response: SearchResponse = await downstream(
            self._searcher.search.remote(
                principal, request, user_id=_handle_user(user_id), request_id=None
            )
        )
        return response.results

    @tracing.handle_method
    async def handle_build_context(
        self, api_key: str, user_id: UUID | str | None, query: str | None = None, **options: Any
    ) -> Context:
        """A prompt context block; ``options`` are the other fields of :class:`ContextRequest`."""
        request = parse(ContextRequest, {"query": query, **options})
        principal = await self._handle_principal(api_key)
        return await downstream(
            self._context.build_context.remote(
                principal, request, user_id=_handle_user(user_id), request_id=None
            )
        )


def event_stream_response(subscription: Subscription, settings: Settings) -> EventSourceResponse:
    """The change feed's SSE response for ``subscription``: a keep-alive every
    EVENTS_KEEPALIVE_SECONDS, and a send that waits EVENTS_RECHECK_SECONDS (the client reads
    nothing) ends the stream, releasing the subscription. A reader that took nothing held
    its stream slot for as long as the load balancer's client timeout (HAProxy's: an hour),
    and a blocked send left the subscription's rechecks (key, permission, user) unrun."""
    return _FeedResponse(
        _event_stream(subscription),
        ping=settings.events_keepalive_seconds,
        send_timeout=settings.events_recheck_seconds,
        headers={"Cache-Control": "no-store"},
    )


class _FeedResponse(EventSourceResponse):
    """The change feed's response: a send that times out (``send_timeout``: the client
    stopped reading) ends the stream in one log line, without a traceback; the subscription
    is released as on a disconnect, and the server closes the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info(
                "change feed: the client read nothing for %g s, stream closed (it resumes "
                "with Last-Event-ID)",
                self.send_timeout,
            )


async def _event_stream(subscription: Subscription) -> AsyncIterator[ServerSentEvent]:
    """The subscription as SSE messages; a disconnect (the response cancels this) or an
    error (sent as ``event: error`` first) releases it."""
    try:
        async for item in subscription:
            if isinstance(item, EventsResync):
                yield ServerSentEvent(
                    data=item.model_dump_json(), event="resync", id=str(item.resume_after)
                )
            else:
                yield ServerSentEvent(data=item.model_dump_json(), event=item.kind, id=str(item.id))
    except HalldyllError as exc:
        retry = exc.fields.get("retry_after")
        yield ServerSentEvent(
            data=json.dumps({"code": exc.code, "message": exc.message}),
            event="error",
            retry=None if retry is None else int(retry * 1000),
        )
    finally:
        await subscription.aclose()


def comma_list(value: str | None) -> list[str] | None:
    """A list query parameter, comma-separated (the client joins a list so:
    ``client.requests._params``): absent is None, empty is the empty list (what ``[]`` is
    everywhere else: no filter), not the one empty name ``[""]``, a 422 for ``tags=[]``
    through the client, GraphQL and MCP that the engine and the search body answered."""
    if value is None:
        return None
    return value.split(",") if value else []


def _handle_user(user_id: UUID | str | None) -> UUID | None:
    """The handle API's ``user_id``: a UUID, its text, or None or ``"me"`` for the caller (as
    the HTTP API, the Python client, GraphQL and MCP take it)."""
    if user_id is None or user_id == "me":
        return None
    return validation.parse_uuid(user_id, "user_id")


# GraphQL at /graphql: its queries and mutations call the routes above, in process.
mount_graphql(api)
# MCP over Streamable HTTP at /mcp: its tools call the routes above, in process.
mount_mcp(api)
# The web dashboard's static files at /ui (it calls the routes above from the browser).
mount_ui(api)

#: The routes of nearly every request an agent makes, in the order they are tried first.
HOT_ROUTES = (
    ("POST", "/v1/users/{user_id}/search"),
    ("POST", "/v1/users/{user_id}/sessions/{session_id}/prepare"),
    ("POST", "/v1/users/{user_id}/sessions/{session_id}/turns"),
    ("POST", "/v1/users/{user_id}/context"),
    ("POST", "/v1/users/{user_id}/memories"),
    ("GET", "/v1/users/{user_id}/memories/{memory_id}"),
)


def _hot_routes_first(app: Any, hot: tuple[tuple[str, str], ...]) -> None:
    """Move the routes ``hot`` names in front of the app's other routes, in that order.

    Every request is matched against the routes in order twice: by Serve, which names its
    route for the access log and metrics, and by Starlette, which dispatches it. With the
    search route 28th of the API's, routing took a quarter of the Ingress's CPU on a cached
    search (``benchmarks/serve_http.py --profile``). No two routes match the same method and
    path (``{user_id}`` and ``{memory_id}`` stop at a ``/``; ``{ref:path}`` only follows
    ``/v1/models/``), so the order changes which route is tried first, never which one
    answers; a 405's ``Allow`` lists every route of the path whatever the order. It must run
    before ``serve.ingress``, which moves the routes (in this order) under one router and
    serves a copy of the app as it is then.
    """
    rank = {key: i for i, key in enumerate(hot)}

    def position(route: Any) -> int:
        keys = [(m, getattr(route, "path", None)) for m in getattr(route, "methods", None) or ()]
        return min((rank[k] for k in keys if k in rank), default=len(hot))

    app.router.routes.sort(key=position)  # stable: the other routes keep their order


_hot_routes_first(api, HOT_ROUTES)
reserve_literal_segments(api.router.routes)
# serve.ingress rewrites the FastAPI routes into class-based views on the app object it is
# given; that must happen at import, in every process (driver and replicas), so it cannot be
# applied late in the builder like the other deployments' decorators.
HTTPIngress = serve.ingress(api)(Ingress)

__all__ = ["HTTPIngress", "Ingress", "api"]


async def _stream(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``first`` then ``rest``; closes ``rest`` (its database transaction) however it ends."""
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
