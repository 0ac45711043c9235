"""Moving an installation to another embedding model: every stored chunk embedded again, in the
background, in batches, resumable, while searches keep working.

Storage. ``memory_chunks.embedding`` (a typed ``vector(N)`` column with its HNSW index) always
holds the vectors searches read, and ``halldyll_meta`` names the model that made them
(``embedding_model_id``, ``embedding_dimension``, ``embedding_model_path``,
``embedding_max_seq_length``, ``embedding_model_name``). An installation that never changes
its model reads exactly the schema it had before, so its searches cost the same. A
re-embedding (migration 0010 and this module):

1. adds ``memory_chunks.embedding_next vector(<new dimension>)``, nullable, and a partial
   index of the chunks still without it (``memory_chunks_pending``); ``embedding_jobs`` holds
   the job (models, counts, state);
2. embeds the pending chunks in batches (``REEMBED_BATCH_SIZE`` a transaction, each batch's
   vectors and its progress committed together), oldest first. Chunks written meanwhile are
   pending too and get caught up the same way, so a write never waits for the new model;
3. builds the column's HNSW index (``CREATE INDEX CONCURRENTLY``: writes go on);
4. switches in one short transaction: takes the table's lock, embeds the last few chunks
   written since, drops the old column and its index, renames ``embedding_next`` to
   ``embedding`` and its index to ``memory_chunks_embedding``, and records the new model in
   ``halldyll_meta``. Searches before the commit read the old vectors with queries embedded
   by the old model; searches after it read the new ones with the new model.

Being columns of ``memory_chunks``, the new vectors have its row-level security and go with
their chunk when a memory or a user is deleted. A crash at any point loses at most one batch:
the job resumes where the committed vectors stop. Only one process runs the job at a time (a
PostgreSQL advisory lock); the others wait for the switch and then follow it.

The old model must stay loadable while the job runs: a process started with a new model loads
the database's model too (from ``embedding_model_path``, or the packaged one that
``embedding_model_name`` names) and embeds queries and new chunks with it until the switch. A
process whose vectors are of a model the database no longer searches (one that has not yet
noticed a switch) is refused by PostgreSQL itself (SQLSTATE HL001, a retryable 503) and follows
the switch within ``poll_seconds``.

The DDL needs the table owner: the login role of ``DATABASE_URL`` (the embedded database's
default). A service whose login role does not own the tables leaves the job to
``halldyll reembed`` run with the migration user's URL, and follows the switch.
Per-user HNSW indexes (``halldyll index-users``) go with the old column: run it again after.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg
import numpy as np
from pydantic import BaseModel, ConfigDict

from halldyll_ray.components.embeddings import Embeddings
from halldyll_ray.errors import HalldyllError, PermissionDenied
from halldyll_ray.storage.database import connect, register_codecs, translate_errors
from halldyll_ray.storage.sql import bind, q

log = logging.getLogger(__name__)

#: Advisory lock held by the one process that runs the job ("reembed" in ASCII).
REEMBED_LOCK_KEY = 0x7265656D626564
#: The HNSW parameters of every vector index of memory_chunks (as in migration 0001).
_HNSW = "USING hnsw ({column} vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
#: Seconds the job waits when every chunk of its batch was held by a writer (see
#: ``reembed_lock``), before it reads the batch again.
_HELD_PAUSE_S = 0.1


@dataclass(frozen=True)
class ModelSpec:
    """An embedding model as the database records it.

    Attributes:
        model_id: The encoder's ``model_id`` (``"onnx:<sha256[:16]>:<max_seq_length>"``).
        dimension: Vector length.
        path: ``EMBEDDING_MODEL_PATH`` it was loaded from; None for a packaged model.
        max_seq_length: Truncation in tokens.
        name: ``EMBEDDING_MODEL`` (``minilm`` or ``use-multilingual``): which packaged model,
            or with ``path`` set, an ONNX model of the user's own (``minilm``). A database
            that recorded no name (before it was kept) holds ``minilm``'s.
    """

    model_id: str
    dimension: int
    path: str | None
    max_seq_length: int
    name: str = "minilm"


class ReembedStatus(BaseModel):
    """Where the installation stands with its embedding model.

    ``state``: ``idle`` (no re-embedding has run or is needed), ``embedding`` (chunks are
    being embedded with the target model: ``done`` chunks stored by the job, ``remaining``
    left, ``total`` = done + remaining; where ``remaining`` cannot be counted (a role that
    row-level security limits) ``total`` is the count when the job started, or done if more),
    ``indexing`` (building the new HNSW index), ``complete`` (the last job switched
    ``active_model`` to its target). ``active_model`` is the model whose vectors searches
    read now.
    """

    model_config = ConfigDict(frozen=True)

    state: Literal["idle", "embedding", "indexing", "complete"]
    active_model: str | None
    active_dimension: int
    target_model: str | None = None
    target_dimension: int | None = None
    total: int = 0
    done: int = 0
    remaining: int | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None


async def read_active(conn: asyncpg.Connection) -> tuple[ModelSpec | None, int]:
    """The model the database searches (None if no process recorded one yet) and the
    dimension of ``memory_chunks.embedding``."""
    meta = {r["key"]: r["value"] for r in await conn.fetch(q("embedding_model_meta"))}
    dimension = int(meta["embedding_dimension"])
    if "embedding_model_id" not in meta:
        return None, dimension
    spec = ModelSpec(
        model_id=meta["embedding_model_id"],
        dimension=dimension,
        path=meta.get("embedding_model_path") or None,
        max_seq_length=int(meta.get("embedding_max_seq_length", "256")),
        name=meta.get("embedding_model_name") or "minilm",
    )
    return spec, dimension


def meta_rows(spec: ModelSpec) -> tuple[list[str], list[str]]:
    """``halldyll_meta`` keys and values that record ``spec`` (for ``set_embedding_meta``)."""
    return (
        [
            "embedding_model_id",
            "embedding_dimension",
            "embedding_model_path",
            "embedding_max_seq_length",
            "embedding_model_name",
        ],
        [
            spec.model_id,
            str(spec.dimension),
            spec.path or "",
            str(spec.max_seq_length),
            spec.name,
        ],
    )


async def record_model(conn: asyncpg.Connection, spec: ModelSpec) -> None:
    """Record ``spec`` as the model of the stored vectors (a database no process had named
    its model in: the vectors were made by the model configured then, as before 0010)."""
    await conn.execute(q("set_embedding_meta"), *meta_rows(spec))


async def read_status(conn: asyncpg.Connection) -> ReembedStatus:
    """The job's state and progress, read on ``conn`` (any role that may read
    ``halldyll_meta`` and ``embedding_jobs``; ``remaining`` needs to see every user's chunks
    and is None where row-level security hides them)."""
    active, dimension = await read_active(conn)
    job = await conn.fetchrow(q("embedding_job"))
    if job is None:
        return ReembedStatus(
            state="idle",
            active_model=None if active is None else active.model_id,
            active_dimension=dimension,
        )
    remaining = None
    if job["state"] == "complete":
        remaining = 0
    elif await conn.fetchval(q("next_column_type")) is not None:
        admin = await conn.fetchval("SELECT halldyll_admin_mode()")
        owner = await conn.fetchval(
            "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class "
            "WHERE oid = 'memory_chunks'::regclass"
        )
        if admin or owner:
            try:
                async with conn.transaction():  # a savepoint inside the caller's transaction
                    remaining = int(await conn.fetchval(q("reembed_remaining")))
            except asyncpg.UndefinedColumnError:  # the switch came between the two reads
                return await read_status(conn)
    return ReembedStatus(
        state=job["state"],
        active_model=None if active is None else active.model_id,
        active_dimension=dimension,
        target_model=job["target_model"],
        target_dimension=job["target_dimension"],
        # What the job stored and what is left now: chunks written or deleted since it
        # started move the count it started from.
        total=job["total"] if remaining is None else job["done"] + remaining,
        done=job["done"],
        remaining=remaining,
        started_at=job["started_at"],
        updated_at=job["updated_at"],
        finished_at=job["finished_at"],
    )


async def abandon(conn: asyncpg.Connection) -> bool:
    """Drop an unfinished job and its column (a process started with the database's own model
    again, before the switch: the move is called off). Returns whether there was one.

    Raises:
        PermissionDenied: the login role does not own ``memory_chunks``.
    """
    with translate_errors():
        job = await conn.fetchrow(q("embedding_job"))
        if job is None or job["state"] == "complete":
            return False
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", REEMBED_LOCK_KEY):
            return False  # a process still runs it; the next start calls it off
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '10s'")
                await conn.execute("DROP INDEX IF EXISTS memory_chunks_embedding_next")
                await conn.execute("DROP INDEX IF EXISTS memory_chunks_pending")
                await conn.execute("ALTER TABLE memory_chunks DROP COLUMN IF EXISTS embedding_next")
                await conn.execute("DELETE FROM embedding_jobs WHERE id = 1")
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", REEMBED_LOCK_KEY)
    log.info("called off the re-embedding to %s", job["target_model"])
    return True


class _TooManyPending(Exception):
    """More chunks were written since the last batch than one switch embeds under its lock."""


class Reembedding:
    """The re-embedding of one process: runs the job or follows another process's.

    Args:
        dsn: PostgreSQL URL of the login role (the table owner).
        live: The process's :class:`Embeddings` (old model until the switch); every component
            shares it, and the switch points it at the target model.
        target: Embeddings of the new model (the local encoder or the Embedding deployment).
        target_spec: The new model as it will be recorded.
        batch_size: Chunks per batch (one transaction each).
        poll_seconds: How often a process that does not hold the job looks for the switch.
    """

    def __init__(
        self,
        dsn: str,
        live: Embeddings,
        target: Embeddings,
        target_spec: ModelSpec,
        *,
        batch_size: int = 256,
        poll_seconds: float = 2.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 1 <= target_spec.dimension <= 16_000:
            raise ValueError(f"dimension {target_spec.dimension} is out of range")
        self.dsn = dsn
        self.live = live
        self.target = target
        self.target_spec = target_spec
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.switched = asyncio.Event()

    # ------------------------------------------------------------------ following
    def _follow(self) -> None:
        """Embed with the target model from now on (the database has switched)."""
        if not self.switched.is_set():
            self.live.retired_models.add(self.live.encoder.model_id)
            self.live.encoder = self.target.encoder
            self.live.remote = self.target.remote
            self.switched.set()
            log.info("embedding model is now %s", self.target_spec.model_id)

    async def _check_switched(self, conn: asyncpg.Connection) -> bool:
        active, _ = await read_active(conn)
        if active is not None and active.model_id == self.target_spec.model_id:
            self._follow()
        return self.switched.is_set()

    async def status(self) -> ReembedStatus:
        """See :func:`read_status` (read as the login role)."""
        with translate_errors():
            conn = await connect(self.dsn)
            try:
                return await read_status(conn)
            finally:
                await conn.close()

    # ------------------------------------------------------------------ the job
    async def run(self, *, max_batches: int | None = None) -> ReembedStatus:
        """Run the job until the switch, or until ``max_batches`` batches are stored.

        Returns at once (with the status) when another process holds the job. Safe to call
        again after any failure: it resumes from the vectors already committed.

        Raises:
            PermissionDenied: the login role may not alter ``memory_chunks`` (not its owner).
            Unavailable: PostgreSQL is unreachable, or the switch could not take the table's
                lock within 10 s; nothing is lost, call again.
        """
        with translate_errors():
            conn = await connect(self.dsn)
            try:
                await register_codecs(conn)
                await conn.execute("SET lock_timeout = '10s'")
                if await self._check_switched(conn):
                    return await read_status(conn)
                # A session lock: closing this connection (below, or by a crash) releases it.
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", REEMBED_LOCK_KEY):
                    return await read_status(conn)
                if await self._check_switched(conn):  # switched by the previous holder
                    return await read_status(conn)
                await self._prepare(conn)
                batches = 0
                while True:
                    while await self._embed_batch(conn, "embedding"):
                        batches += 1
                        if max_batches is not None and batches >= max_batches:
                            return await read_status(conn)
                    await self._build_index(conn)
                    try:
                        await self._switch(conn)
                        break
                    except _TooManyPending:
                        continue
                return await read_status(conn)
            finally:
                await conn.close()

    async def run_in_background(self) -> None:
        """Run or follow the job until this process embeds with the target model: the task
        :class:`~halldyll_ray.engine.MemoryEngine` starts. Failures are logged and retried
        every ``poll_seconds``; a login role without the right to alter the table only
        follows (``halldyll reembed`` does the job then)."""
        may_run = True
        while not self.switched.is_set():
            try:
                if may_run:
                    await self.run()
                else:
                    with translate_errors():
                        conn = await connect(self.dsn)
                        try:
                            await self._check_switched(conn)
                        finally:
                            await conn.close()
            except PermissionDenied:
                log.error(
                    "re-embedding: the login role may not alter memory_chunks; run "
                    "`halldyll reembed` with the migration user's DATABASE_URL (this process "
                    "follows the switch when it is done)"
                )
                may_run = False
            except HalldyllError as exc:
                log.warning("re-embedding paused (%s); retrying", exc.message)
            except Exception:  # the task must outlive any one failure; the job resumes
                log.exception("re-embedding failed; retrying")
            if not self.switched.is_set():
                await asyncio.sleep(self.poll_seconds)

    async def _prepare(self, conn: asyncpg.Connection) -> None:
        """Start the job, or find the one to resume (same target, its column in place)."""
        spec = self.target_spec
        wanted = f"vector({int(spec.dimension)})"
        job = await conn.fetchrow(q("embedding_job"))
        column = await conn.fetchval(q("next_column_type"))
        resumable = (
            job is not None
            and job["state"] != "complete"
            and job["target_model"] == spec.model_id
            and column == wanted
        )
        if not resumable:
            active, _ = await read_active(conn)
            async with conn.transaction():
                if column is not None:  # a job for another model, abandoned: start over
                    await conn.execute("DROP INDEX IF EXISTS memory_chunks_embedding_next")
                    await conn.execute("DROP INDEX IF EXISTS memory_chunks_pending")
                    await conn.execute("ALTER TABLE memory_chunks DROP COLUMN embedding_next")
                # The type modifier cannot be a parameter; it is a checked int.
                await conn.execute(f"ALTER TABLE memory_chunks ADD COLUMN embedding_next {wanted}")
                await conn.execute(
                    *bind(
                        "start_embedding_job",
                        source_model="" if active is None else active.model_id,
                        target_model=spec.model_id,
                        target_dimension=spec.dimension,
                        target_path=spec.path,
                        target_max_seq=spec.max_seq_length,
                    )
                )
            log.info("re-embedding every chunk with %s (%d-d)", spec.model_id, spec.dimension)
        await self._ensure_index(
            conn,
            "memory_chunks_pending",
            "ON memory_chunks (id) WHERE embedding_next IS NULL",
        )

    async def _ensure_index(self, conn: asyncpg.Connection, name: str, definition: str) -> None:
        """Build index ``name`` concurrently unless a valid one exists (an interrupted build
        leaves an invalid one, dropped and built again)."""
        valid = await conn.fetchval(q("index_validity"), name)
        if valid:
            return
        if valid is not None:
            await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        await conn.execute(f"CREATE INDEX CONCURRENTLY {name} {definition}")

    async def _embed(self, rows: list[asyncpg.Record]) -> np.ndarray:
        texts = [
            f"{r['label']}: {r['content']}" if r["label"] else r["content"] for r in rows
        ]  # what Chunk.indexed embeds
        return await self.target.embed_uncached(texts)

    async def _embed_batch(self, conn: asyncpg.Connection, state: str) -> int:
        """Embed and store one batch of pending chunks; return how many (0: none left)."""
        rows = await conn.fetch(q("reembed_pending"), self.batch_size)
        if not rows:
            return 0
        vectors = await self._embed(rows)
        async with conn.transaction():
            stored = await self._store(conn, rows, vectors)
            await conn.execute(q("reembed_progress"), stored, state)
        if not stored:  # every row of the batch is held by a writer: let it finish
            await asyncio.sleep(_HELD_PAUSE_S)
        return len(rows)

    @staticmethod
    async def _store(conn: asyncpg.Connection, rows: list[Any], vectors: np.ndarray) -> int:
        """Store the vectors of the batch's chunks that are still pending and not held by
        another transaction (``reembed_lock``); return how many were stored."""
        at = {r["id"]: i for i, r in enumerate(rows)}
        locked = await conn.fetch(q("reembed_lock"), list(at))
        await conn.executemany(
            q("reembed_store"), [(r["id"], np.asarray(vectors[at[r["id"]]])) for r in locked]
        )
        return len(locked)

    async def _build_index(self, conn: asyncpg.Connection) -> None:
        await conn.execute(q("reembed_progress"), 0, "indexing")
        await self._ensure_index(
            conn,
            "memory_chunks_embedding_next",
            "ON memory_chunks " + _HNSW.format(column="embedding_next"),
        )

    async def _switch(self, conn: asyncpg.Connection) -> None:
        """Swap the columns in one transaction (see the module docstring, step 4)."""
        spec = self.target_spec
        async with conn.transaction():
            # Waits for running writes and searches; those that come after see the new
            # column (their plans are rebuilt) and halldyll_meta's new model.
            await conn.execute("LOCK TABLE memory_chunks IN ACCESS EXCLUSIVE MODE")
            rows = await conn.fetch(q("reembed_pending"), self.batch_size + 1)
            if len(rows) > self.batch_size:
                raise _TooManyPending
            if rows:  # nobody else holds a row under this lock: all are stored
                stored = await self._store(conn, rows, await self._embed(rows))
                await conn.execute(q("reembed_progress"), stored, "indexing")
            await conn.execute("DROP INDEX IF EXISTS memory_chunks_pending")
            # Drops the old vectors, their index and any per-user index built on them.
            await conn.execute("ALTER TABLE memory_chunks DROP COLUMN embedding")
            await conn.execute(
                "ALTER TABLE memory_chunks RENAME COLUMN embedding_next TO embedding"
            )
            await conn.execute(
                "ALTER INDEX memory_chunks_embedding_next RENAME TO memory_chunks_embedding"
            )
            # Every row has a vector (checked above); NOT VALID spares a scan under the lock,
            # the VALIDATE below checks the old rows without blocking anyone.
            await conn.execute(
                "ALTER TABLE memory_chunks ADD CONSTRAINT memory_chunks_embedding_present "
                "CHECK (embedding IS NOT NULL) NOT VALID"
            )
            await record_model(conn, spec)
            await conn.execute(q("finish_embedding_job"))
        self._follow()  # before anything else: this process's next query is of the new model
        log.info("switched searches to %s", spec.model_id)
        await conn.execute(
            "ALTER TABLE memory_chunks VALIDATE CONSTRAINT memory_chunks_embedding_present"
        )
