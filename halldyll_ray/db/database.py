"""The one owner of the asyncpg pool, and the one place driver errors become ours."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
from pgvector.asyncpg import register_vector

from halldyll_ray.errors import Conflict, HalldyllError, InvalidInput, NotFound, Unavailable

log = logging.getLogger(__name__)

_UNAVAILABLE = (
    OSError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    TimeoutError,
)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn asyncpg and socket errors into HalldyllError subclasses."""
    try:
        yield
    except HalldyllError:
        raise
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"already exists ({exc.constraint_name})") from exc
    except asyncpg.RestrictViolationError as exc:
        raise Conflict(
            "still referenced by other rows (an AI model that memories are scoped to); delete "
            "or move them first"
        ) from exc
    except asyncpg.ForeignKeyViolationError as exc:
        if exc.constraint_name and "model" in exc.constraint_name:
            raise Conflict(
                "the AI model is still referenced by memories; delete or move them first"
            ) from exc
        raise NotFound(f"a referenced row does not exist ({exc.constraint_name})") from exc
    except (asyncpg.CheckViolationError, asyncpg.DataError) as exc:
        raise InvalidInput(f"rejected by the database: {exc}") from exc
    except _UNAVAILABLE as exc:
        raise Unavailable(f"PostgreSQL is unavailable: {type(exc).__name__}") from exc
    except asyncpg.PostgresConnectionError as exc:
        raise Unavailable(f"PostgreSQL is unavailable: {type(exc).__name__}") from exc


class Database:
    """An asyncpg pool with pgvector codecs; open/close are idempotent.

    Args:
        dsn: PostgreSQL URL (several hosts allowed; asyncpg tries them in order).
        pool_size: Maximum connections of this process (``DB_POOL_SIZE``).
        command_timeout: Seconds before a statement is abandoned.
        ef_search: ``hnsw.ef_search`` for every connection.
    """

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 5,
        command_timeout: float = 30.0,
        ef_search: int = 100,
    ) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._command_timeout = command_timeout
        self._ef_search = int(ef_search)
        self._pool: asyncpg.Pool | None = None

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        await register_vector(conn)
        for name in ("json", "jsonb"):
            await conn.set_type_codec(
                name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
        # Iterative index scans (pgvector 0.8) so that a per-user filter on the shared HNSW
        # index keeps scanning until it has enough of that user's rows.
        await conn.execute(
            f"SET hnsw.iterative_scan = relaxed_order; SET hnsw.ef_search = {self._ef_search}"
        )

    async def open(self) -> Database:
        if self._pool is not None:
            return self
        with translate_errors():
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=self._command_timeout,
                init=self._init_connection,
                server_settings={
                    "application_name": "halldyll-ray",
                    # Optional filters are written "$n IS NULL OR ..."; a custom plan per call
                    # lets the planner see the real values (and pick exact vs HNSW scans).
                    "plan_cache_mode": "force_custom_plan",
                    "jit": "off",
                },
            )
        return self

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> Database:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise Unavailable("the database is not open; call initialize() first")
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        with translate_errors():
            async with self.pool.acquire() as conn:
                yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        with translate_errors():
            async with self.pool.acquire() as conn, conn.transaction():
                yield conn

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        with translate_errors():
            async with self.pool.acquire() as conn:
                return list(await conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        with translate_errors():
            async with self.pool.acquire() as conn:
                return await conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        with translate_errors():
            async with self.pool.acquire() as conn:
                return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        with translate_errors():
            async with self.pool.acquire() as conn:
                return str(await conn.execute(query, *args))

    async def ping(self) -> str:
        """Return the server version, or raise Unavailable."""
        return str(await self.fetchval("SHOW server_version"))
