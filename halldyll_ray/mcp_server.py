"""The MCP (Model Context Protocol) server: halldyll-ray's memory as tools for an LLM client.

One set of tools, written once over the HTTP client (:class:`AsyncHalldyllClient`), so every
tool call is an ordinary call of the HTTP API: the same routes, authentication, permission
matrix, validation, error mapping and audit rows as REST; no rule lives here. Two doors:

- **Streamable HTTP** at ``/mcp`` on the Ingress (:mod:`halldyll_ray.serve.mcp_http`): each
  call's client reaches the Ingress's own FastAPI app in process, with the caller's key.
- **stdio** (:func:`run_stdio`, ``halldyll mcp --url ... --key ...``): a thin process for
  desktop clients that launch a command; its client talks to ``--url`` over the network.

Tools (names as the LLM sees them): ``store_fact``, ``store_conversation``, ``store_image``,
``store_transcription``, ``store_summary``, ``store_memories``, ``search_memories``,
``build_context``, ``prepare_context``, ``record_turn``, ``get_memory``, ``list_memories``,
``update_memory``, ``delete_memory``, ``list_models``, ``fact_history``, ``list_jobs``. One
store tool per memory type rather than one tool over a discriminated union: a flat schema
with the type's own fields is what LLM clients fill in reliably (several reject or garble a
top-level ``oneOf``), and the tool's name already says which kind of memory it keeps. The
bulk tool, ``store_memories``, takes each memory's JSON with its ``type``, as REST's batch
does. Resource templates: a user's recent memories and a session's
transcript.

Every tool takes ``user_id`` (``"me"`` by default): a Service or Admin key names the user it
acts for, as ``/v1/users/{user_id}/...`` does. A refusal of the API (401, 403, 404, 409, 422,
503) comes back as a tool error (``isError``) whose text is the API's code, message and
request id, never a crash and never the key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import UnionType
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
)

import annotated_types
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, with_config
from pydantic.fields import FieldInfo
from typing_extensions import TypedDict  # pydantic reads typing.TypedDict only on 3.12+

from halldyll_ray import models, schemas, validation
from halldyll_ray.client import AsyncHalldyllClient
from halldyll_ray.context import fence, speaker
from halldyll_ray.errors import HalldyllError, InvalidInput
from halldyll_ray.models import MAX_PAGE_SIZE, MAX_SEARCH_LIMIT, StrictBool, StrictInt
from halldyll_ray.schemas import MAX_CONTEXT_TOKENS, MIN_CONTEXT_TOKENS

#: How a tool gets its client for one call: given the MCP request context, an async context
#: manager that yields a client authenticated as the caller (and closes it, if it owns it).
ClientSource = Callable[[Context[Any, Any]], AbstractAsyncContextManager[AsyncHalldyllClient]]

_T = TypeVar("_T")

INSTRUCTIONS = (
    "Long-term memory for the user this API key belongs to. Before answering, call "
    "search_memories (or build_context for a ready prompt block) to recall what is known; "
    "keep durable knowledge with store_fact (one self-contained statement per fact); in a "
    "chat loop, call prepare_context before the model's turn and record_turn after it. "
    "user_id defaults to 'me'; a Service or Admin key passes the id of the user it acts for."
)

# --------------------------------------------------------------------------- argument types
# Module-level aliases: the SDK resolves the tools' annotations against this module.
UserId = Annotated[
    str,
    Field(
        description="Whose memories: 'me' (the API key's own user) or a user's id (UUID). "
        "A Service or Admin key passes the id of the user it acts for; a Viewer the id of a "
        "user whose memories it was granted."
    ),
]
MemoryId = Annotated[str, Field(description="The memory's id (UUID), as returned when stored.")]
#: REST's limit query parameter of the list routes (their bounds: test_mcp_bounds).
PageSize = Annotated[StrictInt, Field(ge=1, le=MAX_PAGE_SIZE, description="Page size.")]
Cursor = Annotated[str | None, Field(description="next_cursor of the previous page, to read on.")]
SessionId = Annotated[
    str,
    Field(
        description="The chat session's id: 1-128 characters of letters, digits and . _ : - "
        "(e.g. a thread id your client already has)."
    ),
]
Tags = Annotated[
    list[str] | None,
    Field(description="Short labels to filter by later, e.g. ['diet', 'family']."),
]
Metadata = Annotated[
    dict[str, Any] | None, Field(description="Free-form JSON kept with the memory.")
]
Importance = Annotated[
    float | None,
    Field(ge=0, le=1, description="Salience in [0, 1]; ranks search results (default 0.5)."),
]
ModelRef = Annotated[
    str | None,
    Field(
        description="A registered AI model (name or id; see list_models) the memory belongs "
        "to. Omit to share it with all of the user's models."
    ),
]
ModelFilter = Annotated[
    str | None,
    Field(description="Only this registered model's memories (name or id), plus shared ones."),
]
IncludeShared = Annotated[
    StrictBool,
    Field(description="With model: also the memories shared by all models (default true)."),
]
MemorySession = Annotated[
    str | None, Field(description="The chat session this memory belongs to, if any.")
]
MemoryTypeName = Literal["conversation", "fact", "image", "transcription", "summary"]
Types = Annotated[
    list[MemoryTypeName] | None, Field(description="Only these memory types (default: all).")
]
Since = Annotated[
    str | None,
    Field(description="Only memories created at or after this ISO 8601 time, e.g. 2026-01-31."),
]
Until = Annotated[str | None, Field(description="Only memories created before this ISO 8601 time.")]
MaxTokens = Annotated[
    int | None,
    Field(
        ge=MIN_CONTEXT_TOKENS,
        le=MAX_CONTEXT_TOKENS,
        description="Token budget of the context text (default: the server's).",
    ),
]
ModelKindName = Literal[
    "llm",
    "vision-language",
    "image-generation",
    "control",
    "face-recognition",
    "embedding",
    "speech",
    "other",
]


@with_config(ConfigDict(extra="forbid"))  # a misspelt key is an error, not dropped
class MessageArg(TypedDict):
    """One message of a conversation: who said what, and when (``created_at``, ISO 8601;
    the time of the store when absent)."""

    role: Literal["user", "assistant", "system", "tool"]
    content: str
    name: NotRequired[str]
    created_at: NotRequired[str]


@with_config(ConfigDict(extra="forbid"))
class SegmentArg(TypedDict):
    """One timed segment of a transcription, in seconds from the start."""

    start: float
    end: float
    text: str
    speaker: NotRequired[str]


def _present(**values: Any) -> dict[str, Any]:
    """The arguments that were given: None leaves a field to the server's default."""
    return {name: value for name, value in values.items() if value is not None}


def _json(value: BaseModel) -> dict[str, Any]:
    """A model as the JSON the HTTP API answers, without empty optional fields."""
    return value.model_dump(mode="json", exclude_none=True)


def describe(exc: HalldyllError) -> str:
    """The text an LLM reads for an API error: code, message, field at fault, request id."""
    text = f"{exc.code}: {exc.message}"
    field = exc.fields.get("field")
    if isinstance(exc, InvalidInput) and field:
        text += f" (field: {field})"
    request_id = exc.fields.get("request_id")
    if request_id:
        text += f" [request_id {request_id}]"
    return text


# --------------------------------------------------------------------------- the server
_STORED = ("tags", "importance", "session_id", "metadata")
#: Each tool argument that is a field of a REST request body: (model, field). The argument
#: takes that field's type and bounds (:func:`_rest_argument`), so the tool's published input
#: schema states the bounds the API enforces, from the one place they are written. Arguments
#: not here have none of their own to agree with (ids, cursors, enumerations the tool spells
#: as a Literal, times the server parses).
REST_ARGUMENTS: dict[str, dict[str, tuple[type[BaseModel], str]]] = {
    "store_fact": {
        name: (models.Fact, name)
        for name in ("statement", "confidence", "source", "model", *_STORED)
    },
    "store_conversation": {
        name: (models.Conversation, name) for name in ("messages", "title", "model", *_STORED)
    },
    "store_image": {
        **{
            name: (models.Image, name)
            for name in (
                "prompt",
                "negative_prompt",
                "generator",
                "seed",
                "steps",
                "guidance_scale",
                "scheduler",
                "uri",
                "sha256",
                "model",
                *_STORED,
            )
        },
        "width": (models.ImageSize, "width"),
        "height": (models.ImageSize, "height"),
    },
    "store_transcription": {
        name: (models.Transcription, name)
        for name in (
            "text",
            "segments",
            "language",
            "duration_seconds",
            "audio_uri",
            "model",
            *_STORED,
        )
    },
    "store_summary": {
        name: (models.Summary, name) for name in ("text", "covers", "model", *_STORED)
    },
    "store_memories": {"memories": (schemas.StoreMemoriesRequest, "memories")},
    "search_memories": {
        name: (schemas.SearchRequest, name)
        for name in ("query", "limit", "threshold", "tags", "session_id", "model")
    },
    "build_context": {
        name: (schemas.ContextRequest, name)
        for name in ("query", "messages", "session_id", "model", "max_tokens")
    },
    "prepare_context": {
        **{
            name: (schemas.PrepareContextRequest, name)
            for name in ("user_message", "recent_turns", "model", "max_tokens")
        },
        "session_id": (schemas.SearchRequest, "session_id"),
    },
    "record_turn": {
        **{
            name: (schemas.TurnRequest, name)
            for name in (
                "user_message",
                "assistant_message",
                "model",
                "idempotency_key",
                "user_name",
                "assistant_name",
            )
        },
        "session_id": (schemas.SearchRequest, "session_id"),
    },
    "update_memory": {
        name: (models.MemoryUpdate, name)
        for name in (
            "tags",
            "metadata",
            "importance",
            "title",
            "statement",
            "confidence",
            "text",
        )
    },
}
#: The bounds of a list of objects (messages, segments, memories): the tool keeps its own
#: item type (a TypedDict the LLM reads flat), with the list's bounds of REST's field.
_COUNT_BOUNDS = (annotated_types.MinLen, annotated_types.MaxLen)


def _without_none(annotation: Any) -> Any:
    """``annotation`` less its ``None`` (``X | None`` is ``X``)."""
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _rest_argument(argument: FieldInfo, rest: FieldInfo) -> tuple[Any, FieldInfo]:
    """The argument with the type and bounds of REST's field ``rest``, keeping its own
    default and description: optional where the tool has a default, required where not."""
    own = _without_none(argument.annotation)
    if get_origin(own) is list and get_args(own)[0] is not str:
        bounds = [m for m in rest.metadata if isinstance(m, _COUNT_BOUNDS)]
        kind: Any = Annotated[(own, *bounds)] if bounds else own
    else:
        base = _without_none(rest.annotation)
        kind = Annotated[(base, *rest.metadata)] if rest.metadata else base
    if not argument.is_required() and argument.default is None:
        kind = kind | None
    field = Field(description=argument.description)
    if not argument.is_required():
        field = Field(default=argument.default, description=argument.description)
    return kind, field


def _strict_arguments(tool: Tool) -> None:
    """Check ``tool``'s arguments as the API checks a body.

    Each argument of :data:`REST_ARGUMENTS` takes the bounds of its REST field, so the
    published input schema advertises what the API enforces and a value past them is
    refused before any call. And an argument the tool does not have is refused, as the
    API's bodies do (422): the SDK's arguments model ignores unknown keys, so a misspelt
    optional argument (``confidance``) was dropped and the call succeeded without it. The
    published input schema says so too (``additionalProperties: false``)."""
    model = tool.fn_metadata.arg_model
    if model.model_config.get("extra") == "forbid":
        return
    overrides: dict[str, Any] = {}
    for name, (rest_model, rest_name) in REST_ARGUMENTS.get(tool.name, {}).items():
        overrides[name] = _rest_argument(
            model.model_fields[name], rest_model.model_fields[rest_name]
        )
    strict = cast(
        type[ArgModelBase],
        create_model(
            model.__name__,
            __base__=cast(
                type[ArgModelBase],
                type(
                    model.__name__,
                    (model,),
                    {"model_config": ConfigDict(extra="forbid"), "__module__": model.__module__},
                ),
            ),
            __module__=model.__module__,
            **overrides,
        ),
    )
    tool.fn_metadata.arg_model = strict
    tool.parameters = strict.model_json_schema(by_alias=True)


class _Server(MCPServer[Any]):
    """The SDK's server, with arguments checked as the HTTP API checks a body: an argument
    the tool does not have is refused (:func:`_strict_arguments`, applied to every tool as
    it is added), and a call whose arguments fail the tool's schema is a tool error
    ``invalid_input: <field>: <message> (field: <field>)`` (:func:`describe`), not pydantic's
    report, which repeats the rejected value (an argument can hold a secret) and names the
    SDK's internal model."""

    def add_tool(
        self, fn: Callable[..., Any], name: str | None = None, *args: Any, **kwargs: Any
    ) -> None:
        super().add_tool(fn, name, *args, **kwargs)
        tool = self._tool_manager.get_tool(name or fn.__name__)
        if tool is not None:
            _strict_arguments(tool)

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, ValidationError):
                raise ToolError(describe(validation.first_error(cause.errors()))) from None
            raise


def build_mcp_server(clients: ClientSource, *, name: str = "halldyll-ray") -> MCPServer[Any]:
    """The MCP server with every tool and resource, over ``clients``.

    Args:
        clients: Gives each tool call a client that acts as the caller (see
            :data:`ClientSource`).
        name: The server's name in the MCP handshake.

    Returns:
        An :class:`mcp.server.mcpserver.MCPServer`; serve it with ``run_stdio_async()`` or
        through a Streamable HTTP session manager (:mod:`halldyll_ray.serve.mcp_http`).
    """
    from halldyll_ray import __version__

    # WARNING: the SDK configures the root logger when nothing has yet (a bare process);
    # at INFO it would log each in-process API call of the Ingress.
    server: MCPServer[Any] = _Server(
        name, version=__version__, instructions=INSTRUCTIONS, log_level="WARNING"
    )

    async def call(
        ctx: Context[Any, Any], op: Callable[[AsyncHalldyllClient], Awaitable[_T]]
    ) -> _T:
        try:
            async with clients(ctx) as client:
                return await op(client)
        except HalldyllError as exc:
            raise ToolError(describe(exc)) from None

    async def read(
        ctx: Context[Any, Any], op: Callable[[AsyncHalldyllClient], Awaitable[_T]]
    ) -> _T:
        try:
            async with clients(ctx) as client:
                return await op(client)
        except HalldyllError as exc:
            raise ResourceError(describe(exc)) from None

    async def store(ctx: Context[Any, Any], user_id: str, memory: dict[str, Any]) -> dict[str, Any]:
        stored = await call(ctx, lambda c: c.store_memory(memory, user_id=user_id))
        return _json(stored)

    writes = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
    reads = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    # ------------------------------------------------------------------- store, one per type
    @server.tool(annotations=writes)
    async def store_fact(
        ctx: Context[Any, Any],
        statement: Annotated[
            str,
            Field(
                description="One self-contained statement, e.g. 'Ada is allergic to peanuts'. "
                "Storing the same fact again reinforces it instead of duplicating it."
            ),
        ],
        kind: Annotated[
            Literal["permanent", "ephemeral"],
            Field(description="'ephemeral' facts expire (e.g. 'Ada is in Paris this week')."),
        ] = "permanent",
        confidence: Annotated[
            float | None, Field(ge=0, le=1, description="How sure you are, 0-1 (default 0.7).")
        ] = None,
        source: Annotated[
            str | None, Field(description="Where the fact comes from (a URL, 'user said').")
        ] = None,
        tags: Tags = None,
        importance: Importance = None,
        session_id: MemorySession = None,
        model: ModelRef = None,
        metadata: Metadata = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """Remember a fact about the user or their world, for later conversations.

        Use for durable knowledge: preferences, relationships, decisions, constraints. Returns
        the stored memory (its id, and reinforcement_count if it was already known).
        """
        fact = _present(
            type="fact",
            statement=statement,
            kind=kind,
            confidence=confidence,
            source=source,
            tags=tags,
            importance=importance,
            session_id=session_id,
            model=model,
            metadata=metadata,
        )
        return await store(ctx, user_id, fact)

    @server.tool(annotations=writes)
    async def store_conversation(
        ctx: Context[Any, Any],
        messages: Annotated[
            list[MessageArg],
            Field(
                description="The messages in order, each {role, content, name?, "
                "created_at?} (created_at: when it was said, ISO 8601)."
            ),
        ],
        title: Annotated[str | None, Field(description="A short title.")] = None,
        tags: Tags = None,
        importance: Importance = None,
        session_id: MemorySession = None,
        model: ModelRef = None,
        metadata: Metadata = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """Store a whole conversation (or an excerpt) as one memory, searchable per message.

        For a live chat, prefer record_turn after each exchange: it appends to the session's
        conversation. Returns the stored memory with its messages.
        """
        conversation = _present(
            type="conversation",
            messages=messages,
            title=title,
            tags=tags,
            importance=importance,
            session_id=session_id,
            model=model,
            metadata=metadata,
        )
        return await store(ctx, user_id, conversation)

    @server.tool(annotations=writes)
    async def store_image(
        ctx: Context[Any, Any],
        prompt: Annotated[str, Field(description="The prompt the image was generated from.")],
        negative_prompt: Annotated[str | None, Field(description="The negative prompt.")] = None,
        generator: Annotated[
            str | None, Field(description="The image model, e.g. 'RealVisXL_V5.0'.")
        ] = None,
        seed: Annotated[int | None, Field(ge=0, description="The generation seed.")] = None,
        steps: Annotated[int | None, Field(ge=1, description="Sampling steps.")] = None,
        guidance_scale: Annotated[float | None, Field(ge=0, description="CFG scale.")] = None,
        width: Annotated[int | None, Field(ge=1, description="Width in pixels.")] = None,
        height: Annotated[int | None, Field(ge=1, description="Height in pixels.")] = None,
        scheduler: Annotated[str | None, Field(description="The sampler/scheduler.")] = None,
        uri: Annotated[str | None, Field(description="Where the image file is.")] = None,
        sha256: Annotated[
            str | None, Field(description="SHA-256 of the file, 64 lowercase hex digits.")
        ] = None,
        tags: Tags = None,
        importance: Importance = None,
        session_id: MemorySession = None,
        model: ModelRef = None,
        metadata: Metadata = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """Record a generated image's prompt and parameters, so it can be found (by its
        prompt) and reproduced later. The image itself is not stored, only its uri."""
        size = None
        if width is not None or height is not None:
            size = _present(width=width, height=height)
        image = _present(
            type="image",
            prompt=prompt,
            negative_prompt=negative_prompt,
            generator=generator,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            size=size,
            scheduler=scheduler,
            uri=uri,
            sha256=sha256,
            tags=tags,
            importance=importance,
            session_id=session_id,
            model=model,
            metadata=metadata,
        )
        return await store(ctx, user_id, image)

    @server.tool(annotations=writes)
    async def store_transcription(
        ctx: Context[Any, Any],
        text: Annotated[
            str | None,
            Field(description="The transcript; may be omitted when segments are given."),
        ] = None,
        segments: Annotated[
            list[SegmentArg] | None,
            Field(description="Timed segments {start, end, text, speaker?}, in seconds."),
        ] = None,
        language: Annotated[
            str | None, Field(description="ISO 639-1 code; detected when omitted.")
        ] = None,
        duration_seconds: Annotated[
            float | None, Field(ge=0, description="Length of the audio.")
        ] = None,
        audio_uri: Annotated[str | None, Field(description="Where the audio file is.")] = None,
        tags: Tags = None,
        importance: Importance = None,
        session_id: MemorySession = None,
        model: ModelRef = None,
        metadata: Metadata = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """Store the transcript of an audio recording (a meeting, a voice note), searchable
        per segment. Give text, segments, or both."""
        transcription = _present(
            type="transcription",
            text=text,
            segments=segments,
            language=language,
            duration_seconds=duration_seconds,
            audio_uri=audio_uri,
            tags=tags,
            importance=importance,
            session_id=session_id,
            model=model,
            metadata=metadata,
        )
        return await store(ctx, user_id, transcription)

    @server.tool(annotations=writes)
    async def store_summary(
        ctx: Context[Any, Any],
        text: Annotated[str, Field(description="The summary.")],
        covers: Annotated[
            list[str] | None,
            Field(description="Ids of the memories this summary condenses (the same user's)."),
        ] = None,
        tags: Tags = None,
        importance: Importance = None,
        session_id: MemorySession = None,
        model: ModelRef = None,
        metadata: Metadata = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """Store a summary you wrote of earlier memories or of a long conversation."""
        summary = _present(
            type="summary",
            text=text,
            covers=covers,
            tags=tags,
            importance=importance,
            session_id=session_id,
            model=model,
            metadata=metadata,
        )
        return await store(ctx, user_id, summary)

    @server.tool(annotations=writes)
    async def store_memories(
        ctx: Context[Any, Any],
        memories: Annotated[
            list[dict[str, Any]],
            Field(
                min_length=1,
                description="1 to 500 memories of any types, each as the store_* tools "
                "take it plus its type, e.g. {'type': 'fact', 'statement': '...'} or "
                "{'type': 'conversation', 'messages': [{'role': 'user', 'content': '...'}]}.",
            ),
        ],
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """Store many memories in one call (an import, a backlog of notes), all or nothing.

        Faster than one store_* call each. If one memory is bad, nothing is stored and the
        error names it (field 'memories.3...'). Returns {'memories': [...]} as stored, in
        the order given.
        """
        stored = await call(ctx, lambda c: c.store_memories(memories, user_id=user_id))
        return {"memories": [_json(memory) for memory in stored]}

    # ------------------------------------------------------------------- recall
    @server.tool(annotations=reads)
    async def search_memories(
        ctx: Context[Any, Any],
        query: Annotated[
            str, Field(description="What to recall, in natural language or keywords.")
        ],
        mode: Annotated[
            Literal["hybrid", "semantic", "fulltext"] | None,
            Field(
                description="'hybrid' (meaning and words; the usual choice), 'semantic' "
                "(meaning only, falls back to words) or 'fulltext' (exact words, names, "
                "codes). Default: the server's (hybrid)."
            ),
        ] = None,
        limit: Annotated[
            int | None,
            Field(ge=1, le=MAX_SEARCH_LIMIT, description="How many results (default 10)."),
        ] = None,
        threshold: Annotated[
            float | None,
            Field(
                ge=-1,
                le=1,
                description="Minimum cosine similarity for semantic hits; raise it for fewer, "
                "closer results. Default: the server's.",
            ),
        ] = None,
        group: Annotated[
            Literal["part", "memory"],
            Field(
                description="'part': one result per matching message or segment (a long "
                "conversation can appear several times); 'memory': one result per memory."
            ),
        ] = "part",
        view: Annotated[
            Literal["full", "basic"],
            Field(
                description="'full': each result's whole memory (a conversation's messages "
                "aside); 'basic': without a transcription's text and segments, whose matched "
                "segment is in 'matched' (ask for it when recordings may match: a long one "
                "is thousands of segments in every result of it)."
            ),
        ] = "full",
        types: Types = None,
        tags: Annotated[
            list[str] | None, Field(description="Only memories with these tags.")
        ] = None,
        session_id: Annotated[str | None, Field(description="Only this session.")] = None,
        model: ModelFilter = None,
        include_shared: IncludeShared = True,
        since: Since = None,
        until: Until = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """Find the stored memories most relevant to a query, best first.

        Returns {"results": [{score, similarity, source, matched: {part, index, text},
        memory}]}: matched.text is the passage that matched, memory the memory (see view).
        """
        results = await call(
            ctx,
            lambda c: c.search(
                query,
                user_id=user_id,
                limit=limit,
                mode=mode,
                types=types,
                model=model,
                include_shared=include_shared,
                session_id=session_id,
                tags=tags,
                since=since,  # type: ignore[arg-type]  # ISO text; the server parses it
                until=until,  # type: ignore[arg-type]
                threshold=threshold,
                group=group,
                view=view,
            ),
        )
        return {"results": [_json(result) for result in results]}

    @server.tool(annotations=reads)
    async def build_context(
        ctx: Context[Any, Any],
        query: Annotated[
            str | None,
            Field(description="What the next prompt is about; default: the messages' text."),
        ] = None,
        messages: Annotated[
            list[MessageArg] | None,
            Field(description="The current conversation's recent messages."),
        ] = None,
        session_id: Annotated[
            str | None, Field(description="The session the prompt belongs to.")
        ] = None,
        model: ModelFilter = None,
        include_shared: IncludeShared = True,
        max_tokens: MaxTokens = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """Build a ready-to-paste block of the memories relevant to a prompt, under a token
        budget. Returns {text, token_count, max_tokens, sources, sections}: put text in the
        prompt; sources are the ids of the memories used. Give query, messages, or both."""
        context = await call(
            ctx,
            lambda c: c.build_context(
                query,
                user_id=user_id,
                messages=messages,
                model=model,
                include_shared=include_shared,
                session_id=session_id,
                max_tokens=max_tokens,
            ),
        )
        return _json(context)

    @server.tool(annotations=reads)
    async def prepare_context(
        ctx: Context[Any, Any],
        session_id: SessionId,
        user_message: Annotated[str, Field(description="The user's message about to be answered.")],
        recent_turns: Annotated[
            int, Field(ge=0, le=100, description="Past turns to include verbatim.")
        ] = 6,
        model: ModelFilter = None,
        max_tokens: MaxTokens = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """In a chat loop, before answering: the session's summary, the memories relevant to
        the message and the recent turns, as one context block {text, token_count, sources,
        sections}. After answering, call record_turn."""
        context = await call(
            ctx,
            lambda c: c.prepare_context(
                session_id,
                user_message,
                user_id=user_id,
                recent_turns=recent_turns,
                model=model,
                max_tokens=max_tokens,
            ),
        )
        return _json(context)

    @server.tool(annotations=writes)
    async def record_turn(
        ctx: Context[Any, Any],
        session_id: SessionId,
        user_message: Annotated[str, Field(description="What the user said.")],
        assistant_message: Annotated[str, Field(description="What the assistant answered.")],
        model: Annotated[
            str | None, Field(description="The registered model that answered.")
        ] = None,
        idempotency_key: Annotated[
            str | None,
            Field(
                description="Send the same key when retrying a turn after an 'unavailable' "
                "error: the turn is then stored once."
            ),
        ] = None,
        user_name: Annotated[
            str | None, Field(description="Who wrote the user message (indexed for search).")
        ] = None,
        assistant_name: Annotated[
            str | None, Field(description="Who answered (indexed for search).")
        ] = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """In a chat loop, after answering: append the exchange to the session's conversation
        (which is summarised and mined for facts as it grows). Returns {conversation_id,
        message_seqs, summary_id, fact_ids, replayed}."""
        turn = await call(
            ctx,
            lambda c: c.record_turn(
                session_id,
                user_message,
                assistant_message,
                user_id=user_id,
                model=model,
                idempotency_key=idempotency_key,
                user_name=user_name,
                assistant_name=assistant_name,
            ),
        )
        return _json(turn)

    # ------------------------------------------------------------------- one memory
    @server.tool(annotations=reads)
    async def get_memory(
        ctx: Context[Any, Any], memory_id: MemoryId, user_id: UserId = "me"
    ) -> dict[str, Any]:
        """Read one memory in full (a conversation with all its messages)."""
        return _json(await call(ctx, lambda c: c.get_memory(memory_id, user_id=user_id)))

    @server.tool(annotations=reads)
    async def fact_history(
        ctx: Context[Any, Any], memory_id: MemoryId, user_id: UserId = "me"
    ) -> dict[str, Any]:
        """How a fact changed: every version, oldest first (a closed one has valid_to and
        superseded_by, the fact that replaced it). Returns {items: [memory, ...]}."""
        versions = await call(ctx, lambda c: c.fact_history(memory_id, user_id=user_id))
        return {"items": [_json(m) for m in versions]}

    @server.tool(annotations=reads)
    async def list_jobs(
        ctx: Context[Any, Any],
        status: Annotated[
            Literal["queued", "running", "done", "failed"] | None,
            Field(description="Only jobs in this state."),
        ] = None,
        limit: PageSize = 20,
        cursor: Cursor = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """The background jobs that learn from recorded turns (fact extraction, session
        summaries), newest first: whether a turn has been learned from yet, and why not.
        Returns {items, next_cursor}."""
        page = await call(
            ctx, lambda c: c.list_jobs(user_id=user_id, status=status, limit=limit, cursor=cursor)
        )
        return _json(page)

    @server.tool(annotations=reads)
    async def list_memories(
        ctx: Context[Any, Any],
        types: Types = None,
        tags: Annotated[
            list[str] | None, Field(description="Only memories with these tags.")
        ] = None,
        session_id: Annotated[str | None, Field(description="Only this session.")] = None,
        model: ModelFilter = None,
        include_shared: IncludeShared = True,
        since: Since = None,
        until: Until = None,
        limit: PageSize = 20,
        cursor: Cursor = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """Browse memories newest first, by filters rather than by relevance (use
        search_memories to find by meaning). Returns {items, next_cursor}: a page of long
        memories can hold fewer than limit with more to read; pass next_cursor until it is
        null."""
        page = await call(
            ctx,
            lambda c: c.list_memories(
                user_id=user_id,
                types=types,
                model=model,
                include_shared=include_shared,
                session_id=session_id,
                tags=tags,
                since=since,  # type: ignore[arg-type]  # ISO text; the server parses it
                until=until,  # type: ignore[arg-type]
                limit=limit,
                cursor=cursor,
            ),
        )
        return _json(page)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, idempotent_hint=True))
    async def update_memory(
        ctx: Context[Any, Any],
        memory_id: MemoryId,
        tags: Annotated[list[str] | None, Field(description="Replaces the tags.")] = None,
        metadata: Annotated[
            dict[str, Any] | None, Field(description="Replaces the metadata.")
        ] = None,
        importance: Importance = None,
        title: Annotated[str | None, Field(description="A conversation's title.")] = None,
        statement: Annotated[str | None, Field(description="A fact's corrected statement.")] = None,
        confidence: Annotated[
            float | None, Field(ge=0, le=1, description="A fact's confidence.")
        ] = None,
        kind: Annotated[
            Literal["permanent", "ephemeral"] | None, Field(description="A fact's kind.")
        ] = None,
        text: Annotated[
            str | None, Field(description="A summary's or transcription's corrected text.")
        ] = None,
        user_id: UserId = "me",
    ) -> dict[str, Any]:
        """Correct a stored memory; fields left out stay as they are. Returns the memory."""
        update = _present(
            tags=tags,
            metadata=metadata,
            importance=importance,
            title=title,
            statement=statement,
            confidence=confidence,
            kind=kind,
            text=text,
        )
        memory = await call(ctx, lambda c: c.update_memory(memory_id, update, user_id=user_id))
        return _json(memory)

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True))
    async def delete_memory(
        ctx: Context[Any, Any], memory_id: MemoryId, user_id: UserId = "me"
    ) -> dict[str, Any]:
        """Forget a memory for good (when the user asks, or it is wrong). Returns
        {"deleted": memory_id}."""
        await call(ctx, lambda c: c.delete_memory(memory_id, user_id=user_id))
        return {"deleted": memory_id}

    @server.tool(annotations=reads)
    async def list_models(
        ctx: Context[Any, Any],
        kind: Annotated[ModelKindName | None, Field(description="Only this kind.")] = None,
    ) -> dict[str, Any]:
        """The registered AI models memories can be scoped to (their names go in the model
        argument of the other tools). Returns {items: [{id, name, kind, version}]}."""
        models = await call(ctx, lambda c: c.list_models(kind))
        return {"items": [_json(model) for model in models]}

    # ------------------------------------------------------------------- resources
    @server.resource(
        "halldyll://users/{user_id}/memories/recent",
        name="recent_memories",
        description="A user's 20 newest memories ('me' for the key's own user), as JSON.",
        mime_type="application/json",
    )
    async def recent_memories(user_id: str, ctx: Context[Any, Any]) -> str:
        page = await read(ctx, lambda c: c.list_memories(user_id=user_id, limit=20))
        return page.model_dump_json(exclude_none=True)

    @server.resource(
        "halldyll://users/{user_id}/sessions/{session_id}/transcript",
        name="session_transcript",
        description="The conversation recorded in a chat session, one message per line (its own "
        "line breaks indented by four spaces).",
        mime_type="text/plain",
    )
    async def session_transcript(user_id: str, session_id: str, ctx: Context[Any, Any]) -> str:
        async def transcript(client: AsyncHalldyllClient) -> list[str]:
            page = await client.list_memories(
                user_id=user_id, types=["conversation"], session_id=session_id, limit=500
            )
            lines: list[str] = []
            for item in reversed(page.items):  # oldest conversation first
                memory = await client.get_memory(item.id, user_id=user_id)
                for message in memory.messages:
                    who = speaker(message.role, message.name)
                    # A message's own line breaks (\n, U+2028 ...) indent what follows them, as
                    # in a context: a line of it cannot pass for another timed message.
                    lines.append(
                        fence(f"[{message.created_at.isoformat()}] {who}: {message.content}")
                    )
            return lines

        lines = await read(ctx, transcript)
        if not lines:
            raise ResourceNotFoundError(f"no conversation is recorded in session {session_id}")
        return "\n".join(lines)

    return server


# --------------------------------------------------------------------------- stdio
def fixed_client(client: AsyncHalldyllClient) -> ClientSource:
    """A :data:`ClientSource` that lends every call the same client (it stays open)."""

    @asynccontextmanager
    async def lend(ctx: Context[Any, Any]) -> AsyncIterator[AsyncHalldyllClient]:
        yield client

    return lend


async def run_stdio(base_url: str, api_key: str, *, request_timeout_s: float = 60) -> None:
    """Serve the MCP tools over stdin/stdout, calling the HTTP API at ``base_url``.

    Args:
        base_url: Root URL of the service, e.g. ``http://127.0.0.1:8000``.
        api_key: The API key every call authenticates with.
        request_timeout_s: Seconds each HTTP call may take.

    Returns when the client closes stdin.
    """
    async with AsyncHalldyllClient(base_url, api_key, timeout=request_timeout_s) as client:
        await build_mcp_server(fixed_client(client)).run_stdio_async()
