"""Durable background jobs (issue #14 §2) on a real PostgreSQL: queued with their write,
taken once, retaken after a worker dies, retried with backoff, poisoned, isolated per user,
and background learning from turns end to end with the heuristic model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from halldyll_ray import (
    ConfigurationError,
    Conversation,
    InvalidInput,
    Job,
    JobStatus,
    MemoryEngine,
    Message,
    NotFound,
    PermissionDenied,
    Settings,
)
from halldyll_ray.components.jobs import JobQueue
from halldyll_ray.llm.protocol import LLMOutputInvalid, LLMUnavailable
from halldyll_ray.storage.database import Database

ROOT = Path(__file__).resolve().parents[2]


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30) -> None:
    """Wait for ``check`` to hold (not a timing assertion: the bound only stops a hang)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still waiting for {what}")
        await asyncio.sleep(0.05)


async def _job_row(db: Database, job_id: uuid.UUID) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM memory_jobs WHERE id = $1", job_id, admin=True)
    assert row is not None
    return row


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await Database(database_url, pool_size=4).open()
    yield database
    await database.close()


@pytest.fixture
async def background(settings: Settings, encoder: Any) -> AsyncIterator[MemoryEngine]:
    """An engine that learns in the background, on the database of the ``engine`` fixture."""
    changed = settings.model_copy(
        update={
            "memory_extraction": "background",
            "session_summary_every_n_turns": 2,
            "jobs_poll_seconds": 0.2,
            "redis_key_prefix": f"bg-{uuid.uuid4().hex[:8]}",
        }
    )
    engine = MemoryEngine(changed, encoder=encoder)
    await engine.initialize()
    yield engine
    await engine.close()


async def _submit(queue: JobQueue, user_id: uuid.UUID, kind: str, n: int) -> list[uuid.UUID]:
    async with queue.db.scoped(user_id) as conn:
        return [await queue.enqueue(conn, user_id, kind, {"n": i}) for i in range(n)]


# ------------------------------------------------------------------ queued with the write
async def test_a_job_exists_exactly_when_its_transaction_commits(
    engine: MemoryEngine, background: MemoryEngine, database_url: str
) -> None:
    user = await engine.create_user("ada", None, "user")
    queue = background.components.jobs
    with pytest.raises(RuntimeError):
        async with engine.db.scoped(user.id) as conn:
            await queue.enqueue(conn, user.id, "extract", {"conversation_id": str(uuid.uuid4())})
            raise RuntimeError("the write fails after queueing")
    assert (await engine.list_jobs(user.id)).items == []

    # A store that rolls back (a chunk refused after the job was queued) leaves no job.
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(
            """
            CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.content LIKE '%poison%' THEN RAISE EXCEPTION 'refused'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_poison BEFORE INSERT ON memory_chunks
                FOR EACH ROW EXECUTE FUNCTION refuse_poison();
            """
        )
        conversation = Conversation(
            title="chat", messages=[Message(role="user", content="I live in poison city.")]
        )
        with pytest.raises(asyncpg.RaiseError):
            await background.store_memory(user.id, conversation)
        assert (await engine.list_jobs(user.id)).items == []
        assert (await engine.list_memories(user.id)).items == []
        # The same store without the refused chunk commits, with its extraction job.
        kept = await background.store_memory(
            user.id,
            Conversation(title="chat", messages=[Message(role="user", content="I live in Lyon.")]),
        )
    finally:
        await admin.execute("DROP TRIGGER refuse_poison ON memory_chunks")
        await admin.close()
    jobs = (await engine.list_jobs(user.id)).items
    assert [(j.kind, j.payload["conversation_id"]) for j in jobs] == [("extract", str(kept.id))]


# ------------------------------------------------------------------ workers
async def test_two_workers_never_run_one_job_twice(engine: MemoryEngine, database_url: str) -> None:
    user = await engine.create_user("ada", None, "user")
    ran: list[tuple[uuid.UUID, str]] = []
    queues = []
    for name in ("a", "b"):
        db = await Database(database_url, pool_size=5).open()
        queue = JobQueue(db, database_url, poll_s=0.1)

        async def handler(job: Job, name: str = name) -> dict[str, Any]:
            ran.append((job.id, name))
            await asyncio.sleep(0)
            return {"by": name}

        queue.register("count", handler)
        queues.append(queue)
    ids = await _submit(queues[0], user.id, "count", 200)
    try:
        for queue in queues:
            queue.start(4)

        async def all_done() -> bool:
            page = await engine.list_jobs(user.id, status="done", limit=500)
            return len(page.items) == len(ids)

        await _until(all_done, "200 jobs done")
    finally:
        for queue in queues:
            await queue.stop()
            await queue.db.close()
    assert sorted(job_id for job_id, _ in ran) == sorted(ids)  # each ran exactly once
    assert sum(q.counts["done"] for q in queues) == len(ids)
    jobs = (await engine.list_jobs(user.id, limit=500)).items
    assert {j.attempts for j in jobs} == {1}
    assert all(j.result == {"by": by} for j in jobs for job_id, by in ran if job_id == j.id)


_DYING_WORKER = """
import asyncio, sys
from halldyll_ray.components.jobs import JobQueue
from halldyll_ray.storage.database import Database

async def main(dsn):
    db = await Database(dsn, pool_size=2).open()
    queue = JobQueue(db, dsn, lease_s=1.0, poll_s=0.1)

    async def hang(job):
        print("running", job.id, flush=True)
        await asyncio.Event().wait()  # never finishes: the process is killed meanwhile

    queue.register("slow", hang)
    queue.start(1)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""


async def test_a_job_whose_worker_died_is_taken_again(
    engine: MemoryEngine, db: Database, database_url: str
) -> None:
    user = await engine.create_user("ada", None, "user")
    queue = JobQueue(db, database_url, lease_s=1.0, poll_s=0.1, retry_base_s=0.01)
    [job_id] = await _submit(queue, user.id, "slow", 1)
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(_DYING_WORKER),
        database_url,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert worker.stdout is not None
        line = await asyncio.wait_for(worker.stdout.readline(), 60)
        assert line.decode().split() == ["running", str(job_id)]
        row = await _job_row(db, job_id)
        assert row["status"] == "running" and row["attempts"] == 1
        worker.send_signal(signal.SIGKILL)  # dies mid-job, holding the lease
        await worker.wait()
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()

    async def finish(job: Job) -> dict[str, Any]:
        return {"attempt": job.attempts}

    queue.register("slow", finish)
    queue.start(1)
    try:

        async def done() -> bool:
            return (await engine.get_job(user.id, job_id)).status is JobStatus.DONE

        await _until(done, "the job to be taken again after its lease")
    finally:
        await queue.stop()
    job = await engine.get_job(user.id, job_id)
    assert job.attempts == 2 and job.result == {"attempt": 2}
    assert job.last_error is not None and "lease expired" in job.last_error
    assert queue.counts["reaped"] == 1


async def test_a_long_try_keeps_its_lease(
    engine: MemoryEngine, db: Database, database_url: str
) -> None:
    """A try longer than the lease renews it: no other worker takes the job meanwhile."""
    user = await engine.create_user("ada", None, "user")
    queue = JobQueue(db, database_url, lease_s=1.5, poll_s=0.05)
    starts: list[int] = []

    async def slow(job: Job) -> dict[str, Any]:
        starts.append(job.attempts)
        await asyncio.sleep(3.5)  # over two leases
        return {}

    queue.register("slow", slow)
    [job_id] = await _submit(queue, user.id, "slow", 1)
    queue.start(3)  # the other two workers reap expired leases while this one runs
    try:

        async def done() -> bool:
            return (await engine.get_job(user.id, job_id)).status is JobStatus.DONE

        await _until(done, "the long job")
    finally:
        await queue.stop()
    assert starts == [1] and queue.counts["reaped"] == 0


async def test_a_stopping_worker_gives_its_job_back(
    engine: MemoryEngine, db: Database, database_url: str
) -> None:
    user = await engine.create_user("ada", None, "user")
    queue = JobQueue(db, database_url, poll_s=0.05)
    started = asyncio.Event()

    async def hang(job: Job) -> dict[str, Any]:
        started.set()
        await asyncio.Event().wait()
        return {}

    queue.register("hang", hang)
    [job_id] = await _submit(queue, user.id, "hang", 1)
    queue.start(1)
    await asyncio.wait_for(started.wait(), 30)
    await queue.stop(grace_s=0.1)
    row = await _job_row(db, job_id)
    assert (row["status"], row["attempts"], row["locked_by"]) == ("queued", 0, None)
    assert queue.counts["released"] == 1


# ------------------------------------------------------------------ retries and poison
async def test_retries_back_off_then_a_poison_job_fails_with_its_error_kept(
    engine: MemoryEngine, db: Database, database_url: str
) -> None:
    user = await engine.create_user("ada", None, "user")
    base = 0.2
    queue = JobQueue(db, database_url, max_attempts=3, retry_base_s=base, timeout_s=0.5)
    raised_at: dict[uuid.UUID, list[datetime]] = {}
    errors: list[Exception] = [
        LLMOutputInvalid("the model answered no JSON"),  # a failed try, retried
        LLMUnavailable("the LLM endpoint timed out"),
        LLMUnavailable("the LLM endpoint timed out"),
    ]

    async def flaky(job: Job) -> dict[str, Any]:
        raised_at.setdefault(job.id, []).append(datetime.now(UTC))
        raise errors[job.attempts - 1]

    async def missing(job: Job) -> dict[str, Any]:
        raise NotFound("conversation 1 not found")  # nothing a retry can cure

    async def once_slow(job: Job) -> dict[str, Any]:
        if job.attempts == 1:
            await asyncio.sleep(5)  # past timeout_s: a failed try
        return {"ok": True}

    async def leaky(job: Job) -> dict[str, Any]:
        raise RuntimeError("POST https://bot:hunter2@llm.example/v1 with Bearer sk-abcdef123456")

    for kind, handler in [
        ("flaky", flaky),
        ("missing", missing),
        ("slowly", once_slow),
        ("leaky", leaky),
    ]:
        queue.register(kind, handler)
        await _submit(queue, user.id, kind, 1)
    scheduled: list[float] = []

    async def settle() -> bool:
        await queue.run_pending()
        rows = await db.fetch(
            "SELECT kind, status, attempts, run_after FROM memory_jobs", admin=True
        )
        for row in rows:
            if row["kind"] == "flaky" and row["status"] == "queued":
                (job_id,) = raised_at
                tries = raised_at[job_id]
                if len(scheduled) < len(tries):
                    scheduled.append((row["run_after"] - tries[-1]).total_seconds())
        return all(r["status"] in ("done", "failed") for r in rows)

    await _until(settle, "every job to settle")
    jobs = {j.kind: j for j in (await engine.list_jobs(user.id)).items}
    flaky_job = jobs["flaky"]
    assert (flaky_job.status, flaky_job.attempts) == (JobStatus.FAILED, 3)
    assert flaky_job.last_error == "unavailable: the LLM endpoint timed out"
    assert flaky_job.finished_at is not None and flaky_job.result is None
    # Exponential backoff with equal jitter: try n waits at least half of base*2^(n-1).
    assert len(scheduled) == 2
    assert base / 2 <= scheduled[0] and base <= scheduled[1]  # (the exact rule: test_job_rules)
    assert (jobs["missing"].status, jobs["missing"].attempts) == (JobStatus.FAILED, 1)
    assert jobs["missing"].last_error == "not_found: conversation 1 not found"
    slow = jobs["slowly"]
    assert (slow.status, slow.attempts, slow.result) == (JobStatus.DONE, 2, {"ok": True})
    assert slow.last_error is not None and slow.last_error.startswith("timeout")
    leaked = jobs["leaky"].last_error
    assert leaked is not None and leaked.startswith(
        "RuntimeError: POST https://bot:[redacted]@llm.example"
    )
    assert "hunter2" not in leaked and "sk-abc" not in leaked
    failures = await engine.list_audit(operation="job.fail", limit=10)
    assert {r["target_ids"][0] for r in failures} == {
        str(jobs[k].id) for k in ("flaky", "missing", "leaky")
    }
    assert all(r["outcome"] == "error" and r["acting_for"] == user.id for r in failures)


async def test_a_try_whose_error_or_result_postgresql_cannot_store_is_still_recorded(
    engine: MemoryEngine, db: Database, database_url: str
) -> None:
    """kodus-ai/kodus-ai#1683 (events lost to a U+0000 or an unpaired surrogate in an LLM's
    words) and openclaw/openclaw#27753 (an error that cannot be stored loops with no
    recovery): an error quoting such text, or a result holding it, could not be written, so
    the try stayed ``running`` until its lease ran out and was taken again to fail the same
    way. Each is now a recorded failed try."""
    user = await engine.create_user("ada", None, "user")
    queue = JobQueue(db, database_url, max_attempts=1, timeout_s=5)
    said = ["Ada\x00 likes tea", "half an emoji \ud83d"]

    async def quoting(job: Job) -> dict[str, Any]:
        raise RuntimeError(f"the model said {said[job.payload['n']]}")

    async def returning(job: Job) -> dict[str, Any]:
        return {"said": said[job.payload["n"]]}

    for kind, handler in (("quoting", quoting), ("returning", returning)):
        queue.register(kind, handler)
        await _submit(queue, user.id, kind, len(said))
    await queue.run_pending()
    jobs = (await engine.list_jobs(user.id)).items
    assert len(jobs) == 4 and all(j.status is JobStatus.FAILED for j in jobs), jobs
    errors = sorted(j.last_error or "" for j in jobs)
    assert errors[:2] == [
        "RuntimeError: the model said Ada\ufffd likes tea",
        "RuntimeError: the model said half an emoji \ufffd",
    ]
    assert all("returning handler's result is not storable" in e for e in errors[2:])


# ------------------------------------------------------------------ status and isolation
async def test_status_is_the_users_own(engine: MemoryEngine, db: Database, database_url: str):
    ada = await engine.create_user("ada", None, "user")
    bob = await engine.create_user("bob", None, "user")
    queue = JobQueue(db, database_url)
    ada_jobs = await _submit(queue, ada.id, "extract", 3) + await _submit(queue, ada.id, "other", 1)
    bob_jobs = await _submit(queue, bob.id, "extract", 2)

    page = await engine.list_jobs(ada.id, limit=2)
    assert len(page.items) == 2 and page.next_cursor is not None
    rest = await engine.list_jobs(ada.id, limit=2, cursor=page.next_cursor)
    listed = [j.id for j in page.items + rest.items]
    assert sorted(listed) == sorted(ada_jobs) and rest.next_cursor is None
    assert len((await engine.list_jobs(ada.id, kind="extract")).items) == 3
    assert len((await engine.list_jobs(ada.id, status="queued")).items) == 4
    assert (await engine.list_jobs(ada.id, status="done")).items == []
    assert (await engine.get_job(ada.id, ada_jobs[0])).payload == {"n": 0}
    with pytest.raises(NotFound):
        await engine.get_job(ada.id, bob_jobs[0])  # Bob's job is not Ada's to read
    with pytest.raises(NotFound):
        await engine.list_jobs(uuid.uuid4())
    for bad in ({"status": "finished"}, {"kind": "Bad Kind"}, {"limit": 0}, {"cursor": "x"}):
        with pytest.raises(InvalidInput):
            await engine.list_jobs(ada.id, **bad)

    # Row-level security: a transaction acting for Ada sees none of Bob's job rows.
    async with engine.db.scoped(ada.id) as conn:
        owners = {r[0] for r in await conn.fetch("SELECT user_id FROM memory_jobs")}
    assert owners == {ada.id}
    with pytest.raises(PermissionDenied):
        async with engine.db.scoped(ada.id) as conn:
            await queue.enqueue(conn, bob.id, "extract", {})

    # Through the permission matrix: a User reads only its own jobs.
    key = (await engine.create_api_key(ada.id)).key
    api = engine.authorized(await engine.authenticate(key), request_id="req-ada")
    assert len((await api.list_jobs(None)).items) == 4
    assert (await api.get_job(None, ada_jobs[1])).id == ada_jobs[1]
    with pytest.raises(PermissionDenied):
        await api.list_jobs(bob.id)
    with pytest.raises(PermissionDenied):
        await api.get_job(bob.id, bob_jobs[0])

    receipt = await engine.delete_user(bob.id)
    assert receipt.jobs == 2
    assert await db.fetchval("SELECT count(*) FROM memory_jobs", admin=True) == 4


async def test_finished_jobs_are_purged_after_the_retention(
    engine: MemoryEngine, db: Database, database_url: str
) -> None:
    user = await engine.create_user("ada", None, "user")
    queue = JobQueue(db, database_url)

    async def ok(job: Job) -> dict[str, Any]:
        return {}

    queue.register("ok", ok)
    ids = await _submit(queue, user.id, "ok", 3)
    await _submit(queue, user.id, "later", 1)  # no handler here: stays queued
    assert await queue.run_pending() == 3
    async with db.scoped(admin=True) as conn:
        await conn.execute(
            "UPDATE memory_jobs SET finished_at = now() - interval '200 hours' WHERE id = $1",
            ids[0],
        )
    assert await engine.purge_jobs() == 1  # JOBS_RETENTION_HOURS = 168
    async with db.scoped(admin=True) as conn:
        await conn.execute(
            "UPDATE memory_jobs SET finished_at = now() - interval '2 hours' "
            "WHERE finished_at IS NOT NULL"
        )
    assert await engine.purge_jobs(older_than_hours=1) == 2
    assert [j.kind for j in (await engine.list_jobs(user.id)).items] == ["later"]
    with pytest.raises(InvalidInput):
        await engine.purge_jobs(older_than_hours=0)


# ------------------------------------------------------------------ background learning
async def _settled(engine: MemoryEngine, user_id: uuid.UUID, job_ids: list[uuid.UUID]) -> None:
    async def done() -> bool:
        jobs = [await engine.get_job(user_id, job_id) for job_id in job_ids]
        assert all(j.status is not JobStatus.FAILED for j in jobs), jobs
        return all(j.status is JobStatus.DONE for j in jobs)

    await _until(done, "the turn's jobs")


TURNS = [
    ("My name is Ada and I live in Lyon.", "Nice to meet you, Ada!"),
    ("I really love green tea, and my favourite colour is teal.", "Teal is a fine colour."),
]


async def test_background_learning_writes_what_the_inline_path_writes(
    settings: Settings, encoder: Any, background: MemoryEngine
) -> None:
    # The same settings but inline learning (what a deployment without an LLM runs).
    same = {"session_summary_every_n_turns": 2, "memory_extraction": "inline"}
    async with MemoryEngine(settings.model_copy(update=same), encoder=encoder) as engine:
        await _compare(engine, background)


async def _compare(engine: MemoryEngine, background: MemoryEngine) -> None:
    inline_user = await engine.create_user("inline", None, "user")
    user = await background.create_user("ada", None, "user")
    assert engine.extraction_mode == "inline" and background.extraction_mode == "background"
    assert background.components.jobs.running and not engine.components.jobs.running
    inline = [await engine.record_turn(inline_user.id, "s1", u, a) for u, a in TURNS]
    assert all(r.job_ids == [] for r in inline) and inline[1].summary_id is not None

    records = [
        await background.record_turn(user.id, "s1", u, a, request_id=f"turn-{i}")
        for i, (u, a) in enumerate(TURNS)
    ]
    # The turn returns once stored: no facts or summary yet, the jobs that will write them.
    assert [(r.fact_ids, r.summary_id, len(r.job_ids)) for r in records] == [
        ([], None, 1),
        ([], None, 2),
    ]
    for record in records:
        await _settled(background, user.id, record.job_ids)
    jobs = {j.id: j for j in (await background.list_jobs(user.id)).items}
    assert sorted(j.kind for j in jobs.values()) == ["extract", "extract", "summarize"]
    extract = jobs[records[0].job_ids[0]]
    assert extract.payload["seqs"] == [0, 1] and extract.request_id == "turn-0"
    assert extract.result is not None and extract.result["model"] == "heuristic"

    async def learned(engine: MemoryEngine, user_id: uuid.UUID) -> tuple[Any, ...]:
        facts = (await engine.list_memories(user_id, types=["fact"])).items
        summaries = (await engine.list_memories(user_id, types=["summary"])).items
        assert len(summaries) == 1
        return (
            sorted(
                (f.memory.statement, f.memory.confidence, f.memory.kind, tuple(f.memory.tags))
                for f in facts
            ),
            summaries[0].memory.text,
        )

    assert await learned(background, user.id) == await learned(engine, inline_user.id)
    statements = [f[0] for f in (await learned(background, user.id))[0]]
    assert "The user lives in Lyon" in statements
    # Consolidation's audit rows name the job that learned each fact and the turn's request.
    stored = [
        r
        for r in await background.list_audit(user_id=user.id, operation="fact.learn", limit=50)
        if r["target_type"] == "fact"
    ]
    assert {r["details"]["action"] for r in stored} <= {"add", "reinforce"}
    assert stored and {r["details"]["job_id"] for r in stored} == {
        str(records[0].job_ids[0]),
        str(records[1].job_ids[0]),
    }
    assert {r["request_id"] for r in stored} == {"turn-0", "turn-1"}

    # A retried turn (same idempotency key) queues nothing more, and reports the first
    # attempt's jobs (it reported none).
    first = await background.record_turn(
        user.id, "s2", "I work at Acme.", "ok", idempotency_key="k"
    )
    queued = len((await background.list_jobs(user.id)).items)
    again = await background.record_turn(
        user.id, "s2", "I work at Acme.", "ok", idempotency_key="k"
    )
    assert len(first.job_ids) == 1 and again.replayed and again.job_ids == first.job_ids
    assert len((await background.list_jobs(user.id)).items) == queued
    # Without extraction, no extract job (and no summary yet: one turn of two).
    quiet = await background.record_turn(
        user.id, "s3", "I live in Paris.", "ok", extract_facts=False
    )
    assert quiet.job_ids == []


async def test_a_stored_conversation_is_learned_from_in_the_background(
    background: MemoryEngine,
) -> None:
    user = await background.create_user("ada", None, "user")
    conversation = await background.store_memory(
        user.id,
        Conversation(
            title="intro",
            session_id="chat-7",
            messages=[
                Message(role="user", content="I work as a baker."),
                Message(role="assistant", content="I am glad to hear it."),
            ],
        ),
    )
    appended = await background.append_messages(
        user.id, conversation.id, [Message(role="user", content="I have two cats.")]
    )
    assert [m.seq for m in appended] == [2]
    jobs = (await background.list_jobs(user.id)).items
    assert sorted(j.payload["seqs"] for j in jobs) == [[0, 1], [2]]
    await _settled(background, user.id, [j.id for j in jobs])
    facts = (await background.list_memories(user.id, types=["fact"])).items
    assert sorted(f.memory.statement for f in facts) == [
        "The user has cats",
        "The user works as baker",
    ]
    assert all(f.memory.session_id == "chat-7" for f in facts)
    assert all(f.memory.source == f"conversation:{conversation.id}" for f in facts)
    # An assistant's first-person sentence is not a fact about the user.
    assert not any("glad" in f.memory.statement for f in facts)


async def test_a_job_of_a_deleted_conversation_learns_nothing(background: MemoryEngine) -> None:
    """The user deleted the conversation before its job ran: the job ends at its first try
    with nothing learned (no retry, no fact from the deleted text)."""
    user = await background.create_user("ada", None, "user")
    await background.stop_job_workers()
    stored = await background.store_memory(
        user.id, Conversation(messages=[Message(role="user", content="I live in Oslo.")])
    )
    await background.delete_memory(user.id, stored.id)
    assert await background.run_pending_jobs() == 1
    [job] = (await background.list_jobs(user.id)).items
    assert (job.status, job.attempts) == (JobStatus.DONE, 1)
    assert job.result is not None and job.result["changes"] == []
    assert (await background.list_memories(user.id, types=["fact"])).items == []


async def test_engines_without_workers_leave_jobs_queued(
    settings: Settings, encoder: Any, engine: MemoryEngine
) -> None:
    """A request-only engine (run_jobs=False, as the Serve deployments but Ingestion) queues
    jobs and runs none; an inline engine started while jobs wait runs them."""
    user = await engine.create_user("ada", None, "user")
    quiet = MemoryEngine(
        settings.model_copy(update={"memory_extraction": "background"}),
        encoder=encoder,
        run_jobs=False,
    )
    await quiet.initialize()
    try:
        record = await quiet.record_turn(user.id, "s1", "I live in Rome.", "ok")
        assert not quiet.components.jobs.running and len(record.job_ids) == 1
    finally:
        await quiet.close()
    assert (await engine.get_job(user.id, record.job_ids[0])).status is JobStatus.QUEUED
    drainer = MemoryEngine(settings.model_copy(update={"jobs_poll_seconds": 0.1}), encoder=encoder)
    await drainer.initialize()
    try:
        assert drainer.extraction_mode == "inline" and drainer.components.jobs.running
        await _settled(drainer, user.id, record.job_ids)
    finally:
        await drainer.close()
    facts = (await engine.list_memories(user.id, types=["fact"])).items
    assert [f.memory.statement for f in facts] == ["The user lives in Rome"]


def test_extraction_mode_setting() -> None:
    assert Settings.from_env(memory_extraction="BACKGROUND").memory_extraction == "background"
    with pytest.raises(ConfigurationError, match="MEMORY_EXTRACTION"):
        Settings.from_env(memory_extraction="sometimes")


async def test_a_long_conversation_is_learned_from_in_windows(background: MemoryEngine) -> None:
    """A stored conversation longer than one model call reads (EXTRACT_WINDOW messages) is
    learned from window by window: no message's fact is lost to a per-call cap."""
    from halldyll_ray.components.learning import EXTRACT_WINDOW

    hobbies = [
        "chess",
        "archery",
        "pottery",
        "sailing",
        "knitting",
        "fencing",
        "origami",
        "beekeeping",
        "juggling",
        "calligraphy",
        "birdwatching",
        "rowing",
        "woodcarving",
        "astronomy",
        "snorkeling",
        "bouldering",
        "gardening",
        "kayaking",
        "embroidery",
        "skateboarding",
        "falconry",
        "glassblowing",
        "taxidermy",
        "orienteering",
        "curling",
    ]
    assert len(hobbies) > EXTRACT_WINDOW
    user = await background.create_user("ada", None, "user")
    await background.stop_job_workers()
    await background.store_memory(
        user.id,
        Conversation(messages=[Message(role="user", content=f"I love {h}.") for h in hobbies]),
    )
    assert await background.run_pending_jobs() == 1
    [job] = (await background.list_jobs(user.id)).items
    assert job.status is JobStatus.DONE and job.result is not None
    assert len(job.result["changes"]) == len(hobbies)
    facts = (await background.list_memories(user.id, types=["fact"], limit=100)).items
    learned = " ".join(f.memory.statement for f in facts)
    assert all(h in learned for h in hobbies), learned


async def test_a_deleted_memory_s_words_leave_the_job_results(background: MemoryEngine) -> None:
    """A job's result listed the statements a turn taught: deleting the fact, or the turn's
    conversation, left them readable in GET .../jobs until the retention purge."""
    user = await background.create_user("forgetful", None, "user")
    other = await background.create_user("bystander", None, "user")
    records = {}
    for who, session in ((user, "s1"), (user, "s2"), (other, "s1")):
        records[(who.id, session)] = await background.record_turn(
            who.id, session, f"My name is Ada and I live in Lyon ({session}).", "Nice!"
        )
        await _settled(background, who.id, records[(who.id, session)].job_ids)

    async def changes(who: uuid.UUID, session: str) -> list[dict[str, Any]]:
        job = await background.get_job(who, records[(who, session)].job_ids[0])
        assert job.kind == "extract" and job.result is not None
        return list(job.result["changes"])

    first = await changes(user.id, "s1")
    assert first and all(c["statement"] for c in first)
    lyon = next(c for c in first if "Lyon" in c["statement"])
    # The fact goes: its changes keep their action and ids, not its words.
    await background.delete_memory(user.id, lyon["fact_id"])
    after = await changes(user.id, "s1")
    assert [(c["action"], c["fact_id"]) for c in after] == [
        (c["action"], c["fact_id"]) for c in first
    ]
    for before, now in zip(first, after, strict=True):
        gone = lyon["fact_id"] in (before["fact_id"], before.get("target"))
        assert (now["statement"], now["reason"]) == (
            (None, None) if gone else (before["statement"], before["reason"])
        )
    second = await changes(user.id, "s2")
    assert any(c["statement"] for c in second if c["fact_id"] != lyon["fact_id"])
    # The conversation goes: every change its extraction made loses its words, and the
    # facts it taught (they stay) no longer name it as their source.
    s2 = records[(user.id, "s2")].conversation_id
    taught = {c["fact_id"] for c in second if c["fact_id"] != lyon["fact_id"]}
    named = [(await background.get_memory(user.id, f)).sources for f in taught]
    assert all(f"conversation:{s2}" in sources for sources in named)
    await background.delete_memory(user.id, s2)
    assert all(c["statement"] is None for c in await changes(user.id, "s2"))
    for fact_id in taught:
        fact = await background.get_memory(user.id, fact_id)
        assert f"conversation:{s2}" not in fact.sources
        assert fact.memory.source != f"conversation:{s2}"
    # Another user's results are theirs, until their fact expires and is purged.
    theirs = await changes(other.id, "s1")
    assert all(c["statement"] for c in theirs)
    async with background.components.memories.db.scoped(admin=True) as conn:
        expired = await conn.fetchval(
            "UPDATE memories SET expires_at = now() - interval '1 second' WHERE id = $1 "
            "RETURNING id",
            uuid.UUID(theirs[0]["fact_id"]),
        )
    assert expired is not None and await background.purge_expired() == 1
    purged = await changes(other.id, "s1")
    assert purged[0]["statement"] is None and purged[0]["fact_id"] == theirs[0]["fact_id"]


async def test_a_deleted_fact_s_words_leave_the_learning_records(background: MemoryEngine) -> None:
    """Consolidation keeps what it did with each statement of a turn (``fact_learnings``, so
    that a retried job replays it): deleting the fact it wrote left its statement and the
    model's reason there, readable in the database and handed back by a replay."""
    user = await background.create_user("unlearn", None, "user")
    record = await background.record_turn(
        user.id, "s1", "My name is Ada and I live in Lyon.", "Nice!"
    )
    await _settled(background, user.id, record.job_ids)
    job = await background.get_job(user.id, record.job_ids[0])
    assert job.result is not None
    lyon = next(c for c in job.result["changes"] if c["statement"] and "Lyon" in c["statement"])
    await background.delete_memory(user.id, lyon["fact_id"])
    rows = await background.db.fetch(
        "SELECT change FROM fact_learnings WHERE user_id = $1", user.id, admin=True
    )
    assert rows
    for row in rows:
        change = row["change"]
        if lyon["fact_id"] in (change.get("fact_id"), change.get("target")):
            assert (change["statement"], change["reason"]) == (None, None), change
            assert change["action"] == lyon["action"]
        else:
            assert change["statement"]
    assert not any("Lyon" in str(row["change"]) for row in rows)


async def test_a_fact_deleted_while_its_job_runs_leaves_no_words_in_the_result(
    background: MemoryEngine,
) -> None:
    """The job's result is written when the job ends, after the facts it learned committed:
    a fact deleted in between (the deletion found no result to clear yet) had its statement
    kept in the result. The end of a job now takes its user's row, as a deletion does, and
    clears what names a memory that is gone."""
    user = await background.create_user("racer", None, "user")
    consolidation = background.components.learning.consolidation
    original = consolidation.learn_from_turn

    async def learn_then_delete_for(user_id: uuid.UUID, *args: Any, **kwargs: Any) -> Any:
        changes = await original(user_id, *args, **kwargs)
        for change in changes:
            if change.fact_id is not None and "Lyon" in (change.statement or ""):
                await background.delete_memory(user_id, change.fact_id)
        return changes

    consolidation.learn_from_turn = learn_then_delete_for  # type: ignore[method-assign]
    try:
        record = await background.record_turn(
            user.id, "s1", "My name is Ada and I live in Lyon.", "Nice!"
        )
        await _settled(background, user.id, record.job_ids)
    finally:
        consolidation.learn_from_turn = original  # type: ignore[method-assign]
    job = await background.get_job(user.id, record.job_ids[0])
    assert job.result is not None and job.result["changes"]
    assert "Lyon" not in json.dumps(job.result), job.result
    gone = [c for c in job.result["changes"] if c["statement"] is None]
    assert gone and all(c["reason"] is None for c in gone)
    assert any(c["statement"] for c in job.result["changes"])  # what stays keeps its words
