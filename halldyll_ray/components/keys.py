"""API keys: shown once, stored as a keyed hash, rotated and revoked (SPEC §4.1)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from uuid import UUID

import asyncpg

from halldyll_ray import validation
from halldyll_ray.components.audit import Audit, write_audit
from halldyll_ray.components.base import require_user
from halldyll_ray.config import Settings
from halldyll_ray.errors import AuthenticationFailed, Conflict, InvalidInput, NotFound, Unavailable
from halldyll_ray.keys import (
    check_principal_proof,
    generate_key,
    hash_key,
    key_prefix,
    principal_proof,
    verify_key,
)
from halldyll_ray.models import ApiKey, NewApiKey, Principal, Role
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q

#: How long a principal's proof is accepted, in seconds: a request's hops take milliseconds;
#: the margin covers clock differences between nodes and long-running handle callers.
PRINCIPAL_PROOF_MAX_AGE_S = 900


class ApiKeys:
    """Create, list, revoke and rotate API keys; authenticate a key to a :class:`Principal`."""

    def __init__(self, db: Database, audit: Audit, settings: Settings) -> None:
        self.db = db
        self.audit = audit
        self.settings = settings
        self._secret: bytes | None = None

    async def _key_secret(self) -> bytes:
        if self._secret is None:
            configured = self.settings.api_key_secret
            if configured is not None:
                self._secret = configured.get_secret_value().encode()
            else:
                stored = await self.db.fetchval(q("meta_value"), "api_key_secret")
                if stored is None:
                    raise Unavailable("the API key secret is missing: run `halldyll migrate`")
                self._secret = bytes.fromhex(stored)
        return self._secret

    async def create(
        self,
        user_id: UUID | str,
        *,
        name: str = "",
        expires_at: datetime | None = None,
        replaces: UUID | None = None,
    ) -> NewApiKey:
        """Create a key for a user. The returned ``key`` is shown this once and never stored.

        Raises:
            InvalidInput: a bad name or expiry, or ``replaces`` that is not the id of one of
                the user's keys. NotFound: no such user.
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        validation.key_name(name)
        if replaces is not None:
            replaces = validation.parse_uuid(replaces, "replaces")
        expires_at = validation.timestamp(expires_at, "expires_at")
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise InvalidInput("expires_at must be in the future", field="expires_at")
        secret = await self._key_secret()
        async with self.db.scoped() as conn:
            if await conn.fetchrow(q("get_user"), user_id) is None:
                raise NotFound(f"user {user_id} not found")
            if replaces is not None:
                # Another user's key (or none) was linked as the one this key replaced.
                old = await conn.fetchrow(q("get_api_key"), replaces)
                if old is None or old["user_id"] != user_id:
                    raise InvalidInput(
                        "replaces must be the id of one of the user's keys", field="replaces"
                    )
            return await self._insert(conn, secret, user_id, name, expires_at, replaces)

    @staticmethod
    async def _insert(
        conn: asyncpg.Connection,
        secret: bytes,
        user_id: UUID,
        name: str,
        expires_at: datetime | None,
        replaces: UUID | None,
    ) -> NewApiKey:
        prefix, key = generate_key()
        row = await conn.fetchrow(
            *bind(
                "insert_api_key",
                id=uuid.uuid4(),
                user_id=user_id,
                prefix=prefix,
                hash=hash_key(secret, key),
                name=name,
                expires_at=expires_at,
                replaces=replaces,
            )
        )
        await write_audit(
            conn, "key.create", "api_key", [row["id"]], user_id, details={"prefix": prefix}
        )
        return NewApiKey(key=key, api_key=ApiKey(**dict(row)))

    async def get(self, key_id: UUID | str) -> ApiKey:
        key_id = validation.parse_uuid(key_id, "key_id")
        row = await self.db.fetchrow(q("get_api_key"), key_id)
        if row is None:  # the id as parsed: another user's key reads the same (access.py)
            raise NotFound(f"API key {key_id} not found")
        return ApiKey(**dict(row))

    async def of_user(self, user_id: UUID | str) -> list[ApiKey]:
        user_id = validation.parse_uuid(user_id, "user_id")
        rows = await self.db.fetch(q("list_api_keys"), user_id)
        if not rows:
            await require_user(self.db, user_id)
        return [ApiKey(**dict(row)) for row in rows]

    async def revoke(self, key_id: UUID | str) -> ApiKey:
        """Revoke a key at once; revoking twice keeps the first revocation time, and only the
        first is audited (the others change nothing), concurrent ones too."""
        key_id = validation.parse_uuid(key_id, "key_id")
        async with self.db.scoped() as conn:
            row = await conn.fetchrow(q("revoke_api_key"), key_id)
            if row is None:
                raise NotFound(f"API key {key_id} not found")
            if row["revoked_now"]:
                await write_audit(conn, "key.revoke", "api_key", [key_id], row["user_id"])
        key = dict(row)
        del key["revoked_now"]
        return ApiKey(**key)

    async def rotate(self, key_id: UUID | str) -> NewApiKey:
        """A new key for the same user, name and expiry, replacing (and revoking) the old one.

        Rotation replaces the secret, not the key's lifetime: the new key expires when the old
        one would have, and a revoked or expired key cannot be rotated (Conflict), so no key
        outlives the expiry it was given. One transaction with the user's row, then the old
        key's row locked (the lock order of ``storage/sql/users.sql``): of two concurrent
        rotations one replaces the key and the other gets Conflict, so no two live keys come
        of one, and an erasure of the user at the same time goes first or waits.
        """
        key_id = validation.parse_uuid(key_id, "key_id")
        secret = await self._key_secret()
        async with self.db.scoped() as conn:
            # The user's row first, then the key's (storage/sql/keys.sql: lock_key_owner).
            owner = await conn.fetchval(q("lock_key_owner"), key_id)
            old = None if owner is None else await conn.fetchrow(q("lock_api_key"), key_id)
            if old is None:
                raise NotFound(f"API key {key_id} not found")
            if old["revoked_at"] is not None:
                raise Conflict("a revoked key cannot be rotated; create a new one")
            expires_at = old["expires_at"]
            if expires_at is not None and expires_at <= datetime.now(UTC):
                raise Conflict("an expired key cannot be rotated; create a new one")
            new = await self._insert(conn, secret, old["user_id"], old["name"], expires_at, key_id)
            await conn.fetchrow(q("revoke_api_key"), key_id)
            await write_audit(conn, "key.revoke", "api_key", [key_id], old["user_id"])
        return new

    @staticmethod
    def _identity(principal: Principal) -> str:
        return f"{principal.user_id}|{principal.username}|{principal.role.value}|{principal.key_id}"

    async def seal(self, principal: Principal) -> Principal:
        """``principal`` with its proof (see :class:`~halldyll_ray.models.Principal`)."""
        proof = principal_proof(
            await self._key_secret(), self._identity(principal), int(time.time())
        )
        return principal.model_copy(update={"proof": proof})

    async def verify(self, principal: object) -> Principal:
        """``principal`` if it carries a valid proof issued in the last PRINCIPAL_PROOF_MAX_AGE_S
        seconds; AuthenticationFailed otherwise (audited). For deployments that receive a
        principal from another process."""
        if (
            isinstance(principal, Principal)
            and principal.proof is not None
            and check_principal_proof(
                await self._key_secret(),
                self._identity(principal),
                principal.proof,
                now=int(time.time()),
                max_age_s=PRINCIPAL_PROOF_MAX_AGE_S,
            )
        ):
            return principal
        claimed = principal.user_id if isinstance(principal, Principal) else None
        await self.audit.record_denied(
            None,
            claimed,
            "auth",
            "principal",
            [],
            reason="principal without a valid proof",
            throttle="auth:principal",
        )
        raise AuthenticationFailed(
            "this deployment accepts only principals authenticated by the service; call the "
            "Ingress handle API (handle_search, ...) with an API key"
        )

    async def refuse_credentials(self, reason: str) -> AuthenticationFailed:
        """Audit (throttled) a request without usable credentials; the error to raise."""
        await self.audit.record_denied(
            None, None, "auth", "api_key", [], reason=reason, throttle=f"auth:{reason}"
        )
        return AuthenticationFailed("send Authorization: Bearer <API key>")

    async def authenticate(self, key: str) -> Principal:
        """The principal behind an API key, or AuthenticationFailed (recorded in the audit,
        at most one row per second per reason and process, with the count of the others)."""
        prefix = key_prefix(key)
        reason = "malformed key"
        row = None
        if prefix is not None:
            row = await self.db.fetchrow(q("api_key_for_auth"), prefix)
            reason = "unknown key"
        if row is not None:
            if not verify_key(await self._key_secret(), key, row["hash"]):
                reason = "wrong key"
            elif row["revoked_at"] is not None:
                reason = "revoked key"
            elif row["expires_at"] is not None and row["expires_at"] <= datetime.now(UTC):
                reason = "expired key"
            elif row["disabled"]:
                reason = "disabled user"
            else:
                if row["stale"]:  # last_used_at is kept to the minute: no write per request
                    async with self.db.scoped() as conn:
                        await conn.execute(q("touch_api_key"), row["id"])
                principal = Principal(
                    user_id=row["user_id"],
                    username=row["username"],
                    role=Role(row["role"]),
                    key_id=row["id"],
                )
                return await self.seal(principal)
        await self.audit.record_denied(
            None if row is None else row["user_id"],
            None,
            "auth",
            "api_key",
            [] if row is None else [row["id"]],
            reason=reason,
            details={"prefix": prefix},
            throttle=f"auth:{reason}",
        )
        raise AuthenticationFailed("invalid, expired or revoked API key")
