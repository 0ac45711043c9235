"""The asynchronous client: :class:`AsyncHalldyllClient` (httpx.AsyncClient).

About 540 lines: one method per endpoint with the full docstring (the sync client's methods
point here); the requests are built in :mod:`halldyll_ray.client.requests`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from halldyll_ray.client.requests import (
    NDJSON,
    SEND_ERRORS,
    UPLOAD_CHUNK_BYTES,
    Endpoints,
    ExportStart,
    Id,
    MemoryInput,
    Request,
    T,
    aupload_pieces,
    check_open,
    client_options,
    unavailable,
    unchecked,
    upload_data,
)
from halldyll_ray.models import (
    AIModel,
    ApiKey,
    Context,
    ErasureReceipt,
    Job,
    JobStatus,
    MemoryType,
    MemoryUpdate,
    Message,
    ModelKind,
    NewApiKey,
    Page,
    Role,
    SearchGroup,
    SearchMode,
    SearchResult,
    SearchView,
    StoredMemory,
    StoredMessage,
    TurnRecord,
    User,
)
from halldyll_ray.portability import ImportReport
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


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    """A file's bytes in pieces, read off the event loop."""
    with path.open("rb") as file:
        while piece := await asyncio.to_thread(file.read, UPLOAD_CHUNK_BYTES):
            yield piece


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

    Raises:
        InvalidInput: ``base_url`` is not an http(s) URL, ``api_key`` not an API key, or
            ``timeout`` not a finite positive number of seconds (``field`` names which).
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
            transport=transport, **client_options(base_url, api_key, timeout)
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

    async def _send(self, request: Request[T]) -> T:
        content, headers = request.content()
        check_open(self._http, request)
        try:
            response = await self._http.request(
                request.method,
                request.path,
                content=content,
                headers=headers,
                params=request.params,
            )
        except SEND_ERRORS as exc:
            raise unavailable(request, exc) from exc
        return request.finish(response)

    # ----------------------------------------------------------------------- health
    async def healthz(self) -> dict[str, Any]:
        """Liveness: the service process answers.

        Returns:
            ``{"status": "ok"}``.
        """
        return await self._send(Endpoints.healthz())

    async def readyz(self) -> dict[str, Any]:
        """Readiness per dependency (PostgreSQL, Redis, the embedding model).

        Returns:
            The report; ``report["ok"]`` is False (rather than an exception) when a dependency
            is down and the service answered 503 with its report.
        """
        return await self._send(Endpoints.readyz())

    # ----------------------------------------------------------------------- users
    async def me(self) -> User:
        """The user the API key belongs to."""
        return await self._send(Endpoints.me())

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
            Endpoints.create_user(unchecked(UserCreate, username=username, email=email, role=role))
        )

    async def list_users(self, *, limit: int = 100, cursor: str | None = None) -> Page[User]:
        """One page of users (Admin only), oldest first.

        Args:
            limit: Page size.
            cursor: ``next_cursor`` of the previous page.
        """
        return await self._send(Endpoints.list_users(limit=limit, cursor=cursor))

    async def get_user(self, user_id: Id) -> User:
        """A user by id (``"me"`` for the caller)."""
        return await self._send(Endpoints.get_user(user_id))

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
            Endpoints.update_user(
                user_id,
                request=unchecked(UserUpdate, role=role, disabled=disabled, email=email),
            )
        )

    async def delete_user(self, user_id: Id) -> ErasureReceipt:
        """Erase a user and every memory they own (Admin only); the erasure receipt."""
        return await self._send(Endpoints.delete_user(user_id))

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
            Endpoints.create_api_key(
                user_id, request=unchecked(ApiKeyCreate, name=name, expires_at=expires_at)
            )
        )

    async def list_api_keys(self, user_id: Id = "me") -> list[ApiKey]:
        """The public records of a user's keys (no secrets)."""
        return await self._send(Endpoints.list_api_keys(user_id))

    async def rotate_api_key(self, key_id: Id) -> NewApiKey:
        """Replace a key by a new one with the same user and name; the old one is revoked."""
        return await self._send(Endpoints.rotate_api_key(key_id))

    async def revoke_api_key(self, key_id: Id) -> ApiKey:
        """Revoke a key at once.

        Returns:
            The key's record, with ``revoked_at`` set.
        """
        return await self._send(Endpoints.revoke_api_key(key_id))

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
            Endpoints.register_model(
                unchecked(ModelCreate, name=name, kind=kind, version=version, metadata=metadata)
            )
        )

    async def list_models(self, kind: ModelKind | str | None = None) -> list[AIModel]:
        """Registered models, optionally of one kind."""
        return await self._send(Endpoints.list_models(kind))

    async def get_model(self, ref: Id) -> AIModel:
        """A registered model by id or name."""
        return await self._send(Endpoints.get_model(ref))

    async def delete_model(self, ref: Id) -> None:
        """Remove a model from the registry (Admin only).

        Raises:
            Conflict: Memories are still scoped to the model.
        """
        await self._send(Endpoints.delete_model(ref))

    # ----------------------------------------------------------------------- memories
    async def store_memory(self, memory: MemoryInput, *, user_id: Id = "me") -> StoredMemory:
        """Store a conversation, fact, image, transcription or summary.

        Args:
            memory: A memory model (``Fact(...)``...) or its JSON form with a ``type`` key.
            user_id: Whose memory (``"me"``; another user for an Admin or a Service).

        Returns:
            The stored memory; a fact stored again comes back reinforced, not duplicated.
        """
        return await self._send(Endpoints.store_memory(memory, user_id=user_id))

    async def store_memories(
        self, memories: Sequence[MemoryInput], *, user_id: Id = "me"
    ) -> list[StoredMemory]:
        """Store up to STORE_BATCH_MAX (500) memories of any types in one request, all or
        nothing (``POST .../memories/batch``): embedded in one request to the Embedding
        deployment and written in one transaction.

        Args:
            memories: Memory models or their JSON forms (``type`` key), in any mix.
            user_id: Whose memories (``"me"``; another user for an Admin or a Service).

        Returns:
            The memories as stored, in the order given (a fact equal to a stored one, or to
            an earlier one of the batch, comes back reinforced with that fact's id).

        Raises:
            InvalidInput: a bad memory (``field`` names it: ``memories.3...``), an empty
                batch or one over STORE_BATCH_MAX; nothing is stored.
        """
        return await self._send(Endpoints.store_memories(memories, user_id=user_id))

    async def export_memories(self, *, user_id: Id = "me") -> AsyncIterator[bytes]:
        """Every memory of the user as an NDJSON file (:mod:`halldyll_ray.portability`),
        streamed: ``async for piece in client.export_memories(): out.write(piece)``.

        Yields:
            Pieces of the file (bytes of any size; join them for the whole file).

        Raises:
            NotFound, PermissionDenied (before the first piece); Unavailable: the connection
            failed or stalled (``timeout`` seconds between pieces).
        """
        request = Endpoints.export_memories(user_id)
        check_open(self._http, request)
        try:
            async with self._http.stream(request.method, request.path) as response:
                if not response.is_success:
                    await response.aread()
                    request.finish(response)
                start = ExportStart(request)
                async for piece in response.aiter_bytes():
                    if passed := start.feed(piece):
                        yield passed
                if rest := start.end():
                    yield rest
        except SEND_ERRORS as exc:
            raise unavailable(request, exc) from exc

    async def import_memories(
        self,
        data: bytes | PathLike[str] | AsyncIterable[bytes] | Iterable[bytes],
        *,
        user_id: Id = "me",
        atomic: bool = False,
    ) -> ImportReport:
        """Import an export file into the user's memories (idempotent).

        Args:
            data: The file: its bytes, its path, or its pieces (an iterator of bytes, e.g. an
                export being streamed from another service, or a progress-reporting reader).
            user_id: Whose memories the lines become.
            atomic: All or nothing: a bad line refuses the file (InvalidInput whose
                ``fields["report"]`` lists the bad lines); nothing is stored then.

        Returns:
            The report: created by type, merged facts, unchanged lines, bad lines by number.
            The service answers when the whole file is in, so no read timeout applies.

        Raises:
            InvalidInput: Not an export file (no header, another version), over the size
                limit, or (``atomic``) a bad line. NotFound, PermissionDenied, Unavailable.
        """
        request = Endpoints.import_memories(user_id, atomic=atomic)
        checked = upload_data(data)
        check_open(self._http, request)
        content: bytes | AsyncIterable[bytes]
        if isinstance(checked, bytes):
            content = checked
        elif isinstance(checked, PathLike):
            content = _read_file(Path(checked))
        else:
            content = aupload_pieces(checked)
        timeout = self._http.timeout
        try:
            response = await self._http.request(
                request.method,
                request.path,
                params=request.params,
                content=content,
                headers={"Content-Type": NDJSON},
                timeout=httpx.Timeout(timeout.connect, read=None, write=timeout.write),
            )
        except SEND_ERRORS as exc:
            raise unavailable(request, exc) from exc
        return request.finish(response)

    async def get_memory(self, memory_id: Id, *, user_id: Id = "me") -> StoredMemory:
        """One memory, with a conversation's messages."""
        return await self._send(Endpoints.get_memory(memory_id, user_id=user_id))

    async def fact_history(self, memory_id: Id, *, user_id: Id = "me") -> list[StoredMemory]:
        """Every version of a fact, oldest first: the statements it replaced and those that
        replaced it (closed ones have ``valid_to`` and ``superseded_by``). InvalidInput for a
        memory that is not a fact."""
        return await self._send(Endpoints.fact_history(memory_id, user_id=user_id))

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
            limit: Page size: the most memories a page holds (fewer when the server's
                PAGE_MAX_BYTES ends it early; read on until ``next_cursor`` is None).
            cursor: ``next_cursor`` of the previous page.
        """
        return await self._send(
            Endpoints.list_memories(
                unchecked(
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
        return await self._send(Endpoints.update_memory(memory_id, update=update, user_id=user_id))

    async def delete_memory(self, memory_id: Id, *, user_id: Id = "me") -> None:
        """Delete a memory."""
        await self._send(Endpoints.delete_memory(memory_id, user_id=user_id))

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
            Endpoints.append_messages(
                conversation_id,
                request=unchecked(AppendMessagesRequest, messages=messages),
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
        mode: SearchMode | str | None = None,
        types: Sequence[MemoryType | str] | None = None,
        model: str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        threshold: float | None = None,
        group: SearchGroup | str = SearchGroup.PART,
        view: SearchView | str | None = None,
    ) -> list[SearchResult]:
        """The memories most relevant to a query, best first.

        Args:
            query: What to look for.
            user_id: Whose memories.
            limit: How many results (the server's ``SEARCH_TOP_K`` when None).
            mode: ``hybrid``, ``semantic`` (full-text fallback) or ``fulltext``; the
                server's ``SEARCH_MODE`` (default ``hybrid``) when None.
            types: Only these memory types.
            model: This registered model's memories...
            include_shared: ...plus the shared ones.
            session_id: Only this session.
            tags: Only memories with these tags.
            since: Created at or after this time.
            until: Created before this time.
            threshold: Minimum cosine similarity (the server's default when None).
            group: ``part``: a result per matching message/segment (several per memory when
                they earn it); ``memory``: a result per memory.
            view: ``full``: each hit's memory without a conversation's messages; ``basic``:
                without a transcription's text and segments either (much smaller answers
                when long transcriptions match).
        """
        return await self._send(
            Endpoints.search(
                unchecked(
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
                    group=group,
                    view=view,
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
            Endpoints.build_context(
                unchecked(
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
        include_shared: bool = True,
        max_tokens: int | None = None,
    ) -> Context:
        """Before an LLM call: summary, relevant memories, recent turns and the message.

        Args:
            session_id: The chat session.
            user_message: The message about to be sent to the model.
            user_id: Whose session.
            recent_turns: How many past turns to include verbatim.
            model: This registered model's memories...
            include_shared: ...plus the shared ones.
            max_tokens: Budget (the server's ``MAX_CONTEXT_TOKENS`` when None).
        """
        return await self._send(
            Endpoints.prepare_context(
                unchecked(
                    PrepareContextRequest,
                    user_message=user_message,
                    recent_turns=recent_turns,
                    model=model,
                    include_shared=include_shared,
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
        idempotency_key: str | None = None,
        user_name: str | None = None,
        assistant_name: str | None = None,
    ) -> TurnRecord:
        """After an LLM call: store the exchange in the session's conversation.

        Args:
            session_id: The chat session.
            user_message: What the user said.
            assistant_message: What the model answered.
            user_id: Whose session.
            model: The registered model that answered.
            idempotency_key: Send the same key when retrying a turn after a 503: it is
                stored once (the record says ``replayed``). The same key with another turn
                is InvalidInput.
            user_name: Who wrote the user message; assistant_name: who answered. Stored as
                the messages' names and indexed, so a search naming them finds the turn.
        """
        return await self._send(
            Endpoints.record_turn(
                unchecked(
                    TurnRequest,
                    user_message=user_message,
                    assistant_message=assistant_message,
                    model=model,
                    idempotency_key=idempotency_key,
                    user_name=user_name,
                    assistant_name=assistant_name,
                ),
                session_id=session_id,
                user_id=user_id,
            )
        )

    # ----------------------------------------------------------------------- jobs
    async def list_jobs(
        self,
        *,
        user_id: Id = "me",
        status: JobStatus | str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[Job]:
        """The user's background jobs (fact extraction, session summaries), newest first.

        Args:
            user_id: Whose jobs.
            status: Only ``queued``, ``running``, ``done`` or ``failed`` jobs.
            kind: Only jobs of this kind (``extract``, ``summarize``).
            limit: Page size (1-500).
            cursor: ``next_cursor`` of the previous page.
        """
        return await self._send(
            Endpoints.list_jobs(
                user_id=user_id, status=status, kind=kind, limit=limit, cursor=cursor
            )
        )

    async def get_job(self, job_id: Id, *, user_id: Id = "me") -> Job:
        """One background job (an id of a recorded turn's ``job_ids``): its status, tries,
        last error and result."""
        return await self._send(Endpoints.get_job(job_id, user_id=user_id))

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
            Endpoints.list_audit(
                user_id=user_id,
                operation=operation,
                outcome=outcome,
                before_id=before_id,
                limit=limit,
            )
        )
