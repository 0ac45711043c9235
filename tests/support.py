"""Helpers shared by the test tiers (imported as ``support``)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from halldyll_ray import Settings
from halldyll_ray.serve_local import free_port


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database (keeps ?host= for sockets)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


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
        self.port = free_port()
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


def make_settings(database_url: str, redis_url: str | None, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_key_prefix": f"test-{uuid.uuid4().hex[:12]}",
        "db_pool_size": 4,
    }
    values.update(overrides)
    return Settings.from_env(**values)


@asynccontextmanager
async def scratch_database(
    admin_url: str, *, template: str | None = None, prefix: str = "t"
) -> AsyncIterator[str]:
    """A new database (a copy of ``template``, or empty), dropped when the block ends."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    clause = f' TEMPLATE "{template}"' if template else ""

    async def admin(statement: str) -> None:
        # A connection per statement: one held across the block (a whole serve session) could
        # be closed under it by a test that terminates backends.
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    await admin(f'CREATE DATABASE "{name}"{clause}')
    yield with_database(admin_url, name)
    await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def user_with_key(
    http: Any, admin_key: str, role: str = "user"
) -> tuple[dict[str, Any], str]:
    """A new user of ``role`` created over HTTP by the Admin, and an API key of its own."""
    name = f"{role}{uuid.uuid4().hex[:8]}"
    r = await http.post(
        "/v1/users", json={"username": name, "role": role}, headers=bearer(admin_key)
    )
    assert r.status_code == 201, r.text
    user = r.json()
    r = await http.post(
        f"/v1/users/{user['id']}/keys", json={"name": "t"}, headers=bearer(admin_key)
    )
    assert r.status_code == 201, r.text
    return user, r.json()["key"]


def skip_unless_installed(exc: Exception) -> None:
    """Skip a test whose real test LLM is not installed, quoting why; under CI (``CI`` set)
    fail instead: the README's test command installs it, so its absence there is a fault."""
    import os

    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"CI: {exc}")
    pytest.skip(str(exc))


async def graphql(http: Any, key: str, query: str, **variables: Any) -> dict[str, Any]:
    """A GraphQL request to the served app's ``/graphql`` as ``key``; the answer's JSON
    (``data`` and ``errors``), which GraphQL sends with 200."""
    response = await http.post(
        "/graphql",
        json={"query": query, "variables": variables},
        headers={**bearer(key), "X-Request-ID": f"gql-{uuid.uuid4().hex[:12]}"},
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


@asynccontextmanager
async def mcp_session(url: str, key: str, **headers: str) -> AsyncIterator[Any]:
    """An initialized MCP client session over Streamable HTTP at ``url``/mcp as ``key``."""
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with (
        httpx2.AsyncClient(headers={**bearer(key), **headers}, timeout=120) as http,
        streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def mcp_result(result: Any) -> dict[str, Any]:
    """A successful MCP tool result's JSON (its structured content, and the same as its
    text)."""
    import json

    from mcp.types import TextContent

    text = result.content[0].text if isinstance(result.content[0], TextContent) else ""
    assert not result.is_error, text
    assert result.structured_content is not None
    assert json.loads(text) == result.structured_content
    return dict(result.structured_content)


# --------------------------------------------------------------------------- export files
async def export_lines(engine: Any, user_id: uuid.UUID) -> list[dict[str, Any]]:
    """The user's export (``engine.export_memories``) as its JSON lines, each line whole."""
    lines = [line async for line in engine.export_memories(user_id)]
    assert all(line.endswith(b"\n") for line in lines)
    return [json.loads(x) for x in b"".join(lines).splitlines()]


def ndjson(records: list[dict[str, Any]]) -> bytes:
    """An export file of ``records``, one JSON line each."""
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def export_header(user_id: uuid.UUID | None = None, **extra: Any) -> dict[str, Any]:
    """An export file's first line (format version 1), of ``user_id`` or a random user."""
    return {
        "format": "halldyll-export",
        "version": 1,
        "user": {"id": str(user_id or uuid.uuid4()), "username": "someone"},
        "exported_at": datetime.now(UTC).isoformat(),
        **extra,
    }


def fact_line(statement: str, **extra: Any) -> dict[str, Any]:
    """An export file's line of a new fact (a fresh id, stamped now)."""
    now = datetime.now(UTC).isoformat()
    return {
        "id": str(uuid.uuid4()),
        "memory": {"type": "fact", "statement": statement},
        "created_at": now,
        "updated_at": now,
        **extra,
    }
