"""Role-based access control: one permission matrix, enforced on every call for a principal.

Every operation that arrives over HTTP or a Ray handle runs through :class:`AuthorizedEngine`
for an authenticated :class:`~halldyll_ray.models.Principal`, never for a ``user_id`` taken on
trust. The matrix says, per role and operation, whose data the principal may reach:

- ``ANY``: any user's; ``SELF``: only its own; ``GRANTED``: its own plus the owners an Admin
  granted it (Viewers); ``NAMED``: the user the call names, who must be an enabled User or
  Viewer (a Service acting for end users); absent: nothing.

A refused call raises :class:`~halldyll_ray.errors.PermissionDenied` and leaves exactly one
``denied`` audit row; an Admin's or Service's read of another user's memories leaves an
``ok`` audit row; every mutation is audited by the engine with the principal as actor.
PostgreSQL's row-level security (migration 0002) stands behind all of this: even a bug here
cannot make one user's transaction see another user's rows.
"""

from __future__ import annotations

import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from halldyll_ray import requestctx, validation
from halldyll_ray.components.events import Recheck, Subscription
from halldyll_ray.components.reembedding import ReembedStatus
from halldyll_ray.components.search import CachedSearch
from halldyll_ray.errors import NotFound, PermissionDenied
from halldyll_ray.models import (
    AIModel,
    ApiKey,
    Context,
    ErasureReceipt,
    Job,
    Memory,
    MemoryType,
    MemoryUpdate,
    Message,
    ModelKind,
    NewApiKey,
    Page,
    Principal,
    Role,
    SearchMode,
    SearchResult,
    StoredMemory,
    StoredMessage,
    TurnRecord,
    User,
)
from halldyll_ray.portability import ImportReport, file_chunks

if TYPE_CHECKING:  # the engine imports this module to hand out AuthorizedEngine
    from halldyll_ray.engine import MemoryEngine

_T = TypeVar("_T")


class Operation(StrEnum):
    MEMORY_READ = "memory.read"
    MEMORY_WRITE = "memory.write"
    USER_READ = "user.read"
    USER_MANAGE = "user.manage"
    MODEL_READ = "model.read"
    MODEL_MANAGE = "model.manage"
    KEY_MANAGE = "key.manage"
    GRANT_MANAGE = "grant.manage"
    AUDIT_READ = "audit.read"
    MAINTENANCE = "maintenance"


class Reach(StrEnum):
    ANY = "any"
    NAMED = "named user"
    GRANTED = "own + granted"
    SELF = "own"


Op, R = Operation, Reach
#: THE permission matrix (role x operation -> reach); an absent entry means "denied".
PERMISSIONS: Mapping[Role, Mapping[Operation, Reach]] = {
    Role.ADMIN: {op: R.ANY for op in Operation},
    Role.USER: {
        Op.MEMORY_READ: R.SELF,
        Op.MEMORY_WRITE: R.SELF,
        Op.USER_READ: R.SELF,
        Op.MODEL_READ: R.ANY,
        Op.KEY_MANAGE: R.SELF,
    },
    Role.SERVICE: {
        Op.MEMORY_READ: R.NAMED,
        Op.MEMORY_WRITE: R.NAMED,
        Op.USER_READ: R.NAMED,
        Op.MODEL_READ: R.ANY,
        Op.KEY_MANAGE: R.SELF,
    },
    Role.VIEWER: {
        Op.MEMORY_READ: R.GRANTED,
        Op.USER_READ: R.SELF,
        Op.MODEL_READ: R.ANY,
        Op.KEY_MANAGE: R.SELF,
    },
}
del Op, R


def permission_table() -> str:
    """The matrix as a Markdown table (the README's copy is checked against this)."""
    roles = list(Role)
    lines = [
        "| operation | " + " | ".join(r.value.capitalize() for r in roles) + " |",
        "| --- |" + " --- |" * len(roles),
    ]
    for op in Operation:
        cells = [PERMISSIONS[r][op].value if op in PERMISSIONS[r] else "—" for r in roles]
        lines.append(f"| `{op.value}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class AuthorizedEngine:
    """The engine's operations for one principal, with the matrix checked on every call.

    Args:
        engine: An initialised :class:`MemoryEngine`.
        principal: Who is calling (from :meth:`MemoryEngine.authenticate`).
        request_id: Carried into every audit row of the calls made through this object.

    Memory operations take the target user first, like the engine; ``None`` means the
    principal itself.
    """

    def __init__(
        self, engine: MemoryEngine, principal: Principal, *, request_id: str | None = None
    ) -> None:
        self.engine = engine
        self.principal = principal
        # Checked here, where it enters: every audit row of the calls made through this
        # object (refusals too) carries it (InvalidInput, field ``request_id``).
        self.request_id = validation.request_id(request_id)

    # ------------------------------------------------------------------ the check
    async def _deny(
        self,
        operation: str,
        target: UUID | None,
        reason: str,
        targets: Sequence[UUID] = (),
        *,
        role: Role | None = None,
    ) -> PermissionDenied:
        """The audited refusal. ``role``: the caller's role as stored now, when the check read
        it: the principal's is the one its key authenticated with, which a role changed since
        (an Admin made a User while its change feed stays open) no longer is, and the audit
        row and the message must name the role the refusal was decided by."""
        role = self.principal.role if role is None else role
        with requestctx.acting(self.principal.user_id, self.request_id):
            await self.engine.record_denied(
                self.principal.user_id,
                target,
                operation,
                "user" if target else None,
                list(targets) or ([target] if target else []),
                reason=reason,
                details={"role": role.value},
            )
        return PermissionDenied(
            f"{role.value} {self.principal.username!r} may not {operation}"
            + ("" if target is None or target == self.principal.user_id else f" for {target}")
            + f" ({reason})",
            operation=operation,
        )

    async def _check(self, op: Operation, action: str, target: UUID | None = None) -> UUID:
        """Raise PermissionDenied (audited) unless the principal may do ``op`` for ``target``;
        AuthenticationFailed (audited) once the principal's API key no longer authenticates
        (revoked, rotated or expired since it was authenticated, or its user disabled or
        deleted): a principal held past its key's end (an open change feed, the Python API,
        a principal passed to an engine deployment) is refused as a new request with that key
        is. A principal made without a key (trusted code) of a disabled or deleted user gets
        PermissionDenied."""
        me = self.principal
        target = me.user_id if target is None else target
        states, key_live = await self.engine.access_state([me.user_id, target], me)
        mine = states.get(me.user_id)
        if me.key_id is not None and (not key_live or mine is None or mine[1]):
            # Revoked, rotated, expired, gone with its deleted user, or its user disabled:
            # refused as a new request with that key is (401, authenticate's refusal), on
            # every surface. A held principal (an open change feed, the Python API) of a
            # disabled or deleted user was a 403 where the same key's next request is a 401.
            if mine is None:
                reason = "deleted user"
            elif mine[1]:
                reason = "disabled user"
            else:
                reason = "revoked or expired key"
            raise await self.engine.refuse_dead_key(me, reason=reason)
        if mine is None or mine[1]:
            raise await self._deny(
                action,
                target,
                "the calling user is disabled or deleted",
                role=None if mine is None else mine[0],
            )
        role = mine[0]  # the role as stored now: a changed role takes effect at once
        reach = PERMISSIONS[role].get(op)
        if reach is None:
            raise await self._deny(action, target, f"{role.value}s may not {op.value}", role=role)
        if reach is Reach.ANY or target == me.user_id:
            return target
        if reach is Reach.NAMED:
            # One refusal for a user that does not exist and one it may not act for (an
            # Admin, a Service, a disabled user): two told a Service which ids were accounts.
            state = states.get(target)
            if state is None or state[1] or state[0] not in (Role.USER, Role.VIEWER):
                raise await self._deny(
                    action,
                    target,
                    "services act only for existing, enabled users and viewers",
                    role=role,
                )
            return target
        if reach is Reach.GRANTED and target in await self.engine.viewer_grants(me.user_id):
            state = states.get(target)
            if state is None or state[1]:  # as a Service may not act for a disabled user
                raise await self._deny(
                    action,
                    target,
                    "a disabled user's memories are read by Admins only",
                    role=role,
                )
            return target
        raise await self._deny(
            action, target, f"{role.value}s reach only {reach.value} data", role=role
        )

    async def _rechecked(
        self, op: Operation, action: str, target: UUID, items: AsyncIterable[_T]
    ) -> AsyncIterator[_T]:
        """``items``, with the check of ``op`` for ``target`` made again once
        EVENTS_RECHECK_SECONDS have passed since the last one, before the next item is
        handed on: a long import or export, like an open change feed, ends with
        AuthenticationFailed or PermissionDenied once its key is revoked (or expires) or its
        rights are taken away, instead of running to its end on the rights it began with."""
        every = self.engine.settings.events_recheck_seconds
        checked = time.monotonic()
        try:
            async for item in items:
                if time.monotonic() - checked >= every:
                    await self._check(op, action, target)
                    checked = time.monotonic()
                yield item
        finally:
            close = getattr(items, "aclose", None)
            if close is not None:  # an export's transaction ends with it, however it ends
                await close()

    async def _run(self, call: Callable[[], Awaitable[_T]]) -> _T:
        with requestctx.acting(self.principal.user_id, self.request_id):
            return await call()

    async def _read(
        self,
        action: str,
        user_id: UUID | str | None,
        call: Callable[[UUID], Awaitable[_T]],
        *,
        read: Callable[[_T], bool] = lambda _: True,
    ) -> _T:
        """``call`` for ``user_id`` if the principal may read it; a read of another user's
        data is audited when ``read(result)`` says data was read."""
        target = await self._check(Operation.MEMORY_READ, action, self._target(user_id))
        result = await self._run(lambda: call(target))
        if target != self.principal.user_id and read(result):
            await self._run(
                lambda: self.engine.record_read(self.principal.user_id, target, action, [])
            )
        return result

    async def _write(
        self, action: str, user_id: UUID | str | None, call: Callable[[UUID], Awaitable[_T]]
    ) -> _T:
        target = await self._check(Operation.MEMORY_WRITE, action, self._target(user_id))
        return await self._run(lambda: call(target))

    @staticmethod
    def _target(user_id: UUID | str | None) -> UUID | None:
        return None if user_id is None else validation.parse_uuid(user_id, "user_id")

    # ------------------------------------------------------------------ memories
    async def store_memory(
        self, user_id: UUID | str | None, memory: Memory | dict[str, Any]
    ) -> StoredMemory:
        return await self._write(
            "memory.store", user_id, lambda u: self.engine.store_memory(u, memory)
        )

    async def store_memories(
        self, user_id: UUID | str | None, memories: Sequence[Memory | dict[str, Any]]
    ) -> list[StoredMemory]:
        return await self._write(
            "memory.store", user_id, lambda u: self.engine.store_memories(u, memories)
        )

    async def get_memory(
        self, user_id: UUID | str | None, memory_id: UUID | str, *, include_messages: bool = True
    ) -> StoredMemory:
        return await self._read(
            "memory.get",
            user_id,
            lambda u: self.engine.get_memory(u, memory_id, include_messages=include_messages),
        )

    async def fact_history(
        self, user_id: UUID | str | None, memory_id: UUID | str
    ) -> list[StoredMemory]:
        return await self._read(
            "memory.history", user_id, lambda u: self.engine.fact_history(u, memory_id)
        )

    async def list_memories(self, user_id: UUID | str | None, **filters: Any) -> Page[StoredMemory]:
        return await self._read(
            "memory.list", user_id, lambda u: self.engine.list_memories(u, **filters)
        )

    async def export_memories(self, user_id: UUID | str | None) -> AsyncIterator[bytes]:
        """The user's export (:meth:`MemoryEngine.export_memories`), checked as a read."""
        target = await self._check(Operation.MEMORY_READ, "memory.export", self._target(user_id))
        if target != self.principal.user_id:
            await self._run(
                lambda: self.engine.record_read(self.principal.user_id, target, "memory.export", [])
            )
        return self._rechecked(
            Operation.MEMORY_READ,
            "memory.export",
            target,
            self.engine.export_memories(
                target, request_id=self.request_id, actor_id=self.principal.user_id
            ),
        )

    async def import_memories(
        self,
        user_id: UUID | str | None,
        lines: AsyncIterable[bytes | str] | Iterable[bytes | str],
        *,
        atomic: bool = False,
    ) -> ImportReport:
        return await self._write(
            "memory.import",
            user_id,
            lambda u: self.engine.import_memories(
                u,
                self._rechecked(Operation.MEMORY_WRITE, "memory.import", u, file_chunks(lines)),
                atomic=atomic,
                request_id=self.request_id,
            ),
        )

    async def update_memory(
        self,
        user_id: UUID | str | None,
        memory_id: UUID | str,
        update: MemoryUpdate | dict[str, Any],
    ) -> StoredMemory:
        return await self._write(
            "memory.update", user_id, lambda u: self.engine.update_memory(u, memory_id, update)
        )

    async def delete_memory(self, user_id: UUID | str | None, memory_id: UUID | str) -> None:
        await self._write(
            "memory.delete", user_id, lambda u: self.engine.delete_memory(u, memory_id)
        )

    async def append_messages(
        self,
        user_id: UUID | str | None,
        conversation_id: UUID | str,
        messages: Sequence[Message | dict[str, Any]],
    ) -> list[StoredMessage]:
        return await self._write(
            "conversation.append",
            user_id,
            lambda u: self.engine.append_messages(u, conversation_id, messages),
        )

    async def search(
        self,
        user_id: UUID | str | None,
        query: str,
        limit: int | None = None,
        *,
        mode: SearchMode | str | None = None,
        types: Iterable[MemoryType | str] | None = None,
        **filters: Any,
    ) -> list[SearchResult]:
        return await self._read(
            "memory.search",
            user_id,
            lambda u: self.engine.search(u, query, limit, mode=mode, types=types, **filters),
        )

    async def search_json(
        self,
        user_id: UUID | str | None,
        query: str,
        limit: int | None = None,
        *,
        mode: SearchMode | str | None = None,
        types: Iterable[MemoryType | str] | None = None,
        **filters: Any,
    ) -> bytes:
        """:meth:`search` as the HTTP answer's JSON (:meth:`MemoryEngine.search_json`)."""
        return await self._read(
            "memory.search",
            user_id,
            lambda u: self.engine.search_json(u, query, limit, mode=mode, types=types, **filters),
        )

    async def cached_search_json(
        self, user_id: UUID | str | None, query: str, limit: int | None = None, **options: Any
    ) -> CachedSearch:
        """:meth:`search_json`'s answer when the result cache holds it
        (:meth:`MemoryEngine.cached_search_json`). Checked as a search is; a cached answer
        read for another user is audited as the search would be, a miss is not (the search
        that follows it is)."""
        return await self._read(
            "memory.search",
            user_id,
            lambda u: self.engine.cached_search_json(u, query, limit, **options),
            read=lambda found: found.answer is not None,
        )

    async def build_context(
        self, user_id: UUID | str | None, query: str | None = None, **options: Any
    ) -> Context:
        return await self._read(
            "context.build", user_id, lambda u: self.engine.build_context(u, query, **options)
        )

    async def prepare_context(
        self, user_id: UUID | str | None, session_id: str, user_message: str, **options: Any
    ) -> Context:
        return await self._read(
            "context.prepare",
            user_id,
            lambda u: self.engine.prepare_context(u, session_id, user_message, **options),
        )

    async def record_turn(
        self,
        user_id: UUID | str | None,
        session_id: str,
        user_message: str,
        assistant_message: str,
        **options: Any,
    ) -> TurnRecord:
        return await self._write(
            "turn.record",
            user_id,
            lambda u: self.engine.record_turn(
                u, session_id, user_message, assistant_message, **options
            ),
        )

    async def list_jobs(self, user_id: UUID | str | None, **filters: Any) -> Page[Job]:
        """The user's background jobs (:meth:`MemoryEngine.list_jobs`): whoever may read the
        user's memories may read their jobs (``memory.read``)."""
        return await self._read("job.list", user_id, lambda u: self.engine.list_jobs(u, **filters))

    async def get_job(self, user_id: UUID | str | None, job_id: UUID | str) -> Job:
        """One background job of the user (``memory.read``)."""
        return await self._read("job.get", user_id, lambda u: self.engine.get_job(u, job_id))

    async def purge_expired(self) -> int:
        await self._check(Operation.MAINTENANCE, "memory.purge_expired")
        return await self._run(self.engine.purge_expired)

    async def reembed_status(self) -> ReembedStatus:
        """Where a change of embedding model stands (Admins: ``maintenance``)."""
        await self._check(Operation.MAINTENANCE, "embedding.reembed_status")
        return await self._run(self.engine.reembed_status)

    async def health(self) -> dict[str, Any]:
        """The engine's full health report (:meth:`MemoryEngine.health`: versions, the model,
        counters; Admins: ``maintenance``)."""
        await self._check(Operation.MAINTENANCE, "service.health")
        return await self._run(self.engine.health)

    async def check_service_stats(self) -> None:
        """Allow reading the service's own request metrics (``GET /v1/stats``): Admins only
        (``maintenance``); anyone else gets PermissionDenied, audited as ``service.stats``."""
        await self._check(Operation.MAINTENANCE, "service.stats")

    async def subscribe_events(
        self,
        user_id: UUID | str | None,
        *,
        after: int | str | None = None,
        rechecks: Sequence[Recheck] = (),
    ) -> Subscription:
        """Follow the user's memory changes (:meth:`MemoryEngine.subscribe_events`).

        Whoever may read the user's memories may follow them (``memory.read``); a denial is
        audited as ``memory.events``, and so is an Admin's or Service's subscription to
        another user. The permission is checked again every EVENTS_RECHECK_SECONDS while it
        is open: a revoked grant or a disabled caller ends the subscription with
        PermissionDenied; ``rechecks`` are run then too (the HTTP route checks that its API
        key still authenticates).
        """
        action = "memory.events"
        target = await self._check(Operation.MEMORY_READ, action, self._target(user_id))

        async def recheck() -> None:
            await self._check(Operation.MEMORY_READ, action, target)

        subscription = await self._run(
            lambda: self.engine.subscribe_events(target, after=after, rechecks=[recheck, *rechecks])
        )
        if target != self.principal.user_id:
            await self._run(
                lambda: self.engine.record_read(self.principal.user_id, target, action, [])
            )
        return subscription

    # ------------------------------------------------------------------ users
    async def create_user(
        self, username: str, email: str | None = None, role: Role | str = Role.USER, **kw: Any
    ) -> User:
        await self._check(Operation.USER_MANAGE, "user.create")
        return await self._run(lambda: self.engine.create_user(username, email, role, **kw))

    async def get_user(self, user_id: UUID | str | None = None) -> User:
        target = await self._check(Operation.USER_READ, "user.get", self._target(user_id))
        return await self._run(lambda: self.engine.get_user(target))

    async def list_users(self, **options: Any) -> Page[User]:
        await self._check(Operation.USER_MANAGE, "user.list")
        return await self._run(lambda: self.engine.list_users(**options))

    async def update_user(self, user_id: UUID | str, **changes: Any) -> User:
        target = await self._check(Operation.USER_MANAGE, "user.update", self._target(user_id))
        return await self._run(lambda: self.engine.update_user(target, **changes))

    async def delete_user(self, user_id: UUID | str) -> ErasureReceipt:
        target = await self._check(Operation.USER_MANAGE, "user.delete", self._target(user_id))
        return await self._run(lambda: self.engine.delete_user(target))

    # ------------------------------------------------------------------ AI models
    async def register_model(self, name: str, kind: ModelKind | str, **kw: Any) -> AIModel:
        await self._check(Operation.MODEL_MANAGE, "model.register")
        return await self._run(lambda: self.engine.register_model(name, kind, **kw))

    async def delete_model(self, ref: UUID | str) -> None:
        await self._check(Operation.MODEL_MANAGE, "model.delete")
        await self._run(lambda: self.engine.delete_model(ref))

    async def list_models(self, **options: Any) -> list[AIModel]:
        await self._check(Operation.MODEL_READ, "model.list")
        return await self._run(lambda: self.engine.list_models(**options))

    async def get_model(self, ref: UUID | str) -> AIModel:
        await self._check(Operation.MODEL_READ, "model.get")
        return await self._run(lambda: self.engine.get_model(ref))

    # ------------------------------------------------------------------ keys and grants
    async def create_api_key(
        self,
        user_id: UUID | str | None = None,
        *,
        name: str = "",
        expires_at: datetime | None = None,
    ) -> NewApiKey:
        target = await self._check(Operation.KEY_MANAGE, "key.create", self._target(user_id))
        return await self._run(
            lambda: self.engine.create_api_key(target, name=name, expires_at=expires_at)
        )

    async def list_api_keys(self, user_id: UUID | str | None = None) -> list[ApiKey]:
        target = await self._check(Operation.KEY_MANAGE, "key.list", self._target(user_id))
        return await self._run(lambda: self.engine.list_api_keys(target))

    async def _key_owner(self, key_id: UUID | str, action: str) -> UUID:
        try:
            owner = (await self.engine.get_api_key(key_id)).user_id
        except NotFound:
            await self._check(Operation.KEY_MANAGE, action)  # a stranger's probe is audited
            raise
        try:
            await self._check(Operation.KEY_MANAGE, action, owner)  # the refusal is audited
        except PermissionDenied:
            # Another user's key reads as an unknown one: the 403 named its owner's user id,
            # and told a key id that exists from one that does not.
            raise NotFound(f"API key {validation.parse_uuid(key_id, 'key_id')} not found") from None
        return owner

    async def revoke_api_key(self, key_id: UUID | str) -> ApiKey:
        await self._key_owner(key_id, "key.revoke")
        return await self._run(lambda: self.engine.revoke_api_key(key_id))

    async def rotate_api_key(self, key_id: UUID | str) -> NewApiKey:
        await self._key_owner(key_id, "key.rotate")
        return await self._run(lambda: self.engine.rotate_api_key(key_id))

    async def grant_viewer(self, viewer_id: UUID | str, owner_id: UUID | str) -> None:
        await self._check(Operation.GRANT_MANAGE, "grant.create")
        await self._run(lambda: self.engine.grant_viewer(viewer_id, owner_id))

    async def list_viewer_grants(self, viewer_id: UUID | str | None = None) -> list[UUID]:
        """The owners whose memories a Viewer may read (Admins; a user for itself)."""
        target = await self._check(Operation.USER_READ, "grant.list", self._target(viewer_id))
        return await self._run(lambda: self.engine.viewer_grants(target))

    async def revoke_viewer_grant(self, viewer_id: UUID | str, owner_id: UUID | str) -> None:
        await self._check(Operation.GRANT_MANAGE, "grant.revoke")
        await self._run(lambda: self.engine.revoke_viewer_grant(viewer_id, owner_id))

    # ------------------------------------------------------------------ audit
    async def list_audit(self, **filters: Any) -> list[dict[str, Any]]:
        await self._check(Operation.AUDIT_READ, "audit.list")
        return await self._run(lambda: self.engine.list_audit(**filters))
