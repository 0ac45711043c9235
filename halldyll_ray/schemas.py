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

import re
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from halldyll_ray import validation
from halldyll_ray.errors import InvalidInput
from halldyll_ray.models import (
    MAX_KEY_NAME_CHARS,
    MAX_MESSAGES_PER_CALL,
    MAX_QUERY_CHARS,
    MAX_SEARCH_LIMIT,
    Id,
    Memory,
    MemoryType,
    Message,
    ModelKind,
    Role,
    SearchGroup,
    SearchMode,
    SearchResult,
    SearchView,
    SessionId,
    StoredMemory,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tags,
    in_utc_range,
    iso_time_only,
)

__all__ = [
    "ApiKeyCreate",
    "AppendMessagesRequest",
    "ContextRequest",
    "ErrorBody",
    "Grant",
    "GrantCreate",
    "IsoDateTime",
    "Items",
    "ListMemoriesRequest",
    "ModelCreate",
    "PrepareContextRequest",
    "QueryBool",
    "QueryInt",
    "SearchRequest",
    "SearchResponse",
    "StoreMemoriesRequest",
    "StoredMemories",
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


#: A time in a request: ISO 8601 only; naive means UTC (the engine's rule).
IsoDateTime = Annotated[datetime, BeforeValidator(iso_time_only), AfterValidator(in_utc_range)]


#: A whole number in a URL's query (``?limit=``): digits, a leading ``-`` at most.
_QUERY_WHOLE = re.compile(r"-?[0-9]+")


def _query_int(value: object) -> object:
    """Refuse the text pydantic's lax mode reads as an integer but is none: ``10.0``,
    ``1_0``, ``+5``, `` 5``. The same page size is refused as a number of a body, a Python
    argument or a GraphQL variable, where ``10.0`` is a float (and ``"10"`` a string)."""
    if isinstance(value, str) and not _QUERY_WHOLE.fullmatch(value):
        raise ValueError("Input should be a whole number in digits, e.g. 50")
    return value


def _query_bool(value: object) -> object:
    """Refuse what pydantic's lax mode reads as a bool beside ``true`` and ``false`` (``1``,
    ``no``, ``on``, ``Y``): JSON, GraphQL and Python take only those two."""
    if isinstance(value, str) and value not in ("true", "false"):
        raise ValueError("Input should be true or false")
    return value


#: An integer of a URL's query is ``-?[0-9]+``, a yes/no option ``true`` or ``false``:
#: ``Annotated[int, Query(ge=1, le=500), QueryInt]``. The check comes after the Query (an
#: ``Annotated`` of its own before it would flatten in front of it): FastAPI then writes the
#: bounds as OpenAPI's ``minimum`` and ``maximum``, not as unknown ``ge`` and ``le``.
QueryInt = BeforeValidator(_query_int)
QueryBool = BeforeValidator(_query_bool)


#: An AI model's name or id: 1-200 characters, not blank (registering one, the engine also
#: refuses control, format and unassigned characters; so does it in an email).
ModelName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"\S")]
EmailText = Annotated[str, Field(pattern=r"^[^@\s]{1,64}@[^@\s]{1,185}\.[^@\s]{2,63}$")]


class _Request(BaseModel):
    """A request body: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- users, keys, models
class UserCreate(_Request):
    """``POST /v1/users``."""

    username: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    email: EmailText | None = None
    role: Role = Role.USER


class UserUpdate(_Request):
    """``PATCH /v1/users/{user_id}``: None leaves a field as it is."""

    role: Role | None = None
    disabled: StrictBool | None = None
    email: EmailText | None = None


class ApiKeyCreate(_Request):
    """``POST /v1/users/{user_id}/keys``."""

    name: str = Field(default="", max_length=MAX_KEY_NAME_CHARS)
    expires_at: IsoDateTime | None = None


class ModelCreate(_Request):
    """``POST /v1/models``: register an AI model."""

    name: ModelName
    kind: ModelKind
    version: str | None = Field(default=None, max_length=100)
    metadata: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- memories
class ListMemoriesRequest(_Request):
    """``GET /v1/users/{user_id}/memories``: the query parameters, as the route reads them.

    On the wire ``types`` and ``tags`` are comma-separated; the engine bounds ``limit``.
    """

    types: list[str] | None = None
    model: str | None = None
    include_shared: StrictBool = True
    session_id: str | None = None
    tags: list[str] | None = None
    since: IsoDateTime | None = None
    until: IsoDateTime | None = None
    limit: StrictInt = 50
    cursor: str | None = None


class AppendMessagesRequest(_Request):
    """``POST /v1/users/{user_id}/memories/{memory_id}/messages``."""

    messages: list[Message] = Field(min_length=1, max_length=1000)


#: The most memories a bulk store body may hold: STORE_BATCH_MAX's upper bound (the engine
#: refuses more than the configured STORE_BATCH_MAX, 500 by default).
MAX_STORE_BATCH = 10_000


class StoreMemoriesRequest(_Request):
    """``POST /v1/users/{user_id}/memories/batch``: memories of any types, stored all or
    nothing (at most STORE_BATCH_MAX, 500 by default)."""

    memories: list[Memory] = Field(min_length=1, max_length=MAX_STORE_BATCH)


class StoredMemories(BaseModel):
    """The answer to a bulk store: the memories as stored, in the order sent."""

    memories: list[StoredMemory]


# --------------------------------------------------------------------------- search
class SearchRequest(_Request):
    """``POST /v1/users/{user_id}/search``."""

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    limit: StrictInt | None = Field(default=None, ge=1, le=MAX_SEARCH_LIMIT)
    mode: SearchMode | None = Field(
        default=None,
        description="hybrid, semantic or fulltext; the server's SEARCH_MODE "
        "(default hybrid) when absent.",
    )
    types: list[MemoryType] | None = None
    model: ModelName | None = None
    include_shared: StrictBool = True
    session_id: SessionId | None = None
    tags: Tags | None = None
    since: IsoDateTime | None = None
    until: IsoDateTime | None = None
    threshold: StrictFloat | None = Field(default=None, ge=-1, le=1)
    group: SearchGroup = Field(
        default=SearchGroup.PART,
        description="part: a result per matching message/segment/part (a conversation can "
        "answer with several turns); memory: a result per memory, its best part.",
    )
    view: SearchView | None = Field(
        default=None,
        description="full (when absent): each hit's memory as GET /memories/{id} returns it, "
        "without a conversation's messages; basic: without a transcription's text and "
        "segments either (the hit's matched part holds the segment that matched).",
    )


class SearchResponse(BaseModel):
    """The answer to a search: hits, best first."""

    results: list[SearchResult]


# --------------------------------------------------------------------------- context
class ContextRequest(_Request):
    """``POST /v1/users/{user_id}/context``."""

    query: str | None = Field(default=None, max_length=MAX_QUERY_CHARS)
    messages: list[Message] | None = Field(default=None, max_length=MAX_MESSAGES_PER_CALL)
    model: ModelName | None = None
    include_shared: StrictBool = True
    session_id: SessionId | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=MIN_CONTEXT_TOKENS, le=MAX_CONTEXT_TOKENS)


class PrepareContextRequest(_Request):
    """``POST /v1/users/{user_id}/sessions/{session_id}/prepare``: before an LLM call."""

    user_message: str = Field(min_length=1, max_length=MAX_TURN_CHARS)
    recent_turns: StrictInt = Field(default=6, ge=0, le=100)
    model: ModelName | None = None
    include_shared: StrictBool = Field(
        default=True,
        description="With `model`: also the memories shared by all the user's models.",
    )
    max_tokens: StrictInt | None = Field(default=None, ge=MIN_CONTEXT_TOKENS, le=MAX_CONTEXT_TOKENS)


class TurnRequest(_Request):
    """``POST /v1/users/{user_id}/sessions/{session_id}/turns``: after an LLM call."""

    user_message: str = Field(min_length=1, max_length=MAX_TURN_CHARS)
    assistant_message: str = Field(min_length=1, max_length=MAX_TURN_CHARS)
    model: ModelName | None = None
    user_name: str | None = Field(
        default=None, max_length=200, description="Who wrote the user message (indexed)."
    )
    assistant_name: str | None = Field(
        default=None, max_length=200, description="Who wrote the reply (indexed)."
    )
    idempotency_key: str | None = Field(
        default=None,
        pattern=r"^[!-~]{1,128}$",
        description="Send the same key when you retry a turn (say after a 503): it is stored "
        "once, and the retry gets the first attempt's record back (its facts, summary and jobs "
        "too) with replayed=true; if the first attempt failed after storing the messages, "
        "the retry extracts the facts it did not, and while it is still running the retry "
        "waits for it (up to 30 s, then a 409). The "
        "Idempotency-Key header does the same. A key names one request: sent again with "
        "other messages, names, another session or another AI model, or a header and body "
        "key that differ, it is a 422 and nothing is written.",
    )


class GrantCreate(_Request):
    """``POST /v1/users/{viewer_id}/grants``: let a Viewer read another user's memories."""

    owner_id: Id


class Grant(BaseModel):
    """A Viewer's read grant on an owner's memories."""

    viewer_id: UUID
    owner_id: UUID


# --------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code: invalid_input, not_found, ...")
    message: str = Field(description="What is wrong and, where possible, how to fix it.")
    request_id: str = Field(description="The request's id (X-Request-ID), also in the logs.")
    field: str | None = Field(
        default=None,
        description="invalid_input: the field at fault, a dotted path in the body (a memory's "
        "type first: fact.confidence) or a parameter's name.",
    )
    report: dict[str, Any] | None = Field(
        default=None,
        description="A refused atomic import only: its report (portability.ImportReport), "
        "with each bad line's number and problem.",
    )


class ErrorBody(BaseModel):
    """Every error the API answers, whatever its status."""

    error: ErrorDetail


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
    field = validation.error_location(first["loc"])
    message = validation.error_message(first)
    if not field:
        return InvalidInput(message)
    return InvalidInput(f"{field}: {message}", field=field)


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
