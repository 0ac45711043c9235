"""How each HTTP call of the API is built and read back, whoever sends it.

:class:`Endpoints` builds every request (method, path, JSON body from the request models of
:mod:`halldyll_ray.schemas`, query parameters) and names the parser that turns the response
into the typed model of :mod:`halldyll_ray.models`; :func:`error_from` turns the server's
error body into the matching :class:`~halldyll_ray.errors.HalldyllError`. The async and sync
clients only differ in how they send a :class:`Request`.
"""

from __future__ import annotations

import json
import math
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import datetime
from os import PathLike
from typing import Any, Generic, TypeVar
from urllib.parse import quote
from uuid import UUID

import httpx
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python

from halldyll_ray import __version__
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
    redact,
)
from halldyll_ray.models import (
    STORED,
    AIModel,
    ApiKey,
    Context,
    Conversation,
    ErasureReceipt,
    Fact,
    Image,
    Job,
    JobStatus,
    MemoryUpdate,
    ModelKind,
    NewApiKey,
    Page,
    SearchResult,
    StoredMemory,
    StoredMessage,
    Summary,
    Transcription,
    TurnRecord,
    User,
)
from halldyll_ray.portability import ImportReport, parse_header
from halldyll_ray.schemas import (
    ApiKeyCreate,
    AppendMessagesRequest,
    ContextRequest,
    ListMemoriesRequest,
    ModelCreate,
    PrepareContextRequest,
    SearchRequest,
    TurnRequest,
    UserCreate,
    UserUpdate,
)

T = TypeVar("T")
#: The media type of an export file (one JSON object a line).
NDJSON = "application/x-ndjson"
#: Bytes per piece when a client uploads an import file.
UPLOAD_CHUNK_BYTES = 1 << 20


def upload_data(data: object) -> bytes | PathLike[str] | AsyncIterable[Any] | Iterable[Any]:
    """An import's ``data`` as the clients send it: bytes (a ``bytearray`` or ``memoryview``
    copied to bytes), a path, or an iterable of pieces (async or not); InvalidInput (field
    ``data``) for anything else. A ``str`` is neither the file's bytes nor a path (give a
    ``pathlib.Path``, or the text encoded): iterating it sent single characters, and None or a
    number was a bare TypeError."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    if isinstance(data, PathLike | AsyncIterable) or (
        isinstance(data, Iterable) and not isinstance(data, str | Mapping)
    ):
        return data
    raise InvalidInput(
        "data must be the file's bytes, its path (a pathlib.Path) or an iterable of bytes "
        f"pieces, not {type(data).__name__}",
        field="data",
    )


def _piece(piece: object) -> bytes:
    if isinstance(piece, bytes):
        return piece
    if isinstance(piece, bytearray | memoryview):
        return bytes(piece)
    raise InvalidInput(f"data's pieces must be bytes, not {type(piece).__name__}", field="data")


def upload_pieces(pieces: Iterable[Any]) -> Iterator[bytes]:
    """``pieces`` checked one by one as they are sent (InvalidInput for one not bytes)."""
    for piece in pieces:
        yield _piece(piece)


async def aupload_pieces(pieces: AsyncIterable[Any] | Iterable[Any]) -> AsyncIterator[bytes]:
    """:func:`upload_pieces` for the async client, over an async or plain iterable."""
    if isinstance(pieces, AsyncIterable):
        async for piece in pieces:
            yield _piece(piece)
    else:
        for piece in pieces:
            yield _piece(piece)


M = TypeVar("M", bound=BaseModel)

#: What :meth:`store_memory` accepts: a typed memory, or its JSON form as a mapping.
MemoryInput = Conversation | Fact | Image | Transcription | Summary | Mapping[str, Any]
Id = UUID | str

_ERRORS: dict[str, type[HalldyllError]] = {
    cls.code: cls
    for cls in (
        InvalidInput,
        NotFound,
        Conflict,
        PermissionDenied,
        AuthenticationFailed,
        Unavailable,
        MigrationError,
        ConfigurationError,
    )
}
_ERRORS["payload_too_large"] = InvalidInput
#: How much of a request's path an error message repeats (an id can be any length).
_PATH_SHOWN = 200
# For error responses that do not carry the error shape (a proxy's 502, an unknown route), or
# whose code is not one of the product's errors.
_BY_STATUS: dict[int, type[HalldyllError]] = {
    400: InvalidInput,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    408: Unavailable,  # the body did not arrive in time: nothing was applied, send it again
    409: Conflict,
    413: InvalidInput,
    415: InvalidInput,
    422: InvalidInput,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


# --------------------------------------------------------------------------- secrets
def _key_of(request: httpx.Request | None) -> str | None:
    """The API key a request carried (its ``Authorization: Bearer`` header), if any."""
    if request is None:
        return None
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


def _request_of(thing: httpx.Response | httpx.HTTPError) -> httpx.Request | None:
    try:
        return thing.request
    except RuntimeError:  # a response or error made without a request (tests, a transport)
        return None


# --------------------------------------------------------------------------- responses
def _error_from(response: httpx.Response) -> HalldyllError:
    """The typed exception for an error response; nothing of it repeats the API key."""
    key = _key_of(_request_of(response))
    status = response.status_code
    request_id = response.headers.get("x-request-id")
    code = message = field = None
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        request_id = error.get("request_id") or request_id
        field = error.get("field")
        report = error.get("report")
    else:
        report = None
    # An error code of the product names its class; any other (the HTTP layer's own:
    # "bad_request", "request_timeout", "unsupported_media_type"...) goes by the status.
    cls = _ERRORS.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = _BY_STATUS.get(status, HalldyllError)
        if status == 500 and not isinstance(code, str):  # no error shape: the proxy's
            # The app answers every error of its own with the error shape (an unexpected one
            # is 500 "internal_error"). A bare 500 comes from the proxy in front of it: Serve's
            # HAProxy config answers its own 502/503/504 with a plain-text 500 error file (no
            # server left, the replica handling the request lost with its node). The app
            # never answered: retry as for a 503.
            cls = Unavailable
    if not isinstance(message, str) or not message:
        message = f"HTTP {status}: {response.text[:500] or response.reason_phrase}"
    message = redact(message, key)
    if isinstance(request_id, str):
        request_id = redact(request_id, key)
    fields: dict[str, Any] = {"request_id": request_id, "status_code": status}
    if isinstance(field, str) and field:
        fields["field"] = field  # as the engine's InvalidInput has it
    if isinstance(report, dict):
        fields["report"] = report  # a refused atomic import, as the engine raises it
    retry_after = response.headers.get("retry-after", "")
    if retry_after.isdigit():  # seconds; the service sends it with every 503
        fields["retry_after"] = int(retry_after)
    exc = cls(message, **fields)
    # The same attributes an error unpickled from a Ray actor has (errors._rebuild).
    for name, value in fields.items():
        setattr(exc, name, value)
    return exc


def _json(response: httpx.Response) -> Any:
    if not response.is_success:
        raise _error_from(response)
    return response.json()


def _one(model: type[M], key: str | None = None) -> Callable[[httpx.Response], M]:
    def parse(response: httpx.Response) -> M:
        body = _json(response)
        return model.model_validate(body if key is None else body[key], context=STORED)

    return parse


def _many(model: type[M], key: str = "items") -> Callable[[httpx.Response], list[M]]:
    def parse(response: httpx.Response) -> list[M]:
        return [model.model_validate(item, context=STORED) for item in _json(response)[key]]

    return parse


def _new_key(response: httpx.Response) -> NewApiKey:
    body = dict(_json(response))
    key = body.pop("key")
    return NewApiKey(key=key, api_key=ApiKey.model_validate(body, context=STORED))


def _nothing(response: httpx.Response) -> None:
    if not response.is_success:
        raise _error_from(response)


def _health(response: httpx.Response) -> dict[str, Any]:
    body = _json(response)
    return dict(body)


def _readiness(response: httpx.Response) -> dict[str, Any]:
    # A 503 that carries the per-dependency report is an answer, not an error.
    if response.status_code == 503:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "ok" in body and "error" not in body:
            return body
    return _health(response)


def _audit(response: httpx.Response) -> list[dict[str, Any]]:
    return [dict(row) for row in _json(response)["items"]]


# --------------------------------------------------------------------------- requests
@dataclass(frozen=True, slots=True)
class Request(Generic[T]):
    """One HTTP call, independent of how it is sent."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: dict[str, str] | None = None

    def content(self) -> tuple[bytes | None, dict[str, str]]:
        """The body as UTF-8 JSON, and its headers. InvalidInput (``field`` ``body``, as the
        API answers such a body) for what JSON cannot carry: NaN or an infinity (the API
        refuses them), or nesting too deep; httpx raised a bare ValueError. A lone UTF-16
        surrogate (no UTF-8 form) is written as its JSON escape (``\\ud800``), as a raw body
        would carry it: the server names the field at fault (``query``, ``fact.statement``)
        in its 422, with its request id, as it does for that raw body."""
        if self.json is None:
            return None, {}
        try:
            text = json.dumps(self.json, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        except (ValueError, RecursionError) as exc:
            reason = "nested too deep" if isinstance(exc, RecursionError) else exc
            raise InvalidInput(f"the body is not JSON: {reason}", field="body") from None
        try:
            body = text.encode("utf-8")
        except UnicodeEncodeError:
            # Every character past ASCII escaped: the same JSON value, lone surrogates included.
            body = json.dumps(self.json, allow_nan=False, separators=(",", ":")).encode("ascii")
        return body, {"Content-Type": "application/json"}

    def finish(self, response: httpx.Response) -> T:
        try:
            return self.parse(response)
        except HalldyllError:
            raise
        except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not the expected shape
            # Only the kind of mismatch: pydantic's text would repeat the response's values.
            what = (
                "not JSON"
                if isinstance(exc, ValueError) and not isinstance(exc, ValidationError)
                else f"not the expected shape ({type(exc).__name__})"
            )
            raise HalldyllError(
                f"unexpected response to {self.method} {self.path}: {what}",
                request_id=response.headers.get("x-request-id"),
                status_code=response.status_code,
            ) from exc


def _seg(value: Id, field: str, *, slashes: bool = False) -> str:
    """One path segment, percent-encoded; never what would change the route: empty (dropped),
    ``.`` or ``..`` (removed by URL normalisation: a memory id of ``..`` addressed the user
    itself, and DELETE erased the user), None, or a ``/`` (the server decodes ``%2F`` before
    routing: a memory id ``<id>/history`` read the history route). ``slashes``: the segment is
    a model's name, which a route takes whole (``/v1/models/{ref:path}``)."""
    if value is None:
        raise InvalidInput(f"{field} is required", field=field)
    text = str(value)
    if not text:
        raise InvalidInput(f"{field} must not be empty", field=field)
    if text in (".", "..") or (not slashes and "/" in text):
        raise InvalidInput(f"{field} must not be '.', '..' or hold a '/'", field=field)
    return quote(_utf8(text, field), safe="")


def _utf8(text: str, field: str) -> bytes:
    """``text`` as UTF-8, or InvalidInput naming ``field`` for a lone UTF-16 surrogate (it
    has no UTF-8 form; the URL could not be written)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{field} holds a lone UTF-16 surrogate", field=field) from None


def _user(user_id: Id) -> str:
    return f"/v1/users/{_seg(user_id, 'user_id')}"


def unchecked(schema: type[M], /, **values: Any) -> M:
    """A request body as its schema describes it, left for the server to validate.

    The server is the one judge of a body: it answers a bad one 422 with its request id,
    which its log and audit rows carry too. Validating here first would raise without that
    id, and would make a client of one version stricter or looser than the server it talks
    to. A name that is not a field of ``schema`` is a bug in this module: it fails here.
    """
    unknown = values.keys() - schema.model_fields.keys()
    if unknown:
        raise TypeError(f"{schema.__name__} has no field {', '.join(sorted(unknown))}")
    return schema.model_construct(**values)


def _jsonable(value: Any) -> Any:
    """``value`` as the JSON it stands for, each value as it is, not as a field's type would
    write it: an unchecked body may hold what its field type does not (a tuple for a list, a
    plain string for an enum), and a field's serializer turned ``limit=True`` into ``1`` and
    ``threshold=True`` into ``1.0``, which the server took where a raw body's ``true`` is a
    422 (the request models have no aliases or serializers of their own). A model's unset
    options (None) are left out. Keys are kept as given: pydantic's own conversion refused a
    key holding a lone surrogate, which a raw body carries as its escape."""
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        return {
            name: _jsonable(item)
            for name, item in value
            if item is not None and not (name in fields and fields[name].exclude)
        }
    if isinstance(value, Mapping):
        return {
            key if isinstance(key, str) else to_jsonable_python(key): _jsonable(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return to_jsonable_python(value)


def _body(value: BaseModel | Mapping[str, Any]) -> Any:
    """The JSON body: unset options (None) are left out, so the server's defaults apply.
    Anything else that is JSON goes as it is: the server says what is wrong with it."""
    try:
        return _jsonable(dict(value) if isinstance(value, Mapping) else value)
    except PydanticSerializationError as exc:
        raise InvalidInput(f"the body is not JSON: {exc}", field="body") from None
    except (ValueError, RecursionError) as exc:
        # pydantic-core's own limit ("Maximum serialization depth exceeded") is a bare
        # ValueError; its text names no value.
        reason = "nested too deep" if isinstance(exc, RecursionError) else exc
        raise InvalidInput(f"the body is not JSON: {reason}", field="body") from None


def _params(values: Mapping[str, Any]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            params[name] = "true" if value else "false"
        elif isinstance(value, datetime):
            params[name] = value.isoformat()
        elif isinstance(value, list | tuple):
            params[name] = ",".join(str(v) for v in value)  # the server splits on commas
        else:
            params[name] = str(value)
        if name in params:
            _utf8(params[name], name)
    return params


def _memories(user_id: Id) -> str:
    return f"{_user(user_id)}/memories"


def _memory(user_id: Id, memory_id: Id) -> str:
    """One memory's path (a None id is InvalidInput, not the list's path)."""
    return f"{_memories(user_id)}/{_seg(memory_id, 'memory_id')}"


def _session(user_id: Id, session_id: str) -> str:
    return f"{_user(user_id)}/sessions/{_seg(session_id, 'session_id')}"


class Endpoints:
    """Every route of ``halldyll_ray.serve.ingress``: how to call it and how to read the answer.

    Bodies are the models of :mod:`halldyll_ray.schemas`, the ones the server reads. Past the
    first argument every parameter is keyword-only: ids and strings swapped by position would
    still be well-typed.
    """

    @staticmethod
    def healthz() -> Request[dict[str, Any]]:
        return Request("GET", "/healthz", _health)

    @staticmethod
    def readyz() -> Request[dict[str, Any]]:
        return Request("GET", "/readyz", _readiness)

    @staticmethod
    def me() -> Request[User]:
        return Request("GET", "/v1/me", _one(User))

    @staticmethod
    def create_user(request: UserCreate) -> Request[User]:
        return Request("POST", "/v1/users", _one(User), json=_body(request))

    @staticmethod
    def list_users(*, limit: int, cursor: str | None) -> Request[Page[User]]:
        params = _params({"limit": limit, "cursor": cursor})
        return Request("GET", "/v1/users", _one(Page[User]), params=params)

    @staticmethod
    def get_user(user_id: Id) -> Request[User]:
        return Request("GET", _user(user_id), _one(User))

    @staticmethod
    def update_user(user_id: Id, *, request: UserUpdate) -> Request[User]:
        return Request("PATCH", _user(user_id), _one(User), json=_body(request))

    @staticmethod
    def delete_user(user_id: Id) -> Request[ErasureReceipt]:
        return Request("DELETE", _user(user_id), _one(ErasureReceipt))

    @staticmethod
    def create_api_key(user_id: Id, *, request: ApiKeyCreate) -> Request[NewApiKey]:
        return Request("POST", f"{_user(user_id)}/keys", _new_key, json=_body(request))

    @staticmethod
    def list_api_keys(user_id: Id) -> Request[list[ApiKey]]:
        return Request("GET", f"{_user(user_id)}/keys", _many(ApiKey))

    @staticmethod
    def rotate_api_key(key_id: Id) -> Request[NewApiKey]:
        return Request("POST", f"/v1/keys/{_seg(key_id, 'key_id')}/rotate", _new_key)

    @staticmethod
    def revoke_api_key(key_id: Id) -> Request[ApiKey]:
        return Request("DELETE", f"/v1/keys/{_seg(key_id, 'key_id')}", _one(ApiKey))

    @staticmethod
    def register_model(request: ModelCreate) -> Request[AIModel]:
        return Request("POST", "/v1/models", _one(AIModel), json=_body(request))

    @staticmethod
    def list_models(kind: ModelKind | str | None) -> Request[list[AIModel]]:
        return Request("GET", "/v1/models", _many(AIModel), params=_params({"kind": kind}))

    @staticmethod
    def get_model(ref: Id) -> Request[AIModel]:
        return Request("GET", f"/v1/models/{_seg(ref, 'model', slashes=True)}", _one(AIModel))

    @staticmethod
    def delete_model(ref: Id) -> Request[None]:
        return Request("DELETE", f"/v1/models/{_seg(ref, 'model', slashes=True)}", _nothing)

    @staticmethod
    def store_memory(memory: MemoryInput, *, user_id: Id) -> Request[StoredMemory]:
        return Request("POST", _memories(user_id), _one(StoredMemory), json=_body(memory))

    @staticmethod
    def store_memories(
        memories: Sequence[MemoryInput], *, user_id: Id
    ) -> Request[list[StoredMemory]]:
        if isinstance(memories, str | bytes | Mapping) or not isinstance(memories, Sequence):
            raise InvalidInput("memories must be a list of memories", field="memories")
        body = {"memories": [_body(memory) for memory in memories]}
        path = f"{_memories(user_id)}/batch"
        return Request("POST", path, _many(StoredMemory, "memories"), json=body)

    @staticmethod
    def export_memories(user_id: Id) -> Request[None]:
        """The export's request; its body is streamed by the client, checked by ``finish``."""
        return Request("GET", f"{_user(user_id)}/export", _nothing)

    @staticmethod
    def import_memories(user_id: Id, *, atomic: bool) -> Request[ImportReport]:
        params = _params({"atomic": atomic})
        return Request("POST", f"{_user(user_id)}/import", _one(ImportReport), params=params)

    @staticmethod
    def get_memory(memory_id: Id, *, user_id: Id) -> Request[StoredMemory]:
        return Request("GET", _memory(user_id, memory_id), _one(StoredMemory))

    @staticmethod
    def fact_history(memory_id: Id, *, user_id: Id) -> Request[list[StoredMemory]]:
        return Request("GET", f"{_memory(user_id, memory_id)}/history", _many(StoredMemory))

    @staticmethod
    def list_memories(request: ListMemoriesRequest, *, user_id: Id) -> Request[Page[StoredMemory]]:
        # Query parameters, not a body: the fields as given, lists joined by commas.
        params = _params(dict(request))
        return Request("GET", _memories(user_id), _one(Page[StoredMemory]), params=params)

    @staticmethod
    def update_memory(
        memory_id: Id, *, update: MemoryUpdate | Mapping[str, Any], user_id: Id
    ) -> Request[StoredMemory]:
        path = _memory(user_id, memory_id)
        return Request("PATCH", path, _one(StoredMemory), json=_body(update))

    @staticmethod
    def delete_memory(memory_id: Id, *, user_id: Id) -> Request[None]:
        return Request("DELETE", _memory(user_id, memory_id), _nothing)

    @staticmethod
    def append_messages(
        conversation_id: Id, *, request: AppendMessagesRequest, user_id: Id
    ) -> Request[list[StoredMessage]]:
        path = f"{_memory(user_id, conversation_id)}/messages"
        return Request("POST", path, _many(StoredMessage), json=_body(request))

    @staticmethod
    def search(request: SearchRequest, *, user_id: Id) -> Request[list[SearchResult]]:
        path = f"{_user(user_id)}/search"
        return Request("POST", path, _many(SearchResult, "results"), json=_body(request))

    @staticmethod
    def build_context(request: ContextRequest, *, user_id: Id) -> Request[Context]:
        path = f"{_user(user_id)}/context"
        return Request("POST", path, _one(Context), json=_body(request))

    @staticmethod
    def prepare_context(
        request: PrepareContextRequest, *, session_id: str, user_id: Id
    ) -> Request[Context]:
        path = f"{_session(user_id, session_id)}/prepare"
        return Request("POST", path, _one(Context), json=_body(request))

    @staticmethod
    def record_turn(request: TurnRequest, *, session_id: str, user_id: Id) -> Request[TurnRecord]:
        path = f"{_session(user_id, session_id)}/turns"
        return Request("POST", path, _one(TurnRecord), json=_body(request))

    @staticmethod
    def list_jobs(
        *,
        user_id: Id,
        status: JobStatus | str | None,
        kind: str | None,
        limit: int,
        cursor: str | None,
    ) -> Request[Page[Job]]:
        params = _params({"status": status, "kind": kind, "limit": limit, "cursor": cursor})
        return Request("GET", f"{_user(user_id)}/jobs", _one(Page[Job]), params=params)

    @staticmethod
    def get_job(job_id: Id, *, user_id: Id) -> Request[Job]:
        return Request("GET", f"{_user(user_id)}/jobs/{_seg(job_id, 'job_id')}", _one(Job))

    @staticmethod
    def list_audit(
        *,
        user_id: Id | None,
        operation: str | None,
        outcome: str | None,
        before_id: int | None,
        limit: int,
    ) -> Request[list[dict[str, Any]]]:
        params = _params(
            {
                "user_id": user_id,
                "operation": operation,
                "outcome": outcome,
                "before_id": before_id,
                "limit": limit,
            }
        )
        return Request("GET", "/v1/audit", _audit, params=params)


def api_key_header(api_key: object) -> str:
    """``Bearer <key>`` for an API key as read from a file or the environment (surrounding
    whitespace, such as the newline ``read_text()`` keeps, and a leading UTF-8 byte order
    mark, which Windows editors write, are dropped), or InvalidInput
    (field ``api_key``) that never repeats the key: httpx's error for a bad header value
    quoted the whole header."""
    key = api_key.strip().removeprefix("\ufeff").strip() if isinstance(api_key, str) else ""
    if not key or not all("!" <= c <= "~" for c in key):
        raise InvalidInput(
            "api_key is not an API key: one is printable ASCII without spaces", field="api_key"
        )
    return f"Bearer {key}"


def check_timeout(timeout: object) -> float:
    """``timeout`` as seconds, or InvalidInput (field ``timeout``) unless it is a finite
    positive number: httpx took -1, NaN or an infinity and failed at the first request with a
    bare ValueError or OverflowError."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidInput("timeout must be a number of seconds", field="timeout")
    seconds = float(timeout) if math.isfinite(timeout) else math.nan
    if not seconds > 0:
        raise InvalidInput("timeout must be a finite positive number of seconds", field="timeout")
    return seconds


def check_base_url(base_url: object) -> httpx.URL:
    """``base_url`` parsed, or InvalidInput (field ``base_url``) for what is not an http(s)
    URL with a host (httpx raised InvalidURL at once, or failed each request)."""
    shown = "base_url must be an http:// or https:// URL, e.g. http://127.0.0.1:8000"
    if not isinstance(base_url, str | httpx.URL):
        raise InvalidInput(shown, field="base_url")
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        # Its reason ("Invalid port"), not the URL: it can hold user:password.
        reason = str(exc).partition(":")[0] if isinstance(exc, httpx.InvalidURL) else ""
        raise InvalidInput(f"{shown}{f' ({reason})' if reason else ''}", field="base_url") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidInput(shown, field="base_url")
    if url.port is not None and not 0 < url.port < 65536:
        raise InvalidInput(f"{shown} (a port is 1 to 65535)", field="base_url")
    return url


#: How much of an export's start the client reads to find its header line.
_EXPORT_HEAD_BYTES = 1 << 16


def export_head(request: Request[Any], head: bytes, *, done: bool) -> bool:
    """Whether ``head`` (an export's first bytes) holds its whole first line, which must be a
    halldyll export header; ``done``: the body ended. HalldyllError otherwise: a proxy's or
    another server's 200 page was written as the export file."""
    if b"\n" not in head and len(head) < _EXPORT_HEAD_BYTES and not done:
        return False
    try:
        parse_header(1, head.split(b"\n", 1)[0])
    except InvalidInput:
        raise HalldyllError(
            f"{request.method} {request.path} answered with something that is not a halldyll "
            "export (its first line is not an export header): is the URL the service's?"
        ) from None
    return True


class ExportStart:
    """An export's first bytes, held until its first line is whole and checked
    (:func:`export_head`); both clients pass their pieces through it."""

    def __init__(self, request: Request[Any]) -> None:
        self.request = request
        self.head = b""
        self.started = False

    def feed(self, piece: bytes) -> bytes:
        """What to pass on for ``piece``: nothing until the first line is checked."""
        if self.started:
            return piece
        self.head += piece
        self.started = export_head(self.request, self.head, done=False)
        return self.head if self.started else b""

    def end(self) -> bytes:
        """What is left to pass on when the body ended (a file of one short line)."""
        if self.started:
            return b""
        export_head(self.request, self.head, done=True)
        self.started = True
        return self.head


def client_options(base_url: str, api_key: str, timeout: float) -> dict[str, Any]:
    """The httpx client's options; InvalidInput for a bad ``base_url``, key or timeout."""
    return {
        "base_url": check_base_url(base_url),
        "timeout": check_timeout(timeout),
        "headers": {
            "Authorization": api_key_header(api_key),
            "User-Agent": f"halldyll-ray-client/{__version__}",
            "Accept": "application/json",
        },
    }


#: What httpx raises for a request it would not send or whose answer it could not read:
#: every exception of it a client call can meet (TransportError is only one kind).
SEND_ERRORS: tuple[type[Exception], ...] = (
    httpx.HTTPError,
    httpx.InvalidURL,
    httpx.StreamError,
    httpx.CookieConflict,
)


def _named(request: Request[Any]) -> str:
    """``METHOD /path`` of a request for a message, the path cut short (an id of 100,000
    characters would be repeated whole)."""
    path = request.path
    if len(path) > _PATH_SHOWN:
        path = f"{path[:_PATH_SHOWN]}... ({len(request.path)} characters)"
    return f"{request.method} {path}"


def check_open(http: httpx.Client | httpx.AsyncClient, request: Request[Any]) -> None:
    """HalldyllError when the client was closed (httpx's RuntimeError otherwise). Not
    Unavailable: no retry sends a request through a closed client; make a new one."""
    if http.is_closed:
        raise HalldyllError(
            f"{_named(request)} was not sent: the client is closed; create a new one"
        )


#: Transport errors after which the whole request had gone out: the service may have
#: applied it, and only its answer was lost (a read that timed out, a connection closed
#: before the answer came).
_SENT_ERRORS = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError)


def _maybe_applied(request: Request[Any], exc: Exception) -> str:
    """What a caller must know before sending again a write whose answer was lost: it may
    have been applied, and only a turn's idempotency key makes a second send harmless (a
    timed-out store sent again was stored twice, the error saying only "timed out")."""
    if request.method in ("GET", "HEAD") or not isinstance(exc, _SENT_ERRORS):
        return ""
    return (
        " (it may or may not have been applied: a turn sent again with its idempotency_key"
        " is stored once; read before sending any other write again, or it may be applied"
        " twice)"
    )


def unavailable(request: Request[Any], exc: Exception) -> HalldyllError:
    """The typed error for one of :data:`SEND_ERRORS`.

    A request httpx would not send is the caller's InvalidInput: a header value it refuses
    (its text is not repeated: it can quote a header whole), or a URL it cannot write (over
    65,536 characters, say). An answer that could not be read is a HalldyllError; no answer
    at all (refused, reset, timed out) is Unavailable. The text never repeats the API key.
    """
    named = _named(request)
    if isinstance(exc, httpx.LocalProtocolError):
        return InvalidInput(
            f"{named} was not sent: a header value is not valid (printable ASCII, no line breaks)"
        )
    if isinstance(exc, httpx.InvalidURL):
        # The reason ("URL too long", "Invalid port"), not the URL it goes on to quote.
        reason = str(exc).partition(":")[0] or "not a valid URL"
        return InvalidInput(f"{named} was not sent: {reason}", field="url")
    sent = _request_of(exc) if isinstance(exc, httpx.HTTPError) else None
    key = _key_of(sent)
    if isinstance(exc, httpx.ConnectError) and sent is not None:
        # Nothing took the connection: say where it went and what to check, which the
        # driver's "All connection attempts failed" does not.
        where = f"{sent.url.scheme}://{sent.url.netloc.decode('ascii', 'replace')}"
        return Unavailable(
            redact(
                f"{named} failed: nothing answers at {where} (is the service running, and "
                f"is this its URL?): {exc!r}",
                key,
            )
        )
    if isinstance(exc, httpx.TransportError):
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
        return Unavailable(redact(f"{named} {kind}{_maybe_applied(request, exc)}: {exc!r}", key))
    if isinstance(exc, httpx.DecodingError):
        return HalldyllError(f"{named}: the response could not be decoded ({exc!r})")
    return HalldyllError(redact(f"{named} failed: {type(exc).__name__}: {exc}", key))
