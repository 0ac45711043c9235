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
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from halldyll_ray import MemoryEngine, Settings
from halldyll_ray.db.embedded import EmbeddedPostgres
from halldyll_ray.db.migrate import apply_migrations
from halldyll_ray.embedding import OnnxEncoder

TEMPLATE = f"halldyll_tmpl_{os.getpid()}"


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database (keeps ?host= for sockets)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


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
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        await conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
        await apply_migrations(with_database(pg_admin_url, TEMPLATE), embedding_dimension=384)
        yield TEMPLATE
        await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_db(pg_admin_url: str) -> AsyncIterator[str]:
    """An empty database (no schema): for migration tests."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield with_database(pg_admin_url, name)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def database_url(pg_admin_url: str, template_db: str) -> AsyncIterator[str]:
    """A database with the schema, copied from the template, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        yield with_database(pg_admin_url, name)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server process of our own, which a test may stop and start again."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: run the README's test command "
                "(scripts/test.sh installs it) or apt-get install redis-server"
            )
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _redis_ping("127.0.0.1", self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None


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


def make_settings(database_url: str, redis_url: str | None, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_key_prefix": f"test-{uuid.uuid4().hex[:12]}",
        "db_pool_size": 4,
    }
    values.update(overrides)
    return Settings.from_env(**values)


@pytest_asyncio.fixture(loop_scope="session")
async def settings(database_url: str, redis_url: str) -> Settings:
    return make_settings(database_url, redis_url)


@pytest_asyncio.fixture(loop_scope="session")
async def engine(settings: Settings, encoder: OnnxEncoder) -> AsyncIterator[MemoryEngine]:
    engine = MemoryEngine(settings, encoder=encoder)
    await engine.initialize()
    yield engine
    await engine.close()
