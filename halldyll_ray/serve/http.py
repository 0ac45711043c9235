"""The HTTP plumbing of the Ingress: the FastAPI app, one error shape, request ids, body
limits, route metrics, and the translation of Ray's transient failures of a downstream call.

Every error leaves as ``{"error": {"code", "message", "request_id"}}`` with the status of its
:class:`~halldyll_ray.errors.HalldyllError` class (:data:`STATUS`). The routes themselves are in
:mod:`halldyll_ray.serve.ingress`.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl, unquote_to_bytes

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from pydantic import TypeAdapter
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve import metrics
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from halldyll_ray import validation
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
    field_path,
    quoted,
    redact,
)
from halldyll_ray.schemas import ErrorBody, QueryBool
from halldyll_ray.tracing import current_trace_id, is_enabled, request_scope

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
_REQUEST_ID = validation.REQUEST_ID
DEFAULT_MAX_BODY_BYTES = 1_048_576
#: Largest body of ``POST /v1/users/{id}/import`` (an export file), which streams through the
#: import in batches rather than being held whole.
DEFAULT_MAX_IMPORT_BYTES = 1_073_741_824

#: Seconds a client has to send each part of its request body; a client that stalls (a
#: Content-Length larger than what it sends) gets 408 instead of holding a slot for minutes.
BODY_TIMEOUT_S = 30.0

_ERROR = {"model": ErrorBody}
# The product's error shape and status codes, declared once for every route's OpenAPI entry.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "The body is not JSON (or not UTF-8)."},
    401: {**_ERROR, "description": "No valid API key (missing, malformed, expired, revoked)."},
    403: {**_ERROR, "description": "The key's user may not do this (the permission matrix)."},
    404: {**_ERROR, "description": "Not found, or not visible to the caller."},
    408: {**_ERROR, "description": "The request body did not arrive in time (body_timeout_s)."},
    409: {**_ERROR, "description": "Conflicts with what is stored."},
    413: {**_ERROR, "description": "The request body is over the size limit."},
    415: {**_ERROR, "description": "The body has a Content-Encoding (send it as it is)."},
    422: {**_ERROR, "description": "A value is invalid; error.message names the field."},
    503: {**_ERROR, "description": "Temporarily unavailable; retry after Retry-After seconds."},
}

# The docs pages' assets come from the fastapi-offline package, not a CDN: /docs works offline.
api = FastAPIOffline(
    title="halldyll-ray",
    version="1",
    description="Multi-user, multi-model memory for AI agents. Authenticate with "
    "`Authorization: Bearer <API key>` (the Authorize button).",
    responses=ERROR_RESPONSES,
)


class _ClientJSONRequest(Request):
    """A request whose JSON body is read by :func:`validation.json_loads`: ``NaN`` and
    ``Infinity`` are a 422 "not valid JSON" at their position, as on every other surface."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = validation.json_loads(await self.body())
        return self._json


class _ClientJSONRoute(APIRoute):
    """The API's routes, each handed a :class:`_ClientJSONRequest` (FastAPI's documented way
    to change how a route reads its request: a custom ``APIRoute.get_route_handler``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        # The API's routes refuse a query parameter they do not take, as their bodies refuse
        # a field they do not have: ``?type=image`` (for ``types``) or ``?Limit=1`` listed
        # every type, or the default number of items, without a word.
        # (Read from the route's dependant when a request comes: Serve's class-based views
        # give the endpoint its final signature, ``self`` a dependency, after this is built.)
        checked = self.path.startswith("/v1/")

        async def read_as_client_json(request: Request) -> Response:
            if checked and request.scope.get("query_string"):
                _refuse_unknown_parameters(request, _query_names(self.dependant))
            if checked and IDEMPOTENCY_KEY in request.headers:
                _refuse_idempotency_key(self.dependant)
            return await handler(_ClientJSONRequest(request.scope, request.receive))

        return read_as_client_json


#: :func:`_query_names` by dependant (kept alive here: a route keeps its dependant for life).
_QUERY_NAMES: dict[int, tuple[Any, frozenset[str]]] = {}


def _query_names(dependant: Any) -> frozenset[str]:
    """The query parameters a route takes: its own and its dependencies', by their names in
    the URL (aliases)."""
    found = _QUERY_NAMES.get(id(dependant))
    if found is not None and found[0] is dependant:
        return found[1]
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    # Serve's class-based views bind the replica through the endpoint's first parameter,
    # ``self``, which the route's dependant still lists as a query parameter: not the caller's.
    known = frozenset(names - {"self"})
    _QUERY_NAMES[id(dependant)] = (dependant, known)
    return known


def _refuse_unknown_parameters(request: Request, known: frozenset[str]) -> None:
    """RequestValidationError (a 422 after the credentials' check) for the first query
    parameter of ``request`` that is not in ``known``."""
    for name, value in request.query_params.items():
        if name not in known:
            takes = ", ".join(sorted(known)) or "none"
            raise RequestValidationError(
                [
                    {
                        "type": "extra_forbidden",
                        "loc": ("query", name),
                        "msg": f"this route takes no such query parameter (it takes: {takes})",
                        "input": value,
                    }
                ]
            )


#: The request header that names one request, stored once however often it is sent (the IETF
#: draft "The Idempotency-Key HTTP Header Field"); only the routes that declare it keep it.
IDEMPOTENCY_KEY = "idempotency-key"


def _takes_idempotency_key(dependant: Any) -> bool:
    """Whether a route (or one of its dependencies) reads the ``Idempotency-Key`` header."""
    return any(field.alias.lower() == IDEMPOTENCY_KEY for field in dependant.header_params) or any(
        _takes_idempotency_key(sub) for sub in dependant.dependencies
    )


def _refuse_idempotency_key(dependant: Any) -> None:
    """RequestValidationError (a 422 after the credentials' check) when a route that does not
    keep idempotency keys is sent one. It was dropped without a word: a client retrying
    ``POST /v1/users/me/memories`` with the key of its first attempt, as the header promises
    it may, stored the memory twice."""
    if _takes_idempotency_key(dependant):
        return
    raise RequestValidationError(
        [
            {
                "type": "extra_forbidden",
                "loc": ("header", IDEMPOTENCY_KEY),
                "msg": "this route does not keep idempotency keys, so a retry of it would be "
                "applied again: send Idempotency-Key only to POST "
                "/v1/users/{user_id}/sessions/{session_id}/turns",
                "input": None,
            }
        ]
    )


api.router.route_class = _ClientJSONRoute
api.state.max_body_bytes = DEFAULT_MAX_BODY_BYTES
api.state.max_import_bytes = DEFAULT_MAX_IMPORT_BYTES
api.state.body_timeout_s = BODY_TIMEOUT_S
_PUBLIC = frozenset({"/healthz", "/readyz"})


def _openapi() -> dict[str, Any]:
    """FastAPI's schema plus the Bearer security scheme, required on every route but health."""
    if api.openapi_schema is None:
        schema = get_openapi(
            title=api.title,
            version=api.version,
            description=api.description,
            routes=api.routes,
        )
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key."}
        }
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                if path in _PUBLIC:
                    for status in ("401", "403", "404", "409", "422"):
                        operation.get("responses", {}).pop(status, None)
                else:
                    operation["security"] = [{"bearer": []}]
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi  # type: ignore[method-assign]


_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str) -> str:
    """``text`` with each lone UTF-16 surrogate written as its escape (``\\ud800``).

    A message can quote what the caller sent (strawberry's "Unknown operation named ...", a
    JSON field name), and a JSON string of the request can hold a lone surrogate, which no
    UTF-8 body can: rendering the error raised UnicodeEncodeError, a 500 instead of the
    refusal."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    *,
    field: str | None = None,
    report: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The error body (``schemas.ErrorBody``); ``field`` only when one is at fault, ``report``
    only for a refused atomic import (what each bad line was)."""
    error: dict[str, Any] = {
        "code": code,
        "message": _encodable(message),
        "request_id": request_id,
    }
    if field:
        error["field"] = _encodable(field)
    if report is not None:
        error["report"] = report
    return JSONResponse({"error": error}, status_code=status, headers=dict(headers or {}))


_ANY: TypeAdapter[Any] = TypeAdapter(Any)


def json_response(value: Any, status: int = 200) -> Response:
    """A JSON response serialized by pydantic-core in one pass (models, UUIDs, datetimes).

    Much cheaper than FastAPI's ``jsonable_encoder`` walk over ``model_dump`` output.
    """
    return Response(_ANY.dump_json(value), status_code=status, media_type="application/json")


def status_of(exc: HalldyllError) -> int:
    """The HTTP status a product error answers with (:data:`STATUS`, by class; 500 else)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


@api.exception_handler(HalldyllError)
async def halldyll_error_response(request: Request, exc: HalldyllError) -> Response:
    status = status_of(exc)
    headers = {"Retry-After": str(exc.fields.get("retry_after", 5))} if status == 503 else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    message = exc.message if status < 500 or status == 503 else "internal configuration error"
    invalid = isinstance(exc, InvalidInput)
    return error_response(
        status,
        exc.code,
        message,
        request.state.request_id,
        field=exc.fields.get("field") if invalid else None,
        report=exc.fields.get("report") if invalid else None,
        headers=headers,
    )


# A replica of another deployment died, or none could take the request. Transient: Serve
# replaces dead replicas within seconds and sheds load with BackPressureError.
_NOT_SENT = (BackPressureError, DeploymentUnavailableError)
_LOST = (RayActorError, ReplicaUnavailableError, WorkerCrashedError, NodeDiedError)


def unavailable(exc: Exception) -> Unavailable:
    """The typed error (HTTP 503, Retry-After: 1) for a call another deployment did not serve."""
    log.warning("replica unavailable: %s", type(exc).__name__)
    if isinstance(exc, _NOT_SENT):
        message = "the service is overloaded or restarting; the request was not applied, retry"
    else:
        message = (
            "a replica of the service stopped while handling the request, which may or may not "
            "have been applied: a read or a turn sent again with its idempotency_key is safe to "
            "retry; read before sending any other write again, or it may be applied twice"
        )
    return Unavailable(message, retry_after=1)


async def downstream(call: Awaitable[_T]) -> _T:
    """Await a call to another deployment; Ray's transient failures become :func:`unavailable`.

    Serve's own handler for BackPressureError (installed on the app after ours) would answer
    a bare text 503, so the translation happens here, where the call is made.
    """
    try:
        return await call
    except (*_NOT_SENT, *_LOST) as exc:
        raise unavailable(exc) from exc


async def _replica_lost(request: Request, exc: Exception) -> Response:
    # Any other call that a dead replica failed (none is expected outside downstream).
    return await halldyll_error_response(request, unavailable(exc))


for _cls in _LOST:
    api.add_exception_handler(_cls, _replica_lost)


def _request_id(scope: Any) -> str | None:
    """The client's X-Request-ID, a new id when it sent none, or None when it sent one that
    is not 1-128 characters of ``A-Z a-z 0-9 . _ : -`` (the request is then refused: Serve
    echoes the client's header on the response, so replacing it would put one id on the
    response and another in the logs and audit rows)."""
    for name, value in scope.get("headers") or ():
        if name == b"x-request-id":
            given = value.decode("latin-1")
            return given if _REQUEST_ID.fullmatch(given) else None
    return uuid.uuid4().hex


def _body_limit(scope: Any) -> int:
    """The body limit of a request: an import's (an export file) or every other route's."""
    path: str = scope.get("path", "")
    if scope.get("method") == "POST" and path.endswith("/import"):
        return int(api.state.max_import_bytes)
    return int(api.state.max_body_bytes)


#: Paths a route names with a literal segment where another route of the same shape has a
#: parameter (``.../memories/batch`` against ``.../memories/{memory_id}``): each literal
#: route's path pattern and methods (:func:`reserve_literal_segments`).
_LITERAL: list[tuple[re.Pattern[str], frozenset[str]]] = []
#: Every route's path pattern and template, for naming the parameter a path segment fills
#: (:func:`_path_parameter`; kept by :func:`reserve_literal_segments`, which sees the routes
#: before ``serve.ingress`` moves them under a router of its own).
_TEMPLATES: list[tuple[re.Pattern[str], str]] = []


def reserve_literal_segments(routes: Sequence[Any]) -> None:
    """Give each path a route names literally to that route, whatever the method.

    Starlette takes the first route whose path and method match, so ``PATCH
    /v1/users/me/memories/batch`` reached ``PATCH .../memories/{memory_id}`` with
    ``memory_id`` "batch" and answered 422 (not a UUID), where the path is the batch route's
    and the method is not one it serves: 405 with ``Allow: POST`` (RFC 9110 §15.5.6). For
    every pair of routes of the same number of segments where one has a literal segment in
    place of the other's parameter, and is otherwise the same, the literal route's path is
    reserved: another method there gets the 405 from the request middleware.
    """
    _LITERAL.clear()
    _TEMPLATES[:] = [
        (route.path_regex, route.path)
        for route in routes
        if isinstance(getattr(route, "path", None), str) and hasattr(route, "path_regex")
    ]
    shapes = [
        (route, route.path.strip("/").split("/"))
        for route in routes
        if getattr(route, "methods", None) and isinstance(getattr(route, "path", None), str)
    ]
    methods: dict[str, set[str]] = collections.defaultdict(set)
    for literal, mine in shapes:
        for _, theirs in shapes:
            if len(mine) == len(theirs) and _shadows(mine, theirs):
                methods[literal.path] |= set(literal.methods)
    for path, allowed in methods.items():
        _LITERAL.append((compile_path(path)[0], frozenset(allowed)))


def _shadows(mine: list[str], theirs: list[str]) -> bool:
    """``mine`` has a literal segment where ``theirs`` has a parameter, and is otherwise the
    same (parameters against parameters, equal literals)."""
    literal_against_parameter = False
    for a, b in zip(mine, theirs, strict=True):
        a_param, b_param = a.startswith("{"), b.startswith("{")
        if a_param != b_param:
            if a_param:
                return False
            literal_against_parameter = True
        elif not a_param and a != b:
            return False
    return literal_against_parameter


def _not_served_here(scope: Any) -> str | None:
    """The ``Allow`` header's value when the request's path is reserved by a literal route
    that does not serve its method; None otherwise."""
    for regex, allowed in _LITERAL:
        if scope["method"] not in allowed and regex.match(scope["path"]):
            return ", ".join(sorted(allowed))
    return None


#: Request headers that carry one value: given twice, the first one was read without a word
#: (and a proxy that reads the last of two ``Authorization`` headers would disagree with this
#: service about who the caller is). Their refusal's status: a credential's is a 401, which
#: comes before any check of the input; the others' is the 422 (400 for the request id, as
#: for one this service refuses).
_ONE_VALUE_HEADERS = {
    b"authorization": ("Authorization", 401),
    b"x-request-id": ("X-Request-ID", 400),
    b"idempotency-key": ("Idempotency-Key", 422),
    b"last-event-id": ("Last-Event-ID", 422),
}


def _repeated_header(scope: Any) -> tuple[str, int] | None:
    """The name and refusal status of the :data:`_ONE_VALUE_HEADERS` the request gives twice
    (``Authorization`` first of all), or None."""
    seen: set[bytes] = set()
    repeated: list[tuple[str, int]] = []
    for name, _ in scope.get("headers") or ():
        if name in _ONE_VALUE_HEADERS:
            if name in seen:
                repeated.append(_ONE_VALUE_HEADERS[name])
            seen.add(name)
    return min(repeated, key=lambda header: header[1] != 401, default=None)


def _repeated_parameter(scope: Any) -> str | None:
    """The first query parameter the request gives twice (``?types=fact&types=image``), or
    None. Every parameter of this API takes one value, and Starlette keeps the last of
    several: the others were dropped without a word."""
    query: bytes = scope.get("query_string") or b""
    if b"&" not in query:
        return None
    seen: set[str] = set()
    for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name in seen:
            return name[:100]
        seen.add(name)
    return None


def _not_utf8(raw: bytes) -> str | None:
    """Why ``raw`` (a path segment or a query parameter's name or value, as sent) is not
    UTF-8 text once percent-decoded, or None when it is."""
    try:
        unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"byte 0x{exc.object[exc.start]:02X}: {exc.reason}"
    return None


def _path_parameter(scope: Any, index: int) -> str:
    """The name of the parameter that segment ``index`` of the request's path fills in the
    route whose pattern the path matches (the rest of a ``{ref:path}``'s segments too);
    ``path`` when no route matches or the segment is a literal one."""
    path = scope.get("path") or ""
    for regex, template in _TEMPLATES:
        if not regex.match(path):
            continue
        parts = template.strip("/").split("/")
        for at, part in enumerate(parts):
            if part.startswith("{") and (at == index or (at < index and part.endswith(":path}"))):
                return part[1:-1].partition(":")[0]
        break
    return "path"


def _url_not_utf8(scope: Any) -> tuple[str, str] | None:
    """The field (a path parameter's name, a query parameter's name) and the message of the
    first part of the request's URL that is not UTF-8 once percent-decoded, or None.

    The server decodes such bytes as U+FFFD: ``GET /v1/models/%FF`` was a 404 naming
    '\ufffd' and ``?cursor=%FF`` a cursor of replacement characters, where a body that is
    not UTF-8 is a 422 "not UTF-8"."""
    raw_path: bytes | None = scope.get("raw_path")
    # Plain ASCII without a percent-escape (most requests) is UTF-8: nothing to decode.
    if raw_path is not None and (b"%" in raw_path or not raw_path.isascii()):
        for index, segment in enumerate(raw_path.split(b"?", 1)[0].strip(b"/").split(b"/")):
            reason = _not_utf8(segment)
            if reason is not None:
                field = _path_parameter(scope, index)
                what = "the path" if field == "path" else f"path parameter {field}"
                return field, f"{what} is not UTF-8 text once percent-decoded ({reason})"
    query: bytes = scope.get("query_string") or b""
    if b"%" not in query and query.isascii():
        return None
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        bad_name = _not_utf8(name)
        if bad_name is not None:
            # Named as the caller wrote it, percent-escapes and all.
            field = field_path(name.decode("latin-1"))
            return field, (
                f"query parameter name {quoted(field)} is not UTF-8 text once percent-decoded "
                f"({bad_name})"
            )
        reason = _not_utf8(value)
        if reason is not None:
            field = field_path(unquote_to_bytes(name.replace(b"+", b" ")).decode())
            return field, (
                f"query parameter {quoted(field)} is not UTF-8 text once percent-decoded ({reason})"
            )
    return None


#: The import route's ``atomic`` as the route reads it (``true`` or ``false``).
_FLAG: TypeAdapter[bool] = TypeAdapter(Annotated[bool, QueryBool])


def _atomic_import(scope: Any) -> bool:
    """Whether an import's ``atomic`` query parameter is true as the route reads it: only
    ``true`` (``1`` or ``yes`` is the route's 422, before the body is read). The 408 or 413
    of an atomic import says that nothing was imported."""
    query: bytes = scope.get("query_string") or b""
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    given = [value for name, value in pairs if name == "atomic"]
    try:
        return len(given) == 1 and _FLAG.validate_python(given[0])
    except ValueError:  # not a flag: the route refuses the request (422)
        return False


@dataclass(frozen=True)
class FastLane:
    """A route's requests answered before FastAPI's routing and dependency solving when they
    can be; the route answers the others as usual (the same body, and what the lane already
    learned in ``scope["state"]``).

    A fully cached search spends more of the Ingress's CPU in FastAPI's request cycle (route
    matching, dependency solving, the layers between middleware and endpoint) than in its
    own work (``benchmarks/serve_http.py --profile``). A lane must answer exactly as its
    route would, or decline.

    Attributes:
        method: The HTTP method it serves.
        path: The full-path regular expression of its requests.
        route: The path of the route it stands in front of, as declared
            (``/v1/users/{user_id}/search``): it names the route in the metrics.
        answer: ``answer(scope, body, request_id)``: the response, or None to let the route
            answer. Called only when tracing is off (the route's span stays the route's).
    """

    method: str
    path: re.Pattern[str]
    route: str
    answer: Callable[[Any, bytes, str], Awaitable[Response | None]]


_LANES: list[FastLane] = []


def add_fast_lane(lane: FastLane) -> None:
    """Put ``lane`` in front of its route (once per process; a second for the same route
    replaces the first)."""
    _LANES[:] = [other for other in _LANES if other.route != lane.route] + [lane]


def _lane_for(scope: Any) -> FastLane | None:
    if not _LANES or is_enabled():
        return None
    for lane in _LANES:
        if scope["method"] == lane.method and lane.path.fullmatch(scope["path"]):
            return lane
    return None


def _content_coding(scope: Any) -> str | None:
    """The first content coding other than ``identity`` the request's body declares
    (``Content-Encoding: gzip``), or None.

    No route decodes one: a gzip body was read as text (a 400 on REST, a 500 on GraphQL), and
    a plain body labelled ``gzip`` was stored as if it had none. A body is taken only as it
    is sent, so any other coding is a 415 (RFC 9110 section 15.5.16) before it is read."""
    for name, value in scope.get("headers") or ():
        if name == b"content-encoding":
            codings: list[str] = value.decode("latin-1").split(",")
            for coding in (c.strip() for c in codings):
                if coding.lower() not in ("", "identity"):
                    return coding
    return None


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
        given = _request_id(scope)
        request_id = given or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        if given is None:
            refusal = error_response(
                400,
                "invalid_input",
                "X-Request-ID must be 1-128 characters of A-Z a-z 0-9 . _ : -",
                request_id,
                field="X-Request-ID",
            )
            await refusal(scope, receive, send)
            self._record(scope, request_id, 400, time.perf_counter())
            return
        header = _repeated_header(scope)
        not_utf8 = None if header and header[1] == 401 else _url_not_utf8(scope)
        if not_utf8 is not None:
            refusal = error_response(
                422, "invalid_input", not_utf8[1], request_id, field=not_utf8[0]
            )
            await refusal(scope, receive, send)
            self._record(scope, request_id, 422, time.perf_counter())
            return
        repeated = None if header and header[1] == 401 else _repeated_parameter(scope)
        if repeated is not None or header is not None:
            field: str | None
            if repeated is not None:
                status, code, field = 422, "invalid_input", field_path(repeated)
                message = (
                    f"query parameter {quoted(repeated)} is given more than once (every "
                    "parameter takes one value; a list is comma-separated)"
                )
            else:
                assert header is not None
                name, status = header
                code = "unauthenticated" if status == 401 else "invalid_input"
                field = None if status == 401 else name
                message = f"header {name} is given more than once (it takes one value)"
            refusal = error_response(
                status,
                code,
                message,
                request_id,
                field=field,
                headers={"WWW-Authenticate": "Bearer"} if status == 401 else None,
            )
            await refusal(scope, receive, send)
            self._record(scope, request_id, status, time.perf_counter())
            return
        coding = _content_coding(scope)
        if coding is not None:
            refusal = error_response(
                415,
                "unsupported_media_type",
                f"Content-Encoding {quoted(coding)} is not accepted: send the body as it is "
                "(identity)",
                request_id,
                field="Content-Encoding",
                headers={"Accept-Encoding": "identity"},
            )
            await refusal(scope, receive, send)
            self._record(scope, request_id, 415, time.perf_counter())
            return
        allow = _not_served_here(scope) if _LITERAL else None
        if allow is not None:
            refusal = error_response(
                405,
                "method_not_allowed",
                "Method Not Allowed",
                request_id,
                headers={"Allow": allow},
            )
            await refusal(scope, receive, send)
            self._record(scope, request_id, 405, time.perf_counter())
            return
        limit = _body_limit(scope)
        for name, value in scope.get("headers") or ():
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await self._too_large(request_id, limit)(scope, receive, send)
                return
        started = time.perf_counter()
        seen = 0
        answered = 0  # the status this middleware answered itself (413, 408), else 0
        body_done = False
        status = 500

        async def limited() -> Any:
            nonlocal seen, answered, body_done
            if answered:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()  # e.g. waiting for a disconnect while streaming
            try:
                # asyncio.timeout, not wait_for: wait_for runs receive() in a task of its own
                # (Python 3.11), an extra task and loop turn for each part of every body.
                async with asyncio.timeout(api.state.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                answered = 408
                await self._timed_out(request_id, scope)(scope, receive, send)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > limit:
                    answered = 413
                    await self._too_large(request_id, limit, scope)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            if not answered:
                await send(message)

        lane = _lane_for(scope)
        try:
            with request_scope(request_id):  # the request id on every span (tracing on)
                app_receive: Any = limited
                if lane is not None:
                    app_receive = await self._fast(lane, scope, limited, guarded_send, request_id)
                    if app_receive is None:
                        return  # answered (recorded below)
                await self.app(scope, app_receive, guarded_send)
        except Exception:
            if not answered:
                raise  # Starlette's outermost error handler answers 500 (recorded below)
        finally:
            self._record(scope, request_id, answered or status, started)

    @staticmethod
    async def _fast(lane: FastLane, scope: Any, receive: Any, send: Any, request_id: str) -> Any:
        """Read the body and offer the request to its fast lane: None when the lane answered
        it, else the ``receive`` that hands the application the same messages again (a body
        the limits refused ends in the disconnect they gave, as without a lane)."""
        messages: list[Any] = []
        parts: list[bytes] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # gone, or refused by the limits
                break
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                response = await lane.answer(scope, b"".join(parts), request_id)
                if response is not None:
                    scope["route_path"] = lane.route  # the route's name in the metrics
                    await response(scope, receive, send)
                    return None
                break

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        return replay

    @staticmethod
    def _record(scope: Any, request_id: str, status: int, started: float) -> None:
        # Serve puts the same id (the client's X-Request-ID, or its own) on the response.
        route = getattr(scope.get("route"), "path", None) or scope.get("route_path", "unmatched")
        elapsed_ms = (time.perf_counter() - started) * 1000
        recorder = getattr(api.state, "metrics", None)
        if recorder is not None:
            # The request's trace (tracing on): its span is still current, the FastAPI
            # instrumentation's middleware being outside this one.
            recorder.record(
                scope["method"],
                route,
                status,
                elapsed_ms,
                request_id=request_id,
                trace_id=current_trace_id(),
            )
        if log.isEnabledFor(logging.DEBUG):  # Serve's access log has them at INFO
            log.debug(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": redact(scope["path"]),  # an API key put in the URL stays out
                    "status": status,
                    "ms": round(elapsed_ms, 2),
                },
            )

    @staticmethod
    def _streamed_import(scope: Any) -> str:
        """What a body cut short has left of an import that streams: a non-atomic import
        stores each batch of lines as it reads them. ``scope`` None: nothing was read."""
        if scope is None:
            return ""
        if scope.get("method") != "POST" or not scope["path"].endswith("/import"):
            return ""
        if _atomic_import(scope):
            return ""
        return (
            "; lines read before it stopped may have been imported: send the whole file "
            "again (an import skips what it already holds)"
        )

    @classmethod
    def _timed_out(cls, request_id: str, scope: Any) -> Response:
        return error_response(
            408,
            "request_timeout",
            f"the request body did not arrive within {api.state.body_timeout_s:g} s"
            + cls._streamed_import(scope),
            request_id,
            headers={"Connection": "close"},
        )

    @classmethod
    def _too_large(cls, request_id: str, limit: int, scope: Any = None) -> Response:
        return error_response(
            413,
            "payload_too_large",
            f"request body is over {limit} bytes" + cls._streamed_import(scope),
            request_id,
        )


api.add_middleware(_RequestContext)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    codes = {
        400: "bad_request",
        401: "unauthenticated",
        404: "not_found",
        405: "method_not_allowed",
    }
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return error_response(
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        str(exc.detail),
        getattr(request.state, "request_id", ""),
        headers=headers,
    )


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (RFC 9110: the Allow header of a 405).

    FastAPI registers one route per method, so the 405 Starlette raises names only the methods
    of the first route whose path matched.
    """
    methods: set[str] = set()
    for route in request.app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> Response:
    # Never leak internals; the log keeps the traceback with the request id.
    log.exception("unhandled error", extra={"request_id": request.state.request_id})
    return error_response(500, "internal_error", "internal error", request.state.request_id)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    # Credentials first, as on a well-formed request: a caller without a valid API key gets
    # the 401 (audited) whatever its input, and never learns how the input is checked.
    authenticate = getattr(api.state, "authenticate", None)
    if authenticate is not None:
        try:
            await authenticate(request)
        except AuthenticationFailed as failed:
            return await halldyll_error_response(request, failed)
    # A parameter's field is its name, as the engine, the client and MCP name it ("limit",
    # "user_id", "idempotency-key"; not "query.limit" or "path.user_id").
    errors = exc.errors()
    error = validation.first_error(errors, skip=("body", "query", "path", "header"))
    message = error.message
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if errors and tuple(errors[0].get("loc", ())) == ("body",) and not media.endswith("json"):
        # FastAPI reads a body of another media type (curl -d sends a form's) as no JSON at
        # all: "Input should be a valid dictionary" left the caller to guess why.
        got = quoted(media) if media else "none"
        message += f" (send it as JSON with Content-Type: application/json; got {got})"
    return error_response(
        422, "invalid_input", message, request.state.request_id, field=error.field
    )


class RouteMetrics:
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

        self.recent = RecentRequests()

    def record(
        self,
        method: str,
        route: str,
        status: int,
        elapsed_ms: float,
        *,
        request_id: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Count one request. Ray's metrics API has no exemplars, so the request and trace
        ids go to :class:`RecentRequests` only (each window's slowest request)."""
        self.requests.inc(tags={"route": route, "method": method, "status": str(status)})
        self.latency.observe(elapsed_ms, tags={"route": route})
        self.recent.record(
            method, route, status, elapsed_ms, request_id=request_id, trace_id=trace_id
        )


#: Latency buckets (ms, upper bounds) of :class:`RecentRequests`; the last is unbounded.
_LATENCY_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)


class _Tally:
    """Counts, errors and a latency histogram of a set of requests."""

    __slots__ = ("buckets", "count", "errors", "max_ms", "slowest", "total_ms")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.buckets = [0] * (len(_LATENCY_BOUNDS_MS) + 1)
        #: The slowest request's ids (an exemplar): where to look when max_ms is a surprise.
        self.slowest: dict[str, Any] | None = None

    def add(
        self,
        status: int,
        elapsed_ms: float,
        request_id: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        self.count += 1
        self.errors += status >= 500
        self.total_ms += elapsed_ms
        if self.slowest is None or elapsed_ms > self.max_ms:
            self.slowest = {
                "ms": round(elapsed_ms, 3),
                "status": status,
                "request_id": request_id,
                "trace_id": trace_id,
            }
        self.max_ms = max(self.max_ms, elapsed_ms)
        self.buckets[bisect.bisect_left(_LATENCY_BOUNDS_MS, elapsed_ms)] += 1

    def quantile_ms(self, q: float) -> float:
        """The bucket bound under which a ``q`` share of the requests fell, or the largest
        latency seen when that is lower (both are upper bounds of the quantile; a p95 of
        1,000 ms beside a max of 900 ms read as a contradiction)."""
        if not self.count:
            return 0.0
        wanted, seen = q * self.count, 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= wanted and i < len(_LATENCY_BOUNDS_MS):
                return round(min(float(_LATENCY_BOUNDS_MS[i]), self.max_ms), 3)
        return round(self.max_ms, 3)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.count,
            "errors": self.errors,
            "mean_ms": round(self.total_ms / self.count, 3) if self.count else 0.0,
            "p50_ms": self.quantile_ms(0.5),
            "p95_ms": self.quantile_ms(0.95),
            "max_ms": round(self.max_ms, 3),
            "slowest": self.slowest,
        }


class RecentRequests:
    """This process's requests, kept in memory for ``GET /v1/stats``: per route since the
    start, and per minute over the last ``minutes`` minutes (older minutes are dropped).

    Args:
        minutes: How many one-minute buckets are kept.
        clock: Seconds since the epoch (a test's own clock).
    """

    def __init__(self, minutes: int = 60, clock: Callable[[], float] = time.time) -> None:
        self._minutes = minutes
        self._clock = clock
        self.started_at = clock()
        self._by_route: dict[tuple[str, str], _Tally] = {}
        self._by_minute: collections.OrderedDict[int, _Tally] = collections.OrderedDict()

    def record(
        self,
        method: str,
        route: str,
        status: int,
        elapsed_ms: float,
        *,
        request_id: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        minute = int(self._clock() // 60)
        ids = (request_id, trace_id)
        self._by_route.setdefault((method, route), _Tally()).add(status, elapsed_ms, *ids)
        tally = self._by_minute.get(minute)
        if tally is None:
            tally = self._by_minute[minute] = _Tally()
            while len(self._by_minute) > self._minutes:
                self._by_minute.popitem(last=False)
        tally.add(status, elapsed_ms, *ids)

    def snapshot(self) -> dict[str, Any]:
        """``{"started_at", "window_minutes", "routes": [{method, route, requests, errors,
        mean_ms, p50_ms, p95_ms, max_ms, slowest}], "minutes": [{"at", ...the same}]}``:
        times are ISO 8601 UTC, latencies in milliseconds (p50/p95 are bucket bounds, at most
        max_ms), errors are 5xx answers; minutes without a request are absent. ``slowest`` is
        the window's slowest request, ``{ms, status, request_id, trace_id}`` (``trace_id``
        None with tracing off): the exemplar that links a latency to its trace."""
        now_minute = int(self._clock() // 60)
        routes = [
            {"method": method, "route": route, **tally.as_dict()}
            for (method, route), tally in sorted(self._by_route.items(), key=lambda kv: kv[0][1])
        ]
        minutes = [
            {"at": _iso(minute * 60), **tally.as_dict()}
            for minute, tally in self._by_minute.items()
            if minute > now_minute - self._minutes
        ]
        return {
            "started_at": _iso(self.started_at),
            "window_minutes": self._minutes,
            "routes": routes,
            "minutes": minutes,
        }


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")
