"""The synchronous client: :class:`HalldyllClient` (httpx.Client)."""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Iterator, Mapping, Sequence
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
    check_open,
    client_options,
    unavailable,
    unchecked,
    upload_data,
    upload_pieces,
)
from halldyll_ray.errors import InvalidInput
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


# --------------------------------------------------------------------------- sync client
class HalldyllClient:
    """Synchronous client for the halldyll-ray HTTP API.

    The same methods, arguments and errors as :class:`AsyncHalldyllClient`, without ``await``.

    Args:
        base_url: Root URL of the service, e.g. ``http://127.0.0.1:8000``.
        api_key: The API key sent as ``Authorization: Bearer``.
        timeout: Seconds to wait for each request.
        transport: An httpx transport to send requests through.

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
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(transport=transport, **client_options(base_url, api_key, timeout))

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

    def _send(self, request: Request[T]) -> T:
        content, headers = request.content()
        check_open(self._http, request)
        try:
            response = self._http.request(
                request.method,
                request.path,
                content=content,
                headers=headers,
                params=request.params,
            )
        except SEND_ERRORS as exc:
            raise unavailable(request, exc) from exc
        return request.finish(response)

    def healthz(self) -> dict[str, Any]:
        """Liveness; see :meth:`AsyncHalldyllClient.healthz`."""
        return self._send(Endpoints.healthz())

    def readyz(self) -> dict[str, Any]:
        """Readiness per dependency; see :meth:`AsyncHalldyllClient.readyz`."""
        return self._send(Endpoints.readyz())

    def me(self) -> User:
        """The user the API key belongs to."""
        return self._send(Endpoints.me())

    def create_user(
        self, username: str, email: str | None = None, *, role: Role | str = Role.USER
    ) -> User:
        """Create a user; see :meth:`AsyncHalldyllClient.create_user`."""
        return self._send(
            Endpoints.create_user(unchecked(UserCreate, username=username, email=email, role=role))
        )

    def list_users(self, *, limit: int = 100, cursor: str | None = None) -> Page[User]:
        """One page of users; see :meth:`AsyncHalldyllClient.list_users`."""
        return self._send(Endpoints.list_users(limit=limit, cursor=cursor))

    def get_user(self, user_id: Id) -> User:
        """A user by id (``"me"`` for the caller)."""
        return self._send(Endpoints.get_user(user_id))

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
            Endpoints.update_user(
                user_id,
                request=unchecked(UserUpdate, role=role, disabled=disabled, email=email),
            )
        )

    def delete_user(self, user_id: Id) -> ErasureReceipt:
        """Erase a user and every memory they own (Admin only); the erasure receipt."""
        return self._send(Endpoints.delete_user(user_id))

    def create_api_key(
        self, user_id: Id = "me", *, name: str = "", expires_at: datetime | None = None
    ) -> NewApiKey:
        """Create an API key; see :meth:`AsyncHalldyllClient.create_api_key`."""
        return self._send(
            Endpoints.create_api_key(
                user_id, request=unchecked(ApiKeyCreate, name=name, expires_at=expires_at)
            )
        )

    def list_api_keys(self, user_id: Id = "me") -> list[ApiKey]:
        """The public records of a user's keys (no secrets)."""
        return self._send(Endpoints.list_api_keys(user_id))

    def rotate_api_key(self, key_id: Id) -> NewApiKey:
        """Replace a key by a new one; the old one is revoked."""
        return self._send(Endpoints.rotate_api_key(key_id))

    def revoke_api_key(self, key_id: Id) -> ApiKey:
        """Revoke a key at once; returns its record with ``revoked_at`` set."""
        return self._send(Endpoints.revoke_api_key(key_id))

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
            Endpoints.register_model(
                unchecked(ModelCreate, name=name, kind=kind, version=version, metadata=metadata)
            )
        )

    def list_models(self, kind: ModelKind | str | None = None) -> list[AIModel]:
        """Registered models, optionally of one kind."""
        return self._send(Endpoints.list_models(kind))

    def get_model(self, ref: Id) -> AIModel:
        """A registered model by id or name."""
        return self._send(Endpoints.get_model(ref))

    def delete_model(self, ref: Id) -> None:
        """Remove a model from the registry; see :meth:`AsyncHalldyllClient.delete_model`."""
        self._send(Endpoints.delete_model(ref))

    def store_memory(self, memory: MemoryInput, *, user_id: Id = "me") -> StoredMemory:
        """Store a memory; see :meth:`AsyncHalldyllClient.store_memory`."""
        return self._send(Endpoints.store_memory(memory, user_id=user_id))

    def store_memories(
        self, memories: Sequence[MemoryInput], *, user_id: Id = "me"
    ) -> list[StoredMemory]:
        """Store memories all or nothing; see :meth:`AsyncHalldyllClient.store_memories`."""
        return self._send(Endpoints.store_memories(memories, user_id=user_id))

    def export_memories(self, *, user_id: Id = "me") -> Iterator[bytes]:
        """The user's export file in pieces; see :meth:`AsyncHalldyllClient.export_memories`."""
        request = Endpoints.export_memories(user_id)
        check_open(self._http, request)
        try:
            with self._http.stream(request.method, request.path) as response:
                if not response.is_success:
                    response.read()
                    request.finish(response)
                start = ExportStart(request)
                for piece in response.iter_bytes():
                    if passed := start.feed(piece):
                        yield passed
                if rest := start.end():
                    yield rest
        except SEND_ERRORS as exc:
            raise unavailable(request, exc) from exc

    def import_memories(
        self,
        data: bytes | PathLike[str] | Iterable[bytes],
        *,
        user_id: Id = "me",
        atomic: bool = False,
    ) -> ImportReport:
        """Import an export file; see :meth:`AsyncHalldyllClient.import_memories`."""
        request = Endpoints.import_memories(user_id, atomic=atomic)
        checked = upload_data(data)
        check_open(self._http, request)
        if isinstance(checked, AsyncIterable):
            raise InvalidInput(
                "data must be bytes, a path or an iterable of bytes pieces: the synchronous "
                "client cannot read an async iterable",
                field="data",
            )
        try:
            if isinstance(checked, PathLike):
                with Path(checked).open("rb") as file:
                    return self._upload(request, iter(lambda: file.read(UPLOAD_CHUNK_BYTES), b""))
            return self._upload(
                request, checked if isinstance(checked, bytes) else upload_pieces(checked)
            )
        except SEND_ERRORS as exc:
            raise unavailable(request, exc) from exc

    def _upload(self, request: Request[T], content: bytes | Iterable[bytes]) -> T:
        timeout = self._http.timeout
        response = self._http.request(
            request.method,
            request.path,
            params=request.params,
            content=content,
            headers={"Content-Type": NDJSON},
            timeout=httpx.Timeout(timeout.connect, read=None, write=timeout.write),
        )
        return request.finish(response)

    def get_memory(self, memory_id: Id, *, user_id: Id = "me") -> StoredMemory:
        """One memory, with a conversation's messages."""
        return self._send(Endpoints.get_memory(memory_id, user_id=user_id))

    def fact_history(self, memory_id: Id, *, user_id: Id = "me") -> list[StoredMemory]:
        """Every version of a fact, oldest first: the statements it replaced and those that
        replaced it (closed ones have ``valid_to`` and ``superseded_by``). InvalidInput for a
        memory that is not a fact."""
        return self._send(Endpoints.fact_history(memory_id, user_id=user_id))

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

    def update_memory(
        self, memory_id: Id, update: MemoryUpdate | Mapping[str, Any], *, user_id: Id = "me"
    ) -> StoredMemory:
        """Change a memory; see :meth:`AsyncHalldyllClient.update_memory`."""
        return self._send(Endpoints.update_memory(memory_id, update=update, user_id=user_id))

    def delete_memory(self, memory_id: Id, *, user_id: Id = "me") -> None:
        """Delete a memory."""
        self._send(Endpoints.delete_memory(memory_id, user_id=user_id))

    def append_messages(
        self,
        conversation_id: Id,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        user_id: Id = "me",
    ) -> list[StoredMessage]:
        """Append messages to a conversation; see :meth:`AsyncHalldyllClient.append_messages`."""
        return self._send(
            Endpoints.append_messages(
                conversation_id,
                request=unchecked(AppendMessagesRequest, messages=messages),
                user_id=user_id,
            )
        )

    def search(
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
        """The most relevant memories; see :meth:`AsyncHalldyllClient.search`."""
        return self._send(
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

    def prepare_context(
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
        """Before an LLM call; see :meth:`AsyncHalldyllClient.prepare_context`."""
        return self._send(
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

    def record_turn(
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
        """After an LLM call; see :meth:`AsyncHalldyllClient.record_turn`."""
        return self._send(
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

    def list_jobs(
        self,
        *,
        user_id: Id = "me",
        status: JobStatus | str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[Job]:
        """The user's background jobs; see :meth:`AsyncHalldyllClient.list_jobs`."""
        return self._send(
            Endpoints.list_jobs(
                user_id=user_id, status=status, kind=kind, limit=limit, cursor=cursor
            )
        )

    def get_job(self, job_id: Id, *, user_id: Id = "me") -> Job:
        """One background job; see :meth:`AsyncHalldyllClient.get_job`."""
        return self._send(Endpoints.get_job(job_id, user_id=user_id))

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
            Endpoints.list_audit(
                user_id=user_id,
                operation=operation,
                outcome=outcome,
                before_id=before_id,
                limit=limit,
            )
        )
