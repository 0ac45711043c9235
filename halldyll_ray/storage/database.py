"""The one owner of the asyncpg pool, and the one place driver errors become ours."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from uuid import UUID

import asyncpg
from pgvector.asyncpg import register_vector

from halldyll_ray.errors import (
    Conflict,
    HalldyllError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unavailable,
)

log = logging.getLogger(__name__)

_SCOPE = (
    "SELECT set_config('halldyll.user_id', $1, true), set_config('halldyll.admin', $2, true), "
    "set_config('hnsw.ef_search', $3, true), "
    "set_config('hnsw.iterative_scan', 'relaxed_order', true)"
)

#: SQLSTATE of a search or chunk write with vectors of another model than the one the
#: database searches (migration 0010).
EMBEDDING_MODEL_CHANGED = "HL001"

# asyncpg's client-side encoding error (an int over int64, a str for a uuid column) is an
# InterfaceError, which would otherwise read as "unavailable".
_ClientDataError = asyncpg.exceptions._base.DataError

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


_CONSTRAINT = re.compile(r"(?P<table>[a-z_]+?)_(?P<column>[a-z_]+)_(?:check|key|fkey)")


def _field(exc: asyncpg.PostgresError) -> str | None:
    """The column a refused row broke, from the constraint's or the error's own column name."""
    column = getattr(exc, "column_name", None)
    if column:
        return str(column)
    match = _CONSTRAINT.fullmatch(getattr(exc, "constraint_name", None) or "")
    return None if match is None else match["column"]


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn asyncpg and socket errors into HalldyllError subclasses.

    The one place where the driver's errors become ours. Messages never carry the server's
    wording or DETAIL (a refused row would be echoed whole), only the field where known.
    Transient failures (a deadlock or serialization failure the server resolved by aborting
    this transaction, a read-only server during a failover, a statement prepared before a
    migration) are Unavailable with ``retry_after``: nothing was written, and a retry is right.
    """
    try:
        yield
    except HalldyllError:
        raise
    except asyncpg.UniqueViolationError as exc:
        raise Conflict("already exists", field=_field(exc)) from exc
    except asyncpg.RestrictViolationError as exc:
        raise Conflict(
            "still referenced by other rows (an AI model that memories are scoped to); delete "
            "or move them first"
        ) from exc
    except asyncpg.ForeignKeyViolationError as exc:
        # The writing side: a row names one that is gone. The deleting side of the only key
        # onto ai_models is ON DELETE RESTRICT, the branch above: a memory naming a model
        # that another request deleted after this one resolved its name is the model's
        # NotFound, as the same request sent a moment later is, not that delete's Conflict.
        if exc.constraint_name and "model" in exc.constraint_name:
            raise NotFound(
                "the AI model is not registered (it was deleted meanwhile)", field="model"
            ) from exc
        raise NotFound("a row it refers to does not exist", field=_field(exc)) from exc
    except (asyncpg.CheckViolationError, asyncpg.NotNullViolationError) as exc:
        field = _field(exc)
        raise InvalidInput(
            f"{field or 'a value'} is outside what the database accepts", field=field
        ) from exc
    except asyncpg.DataError as exc:  # SQLSTATE class 22: out of range, bad encoding, ...
        field = _field(exc)
        raise InvalidInput(
            f"{field or 'a value'} is out of range or not valid text", field=field
        ) from exc
    except _ClientDataError as exc:  # a Python value asyncpg cannot encode for its column
        raise InvalidInput("a value is out of range for its column") from exc
    except (asyncpg.TransactionRollbackError, asyncpg.InvalidCachedStatementError) as exc:
        log.info("transient database error, retry: %s", type(exc).__name__)
        raise Unavailable(
            "the database aborted the operation because of a concurrent one; nothing was "
            "written, retry",
            retry_after=1,
        ) from exc
    except asyncpg.LockNotAvailableError as exc:  # lock_timeout (maintenance DDL)
        raise Unavailable(
            "a table lock was not had in time (a long transaction holds it); retry",
            retry_after=10,
        ) from exc
    except (asyncpg.ReadOnlySQLTransactionError, asyncpg.QueryCanceledError) as exc:
        raise Unavailable(
            f"PostgreSQL cannot take writes now ({type(exc).__name__}); nothing was written, retry",
            retry_after=5,
        ) from exc
    except asyncpg.InsufficientPrivilegeError as exc:
        # Row-level security refused a row of another user, or the application role lacks a
        # grant (then `halldyll migrate` with the migration user's DATABASE_URL fixes it).
        raise PermissionDenied("the database refused this operation to the acting user") from exc
    except _UNAVAILABLE as exc:
        raise Unavailable(f"PostgreSQL is unavailable: {type(exc).__name__}") from exc
    except asyncpg.PostgresConnectionError as exc:
        raise Unavailable(f"PostgreSQL is unavailable: {type(exc).__name__}") from exc
    except asyncpg.PostgresError as exc:
        if getattr(exc, "sqlstate", None) == EMBEDDING_MODEL_CHANGED:
            # Migration 0010: vectors of a model the database no longer searches (a
            # re-embedding has just switched models; this process follows within seconds).
            raise Unavailable(
                "the embedding model was switched while this request ran; nothing was "
                "written, retry",
                retry_after=2,
            ) from exc
        raise


async def register_codecs(conn: asyncpg.Connection) -> None:
    """pgvector's types as numpy arrays, json/jsonb as Python objects."""
    await register_vector(conn)
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(dsn: str) -> asyncpg.Connection:
    """One plain connection with the login role (migrations, DDL, the audit purge)."""
    with translate_errors():
        return await asyncpg.connect(dsn)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing beyond asyncpg's own (it rolls back an open
    transaction and drops listeners before calling this).

    asyncpg's default adds ``RESET ALL``, advisory unlocks, ``CLOSE ALL`` and ``UNLISTEN *``:
    one more round trip per checkout. Nothing here needs it: the identity and search
    settings are transaction-local (``set_config(..., true)``), the role is set once per
    connection on purpose, and advisory locks, cursors and LISTEN are never used on pooled
    connections (migrations take their own connection).
    """


class Database:
    """An asyncpg pool with pgvector codecs; open/close are idempotent.

    Args:
        dsn: PostgreSQL URL (several hosts allowed; asyncpg tries them in order).
        pool_size: Maximum connections of this process (``DB_POOL_SIZE``).
        command_timeout: Seconds before a statement is abandoned.
        ef_search: ``hnsw.ef_search`` for every transaction.
        role: The role every connection switches to (``SET ROLE``); ``None`` keeps the login
            role (for a login role that is itself subject to row-level security).
    """

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 5,
        command_timeout: float = 30.0,
        ef_search: int = 100,
        role: str | None = "halldyll_app",
    ) -> None:
        if role is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", role):
            raise ValueError(f"invalid role name {role!r}")
        self._role = role
        self._dsn = dsn
        self._pool_size = pool_size
        self._command_timeout = command_timeout
        self._ef_search = int(ef_search)
        self._pool: asyncpg.Pool | None = None

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        await register_codecs(conn)
        if self._role:
            # Work as a role that owns nothing and cannot bypass row-level security. The role
            # setting survives the RESET ALL that the pool runs when a connection is released.
            await conn.execute(f'SET ROLE "{self._role}"')

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
                reset=_keep_session,
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
    async def scoped(
        self,
        user_id: UUID | None = None,
        *,
        admin: bool = False,
        readonly: bool = False,
        snapshot: bool = False,
    ) -> AsyncIterator[asyncpg.Connection]:
        """A transaction acting for one user (row-level security shows only their rows).

        Args:
            user_id: The user whose memories this transaction may see and change; None: no
                memory rows at all (users, models, audit work).
            admin: See every user's rows: the explicit, audited path for cross-user work.
            readonly: A read-only transaction.
            snapshot: REPEATABLE READ: every statement sees the data as of the first one (an
                export's header counts and its lines agree).
        """
        with translate_errors():
            async with (
                self.pool.acquire() as conn,
                conn.transaction(
                    readonly=readonly, isolation="repeatable_read" if snapshot else None
                ),
            ):
                # Transaction-local settings: they end with the transaction, so a pooled
                # connection never carries one user's identity into another's request.
                await conn.execute(
                    _SCOPE,
                    "" if user_id is None else str(user_id),
                    "on" if admin else "",
                    str(self._ef_search),
                )
                yield conn

    # One read, read-only transaction. A read acting for no user and not as admin (users, keys,
    # models: tables without row-level security) is one statement in its own implicit
    # transaction instead, one round trip rather than four: the identity settings are
    # transaction-local, so it runs with none and row-level security shows it no memory row.
    async def fetch(
        self, query: str, *args: Any, user_id: UUID | None = None, admin: bool = False
    ) -> list[asyncpg.Record]:
        if user_id is None and not admin:
            with translate_errors():
                return list(await self.pool.fetch(query, *args))
        async with self.scoped(user_id, admin=admin, readonly=True) as conn:
            return list(await conn.fetch(query, *args))

    async def fetchrow(
        self, query: str, *args: Any, user_id: UUID | None = None, admin: bool = False
    ) -> asyncpg.Record | None:
        if user_id is None and not admin:
            with translate_errors():
                return await self.pool.fetchrow(query, *args)
        async with self.scoped(user_id, admin=admin, readonly=True) as conn:
            return await conn.fetchrow(query, *args)

    async def fetchval(
        self, query: str, *args: Any, user_id: UUID | None = None, admin: bool = False
    ) -> Any:
        if user_id is None and not admin:
            with translate_errors():
                return await self.pool.fetchval(query, *args)
        async with self.scoped(user_id, admin=admin, readonly=True) as conn:
            return await conn.fetchval(query, *args)

    async def ping(self) -> str:
        """Return the server version, or raise Unavailable."""
        return str(await self.fetchval("SHOW server_version"))
