"""Typed Python clients for the HTTP API: :class:`AsyncHalldyllClient` and :class:`HalldyllClient`.

Both clients share one description of every call: :class:`_Endpoints` builds the request
(method, path, JSON body, query parameters) and names the parser that turns the response into
the typed model of :mod:`halldyll_ray.models`. The two classes only differ in how they send it
(``httpx.AsyncClient`` or ``httpx.Client``), so a route changes in one place.

Errors come back as the product's own exceptions: the server's error body
``{"error": {"code", "message", "request_id"}}`` becomes the matching
:class:`~halldyll_ray.errors.HalldyllError` subclass, with ``request_id`` and ``status_code``
as fields (and attributes); a connection failure or timeout becomes
:class:`~halldyll_ray.errors.Unavailable`.

Example::

    async with AsyncHalldyllClient("http://127.0.0.1:8000", api_key) as client:
        await client.store_memory(Fact(statement="Ada prefers tea"))
        hits = await client.search("what does Ada drink?")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Self, TypeVar
from urllib.parse import quote
from uuid import UUID

import httpx
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

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
)
from halldyll_ray.models import (
    AIModel,
    ApiKey,
    Context,
    Conversation,
    Fact,
    Image,
    MemoryType,
    MemoryUpdate,
    Message,
    ModelKind,
    NewApiKey,
    Page,
    Role,
    SearchMode,
    SearchResult,
    StoredMemory,
    StoredMessage,
    Summary,
    Transcription,
    TurnRecord,
    User,
)
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

__all__ = ["AsyncHalldyllClient", "HalldyllClient", "MemoryInput"]

T = TypeVar("T")
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
# For error responses that do not carry the error shape (a proxy's 502, an unknown route).
_BY_STATUS: dict[int, type[HalldyllError]] = {
    400: InvalidInput,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: InvalidInput,
    422: InvalidInput,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


# --------------------------------------------------------------------------- responses
def _error_from(response: httpx.Response) -> HalldyllError:
    """The typed exception for an error response."""
    status = response.status_code
    request_id = response.headers.get("x-request-id")
    code = message = None
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        request_id = error.get("request_id") or request_id
    cls = _ERRORS.get(code, HalldyllError) if isinstance(code, str) else None
    if cls is None:
        cls = _BY_STATUS.get(status, HalldyllError)
    if not isinstance(message, str) or not message:
        message = f"HTTP {status}: {response.text[:500] or response.reason_phrase}"
    fields: dict[str, Any] = {"request_id": request_id, "status_code": status}
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
        return model.model_validate(body if key is None else body[key])

    return parse


def _many(model: type[M], key: str = "items") -> Callable[[httpx.Response], list[M]]:
    def parse(response: httpx.Response) -> list[M]:
        return [model.model_validate(item) for item in _json(response)[key]]

    return parse


def _new_key(response: httpx.Response) -> NewApiKey:
    body = dict(_json(response))
    key = body.pop("key")
    return NewApiKey(key=key, api_key=ApiKey.model_validate(body))


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
class _Request(Generic[T]):
    """One HTTP call, independent of how it is sent."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: dict[str, str] | None = None

    def finish(self, response: httpx.Response) -> T:
        try:
            return self.parse(response)
        except HalldyllError:
            raise
        except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not the expected shape
            raise HalldyllError(
                f"unexpected response to {self.method} {self.path}: {exc}",
                request_id=response.headers.get("x-request-id"),
                status_code=response.status_code,
            ) from exc


def _seg(value: Id, field: str) -> str:
    """A path segment: percent-encoded, never empty (an empty one would change the route)."""
    text = str(value)
    if not text:
        raise InvalidInput(f"{field} must not be empty", field=field)
    return quote(text, safe="")


def _user(user_id: Id) -> str:
    return f"/v1/users/{_seg(user_id, 'user_id')}"


def _unchecked(schema: type[M], /, **values: Any) -> M:
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


def _body(value: BaseModel | Mapping[str, Any]) -> Any:
    """The JSON body: unset options (None) are left out, so the server's defaults apply."""
    if isinstance(value, BaseModel):
        # warnings=False: an unchecked body may hold what its field type does not (a tuple
        # for a list, a plain string for an enum); it is written as JSON all the same.
        return value.model_dump(mode="json", exclude_none=True, warnings=False)
    return to_jsonable_python(dict(value))


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
    return params


def _memories(user_id: Id, memory_id: Id | None = None) -> str:
    path = f"{_user(user_id)}/memories"
    return path if memory_id is None else f"{path}/{_seg(memory_id, 'memory_id')}"


def _session(user_id: Id, session_id: str) -> str:
    return f"{_user(user_id)}/sessions/{_seg(session_id, 'session_id')}"


class _Endpoints:
    """Every route of ``halldyll_ray.serve.ingress``: how to call it and how to read the answer.

    Bodies are the models of :mod:`halldyll_ray.schemas`, the ones the server reads. Past the
    first argument every parameter is keyword-only: ids and strings swapped by position would
    still be well-typed.
    """

    @staticmethod
    def healthz() -> _Request[dict[str, Any]]:
        return _Request("GET", "/healthz", _health)

    @staticmethod
    def readyz() -> _Request[dict[str, Any]]:
        return _Request("GET", "/readyz", _readiness)

    @staticmethod
    def me() -> _Request[User]:
        return _Request("GET", "/v1/me", _one(User))

    @staticmethod
    def create_user(request: UserCreate) -> _Request[User]:
        return _Request("POST", "/v1/users", _one(User), json=_body(request))

    @staticmethod
    def list_users(*, limit: int, cursor: str | None) -> _Request[Page[User]]:
        params = _params({"limit": limit, "cursor": cursor})
        return _Request("GET", "/v1/users", _one(Page[User]), params=params)

    @staticmethod
    def get_user(user_id: Id) -> _Request[User]:
        return _Request("GET", _user(user_id), _one(User))

    @staticmethod
    def update_user(user_id: Id, *, request: UserUpdate) -> _Request[User]:
        return _Request("PATCH", _user(user_id), _one(User), json=_body(request))

    @staticmethod
    def delete_user(user_id: Id) -> _Request[None]:
        return _Request("DELETE", _user(user_id), _nothing)

    @staticmethod
    def create_api_key(user_id: Id, *, request: ApiKeyCreate) -> _Request[NewApiKey]:
        return _Request("POST", f"{_user(user_id)}/keys", _new_key, json=_body(request))

    @staticmethod
    def list_api_keys(user_id: Id) -> _Request[list[ApiKey]]:
        return _Request("GET", f"{_user(user_id)}/keys", _many(ApiKey))

    @staticmethod
    def rotate_api_key(key_id: Id) -> _Request[NewApiKey]:
        return _Request("POST", f"/v1/keys/{_seg(key_id, 'key_id')}/rotate", _new_key)

    @staticmethod
    def revoke_api_key(key_id: Id) -> _Request[ApiKey]:
        return _Request("DELETE", f"/v1/keys/{_seg(key_id, 'key_id')}", _one(ApiKey))

    @staticmethod
    def register_model(request: ModelCreate) -> _Request[AIModel]:
        return _Request("POST", "/v1/models", _one(AIModel), json=_body(request))

    @staticmethod
    def list_models(kind: ModelKind | str | None) -> _Request[list[AIModel]]:
        return _Request("GET", "/v1/models", _many(AIModel), params=_params({"kind": kind}))

    @staticmethod
    def get_model(ref: Id) -> _Request[AIModel]:
        return _Request("GET", f"/v1/models/{_seg(ref, 'model')}", _one(AIModel))

    @staticmethod
    def delete_model(ref: Id) -> _Request[None]:
        return _Request("DELETE", f"/v1/models/{_seg(ref, 'model')}", _nothing)

    @staticmethod
    def store_memory(memory: MemoryInput, *, user_id: Id) -> _Request[StoredMemory]:
        return _Request("POST", _memories(user_id), _one(StoredMemory), json=_body(memory))

    @staticmethod
    def get_memory(memory_id: Id, *, user_id: Id) -> _Request[StoredMemory]:
        return _Request("GET", _memories(user_id, memory_id), _one(StoredMemory))

    @staticmethod
    def list_memories(request: ListMemoriesRequest, *, user_id: Id) -> _Request[Page[StoredMemory]]:
        # Query parameters, not a body: the fields as given, lists joined by commas.
        params = _params(dict(request))
        return _Request("GET", _memories(user_id), _one(Page[StoredMemory]), params=params)

    @staticmethod
    def update_memory(
        memory_id: Id, *, update: MemoryUpdate | Mapping[str, Any], user_id: Id
    ) -> _Request[StoredMemory]:
        path = _memories(user_id, memory_id)
        return _Request("PATCH", path, _one(StoredMemory), json=_body(update))

    @staticmethod
    def delete_memory(memory_id: Id, *, user_id: Id) -> _Request[None]:
        return _Request("DELETE", _memories(user_id, memory_id), _nothing)

    @staticmethod
    def append_messages(
        conversation_id: Id, *, request: AppendMessagesRequest, user_id: Id
    ) -> _Request[list[StoredMessage]]:
        path = f"{_memories(user_id, conversation_id)}/messages"
        return _Request("POST", path, _many(StoredMessage), json=_body(request))

    @staticmethod
    def search(request: SearchRequest, *, user_id: Id) -> _Request[list[SearchResult]]:
        path = f"{_user(user_id)}/search"
        return _Request("POST", path, _many(SearchResult, "results"), json=_body(request))

    @staticmethod
    def build_context(request: ContextRequest, *, user_id: Id) -> _Request[Context]:
        path = f"{_user(user_id)}/context"
        return _Request("POST", path, _one(Context), json=_body(request))

    @staticmethod
    def prepare_context(
        request: PrepareContextRequest, *, session_id: str, user_id: Id
    ) -> _Request[Context]:
        path = f"{_session(user_id, session_id)}/prepare"
        return _Request("POST", path, _one(Context), json=_body(request))

    @staticmethod
    def record_turn(request: TurnRequest, *, session_id: str, user_id: Id) -> _Request[TurnRecord]:
        path = f"{_session(user_id, session_id)}/turns"
        return _Request("POST", path, _one(TurnRecord), json=_body(request))

    @staticmethod
    def list_audit(
        *,
        user_id: Id | None,
        operation: str | None,
        outcome: str | None,
        before_id: int | None,
        limit: int,
    ) -> _Request[list[dict[str, Any]]]:
        params = _params(
            {
                "user_id": user_id,
                "operation": operation,
                "outcome": outcome,
                "before_id": before_id,
                "limit": limit,
            }
        )
        return _Request("GET", "/v1/audit", _audit, params=params)


def _client_options(base_url: str, api_key: str, timeout: float) -> dict[str, Any]:
    return {
        "base_url": base_url,
        "timeout": timeout,
        "headers": {
            "Authorization": f"Bearer {api_key}",
            "User-Agent": f"halldyll-ray-client/{__version__}",
            "Accept": "application/json",
        },
    }


def _unavailable(request: _Request[Any], exc: httpx.TransportError) -> Unavailable:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return Unavailable(f"{request.method} {request.path} {kind}: {exc!r}")


# --------------------------------------------------------------------------- async client
class AsyncHalldyllClient:
    """Asynchronous client for the halldyll-ray HTTP API.

    Every method authenticates with the API key given here and acts as its user; ``user_id``
    defaults to ``"me"`` (that user). Errors are raised as
    :class:`~halldyll_ray.errors.HalldyllError` subclasses.

    Args:
        base_url: Root URL of the service, e.g. ``http://127.0.0.1:8000`` (a path prefix is
            kept).
        api_key: The API key sent as ``Authorization: Bearer``.
        timeout: Seconds to wait for each request (connect, read, write, pool).
        transport: An httpx transport to send requests through (tests, proxies, retries).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            transport=transport, **_client_options(base_url, api_key, timeout)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool; the client cannot be used afterwards."""
        await self._http.aclose()

    async def _send(self, request: _Request[T]) -> T:
        try:
            response = await self._http.request(
                request.method, request.path, json=request.json, params=request.params
            )
        except httpx.TransportError as exc:
            raise _unavailable(request, exc) from exc
        return request.finish(response)

    # ----------------------------------------------------------------------- health
    async def healthz(self) -> dict[str, Any]:
        """Liveness: the service process answers.

        Returns:
            ``{"status": "ok"}``.
        """
        return await self._send(_Endpoints.healthz())

    async def readyz(self) -> dict[str, Any]:
        """Readiness per dependency (PostgreSQL, Redis, the embedding model).

        Returns:
            The report; ``report["ok"]`` is False (rather than an exception) when a dependency
            is down and the service answered 503 with its report.
        """
        return await self._send(_Endpoints.readyz())

    # ----------------------------------------------------------------------- users
    async def me(self) -> User:
        """The user the API key belongs to."""
        return await self._send(_Endpoints.me())

    async def create_user(
        self, username: str, email: str | None = None, *, role: Role | str = Role.USER
    ) -> User:
        """Create a user (Admin only).

        Args:
            username: Unique user name.
            email: Optional e-mail address.
            role: ``admin``, ``user``, ``service`` or ``viewer``.

        Raises:
            Conflict: The username is taken.
            PermissionDenied: The caller is not an Admin.
        """
        return await self._send(
            _Endpoints.create_user(
                _unchecked(UserCreate, username=username, email=email, role=role)
            )
        )

    async def list_users(self, *, limit: int = 100, cursor: str | None = None) -> Page[User]:
        """One page of users (Admin only), oldest first.

        Args:
            limit: Page size.
            cursor: ``next_cursor`` of the previous page.
        """
        return await self._send(_Endpoints.list_users(limit=limit, cursor=cursor))

    async def get_user(self, user_id: Id) -> User:
        """A user by id (``"me"`` for the caller)."""
        return await self._send(_Endpoints.get_user(user_id))

    async def update_user(
        self,
        user_id: Id,
        *,
        role: Role | str | None = None,
        disabled: bool | None = None,
        email: str | None = None,
    ) -> User:
        """Change a user's role, disabled flag or e-mail (Admin only); None leaves a field.

        Args:
            user_id: The user's id.
            role: The new role.
            disabled: True blocks every key of the user.
            email: The new e-mail address.
        """
        return await self._send(
            _Endpoints.update_user(
                user_id,
                request=_unchecked(UserUpdate, role=role, disabled=disabled, email=email),
            )
        )

    async def delete_user(self, user_id: Id) -> None:
        """Delete a user and every memory they own (Admin only)."""
        await self._send(_Endpoints.delete_user(user_id))

    # ----------------------------------------------------------------------- API keys
    async def create_api_key(
        self, user_id: Id = "me", *, name: str = "", expires_at: datetime | None = None
    ) -> NewApiKey:
        """Create an API key; ``NewApiKey.key`` is the only time the secret is visible.

        Args:
            user_id: Whose key (``"me"``, or any user for an Admin).
            name: A label.
            expires_at: When the key stops working; None: never.
        """
        return await self._send(
            _Endpoints.create_api_key(
                user_id, request=_unchecked(ApiKeyCreate, name=name, expires_at=expires_at)
            )
        )

    async def list_api_keys(self, user_id: Id = "me") -> list[ApiKey]:
        """The public records of a user's keys (no secrets)."""
        return await self._send(_Endpoints.list_api_keys(user_id))

    async def rotate_api_key(self, key_id: Id) -> NewApiKey:
        """Replace a key by a new one with the same user and name; the old one is revoked."""
        return await self._send(_Endpoints.rotate_api_key(key_id))

    async def revoke_api_key(self, key_id: Id) -> ApiKey:
        """Revoke a key at once.

        Returns:
            The key's record, with ``revoked_at`` set.
        """
        return await self._send(_Endpoints.revoke_api_key(key_id))

    # ----------------------------------------------------------------------- AI models
    async def register_model(
        self,
        name: str,
        kind: ModelKind | str,
        *,
        version: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AIModel:
        """Register an AI model that memories can be scoped to (Admin only).

        Args:
            name: Unique name, e.g. ``Qwen2.5-14B-Instruct``.
            kind: Specialty: ``llm``, ``vision-language``, ``image-generation``...
            version: Optional version string.
            metadata: Free-form JSON metadata.
        """
        return await self._send(
            _Endpoints.register_model(
                _unchecked(ModelCreate, name=name, kind=kind, version=version, metadata=metadata)
            )
        )

    async def list_models(self, kind: ModelKind | str | None = None) -> list[AIModel]:
        """Registered models, optionally of one kind."""
        return await self._send(_Endpoints.list_models(kind))

    async def get_model(self, ref: Id) -> AIModel:
        """A registered model by id or name."""
        return await self._send(_Endpoints.get_model(ref))

    async def delete_model(self, ref: Id) -> None:
        """Remove a model from the registry (Admin only).

        Raises:
            Conflict: Memories are still scoped to the model.
        """
        await self._send(_Endpoints.delete_model(ref))

    # ----------------------------------------------------------------------- memories
    async def store_memory(self, memory: MemoryInput, *, user_id: Id = "me") -> StoredMemory:
        """Store a conversation, fact, image, transcription or summary.

        Args:
            memory: A memory model (``Fact(...)``...) or its JSON form with a ``type`` key.
            user_id: Whose memory (``"me"``; another user for an Admin or a Service).

        Returns:
            The stored memory; a fact stored again comes back reinforced, not duplicated.
        """
        return await self._send(_Endpoints.store_memory(memory, user_id=user_id))

    async def get_memory(self, memory_id: Id, *, user_id: Id = "me") -> StoredMemory:
        """One memory, with a conversation's messages."""
        return await self._send(_Endpoints.get_memory(memory_id, user_id=user_id))

    async def list_memories(
        self,
        *,
        user_id: Id = "me",
        types: Sequence[MemoryType | str] | None = None,
        model: str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[StoredMemory]:
        """One page of a user's memories, newest first.

        Args:
            user_id: Whose memories.
            types: Only these memory types.
            model: Only memories of this registered model (name or id)...
            include_shared: ...plus the memories shared by all models.
            session_id: Only this session's memories.
            tags: Only memories with these tags.
            since: Created at or after this time.
            until: Created before this time.
            limit: Page size.
            cursor: ``next_cursor`` of the previous page.
        """
        return await self._send(
            _Endpoints.list_memories(
                _unchecked(
                    ListMemoriesRequest,
                    types=types,
                    model=model,
                    include_shared=include_shared,
                    session_id=session_id,
                    tags=tags,
                    since=since,
                    until=until,
                    limit=limit,
                    cursor=cursor,
                ),
                user_id=user_id,
            )
        )

    async def update_memory(
        self, memory_id: Id, update: MemoryUpdate | Mapping[str, Any], *, user_id: Id = "me"
    ) -> StoredMemory:
        """Change a memory's tags, metadata, importance or text; None leaves a field.

        Args:
            memory_id: The memory's id.
            update: The changes.
            user_id: Whose memory.
        """
        return await self._send(_Endpoints.update_memory(memory_id, update=update, user_id=user_id))

    async def delete_memory(self, memory_id: Id, *, user_id: Id = "me") -> None:
        """Delete a memory."""
        await self._send(_Endpoints.delete_memory(memory_id, user_id=user_id))

    async def append_messages(
        self,
        conversation_id: Id,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        user_id: Id = "me",
    ) -> list[StoredMessage]:
        """Append messages to a stored conversation.

        Returns:
            The messages with their sequence numbers.
        """
        return await self._send(
            _Endpoints.append_messages(
                conversation_id,
                request=_unchecked(AppendMessagesRequest, messages=messages),
                user_id=user_id,
            )
        )

    # ----------------------------------------------------------------------- search, context
    async def search(
        self,
        query: str,
        *,
        user_id: Id = "me",
        limit: int | None = None,
        mode: SearchMode | str = SearchMode.SEMANTIC,
        types: Sequence[MemoryType | str] | None = None,
        model: str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        threshold: float | None = None,
    ) -> list[SearchResult]:
        """The memories most relevant to a query, best first.

        Args:
            query: What to look for.
            user_id: Whose memories.
            limit: How many results (the server's ``SEARCH_TOP_K`` when None).
            mode: ``semantic`` (full-text fallback), ``hybrid`` or ``fulltext``.
            types: Only these memory types.
            model: This registered model's memories...
            include_shared: ...plus the shared ones.
            session_id: Only this session.
            tags: Only memories with these tags.
            since: Created at or after this time.
            until: Created before this time.
            threshold: Minimum cosine similarity (the server's default when None).
        """
        return await self._send(
            _Endpoints.search(
                _unchecked(
                    SearchRequest,
                    query=query,
                    limit=limit,
                    mode=mode,
                    types=types,
                    model=model,
                    include_shared=include_shared,
                    session_id=session_id,
                    tags=tags,
                    since=since,
                    until=until,
                    threshold=threshold,
                ),
                user_id=user_id,
            )
        )

    async def build_context(
        self,
        query: str | None = None,
        *,
        user_id: Id = "me",
        messages: Sequence[Message | Mapping[str, Any]] | None = None,
        model: str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        max_tokens: int | None = None,
    ) -> Context:
        """A prompt context block under a token budget, with its sources.

        Args:
            query: What the next prompt is about; defaults to the messages' text.
            user_id: Whose memories.
            messages: The current conversation's recent turns.
            model: This registered model's memories...
            include_shared: ...plus the shared ones.
            session_id: The session the prompt belongs to.
            max_tokens: Budget (the server's ``MAX_CONTEXT_TOKENS`` when None).
        """
        return await self._send(
            _Endpoints.build_context(
                _unchecked(
                    ContextRequest,
                    query=query,
                    messages=messages,
                    model=model,
                    include_shared=include_shared,
                    session_id=session_id,
                    max_tokens=max_tokens,
                ),
                user_id=user_id,
            )
        )

    async def prepare_context(
        self,
        session_id: str,
        user_message: str,
        *,
        user_id: Id = "me",
        recent_turns: int = 6,
        model: str | None = None,
        max_tokens: int | None = None,
    ) -> Context:
        """Before an LLM call: summary, relevant memories, recent turns and the message.

        Args:
            session_id: The chat session.
            user_message: The message about to be sent to the model.
            user_id: Whose session.
            recent_turns: How many past turns to include verbatim.
            model: This registered model's memories plus the shared ones.
            max_tokens: Budget (the server's ``MAX_CONTEXT_TOKENS`` when None).
        """
        return await self._send(
            _Endpoints.prepare_context(
                _unchecked(
                    PrepareContextRequest,
                    user_message=user_message,
                    recent_turns=recent_turns,
                    model=model,
                    max_tokens=max_tokens,
                ),
                session_id=session_id,
                user_id=user_id,
            )
        )

    async def record_turn(
        self,
        session_id: str,
        user_message: str,
        assistant_message: str,
        *,
        user_id: Id = "me",
        model: str | None = None,
    ) -> TurnRecord:
        """After an LLM call: store the exchange in the session's conversation.

        Args:
            session_id: The chat session.
            user_message: What the user said.
            assistant_message: What the model answered.
            user_id: Whose session.
            model: The registered model that answered.
        """
        return await self._send(
            _Endpoints.record_turn(
                _unchecked(
                    TurnRequest,
                    user_message=user_message,
                    assistant_message=assistant_message,
                    model=model,
                ),
                session_id=session_id,
                user_id=user_id,
            )
        )

    # ----------------------------------------------------------------------- audit
    async def list_audit(
        self,
        *,
        user_id: Id | None = None,
        operation: str | None = None,
        outcome: str | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Audit rows, newest first (Admin only).

        Args:
            user_id: Only rows acting on this user.
            operation: Only this operation, e.g. ``memory.store``.
            outcome: ``ok``, ``denied`` or ``error``.
            before_id: Rows older than this row id (to page back).
            limit: How many rows.
        """
        return await self._send(
            _Endpoints.list_audit(
                user_id=user_id,
                operation=operation,
                outcome=outcome,
                before_id=before_id,
                limit=limit,
            )
        )


# --------------------------------------------------------------------------- sync client
class HalldyllClient:
    """Synchronous client for the halldyll-ray HTTP API.

    The same methods, arguments and errors as :class:`AsyncHalldyllClient`, without ``await``.

    Args:
        base_url: Root URL of the service, e.g. ``http://127.0.0.1:8000``.
        api_key: The API key sent as ``Authorization: Bearer``.
        timeout: Seconds to wait for each request.
        transport: An httpx transport to send requests through.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            transport=transport, **_client_options(base_url, api_key, timeout)
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool; the client cannot be used afterwards."""
        self._http.close()

    def _send(self, request: _Request[T]) -> T:
        try:
            response = self._http.request(
                request.method, request.path, json=request.json, params=request.params
            )
        except httpx.TransportError as exc:
            raise _unavailable(request, exc) from exc
        return request.finish(response)

    def healthz(self) -> dict[str, Any]:
        """Liveness; see :meth:`AsyncHalldyllClient.healthz`."""
        return self._send(_Endpoints.healthz())

    def readyz(self) -> dict[str, Any]:
        """Readiness per dependency; see :meth:`AsyncHalldyllClient.readyz`."""
        return self._send(_Endpoints.readyz())

    def me(self) -> User:
        """The user the API key belongs to."""
        return self._send(_Endpoints.me())

    def create_user(
        self, username: str, email: str | None = None, *, role: Role | str = Role.USER
    ) -> User:
        """Create a user; see :meth:`AsyncHalldyllClient.create_user`."""
        return self._send(
            _Endpoints.create_user(
                _unchecked(UserCreate, username=username, email=email, role=role)
            )
        )

    def list_users(self, *, limit: int = 100, cursor: str | None = None) -> Page[User]:
        """One page of users; see :meth:`AsyncHalldyllClient.list_users`."""
        return self._send(_Endpoints.list_users(limit=limit, cursor=cursor))

    def get_user(self, user_id: Id) -> User:
        """A user by id (``"me"`` for the caller)."""
        return self._send(_Endpoints.get_user(user_id))

    def update_user(
        self,
        user_id: Id,
        *,
        role: Role | str | None = None,
        disabled: bool | None = None,
        email: str | None = None,
    ) -> User:
        """Change a user; see :meth:`AsyncHalldyllClient.update_user`."""
        return self._send(
            _Endpoints.update_user(
                user_id,
                request=_unchecked(UserUpdate, role=role, disabled=disabled, email=email),
            )
        )

    def delete_user(self, user_id: Id) -> None:
        """Delete a user and every memory they own (Admin only)."""
        self._send(_Endpoints.delete_user(user_id))

    def create_api_key(
        self, user_id: Id = "me", *, name: str = "", expires_at: datetime | None = None
    ) -> NewApiKey:
        """Create an API key; see :meth:`AsyncHalldyllClient.create_api_key`."""
        return self._send(
            _Endpoints.create_api_key(
                user_id, request=_unchecked(ApiKeyCreate, name=name, expires_at=expires_at)
            )
        )

    def list_api_keys(self, user_id: Id = "me") -> list[ApiKey]:
        """The public records of a user's keys (no secrets)."""
        return self._send(_Endpoints.list_api_keys(user_id))

    def rotate_api_key(self, key_id: Id) -> NewApiKey:
        """Replace a key by a new one; the old one is revoked."""
        return self._send(_Endpoints.rotate_api_key(key_id))

    def revoke_api_key(self, key_id: Id) -> ApiKey:
        """Revoke a key at once; returns its record with ``revoked_at`` set."""
        return self._send(_Endpoints.revoke_api_key(key_id))

    def register_model(
        self,
        name: str,
        kind: ModelKind | str,
        *,
        version: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AIModel:
        """Register an AI model; see :meth:`AsyncHalldyllClient.register_model`."""
        return self._send(
            _Endpoints.register_model(
                _unchecked(ModelCreate, name=name, kind=kind, version=version, metadata=metadata)
            )
        )

    def list_models(self, kind: ModelKind | str | None = None) -> list[AIModel]:
        """Registered models, optionally of one kind."""
        return self._send(_Endpoints.list_models(kind))

    def get_model(self, ref: Id) -> AIModel:
        """A registered model by id or name."""
        return self._send(_Endpoints.get_model(ref))

    def delete_model(self, ref: Id) -> None:
        """Remove a model from the registry; see :meth:`AsyncHalldyllClient.delete_model`."""
        self._send(_Endpoints.delete_model(ref))

    def store_memory(self, memory: MemoryInput, *, user_id: Id = "me") -> StoredMemory:
        """Store a memory; see :meth:`AsyncHalldyllClient.store_memory`."""
        return self._send(_Endpoints.store_memory(memory, user_id=user_id))

    def get_memory(self, memory_id: Id, *, user_id: Id = "me") -> StoredMemory:
        """One memory, with a conversation's messages."""
        return self._send(_Endpoints.get_memory(memory_id, user_id=user_id))

    def list_memories(
        self,
        *,
        user_id: Id = "me",
        types: Sequence[MemoryType | str] | None = None,
        model: str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[StoredMemory]:
        """One page of memories; see :meth:`AsyncHalldyllClient.list_memories`."""
        return self._send(
            _Endpoints.list_memories(
                _unchecked(
                    ListMemoriesRequest,
                    types=types,
                    model=model,
                    include_shared=include_shared,
                    session_id=session_id,
                    tags=tags,
                    since=since,
                    until=until,
                    limit=limit,
                    cursor=cursor,
                ),
                user_id=user_id,
            )
        )

    def update_memory(
        self, memory_id: Id, update: MemoryUpdate | Mapping[str, Any], *, user_id: Id = "me"
    ) -> StoredMemory:
        """Change a memory; see :meth:`AsyncHalldyllClient.update_memory`."""
        return self._send(_Endpoints.update_memory(memory_id, update=update, user_id=user_id))

    def delete_memory(self, memory_id: Id, *, user_id: Id = "me") -> None:
        """Delete a memory."""
        self._send(_Endpoints.delete_memory(memory_id, user_id=user_id))

    def append_messages(
        self,
        conversation_id: Id,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        user_id: Id = "me",
    ) -> list[StoredMessage]:
        """Append messages to a conversation; see :meth:`AsyncHalldyllClient.append_messages`."""
        return self._send(
            _Endpoints.append_messages(
                conversation_id,
                request=_unchecked(AppendMessagesRequest, messages=messages),
                user_id=user_id,
            )
        )

    def search(
        self,
        query: str,
        *,
        user_id: Id = "me",
        limit: int | None = None,
        mode: SearchMode | str = SearchMode.SEMANTIC,
        types: Sequence[MemoryType | str] | None = None,
        model: str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        threshold: float | None = None,
    ) -> list[SearchResult]:
        """The most relevant memories; see :meth:`AsyncHalldyllClient.search`."""
        return self._send(
            _Endpoints.search(
                _unchecked(
                    SearchRequest,
                    query=query,
                    limit=limit,
                    mode=mode,
                    types=types,
                    model=model,
                    include_shared=include_shared,
                    session_id=session_id,
                    tags=tags,
                    since=since,
                    until=until,
                    threshold=threshold,
                ),
                user_id=user_id,
            )
        )

    def build_context(
        self,
        query: str | None = None,
        *,
        user_id: Id = "me",
        messages: Sequence[Message | Mapping[str, Any]] | None = None,
        model: str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        max_tokens: int | None = None,
    ) -> Context:
        """A prompt context block; see :meth:`AsyncHalldyllClient.build_context`."""
        return self._send(
            _Endpoints.build_context(
                _unchecked(
                    ContextRequest,
                    query=query,
                    messages=messages,
                    model=model,
                    include_shared=include_shared,
                    session_id=session_id,
                    max_tokens=max_tokens,
                ),
                user_id=user_id,
            )
        )

    def prepare_context(
        self,
        session_id: str,
        user_message: str,
        *,
        user_id: Id = "me",
        recent_turns: int = 6,
        model: str | None = None,
        max_tokens: int | None = None,
    ) -> Context:
        """Before an LLM call; see :meth:`AsyncHalldyllClient.prepare_context`."""
        return self._send(
            _Endpoints.prepare_context(
                _unchecked(
                    PrepareContextRequest,
                    user_message=user_message,
                    recent_turns=recent_turns,
                    model=model,
                    max_tokens=max_tokens,
                ),
                session_id=session_id,
                user_id=user_id,
            )
        )

    def record_turn(
        self,
        session_id: str,
        user_message: str,
        assistant_message: str,
        *,
        user_id: Id = "me",
        model: str | None = None,
    ) -> TurnRecord:
        """After an LLM call; see :meth:`AsyncHalldyllClient.record_turn`."""
        return self._send(
            _Endpoints.record_turn(
                _unchecked(
                    TurnRequest,
                    user_message=user_message,
                    assistant_message=assistant_message,
                    model=model,
                ),
                session_id=session_id,
                user_id=user_id,
            )
        )

    def list_audit(
        self,
        *,
        user_id: Id | None = None,
        operation: str | None = None,
        outcome: str | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Audit rows, newest first; see :meth:`AsyncHalldyllClient.list_audit`."""
        return self._send(
            _Endpoints.list_audit(
                user_id=user_id,
                operation=operation,
                outcome=outcome,
                before_id=before_id,
                limit=limit,
            )
        )
