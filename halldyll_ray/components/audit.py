"""The audit log: every mutation and every denied access, append-only (SPEC §4.1)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg

from halldyll_ray import requestctx, validation
from halldyll_ray.errors import InvalidInput
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind


async def write_audit(
    conn: asyncpg.Connection,
    operation: str,
    target_type: str | None,
    target_ids: Sequence[UUID],
    acting_for: UUID | None,
    *,
    actor_id: UUID | None = None,
    outcome: str = "ok",
    request_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """One audit row in the caller's transaction (so it commits with the change it records).

    The actor and request id default to those of :mod:`halldyll_ray.requestctx`, which the
    access layer sets for the duration of an authorised call; a row written by a background
    job's handler names the job (``details.job_id``).
    """
    context = requestctx.current()
    if context.job_id is not None:
        details = {**(details or {}), "job_id": str(context.job_id)}
    await conn.execute(
        *bind(
            "insert_audit",
            actor_id=actor_id if actor_id is not None else context.actor_id,
            acting_for=acting_for,
            operation=operation,
            target_type=target_type,
            target_ids=[str(t) for t in target_ids],
            outcome=outcome,
            request_id=request_id if request_id is not None else context.request_id,
            details=details or {},
        )
    )


class Throttle:
    """At most one audit row per key per ``interval_s`` in this process; the rows skipped
    meanwhile are counted into the next one written (``details.suppressed``).

    For denials anyone can cause without credentials (bad tokens): unthrottled, each request
    was one audit row, a write amplifier for anonymous callers. Not a request rate limiter
    (that is a load balancer's job): it samples audit writes and keeps their count, which a
    rate-limit library does not do.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None to skip this row; else how many rows of ``key`` were skipped before it."""
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) < self.interval_s:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._skipped.pop(key, 0)


class Audit:
    """Reads the audit log and records what happens outside a mutation's own transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.throttle = Throttle()

    async def record_denied(
        self,
        actor_id: UUID | None,
        acting_for: UUID | None,
        operation: str,
        target_type: str | None,
        target_ids: Sequence[UUID],
        *,
        reason: str,
        details: dict[str, Any] | None = None,
        throttle: str | None = None,
    ) -> None:
        """Write one audit row for a refused call (in its own transaction).

        With ``throttle``, at most one row per second per that key in this process (see
        :class:`Throttle`).
        """
        if throttle is not None:
            skipped = self.throttle.admit(throttle)
            if skipped is None:
                return
            if skipped:
                details = {**(details or {}), "suppressed": skipped}
        async with self.db.scoped() as conn:
            await write_audit(
                conn,
                operation,
                target_type,
                target_ids,
                acting_for,
                actor_id=actor_id,
                outcome="denied",
                details={"reason": reason, **(details or {})},
            )

    async def record_read(
        self, actor_id: UUID, acting_for: UUID, operation: str, target_ids: Sequence[UUID]
    ) -> None:
        """Audit a read of another user's data (by an Admin or a Service)."""
        async with self.db.scoped() as conn:
            await write_audit(conn, operation, "memory", target_ids, acting_for, actor_id=actor_id)

    async def rows(
        self,
        *,
        user_id: UUID | str | None = None,
        operation: str | None = None,
        outcome: str | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Audit rows, newest first, where ``user_id`` is the actor or the one acted for."""
        if before_id is not None and (
            not isinstance(before_id, int)
            or isinstance(before_id, bool)
            or not 1 <= before_id < 2**63
        ):
            raise InvalidInput("before_id must be a positive 64-bit integer", field="before_id")
        rows = await self.db.fetch(
            *bind(
                "list_audit",
                user_id=None if user_id is None else validation.parse_uuid(user_id, "user_id"),
                operation=None if operation is None else validation.text(operation, "operation"),
                outcome=None if outcome is None else validation.text(outcome, "outcome"),
                before_id=before_id,
                limit=validation.limit(limit, 1000),
            )
        )
        return [dict(row) for row in rows]
