"""Concurrency beyond issue 15's parallel turns: rows that several users share, taken in one
order whoever takes them; maintenance that must not hold one user's writes behind another's;
reads and imports that race a write.

Every case asserts that each call went through (no deadlock surfacing as a 503, no call held
up), and what is stored or read afterwards. Races are set up in a fixed order (a transaction
of the test holds the row or table one side waits on), not left to timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from halldyll_ray import MemoryEngine, NotFound, Settings, User
from halldyll_ray.models import TurnRecord
from halldyll_ray.storage.sql import q


@pytest.fixture
async def second(settings: Settings, encoder) -> AsyncIterator[MemoryEngine]:
    """Another engine (another replica) on the same database and Redis."""
    engine = MemoryEngine(settings, encoder=encoder)
    await engine.initialize()
    yield engine
    await engine.close()


async def _viewers(engine: MemoryEngine, n: int) -> list[User]:
    tag = uuid.uuid4().hex[:8]
    return [await engine.create_user(f"viewer-{tag}-{i}", None, "viewer") for i in range(n)]


async def _grants_of(engine: MemoryEngine, users: list[User]) -> int:
    ids = [u.id for u in users]
    return int(
        await engine.db.fetchval(
            "SELECT count(*) FROM viewer_grants "
            "WHERE viewer_id = ANY($1::uuid[]) OR owner_id = ANY($1::uuid[])",
            ids,
        )
    )


async def test_viewers_who_read_each_other_are_erased_at_once(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """A team of Viewers who read each other's memories, erased together. Each erasure's
    cascade took the user's grants as the Viewer, then as the owner: erasures of V1 and V2
    each took one of the grants V1->V2 and V2->V1 first and waited for the other, and
    PostgreSQL aborted all but one of the six (503). The grants are now locked in the order
    of their key before the cascade."""
    for _ in range(3):  # it failed in every round but the first few percent
        team = await _viewers(engine, 6)
        for viewer in team:
            for owner in team:
                if viewer.id != owner.id:
                    await engine.grant_viewer(viewer.id, owner.id)
        receipts = await asyncio.gather(
            *((engine, second)[i % 2].delete_user(u.id) for i, u in enumerate(team)),
            return_exceptions=True,
        )
        assert [r for r in receipts if isinstance(r, BaseException)] == []
        # Each grant is counted by the erasure that deleted it, once in all.
        assert sum(r.viewer_grants for r in receipts) == 30  # type: ignore[union-attr]
        assert await _grants_of(engine, team) == 0
        for user in team:
            with pytest.raises(NotFound):
                await engine.get_user(user.id)
            audit = await engine.list_audit(user_id=user.id, operation="user.delete")
            assert len(audit) == 1


async def test_two_erasures_waiting_behind_a_revocation_do_not_deadlock(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """The same fault, in a fixed order. A revocation of V3's grant on V1 is in flight;
    the erasure of V1 has taken its grant V1->V2 and waits behind it for V3->V1, on its way
    to V2->V1; the erasure of V2 takes V2->V1 and waits for V1->V2. The revocation ends:
    the old code deadlocked there (one erasure was a 503)."""
    v1, v2, v3 = await _viewers(engine, 3)
    await engine.grant_viewer(v3.id, v1.id)  # first in the table: met first by a scan
    await engine.grant_viewer(v1.id, v2.id)
    await engine.grant_viewer(v2.id, v1.id)
    async with engine.db.scoped() as conn:  # the revocation's statement, not yet committed
        assert await conn.fetchval(q("revoke_viewer_grant"), v3.id, v1.id) == v3.id
        first = asyncio.create_task(engine.delete_user(v1.id))
        await asyncio.sleep(0.4)
        then = asyncio.create_task(second.delete_user(v2.id))
        await asyncio.sleep(0.4)
        # V1's erasure waits for the revocation; V2's waits behind V1's or, when V1's takes
        # its grants in an order that leaves V2's free (the key order follows the random
        # ids), is already done.
        assert not first.done()
    receipts = await asyncio.gather(first, then, return_exceptions=True)
    assert [r for r in receipts if isinstance(r, BaseException)] == []
    assert await _grants_of(engine, [v1, v2, v3]) == 0
    assert [u.id for u in (await engine.list_users()).items if u.id in {v1.id, v2.id}] == []


async def _delete_session_logs(engine: MemoryEngine, user_id: uuid.UUID, times: int) -> int:
    """Delete the session's log (whichever it is now) ``times`` times; how many went."""
    gone = 0
    for _ in range(times):
        logs = await engine.list_memories(
            user_id, types=["conversation"], session_id="chat", limit=10
        )
        for log in logs.items:
            with contextlib.suppress(NotFound):  # the other deleter was first
                await engine.delete_memory(user_id, log.id)
                gone += 1
        await asyncio.sleep(0)
    return gone


async def _logs(engine: MemoryEngine, user_id: uuid.UUID) -> set[uuid.UUID]:
    page = await engine.list_memories(user_id, types=["conversation"], limit=100)
    return {m.id for m in page.items}


async def test_turns_racing_deletions_of_their_session_log_are_all_answered(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """Turns of one session while its log is deleted again and again. A turn looked the
    log up, then appended to it in another transaction: a log deleted in between was looked
    up once more, and deleted again before that append the turn answered NotFound for a
    conversation id the caller never named (a 404; up to 16 of 30 turns a round). The append
    now opens the session's next log in its own transaction, and compares an idempotency
    key on the session (a call with the key whose log was reopened meanwhile replays it)."""
    for _ in range(2):
        user = await engine.create_user(f"deleted-{uuid.uuid4().hex[:8]}", None, "user")
        await engine.record_turn(user.id, "chat", "hello", "hi", extract_facts=False)
        turns = [
            (engine, second)[i % 2].record_turn(
                user.id,
                "chat",
                f"message {i // 2 if i < 16 else i}",
                f"reply {i // 2 if i < 16 else i}",
                extract_facts=False,
                idempotency_key=f"key-{i // 2}" if i < 16 else None,
            )
            for i in range(30)
        ]
        deleters = [_delete_session_logs(e, user.id, 8) for e in (engine, second, engine)]
        results = await asyncio.gather(*turns, *deleters, return_exceptions=True)
        records = results[: len(turns)]
        assert [r for r in results if isinstance(r, BaseException)] == []
        # Calls with one key: one stored the turn, the other replayed that answer; or, the
        # key going with the log it was stored in, the log of one of them is deleted.
        for pair in range(8):
            first, again = records[2 * pair], records[2 * pair + 1]
            assert isinstance(first, TurnRecord) and isinstance(again, TurnRecord)
            if first.replayed or again.replayed:
                assert not (first.replayed and again.replayed)
                assert (first.conversation_id, first.message_seqs) == (
                    again.conversation_id,
                    again.message_seqs,
                )
            else:
                assert first.conversation_id != again.conversation_id
                assert not {first.conversation_id, again.conversation_id} <= await _logs(
                    engine, user.id
                )
        # Each turn stored is where its record says, its reply right after it, unless its
        # log was deleted since; the session's last log numbers its messages from 0.
        for i, record in enumerate(records):
            assert isinstance(record, TurnRecord)
            try:
                log = await engine.get_memory(user.id, record.conversation_id)
            except NotFound:
                continue
            said = [m.content for m in log.messages if m.seq in record.message_seqs]
            n = i // 2 if i < 16 else i
            assert said == [f"message {n}", f"reply {n}"]
            assert [m.seq for m in log.messages] == list(range(log.message_count))


async def test_a_full_session_log_rolls_over_and_the_session_goes_on(
    engine: MemoryEngine,
) -> None:
    """A session's log at MAX_MESSAGES_PER_CONVERSATION refused every further turn (a 422
    "a conversation holds at most 20000 messages" for a caller who did nothing wrong). The
    full log now stays a conversation of the session and the turn opens its next log."""
    from halldyll_ray.models import MAX_MESSAGES_PER_CONVERSATION

    user = await engine.create_user(f"long-{uuid.uuid4().hex[:8]}", None, "user")
    first = await engine.record_turn(user.id, "long", "the first words", "noted")
    # Twenty thousand messages are too slow to send: the log's counter says it is full.
    async with engine.db.scoped(user.id) as conn:
        await conn.execute(
            "UPDATE memories SET message_count = $2 WHERE id = $1",
            first.conversation_id,
            MAX_MESSAGES_PER_CONVERSATION - 1,
        )
    turn = await engine.record_turn(
        user.id, "long", "a turn past the cap", "still here", idempotency_key="past-cap"
    )
    assert turn.conversation_id != first.conversation_id
    assert turn.message_seqs == [0, 1]
    again = await engine.record_turn(
        user.id, "long", "a turn past the cap", "still here", idempotency_key="past-cap"
    )
    assert again.conversation_id == turn.conversation_id  # replayed, not stored twice
    later = await engine.record_turn(user.id, "long", "and one more", "fine")
    assert later.conversation_id == turn.conversation_id and later.message_seqs == [2, 3]

    old = await engine.get_memory(user.id, first.conversation_id)
    assert old.session_id == "long"  # still the session's, found by its session_id
    assert old.message_count == MAX_MESSAGES_PER_CONVERSATION - 1  # the reservation undone
    assert [m.content for m in old.messages][:2] == ["the first words", "noted"]
    new = await engine.get_memory(user.id, turn.conversation_id)
    assert [m.content for m in new.messages] == [
        "a turn past the cap",
        "still here",
        "and one more",
        "fine",
    ]
    logs = await engine.list_memories(user.id, types=["conversation"], session_id="long")
    assert {m.id for m in logs.items} == {first.conversation_id, turn.conversation_id}
    # The context's recent turns come from the session's log, the new one.
    context = await engine.prepare_context(user.id, "long", "what did I say?")
    assert "and one more" in context.text


async def test_a_turn_whose_log_is_deleted_before_its_facts_learns_nothing_from_it(
    engine: MemoryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inline learning stored a turn's candidate facts after the append had committed, each
    in a transaction of its own: a deletion of the session's log landing in between (here,
    while the turn's session summary is written, between the append and the facts) left
    facts of the deleted conversation's words stored after it, naming it as their source,
    which forget() had already removed from every fact. The facts are now stored under the
    user's lock only while the conversation exists."""
    user = await engine.create_user(f"learner-{uuid.uuid4().hex[:8]}", None, "user")
    for i in range(engine.settings.session_summary_every_n_turns - 1):
        await engine.record_turn(user.id, "chat", f"question {i}", "ok", extract_facts=False)
    loop = engine.components.agent_loop
    refresh = loop.refresh_summary

    async def deleted_meanwhile(user_id: uuid.UUID, session: str, log: uuid.UUID, *a, **kw):
        await engine.delete_memory(user_id, log)  # another request, after the append
        return await refresh(user_id, session, log, *a, **kw)

    monkeypatch.setattr(loop, "refresh_summary", deleted_meanwhile)
    turn = await engine.record_turn(user.id, "chat", "I live in Lisbon. I like green tea.", "ok")
    monkeypatch.undo()
    with pytest.raises(NotFound):
        await engine.get_memory(user.id, turn.conversation_id)
    assert turn.fact_ids == []
    facts = await engine.list_memories(user.id, types=["fact"])
    assert facts.items == []

    # Undisturbed, the same turn is learned from, and its facts name its log.
    turn = await engine.record_turn(user.id, "chat", "I live in Lisbon. I like green tea.", "ok")
    assert len(turn.fact_ids) == 2
    for fact_id in turn.fact_ids:
        fact = await engine.get_memory(user.id, fact_id)
        assert fact.sources == [f"conversation:{turn.conversation_id}"]


async def test_a_model_deleted_many_times_at_once_is_deleted_and_audited_once(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """A deletion looked the model up, then deleted its row in another statement: every one
    of several deletions at once found it and answered success (each wrote a
    ``model.delete`` audit row), where the same call a moment later is NotFound. A deletion
    that deletes nothing is now NotFound, as a second revocation of a key writes nothing."""
    for round_ in range(3):
        name = f"gone-{round_}-{uuid.uuid4().hex[:8]}"
        model = await engine.register_model(name, "llm")
        results = await asyncio.gather(
            *((engine, second)[i % 2].delete_model(name) for i in range(8)),
            return_exceptions=True,
        )
        assert sum(r is None for r in results) == 1
        assert all(isinstance(r, NotFound) for r in results if r is not None)
        audit = await engine.list_audit(operation="model.delete")
        assert sum(str(model.id) in map(str, row["target_ids"]) for row in audit) == 1


_OLD_EVENTS = (
    "INSERT INTO memory_events (user_id, memory_id, memory_type, kind, at) "
    "SELECT $1, gen_random_uuid(), 'fact', 'created', now() - make_interval(days => $2) "
    "FROM generate_series(1, $3) RETURNING id"
)
_OLD_JOBS = (
    "INSERT INTO memory_jobs (id, user_id, kind, status, max_attempts, created_at, finished_at) "
    "SELECT gen_random_uuid(), $1, 'extract', 'done', 1, now() - make_interval(days => $2), "
    "now() - make_interval(days => $2 - 1) FROM generate_series(1, $3) RETURNING id"
)


@pytest.mark.parametrize(
    ("rows", "table", "purge"),
    [
        # Two events of the user, the one with the higher id the older (its transaction began
        # first and committed last): the purge walks them by time, the cascade by id.
        (_OLD_EVENTS, "memory_events", lambda e: e.purge_events(older_than_hours=24)),
        # Two jobs of the user, the older finished first: the purge walks them by end, the
        # cascade by the newest created first.
        (_OLD_JOBS, "memory_jobs", lambda e: e.purge_jobs(older_than_hours=24)),
    ],
    ids=["events", "jobs"],
)
async def test_a_retention_purge_during_an_erasure_does_not_deadlock(
    engine: MemoryEngine,
    second: MemoryEngine,
    database_url: str,
    rows: str,
    table: str,
    purge: Callable[[MemoryEngine], Awaitable[int]],
) -> None:
    """The retention purges deleted every old event (job) in the order of their time, the
    erasure's cascade deletes the user's in the order of its index (id; newest created
    first): each took one of two rows of the user first and waited for the other, and
    PostgreSQL aborted the purge (a 503 for a maintenance command). The purges now skip the
    rows a deletion holds (they are going anyway, or are purged next time)."""
    victim = await engine.create_user(f"victim-{uuid.uuid4().hex[:8]}", None, "user")
    other = await engine.create_user(f"bystander-{uuid.uuid4().hex[:8]}", None, "user")
    owner = await asyncpg.connect(database_url)  # the tables' owner: ANALYZE
    try:
        # Recent rows of someone else: the purge reads the few old ones through its index,
        # as it does on a server that keeps a few days of them.
        await owner.execute(rows, other.id, 0, 100_000)
        first = await owner.fetchval(rows, victim.id, 100, 1)
        await owner.fetchval(rows, victim.id, 200, 1)
        await owner.execute(f"ANALYZE {table}")
        # A third transaction holds the row the erasure takes first, so that the erasure
        # waits on it and the purge queues behind the erasure with the other row taken.
        async with owner.transaction():
            await owner.execute(f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE", first)
            erasure = asyncio.create_task(engine.delete_user(victim.id))
            await asyncio.sleep(0.5)
            purged = asyncio.create_task(purge(second))
            await asyncio.sleep(0.5)
    finally:
        await owner.close()
    results = await asyncio.gather(erasure, purged, return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    left = await engine.db.fetchval(
        f"SELECT count(*) FROM {table} WHERE user_id = $1", victim.id, admin=True
    )
    assert left == 0


async def test_an_erasure_during_a_learning_that_ignores_its_fact_does_not_deadlock(
    engine: MemoryEngine, database_url: str
) -> None:
    """Consolidation's "ignore" decision writes no fact, so it skipped the user's row lock:
    it held the turn's conversation (lock_learning_source), then its learning record's
    foreign key took the user's row. An erasure of the user takes the user's row first, then
    (its cascade) the conversation: each held what the other waited for, and PostgreSQL
    aborted one of them (the erasure was a 503, or the job failed). An "ignore" now shares
    the user's row first (FOR KEY SHARE: other writers go on), as the lock order says.

    Fixed order: the erasure has taken the user's row and waits for a grant an uncommitted
    transaction holds; the learning takes the conversation and waits for the user's row; the
    grant is freed and the erasure's cascade reaches the conversation."""
    from scripted_model import ScriptedMemoryModel

    from halldyll_ray.components.consolidation import Consolidation
    from halldyll_ray.llm.protocol import Action, Decision, FactCandidate

    for round_ in range(2):
        user = await engine.create_user(f"ignored-{uuid.uuid4().hex[:8]}", None, "user")
        [viewer] = await _viewers(engine, 1)
        await engine.grant_viewer(viewer.id, user.id)
        turn = await engine.record_turn(user.id, "s", "Hello there", "Hi.", extract_facts=False)
        model = ScriptedMemoryModel(
            facts=[FactCandidate(statement="The user says hello", confidence=0.5)],
            decide=lambda fact, shown: Decision(action=Action.IGNORE, reason="small talk"),
        )
        c = engine.components
        consolidation = Consolidation(
            engine.db, c.embeddings, c.models, c.ingestion, engine.settings, model
        )
        holder = await asyncpg.connect(database_url)
        try:
            async with holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM viewer_grants WHERE owner_id = $1 FOR UPDATE", user.id
                )
                erasure = asyncio.create_task(engine.delete_user(user.id))
                await asyncio.sleep(0.5)  # the user's row taken, waiting for the grant
                learning = asyncio.create_task(
                    consolidation.learn_from_turn(
                        user.id,
                        turn.conversation_id,
                        turn.message_seqs,
                        job_id=None,
                        model_id=None,
                    )
                )
                await asyncio.sleep(0.5)  # the conversation taken (old code), or waiting
                assert not erasure.done()
        finally:
            await holder.close()
        receipt, learned = await asyncio.gather(erasure, learning, return_exceptions=True)
        assert not isinstance(receipt, BaseException), (round_, receipt)
        # Erased before the learning wrote: the user is gone, as for a call made after.
        assert isinstance(learned, NotFound), (round_, learned)
        with pytest.raises(NotFound):
            await engine.get_user(user.id)


_APPEND_ONE = (
    "WITH grown AS (UPDATE memories SET message_count = message_count + 1 WHERE id = $1 "
    "RETURNING message_count) INSERT INTO conversation_messages (memory_id, seq, role, content) "
    "SELECT $1, message_count - 1, 'user', 'one more' FROM grown"
)


@pytest.mark.parametrize(
    "change", [_APPEND_ONE, "DELETE FROM memories WHERE id = $1"], ids=["append", "delete"]
)
async def test_a_conversation_read_while_it_changes_is_read_whole(
    engine: MemoryEngine, database_url: str, change: str
) -> None:
    """get_memory read the conversation's row, then its messages in another transaction: a
    turn appended in between came back as messages the row's ``message_count`` did not count
    (one read in three, under two writers), and a deletion in between as a conversation with
    no messages at all. Both are now read from one snapshot.

    Fixed order: a writer holds the messages' table (its change not yet committed), so the
    read waits between the row and the messages; the change commits while it waits."""
    user = await engine.create_user(f"reader-{uuid.uuid4().hex[:8]}", None, "user")
    conv = await engine.store_memory(
        user.id,
        {"type": "conversation", "messages": [{"role": "user", "content": "hi"}]},
    )
    writer = await asyncpg.connect(database_url)  # the tables' owner
    try:
        async with writer.transaction():
            await writer.execute("LOCK TABLE conversation_messages IN ACCESS EXCLUSIVE MODE")
            await writer.execute(change, conv.id)
            read = asyncio.create_task(engine.get_memory(user.id, conv.id))
            await asyncio.sleep(0.5)
            assert not read.done()
    finally:
        await writer.close()
    got = await read
    # As it was before the change (the change came after the read began): the row and its
    # messages agree.
    assert got.message_count == 1
    assert [(m.seq, m.content) for m in got.messages] == [(0, "hi")]


async def test_the_expiry_purge_does_not_hold_other_users_behind_a_busy_one(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """purge_expired locked the rows of every user with expired facts, in the order of
    their ids, waiting for each: behind one user whose row a long transaction held (an
    atomic import of a big file), it held the rows of the users before them, and every
    write of those users waited for that one user's transaction (a store hung for as long as
    the import ran). The purge now skips the rows other transactions hold; their expired facts
    go at their next write or at the next purge."""
    first, then = sorted(
        [
            await engine.create_user(f"expiring-{uuid.uuid4().hex[:8]}", None, "user")
            for _ in range(2)
        ],
        key=lambda u: u.id,
    )
    for user in (first, then):
        fact = await engine.store_memory(
            user.id, {"type": "fact", "statement": "I am in Oslo", "kind": "ephemeral"}
        )
        async with engine.db.scoped(admin=True) as conn:
            await conn.execute(
                "UPDATE memories SET expires_at = now() - interval '1 second' WHERE id = $1",
                fact.id,
            )
    async with engine.db.scoped(then.id) as busy:  # a long write of the later user
        await busy.execute(q("lock_writer"), then.id)
        purge = asyncio.create_task(second.purge_expired())
        await asyncio.sleep(0.5)
        # The earlier user writes on, whatever the later one is doing.
        stored = await asyncio.wait_for(
            engine.store_memory(first.id, {"type": "fact", "statement": "I like maps"}), 10
        )
        assert stored.memory.statement == "I like maps"  # type: ignore[union-attr]
        assert await asyncio.wait_for(purge, 10) == 1  # the earlier user's expired fact
    # The busy user's expired fact goes at the next purge.
    assert await engine.purge_expired() == 1
    for user in (first, then):
        facts = await engine.db.fetchval(
            "SELECT count(*) FROM memories WHERE user_id = $1 AND expires_at <= now()",
            user.id,
            admin=True,
        )
        assert facts == 0


async def test_the_events_purge_does_not_hold_other_users_behind_an_erasure(
    engine: MemoryEngine, second: MemoryEngine, database_url: str
) -> None:
    """The events purge took the rows of every user with old events FOR KEY SHARE, in the
    order of their ids, waiting for each: behind a user whose erasure was in progress, it
    held the rows of the users before them, and their erasures and role changes (FOR UPDATE)
    waited for that other user's erasure. The purge now skips the rows it would wait for."""
    first, then = sorted(
        [
            await engine.create_user(f"eventful-{uuid.uuid4().hex[:8]}", None, "user")
            for _ in range(2)
        ],
        key=lambda u: u.id,
    )
    owner = await asyncpg.connect(database_url)  # the tables' owner: old events
    try:
        for user in (first, then):
            await owner.execute(_OLD_EVENTS, user.id, 100, 1)
        async with owner.transaction():  # the later user's row, as an erasure holds it
            await owner.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", then.id)
            purge = asyncio.create_task(second.purge_events(older_than_hours=24))
            await asyncio.sleep(0.5)
            changed = await asyncio.wait_for(engine.update_user(first.id, role="viewer"), 10)
            assert changed.role.value == "viewer"
            assert await asyncio.wait_for(purge, 10) == 1  # the earlier user's
    finally:
        await owner.close()
    assert await engine.purge_events(older_than_hours=24) == 1  # the later user's, now


async def test_a_model_deleted_while_an_import_waits_costs_its_lines_only(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """An import resolves each line's AI model before it takes the user's lock; a model
    deleted in between failed the insert on its foreign key, a driver error that the line's
    savepoint did not turn into the line's problem: the whole batch was refused (a 404 for
    the import, the good lines of the batch not written and the rest of the file not read),
    where a line naming an unknown model is reported and the rest imported. The database's
    refusal of a line is now that line's problem (the model's NotFound, ``memory.model``)."""
    from support import export_header, fact_line, ndjson

    user = await engine.create_user(f"importer-{uuid.uuid4().hex[:8]}", None, "user")
    name = f"leaving-{uuid.uuid4().hex[:8]}"
    await engine.register_model(name, "llm")
    scoped = fact_line("Dana rides a bike")
    scoped["memory"]["model"] = name
    file = ndjson([export_header(), fact_line("Dana reads maps"), scoped, fact_line("Dana sings")])
    async with engine.db.scoped(user.id) as busy:  # the user's lock, held by another write
        await busy.execute(q("lock_writer"), user.id)
        imported = asyncio.create_task(second.import_memories(user.id, [file]))
        await asyncio.sleep(1.0)  # the lines resolved and embedded, the import waits
        assert not imported.done()
        await second.delete_model(name)  # no memory names it yet
    report = await imported
    assert report.created == {"fact": 2}
    assert [(e.line, e.field) for e in report.errors] == [(3, "memory.model")]
    facts = await engine.list_memories(user.id, types=["fact"])
    assert sorted(f.text for f in facts.items) == ["Dana reads maps", "Dana sings"]


async def test_a_model_deleted_during_a_batch_store_names_the_first_memory_that_gave_it(
    engine: MemoryEngine, second: MemoryEngine
) -> None:
    """A batch's models are resolved before the user's lock; one deleted in between failed
    the insert on its foreign key, a NotFound without the ``index`` that the same batch's
    NotFound carries when the model is unknown from the start. It names the first memory
    that gave the model (here a fact, written after the image that failed), and nothing of
    the batch is stored."""
    user = await engine.create_user(f"batcher-{uuid.uuid4().hex[:8]}", None, "user")
    name = f"leaving-{uuid.uuid4().hex[:8]}"
    await engine.register_model(name, "llm")
    batch = [
        {"type": "fact", "statement": "Ola rows at dawn"},
        {"type": "fact", "statement": "Ola keeps bees", "model": name},
        {"type": "image", "prompt": "a hive in a meadow", "model": name},
    ]
    async with engine.db.scoped(user.id) as busy:  # the user's lock, held by another write
        await busy.execute(q("lock_writer"), user.id)
        stored = asyncio.create_task(second.store_memories(user.id, batch))
        await asyncio.sleep(1.0)  # the batch resolved and embedded, the store waits
        assert not stored.done()
        await second.delete_model(name)  # no memory names it yet
    with pytest.raises(NotFound) as caught:
        await stored
    assert caught.value.fields == {"field": "model", "index": 1}
    assert caught.value.message.startswith("memories.1: ")
    assert (await engine.list_memories(user.id)).items == []
