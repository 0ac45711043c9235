"""Numbered SQL migrations, applied in order under a PostgreSQL advisory lock.

Every process that runs :func:`apply_migrations` takes the same session-level advisory lock
first, so when ten replicas start at once one applies the pending files and the nine others
wait, then find nothing left to do. Each file runs in its own transaction together with the
row that records it in ``schema_migrations``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from halldyll_ray.errors import MigrationError

log = logging.getLogger(__name__)

#: Key of the advisory lock (an arbitrary constant: "halldyll" in ASCII, folded to int64).
MIGRATION_LOCK_KEY = 0x68616C6C64796C6C
_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """The installed migrations (wheel) or the repository's ``migrations/`` (editable)."""
    packaged = Path(__file__).resolve().parent.parent / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Read ``NNNN_name.sql`` files in version order; refuse gaps and duplicates."""
    directory = directory or migrations_dir()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_RE.fullmatch(path.name)
        if not match:
            raise MigrationError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migrations must be numbered 0001, 0002, ... without gaps; found "
                f"{migration.version:04d} where {expected:04d} was expected"
            )
    if not found:
        raise MigrationError(f"no migrations found in {directory}")
    return found


def render(migration: Migration, *, embedding_dimension: int) -> str:
    if not 1 <= embedding_dimension <= 16_000:
        raise MigrationError(f"EMBEDDING_DIMENSION {embedding_dimension} is out of range")
    return migration.sql.replace("{{EMBEDDING_DIMENSION}}", str(int(embedding_dimension)))


async def _check_extensions(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "SELECT name, installed_version FROM pg_available_extensions WHERE name = ANY($1::text[])",
        ["vector", "pg_trgm"],
    )
    available = {row["name"] for row in rows}
    version = await conn.fetchval("SHOW server_version")
    if "vector" not in available:
        raise MigrationError(
            f"this PostgreSQL server ({version}) does not have the pgvector extension "
            "('vector'), which halldyll-ray needs. Fix: install pgvector >= 0.8 on the server "
            "(Debian/Ubuntu: apt install postgresql-<major>-pgvector; Docker: the "
            "pgvector/pgvector image), or unset DATABASE_URL to use the embedded PostgreSQL, "
            "which ships it."
        )
    if "pg_trgm" not in available:
        raise MigrationError(
            f"this PostgreSQL server ({version}) lacks the pg_trgm extension (contrib); "
            "install the server's contrib package"
        )


async def applied_versions(conn: asyncpg.Connection) -> dict[int, str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


async def rendered_dimension(conn: asyncpg.Connection) -> int | None:
    """The EMBEDDING_DIMENSION the database's migrations were rendered with, or None for an
    empty database. Migration 0010 keeps it apart from ``embedding_dimension``, the size of
    the vectors searched now, which a re-embedding changes."""
    if not await conn.fetchval("SELECT to_regclass('halldyll_meta') IS NOT NULL"):
        return None
    rows = await conn.fetch(
        "SELECT key, value FROM halldyll_meta "
        "WHERE key IN ('migration_embedding_dimension', 'embedding_dimension')"
    )
    found = {row["key"]: int(row["value"]) for row in rows}
    return found.get("migration_embedding_dimension", found.get("embedding_dimension"))


async def apply_migrations(
    dsn_or_conn: str | asyncpg.Connection,
    *,
    embedding_dimension: int,
    migrations: list[Migration] | None = None,
) -> list[int]:
    """Apply pending migrations; return the versions this call applied (often none).

    Raises:
        MigrationError: the server lacks an extension, a file failed, an applied file was
            edited afterwards, or the database was built for another EMBEDDING_DIMENSION.
    """
    migrations = migrations if migrations is not None else load_migrations()
    own = isinstance(dsn_or_conn, str)
    conn = await asyncpg.connect(dsn_or_conn) if isinstance(dsn_or_conn, str) else dsn_or_conn
    applied_now: list[int] = []
    try:
        await _check_extensions(conn)
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       checksum   text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = await applied_versions(conn)
            # A built database renders its migrations with the dimension it was built with,
            # whatever the model now configured (a re-embedding may be under way or done).
            built_with = await rendered_dimension(conn)
            dimension = embedding_dimension if built_with is None else built_with
            for migration in migrations:
                sql = render(migration, embedding_dimension=dimension)
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if migration.version in done:
                    if done[migration.version] != checksum:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name} was changed "
                            "after it was applied (or EMBEDDING_DIMENSION differs from the one "
                            "the database was built with); add a new migration instead"
                        )
                    continue
                log.info("applying migration %04d_%s", migration.version, migration.name)
                try:
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) "
                            "VALUES ($1, $2, $3)",
                            migration.version,
                            migration.name,
                            checksum,
                        )
                except asyncpg.PostgresError as exc:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} failed: {exc}"
                    ) from exc
                applied_now.append(migration.version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        if own:
            await conn.close()
    return applied_now


async def check_schema(conn: asyncpg.Connection, *, embedding_dimension: int | None) -> None:
    """Fail fast when migrations are missing or were run for another vector size.

    ``embedding_dimension=None`` leaves the vector size to the caller (the engine, which
    starts a re-embedding when the configured model is not the database's).
    """
    done = await applied_versions(conn)
    expected = {m.version for m in load_migrations()}
    missing = sorted(expected - set(done))
    if missing:
        raise MigrationError(
            f"the database schema is not up to date (missing migrations {missing}); run "
            "`halldyll migrate` first"
        )
    if embedding_dimension is None:
        return
    stored = await conn.fetchval(
        "SELECT value FROM halldyll_meta WHERE key = 'embedding_dimension'"
    )
    if stored is not None and int(stored) != embedding_dimension:
        raise MigrationError(
            f"EMBEDDING_DIMENSION is {embedding_dimension} but the database stores "
            f"{stored}-dimensional vectors; set EMBEDDING_DIMENSION={stored} (and a model of "
            "that size) or use a new database"
        )
