"""Maintenance: expiring ephemeral facts, per-user HNSW indexes, audit retention.

The last two run DDL or delete from the append-only audit log, so they open their own
connection with the login role (the table owner, for the embedded default) instead of the
application role of the pool.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from halldyll_ray import validation
from halldyll_ray.components.audit import write_audit
from halldyll_ray.components.base import drop_cached, forget
from halldyll_ray.components.embeddings import Embeddings
from halldyll_ray.config import Settings
from halldyll_ray.errors import Unavailable
from halldyll_ray.storage.database import Database, connect, register_codecs
from halldyll_ray.storage.sql import q

#: Name prefix of the per-user partial HNSW indexes (the user id's hex follows).
USER_INDEX_PREFIX = "memory_chunks_user_hnsw_"


class Operations:
    """Maintenance tasks an Admin or a scheduled job runs."""

    def __init__(
        self, db: Database, dsn: str, settings: Settings, embeddings: Embeddings | None = None
    ) -> None:
        self.db = db
        self.dsn = dsn
        self.settings = settings
        #: Whose cache holds the embeddings of purged facts' texts (dropped after a purge).
        self.embeddings = embeddings

    async def purge_expired(self) -> int:
        """Delete ephemeral facts past their expiry; return how many went.

        What stays of them is what stays of a deleted memory
        (:func:`~halldyll_ray.components.base.forget`); once committed, the cached embeddings
        of their texts go too (:func:`~halldyll_ray.components.base.drop_cached`).

        A user whose row another transaction holds (a write in progress) is skipped, not
        waited for: their expired facts go at their next write, which deletes them first
        (:func:`~halldyll_ray.components.base.lock_user`), or at the next purge.
        """
        async with self.db.scoped(admin=True) as conn:
            expired = [row["user_id"] for row in await conn.fetch(q("expired_owners"))]
            # Their user rows first (storage/sql/users.sql), but those a transaction holds
            # are skipped, not waited for: waiting on one busy user (a long atomic import)
            # while holding the rows of the others held up every write of theirs. A skipped
            # user's expired facts go at their next write (base.lock_user) or the next purge.
            owners = (
                [row["id"] for row in await conn.fetch(q("lock_expired_owners"), expired)]
                if expired
                else []
            )
            texts = (
                [r["indexed"] for r in await conn.fetch(q("expired_texts"), owners)]
                if owners
                else []
            )
            rows = await conn.fetch(q("purge_expired"), owners) if owners else []
            gone: dict[UUID, list[UUID]] = {}
            for row in rows:
                gone.setdefault(row["user_id"], []).append(row["id"])
            for owner, ids in gone.items():  # as delete_memory: nothing names them or says them
                texts += (await forget(conn, owner, ids)).texts
            if rows:
                await write_audit(
                    conn,
                    "memory.purge_expired",
                    "fact",
                    [r["id"] for r in rows],
                    None,
                    details={"count": len(rows)},
                )
        if self.embeddings is not None:
            await drop_cached(self.embeddings, texts)
        return len(rows)

    async def ensure_user_indexes(self, *, min_rows: int | None = None) -> dict[str, list[UUID]]:
        """Give each very large user a partial HNSW index of their own; drop stale ones.

        A per-user filter on the shared HNSW index is slow for a user with tens of thousands
        of rows when few of them are near the query: the iterative scan walks other users'
        rows up to hnsw.max_scan_tuples (benchmarks/search_scale.py measured p99 30-100 ms at
        1M rows). A partial index ``WHERE user_id = ...`` answers those in a few ms, and the
        planner picks it by itself. Small users are served exactly by the btree and need none.

        Runs as the table owner (DDL), ``CREATE/DROP INDEX CONCURRENTLY`` so writes go on.
        Indexes of users that fell under half the threshold (or are gone) are dropped.
        """
        threshold = self.settings.large_user_index_rows if min_rows is None else min_rows
        # True is an int: min_rows=True built an index for every user with one row.
        threshold = validation.count(threshold, "min_rows")
        conn = await connect(self.dsn)
        created: list[UUID] = []
        dropped: list[UUID] = []
        try:
            counts = {
                row["user_id"]: row["n"]
                for row in await conn.fetch(q("chunk_counts"), max(1, threshold // 2))
            }
            existing = {
                UUID(row["indexname"].removeprefix(USER_INDEX_PREFIX)): row["indexname"]
                for row in await conn.fetch(q("user_indexes"), USER_INDEX_PREFIX + "%")
            }
            for user_id, rows in sorted(counts.items()):
                if rows >= threshold and user_id not in existing:
                    # DDL takes no bind parameters; the name and literal come from a UUID.
                    await conn.execute(
                        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {USER_INDEX_PREFIX}{user_id.hex} "
                        "ON memory_chunks USING hnsw (embedding vector_cosine_ops) "
                        f"WITH (m = 16, ef_construction = 64) WHERE user_id = '{user_id}'",
                        timeout=None,
                    )
                    created.append(user_id)
            for user_id, name in sorted(existing.items()):
                if user_id not in counts:
                    await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
                    dropped.append(user_id)
            if created or dropped:
                await conn.execute("ANALYZE memory_chunks")
        except asyncpg.InsufficientPrivilegeError as exc:
            raise Unavailable(
                "creating indexes needs the table owner's connection (run `halldyll "
                "index-users` with the migration user's DATABASE_URL)"
            ) from exc
        finally:
            await conn.close()
        return {"created": created, "dropped": dropped}

    async def purge_audit(self, *, older_than_days: int | None = None) -> int:
        """Delete audit rows past the retention (AUDIT_RETENTION_DAYS), as the table owner.

        The application role has no DELETE privilege on the audit log, so this opens its own
        connection with the login role (the database owner for the embedded default).
        """
        days = self.settings.audit_retention_days if older_than_days is None else older_than_days
        # True is an int: older_than_days=True purged every row older than a day.
        cutoff = validation.age_cutoff(days, "older_than_days", unit="days", whole=True)
        conn = await connect(self.dsn)
        try:
            await register_codecs(conn)
            async with conn.transaction():
                await conn.execute(q("allow_audit_purge"), cutoff.isoformat())
                status = await conn.execute(q("purge_audit"), cutoff)
                await write_audit(
                    conn, "audit.purge", None, [], None, details={"before": cutoff.isoformat()}
                )
        except asyncpg.InsufficientPrivilegeError as exc:
            raise Unavailable(
                "purging the audit log needs the table owner's connection (run "
                "`halldyll purge-audit` with the migration user's DATABASE_URL)"
            ) from exc
        finally:
            await conn.close()
        return int(status.split()[-1])
