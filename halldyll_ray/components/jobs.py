"""Durable background jobs in PostgreSQL (issue #14 §2): a queue table and in-process workers.

A job is a row of ``memory_jobs`` (migration 0011) queued by :meth:`JobQueue.enqueue` in the
transaction of the write that causes it, so a write that rolls back leaves no job and a
committed one always has its job. Workers (:meth:`JobQueue.start`: asyncio tasks of this
process; the Ingestion deployment runs them under Ray Serve) take due jobs with
``FOR UPDATE SKIP LOCKED``, so two workers never take one job, and run each under a lease they
renew every third of JOBS_LEASE_SECONDS; a job whose worker died (lease out) is queued again by
the next worker that looks. A failed try is retried after an exponential backoff until
JOBS_MAX_ATTEMPTS tries, then the job is ``failed`` with its error kept (``last_error``);
an error no retry can cure (invalid input, a deleted conversation) fails it at once.

Why our own SQL rather than a queue library: procrastinate (the maintained PostgreSQL queue
in Python) runs on psycopg 3 with its own schema, worker process and connector; under asyncpg
it would bring a second driver and pool, and it cannot insert a job in the caller's asyncpg
transaction, which is the point here (a turn and its job commit together). The queue needs
eight short statements (``storage/sql/jobs.sql``), the same row-level security as every
other user table, and the retry delay is a row's ``run_after``, not an in-process loop
(so tenacity, which retries calls in-process, does not apply).

Waking: the enqueue sends ``pg_notify('halldyll_jobs', kind)``, delivered at commit to one
LISTEN connection per queue (:class:`~halldyll_ray.storage.listen.Listener`), which wakes
idle workers at once; they also look every JOBS_POLL_SECONDS for retries that came due,
leases that ran out and notifications lost with a dropped connection.
``benchmarks/turns_background.py`` measures the pickup latency both ways.

Handlers are ``async def handler(job: Job) -> dict``: the dict is kept as the job's
``result``. They run with the job's actor and request id in :mod:`halldyll_ray.requestctx`
(so their audit rows name the job, the request and who caused it) and must tolerate running
twice: a try whose worker lost its lease may have written part of its work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from halldyll_ray import requestctx, validation
from halldyll_ray.components.audit import write_audit
from halldyll_ray.components.base import require_user
from halldyll_ray.errors import (
    Conflict,
    HalldyllError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    redact,
)
from halldyll_ray.models import MAX_PAGE_SIZE, Job, JobStatus, Page, check_json_value, storable
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.listen import Listener
from halldyll_ray.storage.sql import bind, q

log = logging.getLogger(__name__)

#: What a handler is: the job in, its result (JSON) out.
Handler = Callable[[Job], Awaitable[dict[str, Any]]]
#: The notification channel of the enqueue (storage/sql/jobs.sql).
CHANNEL = "halldyll_jobs"
#: A job kind: what the table's CHECK accepts.
KIND = re.compile(r"[a-z][a-z0-9_.]{0,63}")
#: Errors no retry can cure: the job fails at its first try.
PERMANENT: tuple[type[HalldyllError], ...] = (InvalidInput, NotFound, PermissionDenied, Conflict)
#: The longest backoff between two tries, in seconds.
MAX_RETRY_DELAY_S = 600.0
#: Characters of an error kept on the job row.
ERROR_CHARS = 1000
#: Most jobs one status page lists.
MAX_PAGE = MAX_PAGE_SIZE


def retry_delay(attempt: int, base_s: float, *, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the try after try number ``attempt`` (1 = the first) failed.

    ``base_s x 2^(attempt-1)``, at most :data:`MAX_RETRY_DELAY_S`, with "equal jitter" (half
    of it fixed, half random): retries of jobs that failed together (an LLM outage) spread
    out instead of coming back at the same instant.
    """
    full = min(MAX_RETRY_DELAY_S, base_s * 2.0 ** max(0, attempt - 1))
    return float(full / 2 + rand() * full / 2)


def describe_error(exc: BaseException) -> str:
    """The ``last_error`` of a failed try (also in the job's audit row and log lines): our
    errors' code and message, another exception's type and its text, with credentials masked
    (:func:`~halldyll_ray.errors.redact`) and what PostgreSQL cannot store (NUL, a lone
    surrogate) replaced (:func:`~halldyll_ray.models.storable`); at most :data:`ERROR_CHARS`
    characters.

    An error quoting a model's or a server's words with a NUL or half an emoji could not be
    recorded: the try stayed ``running`` until its lease ran out, and was taken again to fail
    the same way, never ``failed`` (kodus-ai/kodus-ai#1683, openclaw/openclaw#27753: an error
    that cannot be stored loops with no recovery)."""
    if isinstance(exc, HalldyllError):
        text = f"{exc.code}: {exc.message}"
    elif isinstance(exc, TimeoutError) and not str(exc):
        text = "timeout: the try took longer than JOBS_TIMEOUT_SECONDS"
    else:
        detail = str(exc)
        text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return storable(redact(text))[:ERROR_CHARS]


@dataclass(frozen=True)
class _Taken:
    """A job a worker holds, and who caused it (kept on the row, not in the public Job)."""

    job: Job
    actor_id: UUID | None


def _job(row: Any) -> Job:
    return Job(
        id=row["id"],
        user_id=row["user_id"],
        kind=row["kind"],
        status=JobStatus(row["status"]),
        payload=row["payload"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        run_after=row["run_after"],
        last_error=row["last_error"],
        result=row["result"],
        request_id=row["request_id"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


class JobQueue:
    """Queue jobs, read their status, and run them with workers of this process.

    Args:
        db: The pool (workers take and finish jobs in admin mode; reads act as the user).
        dsn: The login URL, for the LISTEN connection that wakes idle workers.
        max_attempts: Tries of a job before it fails for good (JOBS_MAX_ATTEMPTS).
        retry_base_s: Backoff before the second try (JOBS_RETRY_BASE_SECONDS), doubled after.
        lease_s: How long a worker holds a job without renewing (JOBS_LEASE_SECONDS).
        timeout_s: Longest try (JOBS_TIMEOUT_SECONDS); a longer one fails (retryable).
        poll_s: How often idle workers look for due jobs (JOBS_POLL_SECONDS).
        retention_hours: Age of finished jobs :meth:`purge` deletes (JOBS_RETENTION_HOURS).
        listen: Wake idle workers by LISTEN/NOTIFY (False: polling only; for measurements).
    """

    def __init__(
        self,
        db: Database,
        dsn: str,
        *,
        max_attempts: int = 5,
        retry_base_s: float = 2.0,
        lease_s: float = 60.0,
        timeout_s: float = 300.0,
        poll_s: float = 2.0,
        retention_hours: float = 168.0,
        listen: bool = True,
    ) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.retention_hours = retention_hours
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._handlers: dict[str, Handler] = {}
        self._listener = Listener(dsn, CHANNEL, self._notified, on_connect=self._wake_all)
        self._listen = listen
        self._workers: list[asyncio.Task[None]] = []
        self._wakes: list[asyncio.Event] = []
        self._stopping = False
        self._reaped_at = float("-inf")
        self._unavailable_logged = False
        #: Jobs this process ran, by outcome (done, retried, failed, released, reaped).
        self.counts: dict[str, int] = {
            "done": 0,
            "retried": 0,
            "failed": 0,
            "released": 0,
            "reaped": 0,
        }

    # ------------------------------------------------------------------ handlers
    def register(self, kind: str, handler: Handler) -> None:
        """Run jobs of ``kind`` with ``handler`` in this process (replaces an earlier one).

        Raises:
            ValueError: ``kind`` is not 1-64 characters of a-z, 0-9, ``_`` and ``.``,
                starting with a letter.
        """
        if not KIND.fullmatch(kind):
            raise ValueError(f"job kind {kind!r} must match {KIND.pattern}")
        self._handlers[kind] = handler

    @property
    def kinds(self) -> list[str]:
        """The kinds this process runs."""
        return sorted(self._handlers)

    # ------------------------------------------------------------------ queueing
    async def enqueue(
        self,
        conn: asyncpg.Connection,
        user_id: UUID,
        kind: str,
        payload: Mapping[str, Any],
        *,
        request_id: str | None = None,
        actor_id: UUID | None = None,
        delay_s: float = 0.0,
        max_attempts: int | None = None,
    ) -> UUID:
        """Queue a job in the caller's transaction (``conn`` acts as ``user_id``).

        The job exists exactly when that transaction commits; the workers are woken then.

        Args:
            conn: A connection inside a transaction of :meth:`Database.scoped` for the user.
            user_id: Whose job (its status is theirs to read).
            kind: What to run (a registered handler, in some process).
            payload: The handler's input: JSON (ids and numbers; no memory content).
            request_id, actor_id: The request and the principal that caused it (defaults:
                those of :mod:`halldyll_ray.requestctx`), for its audit rows.
            delay_s: Not taken before this many seconds from now.
            max_attempts: Tries before it fails for good (default JOBS_MAX_ATTEMPTS).

        Returns:
            The job's id.

        Raises:
            InvalidInput: a bad kind or a payload that is not JSON.
        """
        if not KIND.fullmatch(kind):
            raise InvalidInput(f"job kind must match {KIND.pattern}", field="kind")
        try:
            body = json.loads(json.dumps(dict(payload), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"a job payload must be JSON: {exc}", field="payload") from None
        context = requestctx.current()
        job_id = uuid.uuid4()
        await conn.fetchrow(
            *bind(
                "enqueue_job",
                id=job_id,
                user_id=user_id,
                kind=kind,
                payload=body,
                max_attempts=self.max_attempts if max_attempts is None else max_attempts,
                delay_s=float(delay_s),
                actor_id=actor_id if actor_id is not None else context.actor_id,
                request_id=request_id if request_id is not None else context.request_id,
            )
        )
        return job_id

    async def submit(
        self,
        user_id: UUID | str,
        kind: str,
        payload: Mapping[str, Any],
        *,
        request_id: str | None = None,
        delay_s: float = 0.0,
        max_attempts: int | None = None,
    ) -> UUID:
        """:meth:`enqueue` in a transaction of its own. NotFound: no such user."""
        user_id = validation.parse_uuid(user_id, "user_id")
        async with self.db.scoped(user_id) as conn:
            if await conn.fetchrow(q("user_state"), user_id) is None:
                raise NotFound(f"user {user_id} not found")
            return await self.enqueue(
                conn,
                user_id,
                kind,
                payload,
                request_id=request_id,
                delay_s=delay_s,
                max_attempts=max_attempts,
            )

    # ------------------------------------------------------------------ status
    async def get(self, user_id: UUID | str, job_id: UUID | str) -> Job:
        """One job of the user. NotFound: no such job of theirs, or no such user."""
        user_id = validation.parse_uuid(user_id, "user_id")
        job_id = validation.parse_uuid(job_id, "job_id")
        row = await self.db.fetchrow(q("get_job"), job_id, user_id, user_id=user_id)
        if row is None:
            await require_user(self.db, user_id)
            raise NotFound(f"job {job_id} not found")
        return _job(row)

    async def page(
        self,
        user_id: UUID | str,
        *,
        status: JobStatus | str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[Job]:
        """The user's jobs, newest first, ``limit`` (1-500) a page, filtered by status/kind.

        Raises:
            InvalidInput: a bad status, kind, limit or cursor. NotFound: no such user.
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        if status is not None:
            try:
                status = JobStatus(status)
            except ValueError:
                allowed = ", ".join(s.value for s in JobStatus)
                raise InvalidInput(f"status must be one of {allowed}", field="status") from None
        if kind is not None and (not isinstance(kind, str) or not KIND.fullmatch(kind)):
            raise InvalidInput(f"kind must match {KIND.pattern}", field="kind")
        limit = validation.limit(limit, MAX_PAGE)
        after_at, after_id = validation.decode_cursor(cursor, listing=f"jobs/{user_id}")
        rows = await self.db.fetch(
            *bind(
                "list_jobs",
                user_id=user_id,
                status=None if status is None else status.value,
                kind=kind,
                after_at=after_at,
                after_id=after_id,
                limit=limit + 1,
            ),
            user_id=user_id,
        )
        if not rows:
            await require_user(self.db, user_id)
        items = [_job(row) for row in rows[:limit]]
        next_cursor = (
            validation.encode_cursor(items[-1].created_at, items[-1].id, listing=f"jobs/{user_id}")
            if len(rows) > limit
            else None
        )
        return Page[Job](items=items, next_cursor=next_cursor)

    async def pending(self) -> bool:
        """Whether any job is queued or running (of any user)."""
        return bool(await self.db.fetchval(q("jobs_pending"), admin=True))

    async def purge(self, *, older_than_hours: float | None = None) -> int:
        """Delete done and failed jobs finished before JOBS_RETENTION_HOURS; how many went.
        Audited (``jobs.purge``)."""
        hours = self.retention_hours if older_than_hours is None else older_than_hours
        cutoff = validation.age_cutoff(hours, "older_than_hours", unit="hours")
        async with self.db.scoped(admin=True) as conn:
            purged = int(await conn.fetchval(q("purge_jobs"), cutoff))
            if purged:
                await write_audit(
                    conn,
                    "jobs.purge",
                    None,
                    [],
                    None,
                    details={"count": purged, "before": cutoff.isoformat()},
                )
        return purged

    # ------------------------------------------------------------------ workers
    @property
    def running(self) -> bool:
        """Whether workers of this process are running."""
        return bool(self._workers)

    def state(self) -> dict[str, Any]:
        """For health reports: workers, whether the wake-up connection is up, job counts."""
        return {
            "workers": len(self._workers),
            "kinds": self.kinds,
            "listening": self._listener.listening if self._workers and self._listen else None,
            **self.counts,
        }

    def start(self, workers: int) -> None:
        """Start ``workers`` worker tasks in this event loop (nothing if already running)."""
        if self._workers or workers <= 0:
            return
        self._stopping = False
        if self._listen:
            self._listener.start()
        self._wakes = [asyncio.Event() for _ in range(workers)]
        self._workers = [
            asyncio.create_task(self._work(wake), name=f"halldyll-job-worker-{i}")
            for i, wake in enumerate(self._wakes)
        ]
        log.info("job workers started: %d (%s), kinds %s", workers, self.worker_id, self.kinds)

    async def stop(self, *, grace_s: float = 10.0) -> None:
        """Stop the workers: no new job is taken; running tries get ``grace_s`` seconds to
        finish, then are cancelled and given back to the queue (the try is not counted)."""
        self._stopping = True
        self._wake_all()
        workers, self._workers = self._workers, []
        if workers:
            _, late = await asyncio.wait(workers, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        await self._listener.close()

    async def run_pending(self, *, limit: int = 1000) -> int:
        """Run due jobs in the calling task until none is due (or ``limit`` ran); how many
        ran. For scripts and tests; the workers of :meth:`start` do the same continuously."""
        limit = validation.count(limit, "limit")
        ran = 0
        await self._reap()
        while ran < limit:
            job = await self._take()
            if job is None:
                break
            await self._run(job)
            ran += 1
        return ran

    def _notified(self, _payload: str) -> None:
        self._wake_all()

    def _wake_all(self) -> None:
        for wake in self._wakes:
            wake.set()

    async def _work(self, wake: asyncio.Event) -> None:
        while not self._stopping:
            wake.clear()  # before the take: a job queued during it wakes the wait below
            try:
                now = time.monotonic()
                if now - self._reaped_at >= self.poll_s:
                    self._reaped_at = now
                    await self._reap()
                job = await self._take()
                self._unavailable_logged = False
            except HalldyllError as exc:  # PostgreSQL out of reach: try again later
                if not self._unavailable_logged:
                    log.warning("job workers: cannot take jobs (%s)", exc.message)
                    self._unavailable_logged = True
                job = None
            if job is not None:
                try:
                    await self._run(job)
                except Exception:  # a bug here must not end the worker; the lease runs out
                    log.exception("job %s: unexpected error in the worker", job.job.id)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.poll_s)

    async def _take(self) -> _Taken | None:
        if not self._handlers:
            return None
        async with self.db.scoped(admin=True) as conn:
            row = await conn.fetchrow(
                *bind(
                    "take_jobs",
                    kinds=self.kinds,
                    limit=1,
                    worker=self.worker_id,
                    lease_s=float(self.lease_s),
                )
            )
        return None if row is None else _Taken(_job(row), row["actor_id"])

    async def _reap(self) -> None:
        """Queue again (or fail) the jobs whose worker stopped renewing its lease."""
        async with self.db.scoped(admin=True) as conn:
            rows = await conn.fetch(
                *bind("reap_jobs", cap_s=MAX_RETRY_DELAY_S, base_s=float(self.retry_base_s))
            )
            for row in rows:
                if row["status"] == JobStatus.FAILED:
                    await _audit_failure(conn, row, "lease expired")
        for row in rows:
            self.counts["reaped"] += 1
            log.warning(
                "job %s (%s): its worker stopped during try %d; now %s",
                row["id"],
                row["kind"],
                row["attempts"],
                row["status"],
            )

    async def _run(self, taken: _Taken) -> None:
        """One try of a job: the handler under a renewed lease, then done, retry or failed."""
        job = taken.job
        handler = self._handlers[job.kind]
        work = asyncio.create_task(
            self._call(handler, job, taken.actor_id), name=f"halldyll-job-{job.id}"
        )
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=self.lease_s / 3)
                if done:
                    break
                if not await self._renew(job):
                    # Reaped (this process stalled past the lease) or its user was deleted:
                    # the job is no longer ours, and its next try must not race this one.
                    work.cancel()
                    with contextlib.suppress(BaseException):
                        await work
                    log.warning("job %s: lease lost during try %d", job.id, job.attempts)
                    return
        except asyncio.CancelledError:
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            with contextlib.suppress(HalldyllError):
                await self._settle("release_job", job)
                self.counts["released"] += 1
            raise
        error = work.exception()
        try:
            if error is None:
                await self._finished(job, work.result())
            else:
                await self._failed(job, error)
        except HalldyllError as exc:  # the lease expires and the job is taken again
            log.warning("job %s: could not record its try (%s)", job.id, exc.message)

    async def _call(self, handler: Handler, job: Job, actor_id: UUID | None) -> dict[str, Any]:
        with requestctx.acting(actor_id, job.request_id, job_id=job.id):
            async with asyncio.timeout(self.timeout_s):
                result = await handler(job)
        if not isinstance(result, dict):
            raise TypeError(f"the {job.kind} handler returned {type(result).__name__}, not dict")
        # JSON as the row will hold it (UUIDs and times as text); NaN is refused, and so is
        # text PostgreSQL cannot store (the try fails and is recorded, instead of the finish
        # failing and the job staying taken until its lease runs out, again and again).
        kept: dict[str, Any] = json.loads(json.dumps(result, allow_nan=False, default=str))
        try:
            check_json_value(kept, max_depth=sys.getrecursionlimit())
        except ValueError as exc:
            raise ValueError(f"the {job.kind} handler's result is not storable: {exc}") from None
        return kept

    async def _renew(self, job: Job) -> bool:
        """Extend the lease; False when the job is no longer this try's. PostgreSQL out of
        reach counts as kept: if the lease runs out meanwhile, the finish is refused."""
        try:
            return await self._extend(job)
        except HalldyllError as exc:
            log.warning("job %s: lease not renewed (%s)", job.id, exc.message)
            return True

    async def _extend(self, job: Job) -> bool:
        async with self.db.scoped(admin=True) as conn:
            row = await conn.fetchrow(
                *bind(
                    "extend_lease",
                    id=job.id,
                    worker=self.worker_id,
                    attempt=job.attempts,
                    lease_s=float(self.lease_s),
                )
            )
        return row is not None

    async def _settle(self, name: str, job: Job, **values: Any) -> Any:
        async with self.db.scoped(admin=True) as conn:
            return await conn.fetchrow(
                *bind(name, id=job.id, worker=self.worker_id, attempt=job.attempts, **values)
            )

    async def _finished(self, job: Job, result: dict[str, Any]) -> None:
        """Write the result, with its user's row taken first: the words of a memory deleted
        while the job ran (after its changes committed, before this) leave it here, those of
        one deleted later by :func:`~halldyll_ray.components.base.forget`."""
        async with self.db.scoped(admin=True) as conn:
            await conn.execute(q("share_job_owner"), job.user_id)
            row = await conn.fetchrow(
                *bind(
                    "finish_job",
                    id=job.id,
                    worker=self.worker_id,
                    attempt=job.attempts,
                    result=result,
                )
            )
            if row is not None:
                await conn.execute(q("forget_gone_in_job"), job.id)
        if row is not None:
            self.counts["done"] += 1

    async def _failed(self, job: Job, exc: BaseException) -> None:
        error = describe_error(exc)
        retry_in = None
        if not isinstance(exc, PERMANENT) and job.attempts < job.max_attempts:
            retry_in = retry_delay(job.attempts, self.retry_base_s)
        async with self.db.scoped(admin=True) as conn:
            row = await conn.fetchrow(
                *bind(
                    "fail_job",
                    id=job.id,
                    worker=self.worker_id,
                    attempt=job.attempts,
                    retry_in_s=retry_in,
                    error=error,
                )
            )
            if row is not None and row["status"] == JobStatus.FAILED:
                facts = {"user_id": job.user_id, "kind": job.kind, "attempts": job.attempts}
                await _audit_failure(conn, {**dict(row), **facts}, error)
        if row is None:
            return
        if retry_in is None:
            self.counts["failed"] += 1
            log.warning("job %s (%s) failed, try %d: %s", job.id, job.kind, job.attempts, error)
        else:
            self.counts["retried"] += 1
            log.info(
                "job %s (%s) try %d failed, retry in %.1f s: %s",
                job.id,
                job.kind,
                job.attempts,
                retry_in,
                error,
            )


async def _audit_failure(conn: asyncpg.Connection, row: Mapping[str, Any], error: str) -> None:
    """A job that gave up is audited: the change it was to make did not happen."""
    await write_audit(
        conn,
        "job.fail",
        "job",
        [row["id"]],
        row["user_id"],
        actor_id=row["actor_id"],
        outcome="error",
        request_id=row["request_id"],
        details={"kind": row["kind"], "attempts": row["attempts"], "error": error},
    )
