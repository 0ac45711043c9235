"""Migrations and RLS on a managed-style PostgreSQL: the app's login user is no superuser.

The administrator's part (as on RDS/Cloud SQL) is done first as the superuser: the vector
extension (pgvector is not a trusted extension) and membership in halldyll_app, exactly
the statements the migration's error hint names. Everything else runs as an ordinary
database owner.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from support import make_settings, scratch_database

from halldyll_ray import Fact, MemoryEngine
from halldyll_ray.db.migrate import apply_migrations


def _as_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, ""))


async def test_non_superuser_owner_migrates_and_is_isolated(
    pg_admin_url: str, redis_url: str, encoder
) -> None:
    owner = f"owner_{uuid.uuid4().hex[:8]}"
    async with scratch_database(pg_admin_url) as db_url:
        admin = await asyncpg.connect(db_url)
        try:
            await admin.execute(f"CREATE ROLE {owner} LOGIN PASSWORD 'pw' NOSUPERUSER CREATEROLE")
            await admin.execute(f'ALTER DATABASE "{urlsplit(db_url).path[1:]}" OWNER TO {owner}')
            await admin.execute("CREATE EXTENSION IF NOT EXISTS vector")
            await admin.execute(
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = "
                "'halldyll_app') THEN CREATE ROLE halldyll_app NOLOGIN; END IF; END $$"
            )
            await admin.execute(f"GRANT halldyll_app TO {owner}")
        finally:
            await admin.close()
        url = _as_user(db_url, owner, "pw")
        try:
            assert await apply_migrations(url, embedding_dimension=384) == [1, 2, 3]
            settings = make_settings(url, redis_url)
            async with MemoryEngine(settings, encoder=encoder) as engine:
                ada = await engine.create_user("ada", None, "user")
                bob = await engine.create_user("bob", None, "user")
                await engine.store_memory(ada.id, Fact(statement="Ada's secret"))
                await engine.store_memory(bob.id, Fact(statement="Bob's secret"))
                async with engine.db.scoped(ada.id) as conn:
                    assert await conn.fetchval("SELECT current_user") == "halldyll_app"
                    rows = await conn.fetch("SELECT content FROM memories")
                assert [r["content"] for r in rows] == ["Ada's secret"]
                assert await engine.purge_audit(older_than_days=1) == 0
        finally:
            admin = await asyncpg.connect(pg_admin_url)
            try:
                await admin.execute(
                    f'DROP DATABASE IF EXISTS "{urlsplit(db_url).path[1:]}" WITH (FORCE)'
                )
                await admin.execute(f"DROP ROLE IF EXISTS {owner}")
            finally:
                await admin.close()
