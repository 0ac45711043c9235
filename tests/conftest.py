"""Real services for the tests, started once per session.

PostgreSQL: ``TEST_DATABASE_URL`` (a server with pgvector where the user may create
databases), else a private embedded PostgreSQL in a temporary folder. The schema is built
once into a template database; each test that needs a database gets a fresh copy
(``CREATE DATABASE ... TEMPLATE``), which takes a few tens of milliseconds.

Redis: ``TEST_REDIS_URL``, else the Redis on 127.0.0.1:6379 (database 15), else a
``redis-server`` started here on a free port. Every engine gets its own key prefix.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from support import (
    RedisServer,
    _redis_ping,
    make_settings,
    scratch_database,
    with_database,
)

from halldyll_ray import MemoryEngine, Settings, serve_env
from halldyll_ray.embedding import OnnxEncoder
from halldyll_ray.storage.embedded import EmbeddedPostgres
from halldyll_ray.storage.migrate import apply_migrations

# Ray Serve reads its environment when it is imported: the product's (HAProxy, direct
# ingress, gRPC between deployments) must be set before any test imports Ray. Ingress
# replicas drain for 30 s on shutdown by default, which only slows the tests.
serve_env.apply()
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")

TEMPLATE = f"halldyll_tmpl_{os.getpid()}"


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"), database="postgres")
    url = server.start()
    yield url
    server.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def template_db(pg_admin_url: str) -> AsyncIterator[str]:
    # A connection per statement, not one held for the session: tests that terminate
    # backends (outages, a killed LISTEN connection) would close it under the teardown.
    await _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
    await _admin(pg_admin_url, f'CREATE DATABASE "{TEMPLATE}"')
    await apply_migrations(with_database(pg_admin_url, TEMPLATE), embedding_dimension=384)
    yield TEMPLATE
    await _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_db(pg_admin_url: str) -> AsyncIterator[str]:
    """An empty database (no schema): for migration tests."""
    async with scratch_database(pg_admin_url) as url:
        yield url


@pytest_asyncio.fixture(loop_scope="session")
async def database_url(pg_admin_url: str, template_db: str) -> AsyncIterator[str]:
    """A database with the schema, copied from the template, dropped after the test."""
    async with scratch_database(pg_admin_url, template=template_db) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("TEST_REDIS_URL")
    if configured:
        yield configured
        return
    if _redis_ping("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/15"
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis that the test controls (to simulate an outage)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def encoder() -> OnnxEncoder:
    return OnnxEncoder.load()


@pytest_asyncio.fixture(loop_scope="session")
async def settings(database_url: str, redis_url: str) -> Settings:
    return make_settings(database_url, redis_url)


@pytest_asyncio.fixture(loop_scope="session")
async def engine(settings: Settings, encoder: OnnxEncoder) -> AsyncIterator[MemoryEngine]:
    engine = MemoryEngine(settings, encoder=encoder)
    await engine.initialize()
    yield engine
    await engine.close()
