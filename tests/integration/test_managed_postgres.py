"""Migrations and RLS on a managed-style PostgreSQL: the app's login user is no superuser.

The administrator's part (as on RDS/Cloud SQL) is done first as the superuser: the vector
extension (pgvector is not a trusted extension) and membership in halldyll_app, exactly
the statements the migration's error hint names. Everything else runs as an ordinary
database owner.
"""

from __future__ import annotations

import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from support import make_settings, scratch_database

from halldyll_ray import Fact, MemoryEngine
from halldyll_ray.storage.migrate import apply_migrations, load_migrations


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
            assert await apply_migrations(url, embedding_dimension=384) == [
                m.version for m in load_migrations()
            ]
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


def _dead_host_first(url: str) -> str:
    """The same server behind a host list whose first entry refuses connections."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if "host" in query:  # a Unix socket directory (the embedded server)
        query["host"] = f"/nonexistent-halldyll-socket-dir,{query['host']}"
        netloc = parts.netloc
    else:
        user, _, hostport = parts.netloc.rpartition("@")
        netloc = f"{user}@127.0.0.1:1,{hostport}" if user else f"127.0.0.1:1,{hostport}"
    query["target_session_attrs"] = "read-write"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))


async def test_multi_host_url_fails_over_to_a_live_primary(
    database_url: str, redis_url: str, encoder
) -> None:
    """SPEC 4.7: DATABASE_URL may list several hosts; the first one that accepts a read-write
    session serves, so a dead first host (a failed-over primary) costs nothing."""
    failover = _dead_host_first(database_url)
    assert failover != database_url
    async with MemoryEngine(make_settings(failover, redis_url), encoder=encoder) as engine:
        assert (await engine.health())["database"]["ok"] is True
        user = await engine.create_user(f"ada{uuid.uuid4().hex[:6]}", None, "user")
        fact = await engine.store_memory(user.id, Fact(statement="Ada keeps bees"))
        hits = await engine.search(user.id, "what animals does Ada keep?")
        assert [h.memory.id for h in hits] == [fact.id]
