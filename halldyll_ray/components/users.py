"""Users, their roles and Viewers' read grants (SPEC §4.1)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from halldyll_ray import requestctx, validation
from halldyll_ray.components.audit import write_audit
from halldyll_ray.components.base import require_user
from halldyll_ray.components.embeddings import Embeddings
from halldyll_ray.errors import Conflict, InvalidInput, NotFound, Unavailable, quoted
from halldyll_ray.models import ErasureReceipt, Page, Role, User
from halldyll_ray.storage.cache import TieredCache
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q


def _changes(old: Any, new: Any) -> dict[str, Any]:
    """What an update changed, for its audit row: the fields, and a role or disabled flag's
    old and new values (an email's values are personal data and stay out of the log)."""
    changed = sorted(
        name for name in ("role", "disabled", "email", "metadata") if old[name] != new[name]
    )
    details: dict[str, Any] = {"fields": changed}
    for name in ("role", "disabled"):
        if name in changed:
            details[name] = {"from": old[name], "to": new[name]}
    return details


class Users:
    """Create, read, update and delete users; grant Viewers another user's memories.

    Deleting a user is an erasure (:meth:`delete`): the caches derived from their data go
    with their rows, and a receipt says what went.
    """

    def __init__(self, db: Database, cache: TieredCache, embeddings: Embeddings) -> None:
        self.db = db
        self.cache = cache
        self.embeddings = embeddings

    async def create(
        self,
        username: str,
        email: str | None = None,
        role: Role | str = Role.USER,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> User:
        """Create a user. Raises InvalidInput for a bad field, Conflict for a taken name/email."""
        username = validation.username(username)
        email = validation.email(email)
        checked_role = validation.role(role)
        checked_metadata = validation.metadata(metadata)
        try:
            async with self.db.scoped() as conn:
                row = await conn.fetchrow(
                    *bind(
                        "insert_user",
                        id=uuid.uuid4(),
                        username=username,
                        email=email,
                        role=checked_role.value,
                        metadata=checked_metadata,
                    )
                )
                await write_audit(conn, "user.create", "user", [row["id"]], row["id"])
        except Conflict:
            raise Conflict(
                f"a user named {quoted(username)} or with that email already exists"
            ) from None
        return User(**dict(row))

    async def get(self, user_id: UUID | str) -> User:
        row = await self.db.fetchrow(q("get_user"), validation.parse_uuid(user_id, "user_id"))
        if row is None:
            raise NotFound(f"user {user_id} not found")
        return User(**dict(row))

    async def get_by_username(self, username: str) -> User:
        # Not cut to 64 characters: a longer name named another user (its first 64).
        row = await self.db.fetchrow(q("get_user_by_name"), validation.username(username))
        if row is None:
            raise NotFound(f"user {quoted(username)} not found")
        return User(**dict(row))

    async def page(self, *, limit: int = 100, cursor: str | None = None) -> Page[User]:
        limit = validation.limit(limit, 1000)
        after_at, after_id = validation.decode_cursor(cursor, listing="users")
        rows = await self.db.fetch(
            q("list_users"), None if after_id is None else str(after_id), after_at, limit + 1
        )
        users = [User(**dict(row)) for row in rows[:limit]]
        next_cursor = (
            validation.encode_cursor(users[-1].created_at, users[-1].id, listing="users")
            if len(rows) > limit
            else None
        )
        return Page[User](items=users, next_cursor=next_cursor)

    async def update(
        self,
        user_id: UUID | str,
        *,
        role: Role | str | None = None,
        disabled: bool | None = None,
        email: str | None = None,
        clear_email: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> User:
        user_id = validation.parse_uuid(user_id, "user_id")
        role_value = None if role is None else validation.role(role).value
        email = validation.email(email)
        if disabled is not None and not isinstance(disabled, bool):
            raise InvalidInput("disabled must be true or false", field="disabled")
        clear_email = validation.flag(clear_email, "clear_email")
        async with self.db.scoped() as conn:
            old = await conn.fetchrow(q("lock_user_for_update"), user_id)
            if old is None:
                raise NotFound(f"user {user_id} not found")
            row = await conn.fetchrow(
                *bind(
                    "update_user",
                    id=user_id,
                    role=role_value,
                    disabled=disabled,
                    set_email=email is not None or clear_email,
                    email=email,
                    metadata=None if metadata is None else validation.metadata(metadata),
                )
            )
            if row is None:
                raise NotFound(f"user {user_id} not found")
            await write_audit(
                conn, "user.update", "user", [user_id], user_id, details=_changes(old, row)
            )
            if old["role"] == Role.VIEWER.value and row["role"] != Role.VIEWER.value:
                # Grants are a Viewer's: they go with the role, so that becoming a Viewer
                # again reads nobody's memories until granted anew.
                owners = [r["owner_id"] for r in await conn.fetch(q("drop_viewer_grants"), user_id)]
                if owners:
                    await write_audit(
                        conn,
                        "grant.revoke",
                        "user",
                        owners,
                        user_id,
                        details={"reason": f"role changed to {row['role']}"},
                    )
        return User(**dict(row))

    async def delete(self, user_id: UUID | str) -> ErasureReceipt:
        """Erase a user: every row that is theirs, and the cache entries derived from them.

        In one transaction, with the user's row locked first, then their viewer grants in the order
        of their key (the lock order of ``storage/sql/users.sql``): count what goes, delete the user
        (memories, messages, chunks, API keys, grants and turn records cascade), remove from Redis
        and this process's LRU their cached searches and session state and the cached embeddings of
        their stored texts, write the ``user.delete`` audit row with the counts, commit. After the
        commit the cache is swept once more, for an entry a concurrent search wrote meanwhile; one
        written after that sweep is removed by its writer, which checks that the user still
        exists once it has written (:func:`~halldyll_ray.components.base.cache_for_user`). What
        stays, by design: the audit log (append-only; its rows name the user's id, never their
        texts), and a query's cached embedding (keyed by a hash of the query, not linked to any
        user; it expires within a week).

        Returns:
            The receipt: counts by kind, when, by whom, the request id.

        Raises:
            InvalidInput: ``user_id`` is not a UUID.
            NotFound: no such user.
            Unavailable: Redis failed; nothing was deleted (retry).
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        context = requestctx.current()
        # As the user: row-level security shows their rows, which the counts read.
        async with self.db.scoped(user_id) as conn:
            if await conn.fetchrow(q("lock_user_for_update"), user_id) is None:
                raise NotFound(f"user {user_id} not found")
            # Then the grants the DELETE's cascade takes, in one order for every erasure.
            await conn.execute(q("lock_erased_grants"), user_id)
            counts = await conn.fetchrow(q("erasure_counts"), user_id)
            texts = [r["indexed"] for r in await conn.fetch(q("erasure_texts"), user_id)]
            await conn.fetchval(q("delete_user"), user_id)
            removed = await self.cache.erase(user_id, self.embeddings.erasure_keys(texts))
            receipt = ErasureReceipt(
                user_id=user_id,
                username=counts["username"],
                erased_at=datetime.now(UTC),
                erased_by=context.actor_id,
                request_id=context.request_id,
                memories=dict(sorted(counts["memories"].items())),
                messages=counts["messages"],
                chunks=counts["chunks"],
                api_keys=counts["api_keys"],
                viewer_grants=counts["viewer_grants"],
                turn_requests=counts["turn_requests"],
                events=counts["events"],
                jobs=counts["jobs"],
                cache_entries=removed,
            )
            details = receipt.model_dump(
                mode="json", exclude={"user_id", "erased_by", "request_id"}
            )
            await write_audit(conn, "user.delete", "user", [user_id], user_id, details=details)
        with contextlib.suppress(Unavailable):
            await self.cache.erase(user_id, [])
        return receipt

    async def states(self, user_ids: Sequence[UUID]) -> dict[UUID, tuple[Role, bool]]:
        """(role, disabled) of each existing user among ``user_ids``; InvalidInput
        (``user_ids``) for what is not a list of UUIDs."""
        ids = [validation.parse_uuid(i, "user_ids") for i in validation.items(user_ids, "user_ids")]
        rows = await self.db.fetch(q("users_state"), list(dict.fromkeys(ids)))
        return {row["id"]: (Role(row["role"]), row["disabled"]) for row in rows}

    async def states_with_key(
        self, user_ids: Sequence[UUID], caller: UUID, key_id: UUID
    ) -> tuple[dict[UUID, tuple[Role, bool]], bool]:
        """:meth:`states`, and whether ``caller``'s API key ``key_id`` is still live (not
        revoked, not expired, still the caller's), in one query."""
        rows = await self.db.fetch(
            q("users_state_with_key"), list(dict.fromkeys(user_ids)), key_id, caller
        )
        states = {row["id"]: (Role(row["role"]), row["disabled"]) for row in rows}
        return states, any(row["key_live"] for row in rows)

    # ------------------------------------------------------------------ viewer grants
    async def grant_viewer(self, viewer_id: UUID | str, owner_id: UUID | str) -> None:
        """Let a Viewer read another user's memories."""
        viewer_id = validation.parse_uuid(viewer_id, "viewer_id")
        owner_id = validation.parse_uuid(owner_id, "owner_id")
        if viewer_id == owner_id:
            raise InvalidInput("a user always reads their own memories", field="owner_id")
        viewer = await self.get(viewer_id)
        if viewer.role is not Role.VIEWER:
            raise InvalidInput("read grants are for users with the viewer role", field="viewer_id")
        await self.get(owner_id)
        async with self.db.scoped() as conn:
            # Checked again with the Viewer's row locked: a role changed meanwhile
            # (update() drops a former Viewer's grants) must not be granted after all. The
            # owner's row is locked with it, both in the order of their ids, so that grants
            # given both ways at once take turns instead of deadlocking.
            rows = await conn.fetch(q("lock_grant_users"), [viewer_id, owner_id])
            roles = {row["id"]: row["role"] for row in rows}
            for user_id in (viewer_id, owner_id):
                if user_id not in roles:
                    raise NotFound(f"user {user_id} not found")
            if roles[viewer_id] != Role.VIEWER.value:
                raise InvalidInput(
                    "read grants are for users with the viewer role", field="viewer_id"
                )
            added = await conn.fetchval(
                q("grant_viewer"), viewer_id, owner_id, requestctx.current().actor_id
            )
            if added is not None:  # given again: nothing changed, nothing to audit
                await write_audit(conn, "grant.create", "user", [owner_id], viewer_id)

    async def revoke_viewer_grant(self, viewer_id: UUID | str, owner_id: UUID | str) -> None:
        viewer_id = validation.parse_uuid(viewer_id, "viewer_id")
        owner_id = validation.parse_uuid(owner_id, "owner_id")
        async with self.db.scoped() as conn:
            if await conn.fetchval(q("revoke_viewer_grant"), viewer_id, owner_id) is None:
                raise NotFound("no such grant")
            await write_audit(conn, "grant.revoke", "user", [owner_id], viewer_id)

    async def viewer_grants(self, viewer_id: UUID | str) -> list[UUID]:
        """The owners whose memories a Viewer may read."""
        viewer_id = validation.parse_uuid(viewer_id, "viewer_id")
        rows = await self.db.fetch(q("viewer_grants"), viewer_id)
        if not rows:
            await require_user(self.db, viewer_id)
        return [row["owner_id"] for row in rows]
