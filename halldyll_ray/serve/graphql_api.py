"""GraphQL at ``/graphql`` on the Ingress (strawberry): queries, mutations, and subscriptions
over WebSocket to a user's memory changes.

One more door into the same rooms:

- **Queries and mutations are REST calls.** Each resolver calls the HTTP API in process
  (:class:`~halldyll_ray.serve.loopback.Loopback`) with the caller's API key and the request's
  id: the same routes, permission matrix, validation, error mapping and audit rows.
- **Authentication.** An HTTP request is checked as ``GET /v1/me`` first: a missing or bad
  key gets the REST API's 401, not a GraphQL error. A WebSocket brings its key in the
  ``Authorization`` header of the handshake or in the ``connection_init`` payload
  (``{"Authorization": "Bearer <key>"}``, what browser clients can send); without a valid
  one the socket is closed with 4403 (``graphql-transport-ws`` and the legacy ``graphql-ws``).
- **One operation.** A document of several operations needs ``operationName``, and a
  subscription needs the WebSocket: otherwise 400 over HTTP, and nothing runs.
- **Subscriptions** (``memoryEvents``) ride the change feed (``GET /v1/users/{id}/events``):
  the same permission check (``memory.read``, audited), rechecked every 30 s with the key,
  and ``after`` resumes as ``Last-Event-ID`` does.
- **Limits.** Depth (:data:`MAX_DEPTH`), aliases (:data:`MAX_ALIASES`), tokens
  (:data:`MAX_TOKENS`) and fields with fragments written out (:data:`MAX_SELECTIONS`) are
  checked before execution, and every list is bounded by the REST
  limits it calls (500 memories a page, 100 search results): a deep or wide query gets an
  error naming the limit, not a slow server. No GraphQL IDE is served (it loads from a CDN).

The schema is published as ``docs/schema.graphql`` (``scripts/publish_schemas.py`` writes it;
a unit test keeps it current).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from datetime import datetime
from typing import Annotated, Any, TypeVar, cast

import strawberry
from cross_web import HTTPException
from fastapi import FastAPI
from graphql import (
    ArgumentNode,
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    ListValueNode,
    Node,
    OperationDefinitionNode,
    SelectionSetNode,
    VariableDefinitionNode,
    VariableNode,
)
from starlette.requests import HTTPConnection, Request
from starlette.types import Receive, Scope, Send
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError, MissingQueryError
from strawberry.extensions import (
    MaskErrors,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    QueryDepthLimiter,
    SchemaExtension,
)
from strawberry.scalars import JSON
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.subscriptions.protocols.graphql_ws.types import ConnectionInitMessage
from strawberry.types import ExecutionContext, Info
from strawberry.types.graphql import OperationType

from halldyll_ray import models as hm
from halldyll_ray import requestctx, validation
from halldyll_ray.client import AsyncHalldyllClient
from halldyll_ray.errors import AuthenticationFailed, HalldyllError, bound_quotes, field_path
from halldyll_ray.serve import http
from halldyll_ray.serve.http import error_response, status_of
from halldyll_ray.serve.loopback import (
    Loopback,
    authorization_of,
    bearer,
    relay,
    request_id_of,
)

#: Where GraphQL is served (HTTP POST and WebSocket).
GRAPHQL_PATH = "/graphql"
#: Deepest selection accepted. Only ``covers`` (a summary's memories) recurses; the rest is at
#: most 4 deep (``search { memory { messages { content } } }``).
MAX_DEPTH = 8
#: Covered memories a summary's ``covers`` field resolves (one REST read each).
MAX_COVERS = 50
#: Covered memories one request reads in all, every level of ``covers`` together: nested
#: ``covers`` multiply (50 per summary, 7 levels under the depth limit, 10 aliases), and a
#: query four levels deep over 8 summaries a level took 12.6 s and slowed every other user.
MAX_COVER_READS = 200
#: Most aliases in one document: each alias of ``search`` is a search.
MAX_ALIASES = 10
#: Most tokens in one document.
MAX_TOKENS = 2000
#: Most fields in one document with every fragment spread written out in full. A fragment
#: that spreads another twice, twenty deep, is 2**20 fields in under 200 tokens: the depth and
#: alias limits walked each of them (a replica's event loop held for 12.8 s, validating).
MAX_SELECTIONS = MAX_TOKENS

_T = TypeVar("_T")
log = logging.getLogger(__name__)
#: A user argument's default: the caller.
ME = strawberry.ID("me")

SearchMode = strawberry.enum(hm.SearchMode, name="SearchMode")
SearchGroup = strawberry.enum(hm.SearchGroup, name="SearchGroup")
SearchView = strawberry.enum(
    hm.SearchView,
    name="SearchView",
    description="FULL: each hit's memory without a conversation's messages; BASIC: without a "
    "transcription's text and segments either.",
)
MemoryType = strawberry.enum(hm.MemoryType, name="MemoryType")
MemoryEventKind = strawberry.enum(hm.MemoryEventKind, name="MemoryEventKind")


# --------------------------------------------------------------------------- context
class GraphQLContext:
    """Per request (or WebSocket): the loopback and the caller's ``Authorization`` header;
    ``connection_params`` is what a WebSocket's ``connection_init`` carried, ``websocket``
    whether the operations come over one."""

    def __init__(self, loopback: Loopback, connection: HTTPConnection) -> None:
        self.loopback = loopback
        self.connection_params: dict[str, Any] | None = None
        # Two headers (which a WebSocket's handshake can carry: the HTTP middleware refuses
        # them on requests) name no caller: the first is not more the caller's than the last.
        given = connection.headers.getlist("authorization")
        self.authorization = given[0] if len(given) == 1 else ""
        self.authorization_repeated = len(given) > 1
        self.websocket = connection.scope["type"] == "websocket"
        self.request_id = request_id_of(connection.scope)
        #: What ``covers`` read in this request, by memory id (a memory covered twice is
        #: read once), and how many reads are left of :data:`MAX_COVER_READS`.
        self.covered: dict[str, Any] = {}
        self.cover_reads_left = MAX_COVER_READS

    @property
    def api_key(self) -> str:
        header = self.authorization
        params = self.connection_params or {}
        given = params.get("Authorization", params.get("authorization"))
        if not header and isinstance(given, str):
            header = given
        key = bearer(header)
        if self.authorization_repeated:
            raise AuthenticationFailed(
                "header Authorization is given more than once (it takes one value)"
            )
        if key is None:
            raise AuthenticationFailed("no API key: send Authorization: Bearer <key>")
        return key

    def client(self) -> AsyncHalldyllClient:
        return self.loopback.client(self.api_key, self.request_id)


# --------------------------------------------------------------------------- types
@strawberry.type(description="One message of a conversation.")
class Message:
    seq: int
    role: str
    name: str | None
    content: str
    created_at: datetime

    @classmethod
    def of(cls, m: hm.StoredMessage) -> Message:
        return cls(
            seq=m.seq, role=m.role.value, name=m.name, content=m.content, created_at=m.created_at
        )


@strawberry.type(description="A memory as stored; `body` is its typed payload as JSON.")
class Memory:
    id: strawberry.ID
    user_id: strawberry.ID
    type: MemoryType  # type: ignore[valid-type]
    model_id: strawberry.ID | None
    session_id: str | None
    tags: list[str]
    metadata: JSON
    importance: float
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    reinforcement_count: int
    message_count: int
    valid_from: datetime | None = strawberry.field(
        description="A fact's version: when it became the user's current statement."
    )
    valid_to: datetime | None = strawberry.field(
        description="When a later statement replaced this fact (null: still current)."
    )
    superseded_by: strawberry.ID | None = strawberry.field(
        description="The fact that replaced this one."
    )
    sources: list[str] = strawberry.field(
        description="A fact: the source of every store that stated it, oldest first."
    )
    text: str = strawberry.field(description="The main text: statement, prompt, transcript...")
    body: JSON = strawberry.field(description="The typed memory, as stored (JSON).")
    messages: list[Message] = strawberry.field(description="A conversation's messages.")

    @strawberry.field(
        description="A summary's covered memories, those that still exist (others: empty)."
    )
    async def covers(self, info: Info[GraphQLContext, None]) -> list[Memory]:
        body = self.body if isinstance(self.body, dict) else {}
        if self.type is not hm.MemoryType.SUMMARY or not body.get("covers"):
            return []
        found: list[Memory] = []
        owner = str(self.user_id)
        context = info.context
        for memory_id in body["covers"][:MAX_COVERS]:
            key = f"{owner}/{memory_id}"
            if key not in context.covered:
                if context.cover_reads_left <= 0:
                    raise GraphQLError(
                        f"the query reads more than {MAX_COVER_READS} covered memories: ask "
                        "for fewer levels of covers, or read the summaries one at a time",
                        extensions={"code": "invalid_input", "status_code": 422},
                    )
                context.cover_reads_left -= 1

                def read(c: AsyncHalldyllClient, m: str = str(memory_id)) -> Awaitable[Any]:
                    return c.get_memory(m, user_id=owner)

                try:
                    context.covered[key] = await _call(info, read)
                except GraphQLError as exc:
                    if (exc.extensions or {}).get("code") != "not_found":
                        raise
                    context.covered[key] = None  # deleted since the summary was written
            if context.covered[key] is not None:
                found.append(Memory.of(context.covered[key]))
        return found

    @classmethod
    def of(cls, m: hm.StoredMemory) -> Memory:
        return cls(
            id=strawberry.ID(str(m.id)),
            user_id=strawberry.ID(str(m.user_id)),
            type=m.type,
            model_id=None if m.model_id is None else strawberry.ID(str(m.model_id)),
            session_id=m.session_id,
            tags=m.tags,
            metadata=_json(m.metadata),
            importance=m.importance,
            created_at=m.created_at,
            updated_at=m.updated_at,
            expires_at=m.expires_at,
            reinforcement_count=m.reinforcement_count,
            message_count=m.message_count,
            valid_from=m.valid_from,
            valid_to=m.valid_to,
            superseded_by=None if m.superseded_by is None else strawberry.ID(str(m.superseded_by)),
            sources=m.sources,
            text=m.text,
            body=_json(m.memory.model_dump(mode="json")),
            messages=[Message.of(x) for x in m.messages],
        )


@strawberry.type(description="A background job: fact extraction, a session summary...")
class Job:
    id: strawberry.ID
    user_id: strawberry.ID
    kind: str
    status: str = strawberry.field(description="queued, running, done or failed.")
    attempts: int
    max_attempts: int
    last_error: str | None
    result: JSON | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, j: hm.Job) -> Job:
        return cls(
            id=strawberry.ID(str(j.id)),
            user_id=strawberry.ID(str(j.user_id)),
            kind=j.kind,
            status=j.status.value,
            attempts=j.attempts,
            max_attempts=j.max_attempts,
            last_error=j.last_error,
            result=None if j.result is None else _json(j.result),
            created_at=j.created_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
        )


@strawberry.type
class JobPage:
    items: list[Job]
    next_cursor: str | None = strawberry.field(description="Pass back as `cursor`; null: last.")


@strawberry.type
class MemoryPage:
    items: list[Memory]
    next_cursor: str | None = strawberry.field(description="Pass back as `cursor`; null: last.")


@strawberry.type(description="The part of a memory a search hit matched.")
class MatchedPart:
    part: str
    index: int
    text: str


@strawberry.type
class SearchHit:
    memory: Memory
    score: float = strawberry.field(
        description="Ranking score: cosine similarity (semantic), BM25 score (fulltext), or "
        "the hybrid ranking's probability (0-1) that the part holds what the query asks."
    )
    similarity: float | None = strawberry.field(description="Cosine similarity, if known.")
    source: str = strawberry.field(description="semantic, fulltext or hybrid.")
    matched: MatchedPart


@strawberry.type
class ContextItem:
    memory_id: strawberry.ID | None
    type: str
    text: str
    score: float
    tokens: int


@strawberry.type
class ContextSection:
    name: str
    items: list[ContextItem]


@strawberry.type(description="A prompt context block within a token budget.")
class Context:
    text: str
    token_count: int
    max_tokens: int
    sources: list[strawberry.ID]
    sections: list[ContextSection]

    @classmethod
    def of(cls, c: hm.Context) -> Context:
        return cls(
            text=c.text,
            token_count=c.token_count,
            max_tokens=c.max_tokens,
            sources=[strawberry.ID(str(s)) for s in c.sources],
            sections=[
                ContextSection(
                    name=s.name,
                    items=[
                        ContextItem(
                            memory_id=_id(i.memory_id),
                            type=i.type,
                            text=i.text,
                            score=i.score,
                            tokens=i.tokens,
                        )
                        for i in s.items
                    ],
                )
                for s in c.sections
            ],
        )


@strawberry.type
class User:
    id: strawberry.ID
    username: str
    email: str | None
    role: str
    disabled: bool
    metadata: JSON
    created_at: datetime

    @classmethod
    def of(cls, u: hm.User) -> User:
        return cls(
            id=strawberry.ID(str(u.id)),
            username=u.username,
            email=u.email,
            role=u.role.value,
            disabled=u.disabled,
            metadata=_json(u.metadata),
            created_at=u.created_at,
        )


@strawberry.type
class UserPage:
    items: list[User]
    next_cursor: str | None


@strawberry.type(name="AIModel")
class AIModel:
    id: strawberry.ID
    name: str
    kind: str
    version: str | None
    metadata: JSON


@strawberry.type(description="One change of one memory (never its content).")
class MemoryEvent:
    id: strawberry.ID = strawberry.field(description="The event id; resume with `after`.")
    user_id: strawberry.ID
    memory_id: strawberry.ID
    memory_type: MemoryType  # type: ignore[valid-type]
    kind: MemoryEventKind  # type: ignore[valid-type]
    at: datetime


@strawberry.type(
    description="The events right after `after` may be gone (past retention, or `after` is "
    "not this database's): re-read what you mirror; events after `resumeAfter` follow."
)
class EventsResync:
    after: strawberry.ID
    resume_after: strawberry.ID
    reason: str


FeedItem = Annotated[MemoryEvent | EventsResync, strawberry.union("FeedItem")]


def _json(value: Any) -> JSON:
    """A value for a JSON field (strawberry's JSON scalar passes values through)."""
    return cast(JSON, value)


def _id(value: object) -> strawberry.ID | None:
    return None if value is None else strawberry.ID(str(value))


def _graphql_error(exc: HalldyllError, request_id: str | None) -> GraphQLError:
    """The API's error as a GraphQL error: the message, and in ``extensions`` the code, the
    HTTP status REST answered, the field at fault and the request id.

    An error refused before any route ran (the client's own checks of an id it puts in a
    path: ``id: ""``, ``userId: "a/b"``) carries neither status nor request id: it gets the
    status REST answers for its kind and ``request_id``, the GraphQL request's id, as every
    other error of that request does."""
    extensions: dict[str, Any] = {"code": exc.code, "status_code": status_of(exc)}
    for name in ("status_code", "field", "request_id", "report"):
        if exc.fields.get(name) is not None:
            extensions[name] = exc.fields[name]
    if "request_id" not in extensions and request_id:
        extensions["request_id"] = request_id
    return GraphQLError(exc.message, extensions=extensions, original_error=exc)


async def _call(
    info: Info[GraphQLContext, None], fn: Callable[[AsyncHalldyllClient], Awaitable[_T]]
) -> _T:
    try:
        async with info.context.client() as client:
            return await fn(client)
    except HalldyllError as exc:
        raise _graphql_error(exc, info.context.request_id) from None


def _types(types: list[hm.MemoryType] | None) -> list[str] | None:
    return None if types is None else [t.value for t in types]


# --------------------------------------------------------------------------- operations
@strawberry.type
class Query:
    @strawberry.field(description="The caller.")
    async def me(self, info: Info[GraphQLContext, None]) -> User:
        return User.of(await _call(info, lambda c: c.me()))

    @strawberry.field(description="A user (yourself, or anyone for an Admin).")
    async def user(self, info: Info[GraphQLContext, None], id: strawberry.ID) -> User:
        return User.of(await _call(info, lambda c: c.get_user(str(id))))

    @strawberry.field(description="Every user, a page at a time (Admins).")
    async def users(
        self, info: Info[GraphQLContext, None], limit: int = 100, cursor: str | None = None
    ) -> UserPage:
        page = await _call(info, lambda c: c.list_users(limit=limit, cursor=cursor))
        return UserPage(items=[User.of(u) for u in page.items], next_cursor=page.next_cursor)

    @strawberry.field(description="The AI model registry.")
    async def models(
        self, info: Info[GraphQLContext, None], kind: str | None = None
    ) -> list[AIModel]:
        found = await _call(info, lambda c: c.list_models(kind))
        return [
            AIModel(
                id=strawberry.ID(str(m.id)),
                name=m.name,
                kind=m.kind.value,
                version=m.version,
                metadata=_json(m.metadata),
            )
            for m in found
        ]

    @strawberry.field(description="One memory, with a conversation's messages.")
    async def memory(
        self, info: Info[GraphQLContext, None], id: strawberry.ID, user_id: strawberry.ID = ME
    ) -> Memory:
        return Memory.of(await _call(info, lambda c: c.get_memory(str(id), user_id=str(user_id))))

    @strawberry.field(
        description="Every version of a fact, oldest first (closed ones have validTo and "
        "supersededBy)."
    )
    async def fact_history(
        self, info: Info[GraphQLContext, None], id: strawberry.ID, user_id: strawberry.ID = ME
    ) -> list[Memory]:
        found = await _call(info, lambda c: c.fact_history(str(id), user_id=str(user_id)))
        return [Memory.of(m) for m in found]

    @strawberry.field(description="A user's background jobs, newest first.")
    async def jobs(
        self,
        info: Info[GraphQLContext, None],
        user_id: strawberry.ID = ME,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        page = await _call(
            info,
            lambda c: c.list_jobs(
                user_id=str(user_id), status=status, kind=kind, limit=limit, cursor=cursor
            ),
        )
        return JobPage(items=[Job.of(j) for j in page.items], next_cursor=page.next_cursor)

    @strawberry.field(description="One background job.")
    async def job(
        self, info: Info[GraphQLContext, None], id: strawberry.ID, user_id: strawberry.ID = ME
    ) -> Job:
        return Job.of(await _call(info, lambda c: c.get_job(str(id), user_id=str(user_id))))

    @strawberry.field(description="A user's memories, newest first, with filters and cursor pages.")
    async def memories(
        self,
        info: Info[GraphQLContext, None],
        user_id: strawberry.ID = ME,
        types: list[MemoryType] | None = None,  # type: ignore[valid-type]
        model: str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: list[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> MemoryPage:
        page = await _call(
            info,
            lambda c: c.list_memories(
                user_id=str(user_id),
                types=_types(types),
                model=model,
                include_shared=include_shared,
                session_id=session_id,
                tags=tags,
                since=since,
                until=until,
                limit=limit,
                cursor=cursor,
            ),
        )
        return MemoryPage(items=[Memory.of(m) for m in page.items], next_cursor=page.next_cursor)

    @strawberry.field(description="Search a user's memories (hybrid by default).")
    async def search(
        self,
        info: Info[GraphQLContext, None],
        query: str,
        user_id: strawberry.ID = ME,
        limit: int | None = None,
        mode: SearchMode | None = None,  # type: ignore[valid-type]
        types: list[MemoryType] | None = None,  # type: ignore[valid-type]
        model: str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: list[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        threshold: float | None = None,
        group: SearchGroup = hm.SearchGroup.PART,  # type: ignore[valid-type]
        view: SearchView = hm.SearchView.FULL,  # type: ignore[valid-type]
    ) -> list[SearchHit]:
        hits = await _call(
            info,
            lambda c: c.search(
                query,
                user_id=str(user_id),
                limit=limit,
                mode=mode,
                types=_types(types),
                model=model,
                include_shared=include_shared,
                session_id=session_id,
                tags=tags,
                since=since,
                until=until,
                threshold=threshold,
                group=group,
                view=view,
            ),
        )
        return [
            SearchHit(
                memory=Memory.of(h.memory),
                score=h.score,
                similarity=h.similarity,
                source=h.source,
                matched=MatchedPart(
                    part=h.matched.part, index=h.matched.index, text=h.matched.text
                ),
            )
            for h in hits
        ]

    @strawberry.field(description="A prompt context block for a query, within a token budget.")
    async def context(
        self,
        info: Info[GraphQLContext, None],
        query: str,
        user_id: strawberry.ID = ME,
        model: str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        max_tokens: int | None = None,
    ) -> Context:
        built = await _call(
            info,
            lambda c: c.build_context(
                query,
                user_id=str(user_id),
                model=model,
                include_shared=include_shared,
                session_id=session_id,
                max_tokens=max_tokens,
            ),
        )
        return Context.of(built)


@strawberry.type
class Mutation:
    @strawberry.mutation(
        description='Store a memory: its JSON as REST takes it, e.g. {"type": "fact", '
        '"statement": "..."}.'
    )
    async def store_memory(
        self, info: Info[GraphQLContext, None], memory: JSON, user_id: strawberry.ID = ME
    ) -> Memory:
        body: Any = memory  # any JSON, sent as given: REST says what is wrong with it
        return Memory.of(await _call(info, lambda c: c.store_memory(body, user_id=str(user_id))))

    @strawberry.mutation(
        description="Store 1 to STORE_BATCH_MAX (500) memories of any types at once, all or "
        "nothing: a JSON list of memories as REST's batch takes them. The memories as stored, "
        "in the order given; a bad one is named by its index (field `memories.3...`) and "
        "nothing is stored."
    )
    async def store_memories(
        self, info: Info[GraphQLContext, None], memories: JSON, user_id: strawberry.ID = ME
    ) -> list[Memory]:
        given: Any = memories  # any JSON: the client and the API say what is wrong with it
        stored = await _call(info, lambda c: c.store_memories(given, user_id=str(user_id)))
        return [Memory.of(m) for m in stored]

    @strawberry.mutation(description="Change a memory (the fields of REST's PATCH, as JSON).")
    async def update_memory(
        self,
        info: Info[GraphQLContext, None],
        id: strawberry.ID,
        update: JSON,
        user_id: strawberry.ID = ME,
    ) -> Memory:
        body: Any = update  # any JSON, sent as given (REST's "body: Input should be a valid
        # dictionary"); it was wrapped in {"": update}: "Extra inputs are not permitted"
        return Memory.of(
            await _call(info, lambda c: c.update_memory(str(id), body, user_id=str(user_id)))
        )

    @strawberry.mutation(description="Delete a memory; true when it was deleted.")
    async def delete_memory(
        self, info: Info[GraphQLContext, None], id: strawberry.ID, user_id: strawberry.ID = ME
    ) -> bool:
        await _call(info, lambda c: c.delete_memory(str(id), user_id=str(user_id)))
        return True

    @strawberry.mutation(description="Append messages (JSON list) to a conversation.")
    async def append_messages(
        self,
        info: Info[GraphQLContext, None],
        id: strawberry.ID,
        messages: JSON,
        user_id: strawberry.ID = ME,
    ) -> list[Message]:
        # Any JSON, sent as given: one message object is no list, refused as REST refuses it
        # (it was wrapped in a list and appended).
        given: Any = messages
        stored = await _call(
            info, lambda c: c.append_messages(str(id), given, user_id=str(user_id))
        )
        return [Message.of(m) for m in stored]


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="A user's memory changes as they happen (from writes through any replica); "
        "`after`: resume after this event id, nothing lost or repeated."
    )
    async def memory_events(
        self,
        info: Info[GraphQLContext, None],
        user_id: strawberry.ID = ME,
        after: strawberry.ID | None = None,
    ) -> AsyncGenerator[FeedItem, None]:
        context = info.context
        # The module's app, not the endpoint's copy: serve.ingress serves a pickled copy of
        # the app, while the replica's Ingress registers itself on the module's object.
        ingress = getattr(http.api.state, "ingress", None)
        if ingress is None:
            raise GraphQLError(
                "the change feed is not running",
                extensions={"code": "unavailable", "status_code": 503},
            )
        try:
            key = context.api_key
            engine = await ingress.engine()
            with requestctx.acting(None, context.request_id):
                principal = await engine.authenticate(key)

            async def key_still_valid() -> None:
                with requestctx.acting(None, context.request_id):
                    await engine.authenticate(key)

            authorized = engine.authorized(principal, request_id=context.request_id)
            target = None if str(user_id) == "me" else str(user_id)
            subscription = await authorized.subscribe_events(
                target, after=None if after is None else str(after), rechecks=[key_still_valid]
            )
        except HalldyllError as exc:
            raise _graphql_error(exc, context.request_id) from None
        async with subscription:
            try:
                async for item in subscription:
                    yield _feed_item(item)
            except HalldyllError as exc:
                raise _graphql_error(exc, context.request_id) from None


def _feed_item(item: hm.MemoryEvent | hm.EventsResync) -> MemoryEvent | EventsResync:
    if isinstance(item, hm.EventsResync):
        return EventsResync(
            after=strawberry.ID(str(item.after)),
            resume_after=strawberry.ID(str(item.resume_after)),
            reason=item.reason,
        )
    return MemoryEvent(
        id=strawberry.ID(str(item.id)),
        user_id=strawberry.ID(str(item.user_id)),
        memory_id=strawberry.ID(str(item.memory_id)),
        memory_type=item.memory_type,
        kind=item.kind,
        at=item.at,
    )


class _OperationNameRequired(CannotGetOperationTypeError):
    """A document of several operations, none named by the request (400 over HTTP, as an
    ``operationName`` that names none of them)."""

    def __init__(self, count: int) -> None:
        super().__init__(None)
        self.count = count

    def as_http_error_reason(self) -> str:
        return f"the document holds {self.count} operations: name the one to run in operationName"


class _SubscriptionNeedsWebSocket(InvalidOperationTypeError):
    """A subscription sent over HTTP (400)."""

    def __init__(self) -> None:
        super().__init__(OperationType.SUBSCRIPTION)

    def as_http_error_reason(self, method: str = "POST") -> str:
        return (
            f"subscriptions need the WebSocket transport: open a WebSocket to {GRAPHQL_PATH} "
            f"(subprotocol graphql-transport-ws) and subscribe there, not over {method}"
        )


def expanded_selections(document: DocumentNode, limit: int = MAX_SELECTIONS) -> int:
    """How many fields ``document``'s operations select with every fragment spread written out
    in full, counted in time linear in the document (each fragment once); stops counting past
    ``limit``. A spread of an unknown fragment, or one in a cycle, counts nothing (validation
    refuses both)."""
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    sizes: dict[str, int] = {}
    counting: set[str] = set()

    def size(selection_set: SelectionSetNode | None) -> int:
        total = 0
        for selection in () if selection_set is None else selection_set.selections:
            if isinstance(selection, FieldNode):
                total += 1 + size(selection.selection_set)
            elif isinstance(selection, InlineFragmentNode):
                total += size(selection.selection_set)
            elif isinstance(selection, FragmentSpreadNode):
                total += fragment(selection.name.value)
            if total > limit:
                break
        return min(total, limit + 1)

    def fragment(name: str) -> int:
        if name not in sizes:
            definition = fragments.get(name)
            if definition is None or name in counting:
                return 0
            counting.add(name)
            sizes[name] = size(definition.selection_set)
            counting.discard(name)
        return sizes[name]

    total = 0
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode):
            total = min(total + size(definition.selection_set), limit + 1)
    return total


class _OperationChecks(SchemaExtension):
    """Refuses, before anything runs, two requests strawberry would run:

    - several operations without ``operationName``: strawberry ran the first one (a mutation
      too), where the spec's GetOperation requires the name;
    - a subscription that does not come over a WebSocket: over POST it ran as a query and
      failed with a server error;

    and answers a document too large with its fragments written out
    (:data:`MAX_SELECTIONS`) with a GraphQL error, without validating it.

    Over HTTP both answer 400 (strawberry maps these exceptions); over a WebSocket, an error
    message for the operation.
    """

    def on_operation(self) -> Iterator[None]:
        # Before parsing, ``operation_name`` is the request's; after, strawberry answers the
        # first operation's name for a request that named none.
        self.named = self.execution_context.operation_name is not None
        yield

    def on_validate(self) -> Iterator[None]:
        execution = self.execution_context
        document = execution.graphql_document
        operations = [] if document is None else document.definitions
        count = sum(isinstance(d, OperationDefinitionNode) for d in operations)
        if count > 1 and not self.named:
            raise _OperationNameRequired(count)
        context = execution.context
        websocket = isinstance(context, GraphQLContext) and context.websocket
        if execution.operation_type is OperationType.SUBSCRIPTION and not websocket:
            raise _SubscriptionNeedsWebSocket
        try:
            selections = 0 if document is None else expanded_selections(document)
        except RecursionError:  # fragments spreading fragments, hundreds deep
            selections = MAX_SELECTIONS + 1
        if selections > MAX_SELECTIONS:
            # Set before validation runs, validation is skipped: the depth and alias limits
            # walk every spread of every fragment again, in time exponential in the document.
            execution.pre_execution_errors = [
                GraphQLError(
                    f"the document selects more than {MAX_SELECTIONS} fields with its "
                    "fragments written out: spread each fragment fewer times",
                    extensions={"code": "invalid_input", "status_code": 400},
                )
            ]
        yield


#: What a request got wrong (over a WebSocket strawberry turns the last three into errors)
#: or the API refused, as the cause of a GraphQL error.
_REQUEST_ERRORS = (
    GraphQLError,
    HalldyllError,
    MissingQueryError,
    CannotGetOperationTypeError,
    InvalidOperationTypeError,
)


def _cause(error: GraphQLError) -> BaseException | None:
    """What lies behind ``error``, through the GraphQL errors that wrap it (None: nothing)."""
    cause = error.original_error
    while isinstance(cause, GraphQLError) and cause.original_error is not None:
        cause = cause.original_error
    return cause


def _unexpected(error: GraphQLError) -> BaseException | None:
    """What lies behind ``error`` when it is neither the request's fault nor an answer of
    the API (a resolver's bug, a broken connection); None otherwise."""
    cause = _cause(error)
    return cause if cause is not None and not isinstance(cause, _REQUEST_ERRORS) else None


class _MaskUnexpected(MaskErrors):
    """The client gets ``internal error`` (code ``internal_error``, as REST's 500) for an
    error nobody meant to send: its own message could name internals ("'NoneType' object
    has no attribute 'client'"). The log keeps it with its traceback
    (:meth:`_Schema.process_errors` runs first)."""

    def __init__(self) -> None:
        super().__init__(
            should_mask_error=lambda error: _unexpected(error) is not None,
            error_message="internal error",
        )

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        masked = super().anonymise_error(error)
        masked.extensions = {"code": "internal_error", "status_code": 500}
        return masked

    def _process_errors(self, errors: list[GraphQLError]) -> list[GraphQLError]:
        # Every error the client gets, its message bounded: graphql-core's own (a bad
        # document, a variable's value) quote the caller's names and values whole.
        document = self.execution_context.graphql_document
        return [_bounded(_coded(error, document)) for error in super()._process_errors(errors)]


#: graphql-core's words for an argument that is required and not given.
_REQUIRED_ARGUMENT = re.compile(
    r"argument '(\w+)' of type '[^']*' is required"
    r"|Argument '[^'(]*\((\w+):\)' of type '[^']*' is required"
)


def _coded(error: GraphQLError, document: DocumentNode | None) -> GraphQLError:
    """graphql-core's own refusal of a document or a variable (no ``code``: not an answer
    of the API) with the ``extensions`` of the API's: ``invalid_input``, and for a bad
    argument (an unknown one, a value of the wrong type or not of its enum, a required one
    missing, a variable holding such a value) the REST status, 422, and ``field``, the
    argument as REST names the body field or query parameter (``limit``, ``user_id``,
    ``types.1``). A ``limit: "5"`` was a GraphQL error without a code or field, where REST
    answers 422 on ``limit`` and the API's own checks (``limit: 0``) answer that here too.
    Other document errors (syntax, an unknown field) get the status of a malformed
    request, 400."""
    cause = _cause(error)
    if (error.extensions or {}).get("code") or not isinstance(cause, GraphQLError | None):
        return error
    try:
        argument = _argument_of(error, document)
    except RecursionError:  # lists in lists, about a thousand deep: about no argument then
        argument = None
    if argument is None:
        error.extensions = {"code": "invalid_input", "status_code": 400}
    else:
        # REST's snake_case (``includeShared``: ``include_shared``), cut as REST cuts a
        # name the caller chose (an unknown argument's).
        field = field_path(re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", argument).lower())
        error.extensions = {"code": "invalid_input", "status_code": 422, "field": field}
    return error


def _argument_of(error: GraphQLError, document: DocumentNode | None) -> str | None:
    """The argument (``name`` or ``name.index`` for an item of a list) an error of
    graphql-core is about, as the document names it; None when it is about none."""
    required = _REQUIRED_ARGUMENT.search(error.message)
    if required:
        return required.group(1) or required.group(2)
    node = error.nodes[0] if error.nodes else None
    if isinstance(node, ArgumentNode):
        return node.name.value
    if node is None or document is None:
        return None
    for argument in _arguments(document):
        value = argument.value
        if value is node:
            return argument.name.value
        if isinstance(value, ListValueNode):
            for index, item in enumerate(value.values):
                if item is node:
                    return f"{argument.name.value}.{index}"
        if (
            isinstance(node, VariableDefinitionNode)
            and isinstance(value, VariableNode)
            and value.name.value == node.variable.name.value
        ):
            return argument.name.value
    return None


def _arguments(node: Node) -> Iterator[ArgumentNode]:
    """Every argument node under ``node``, in document order."""
    if isinstance(node, ArgumentNode):
        yield node
    for key in node.keys:
        child = getattr(node, key, None)
        for item in child if isinstance(child, tuple | list) else (child,):
            if isinstance(item, Node):
                yield from _arguments(item)


def _bounded(error: GraphQLError) -> GraphQLError:
    message = bound_quotes(error.message)
    if message == error.message:
        return error
    return GraphQLError(
        message,
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        original_error=error.original_error,
        extensions=error.extensions,
    )


class _Schema(strawberry.Schema):
    """The schema, logging its errors by who caused them."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        """One line per error the request caused or the API answered (a bad document, a
        REST refusal a resolver relays), without a traceback: INFO, or WARNING for a 5xx
        (the REST route logs its own 500s with their traceback). Anything else a resolver
        raised is logged at ERROR with its traceback. (Strawberry logs every error at ERROR,
        with the traceback of whatever lies behind it: a 404 took a dozen lines.)"""
        for error in errors:
            cause = _cause(error)
            if cause is not None and not isinstance(cause, _REQUEST_ERRORS):
                log.error("GraphQL error: %s", error.message, exc_info=cause)
                continue
            extensions = error.extensions or {}
            status = extensions.get("status_code")
            if status is None and isinstance(cause, HalldyllError):
                status = status_of(cause)
            level = logging.WARNING if isinstance(status, int) and status >= 500 else logging.INFO
            path = ".".join(str(p) for p in error.path or ())
            log.log(
                level,
                "GraphQL request refused (%s %s)%s: %s",
                status or 400,
                extensions.get("code", "invalid_document"),
                f" at {path}" if path else "",
                error.message,
            )


schema = _Schema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    extensions=[
        _MaskUnexpected,
        _OperationChecks,
        lambda: QueryDepthLimiter(max_depth=MAX_DEPTH),
        lambda: MaxAliasesLimiter(max_alias_count=MAX_ALIASES),
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
    ],
)


class _GraphQLWSHandler(BaseGraphQLWSHandler[GraphQLContext, None]):
    """The legacy ``graphql-ws`` subprotocol, refusing a connection as
    ``graphql-transport-ws`` does: ``connection_error``, then close with 4403 (strawberry's
    own closes with 1011, a server error)."""

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        payload = message.get("payload")
        self.context.connection_params = payload if isinstance(payload, dict) else None
        try:
            await self.view.on_ws_connect(self.context)
        except ConnectionRejectionError as exc:
            await self.send_message({"type": "connection_error", "payload": exc.payload})
            await self.websocket.close(code=4403, reason="Forbidden")
            return
        await self.send_message({"type": "connection_ack"})
        self.connection_acknowledged = True
        if self.keep_alive:
            self.keep_alive_task = asyncio.create_task(self.handle_keep_alive())


class _GraphQL(GraphQL[GraphQLContext, None]):
    """Strawberry's ASGI app with this service's context and WebSocket check."""

    graphql_ws_handler_class = _GraphQLWSHandler

    def __init__(self, loopback: Loopback) -> None:
        super().__init__(schema, graphql_ide=None, allow_queries_via_get=False)
        self.loopback = loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        try:
            response = await self.run(Request(scope=scope, receive=receive))
        except HTTPException as exc:
            # A request that is not GraphQL at all (malformed JSON, no query, a batch): the
            # API's error shape rather than strawberry's plain text.
            code = "invalid_input" if exc.status_code in (400, 422) else "http_error"
            reason = bound_quotes(exc.reason)  # strawberry's: an operation's name, whole
            response = error_response(exc.status_code, code, reason, request_id_of(scope) or "")
        await response(scope, receive, send)

    def decode_json(self, data: str | bytes) -> object:
        """The body's JSON (:func:`~halldyll_ray.validation.json_loads`: no NaN or
        Infinity, no integer of thousands of digits, no nesting deeper than the parser
        recurses, nothing but UTF-8: each was a 500 or a value taken as given); 400 "not
        valid JSON: <what> at <where>" for any of them, and 400 for a body that is neither
        an object nor a batch (a list)."""
        try:
            value = validation.json_loads(data)
        except json.JSONDecodeError as exc:  # strawberry's text does not say what or where
            raise HTTPException(400, f"not valid JSON: {exc}") from None
        if not isinstance(value, dict | list):  # a list is a batch, which strawberry refuses
            # strawberry reads the body as an object: a number, a string or null was a 500.
            raise HTTPException(400, 'the body must be a JSON object: {"query": ...}')
        return value

    async def get_context(self, request: Any, response: Any) -> GraphQLContext:
        return GraphQLContext(self.loopback, request)

    async def on_ws_connect(self, context: GraphQLContext) -> None:
        """Accept a WebSocket only with a valid key (header or ``connection_init``)."""
        try:
            key = context.api_key
        except AuthenticationFailed:
            raise ConnectionRejectionError({"reason": "no API key"}) from None
        answer = await self.loopback.check_key(f"Bearer {key}", context.request_id)
        if answer.status_code != 200:
            raise ConnectionRejectionError({"reason": "the API key was refused"})


class GraphQLEndpoint:
    """The ASGI app at ``/graphql``: the REST key check for HTTP, then strawberry.

    Built lazily in the process that serves: ``serve.ingress`` pickles the FastAPI app into
    every replica, and a GraphQL schema does not pickle.
    """

    def __init__(self, app: FastAPI) -> None:
        self._app = app
        self._server: _GraphQL | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_app": self._app, "_server": None}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._server is None:
            self._server = _GraphQL(Loopback(self._app))
        server = self._server
        if scope["type"] == "http":
            answer = await server.loopback.check_key(authorization_of(scope), request_id_of(scope))
            if answer.status_code != 200:
                await relay(answer)(scope, receive, send)
                return
        await server(scope, receive, send)


def mount_graphql(app: FastAPI, *, path: str = GRAPHQL_PATH) -> GraphQLEndpoint:
    """Serve GraphQL at ``path`` of ``app`` (HTTP POST and WebSocket); call at import."""
    endpoint = GraphQLEndpoint(app)
    app.router.add_route(path, endpoint, methods=["POST"], include_in_schema=False)  # type: ignore[arg-type]
    app.router.add_websocket_route(path, endpoint)  # type: ignore[arg-type]
    return endpoint
