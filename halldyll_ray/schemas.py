"""The request and response bodies of the HTTP API, shared by every side of it.

One module describes each body once: the Ingress declares them as its FastAPI bodies, the
Ingress passes them across the hop to the Search, Ingestion and Context deployments (typed
methods, :mod:`halldyll_ray.serve.deployments`), the handle API builds them from its
arguments, and the Python client (:mod:`halldyll_ray.client`) builds its JSON bodies from them.
Nothing here imports Ray or FastAPI, so the client can import it on a machine without Ray.

The JSON wire format is the API's contract: field names, defaults, ``extra="forbid"`` and the
limits are those the README documents. Memory payloads and records are the models of
:mod:`halldyll_ray.models` (a stored memory, a search hit, a context block); this module holds
what wraps them on the wire.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from halldyll_ray.errors import InvalidInput
from halldyll_ray.models import (
    MAX_QUERY_CHARS,
    MAX_SEARCH_LIMIT,
    Memory,
    Message,
    ModelKind,
    Role,
    SearchMode,
    SearchResult,
)

__all__ = [
    "ApiKeyCreate",
    "AppendMessagesRequest",
    "ContextRequest",
    "Items",
    "ListMemoriesRequest",
    "ModelCreate",
    "PrepareContextRequest",
    "SearchRequest",
    "SearchResponse",
    "TurnRequest",
    "UserCreate",
    "UserUpdate",
    "invalid_input",
    "parse",
    "parse_memory",
]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

MAX_TURN_CHARS = 32_000  # one side of a turn (the user's message, the model's answer)
MIN_CONTEXT_TOKENS = 16
MAX_CONTEXT_TOKENS = 1_000_000


class _Request(BaseModel):
    """A request body: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- users, keys, models
class UserCreate(_Request):
    """``POST /v1/users``."""

    username: str
    email: str | None = None
    role: Role = Role.USER


class UserUpdate(_Request):
    """``PATCH /v1/users/{user_id}``: None leaves a field as it is."""

    role: Role | None = None
    disabled: bool | None = None
    email: str | None = None


class ApiKeyCreate(_Request):
    """``POST /v1/users/{user_id}/keys``."""

    name: str = ""
    expires_at: datetime | None = None


class ModelCreate(_Request):
    """``POST /v1/models``: register an AI model."""

    name: str
    kind: ModelKind
    version: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- memories
class ListMemoriesRequest(_Request):
    """``GET /v1/users/{user_id}/memories``: the query parameters, as the route reads them.

    On the wire ``types`` and ``tags`` are comma-separated; the engine bounds ``limit``.
    """

    types: list[str] | None = None
    model: str | None = None
    include_shared: bool = True
    session_id: str | None = None
    tags: list[str] | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50
    cursor: str | None = None


class AppendMessagesRequest(_Request):
    """``POST /v1/users/{user_id}/memories/{memory_id}/messages``."""

    messages: list[Message]


# --------------------------------------------------------------------------- search
class SearchRequest(_Request):
    """``POST /v1/users/{user_id}/search``."""

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    limit: int | None = Field(default=None, ge=1, le=MAX_SEARCH_LIMIT)
    mode: SearchMode = SearchMode.SEMANTIC
    types: list[str] | None = None
    model: str | None = None
    include_shared: bool = True
    session_id: str | None = None
    tags: list[str] | None = None
    since: datetime | None = None
    until: datetime | None = None
    threshold: float | None = Field(default=None, ge=-1, le=1)


class SearchResponse(BaseModel):
    """The answer to a search: hits, best first."""

    results: list[SearchResult]


# --------------------------------------------------------------------------- context
class ContextRequest(_Request):
    """``POST /v1/users/{user_id}/context``."""

    query: str | None = Field(default=None, max_length=MAX_QUERY_CHARS)
    messages: list[Message] | None = None
    model: str | None = None
    include_shared: bool = True
    session_id: str | None = None
    max_tokens: int | None = Field(default=None, ge=MIN_CONTEXT_TOKENS, le=MAX_CONTEXT_TOKENS)


class PrepareContextRequest(_Request):
    """``POST /v1/users/{user_id}/sessions/{session_id}/prepare``: before an LLM call."""

    user_message: str = Field(min_length=1, max_length=MAX_TURN_CHARS)
    recent_turns: int = Field(default=6, ge=0, le=100)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=MIN_CONTEXT_TOKENS, le=MAX_CONTEXT_TOKENS)


class TurnRequest(_Request):
    """``POST /v1/users/{user_id}/sessions/{session_id}/turns``: after an LLM call."""

    user_message: str = Field(min_length=1, max_length=MAX_TURN_CHARS)
    assistant_message: str = Field(min_length=1, max_length=MAX_TURN_CHARS)
    model: str | None = None


# --------------------------------------------------------------------------- lists
class Items(BaseModel, Generic[T]):
    """A list that does not page: ``{"items": [...]}`` (paged lists are ``models.Page``)."""

    items: list[T]


# --------------------------------------------------------------------------- validation
def invalid_input(exc: ValidationError) -> InvalidInput:
    """The product's error for a body that fails its schema: ``field: message`` of the first
    error, as the HTTP API words a bad body (HTTP 422). Unlike pydantic's error it is one of
    the product's exceptions, which the Ingress maps and which pickles with its fields."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(part) for part in first["loc"])
    if not field:
        return InvalidInput(str(first["msg"]))
    return InvalidInput(f"{field}: {first['msg']}", field=field)


def parse(model: type[M], value: object) -> M:
    """``value`` as ``model``, as pydantic validates it; a failure is :class:`InvalidInput`.

    An instance of ``model`` passes as it is (pydantic does not validate an instance again),
    a mapping of its fields is validated, anything else fails as pydantic fails it.
    """
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise invalid_input(exc) from None


_MEMORY: TypeAdapter[Memory] = TypeAdapter(Memory)


def parse_memory(value: object) -> Memory:
    """:func:`parse` for the body of ``POST .../memories``: one of the five memory types,
    chosen by its ``type``."""
    try:
        return _MEMORY.validate_python(value)
    except ValidationError as exc:
        raise invalid_input(exc) from None
