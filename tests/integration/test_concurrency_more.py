"""Concurrency beyond issue 15's parallel turns: rows that several users share, taken in one
order whoever takes them.

Every case asserts that each call went through (no deadlock surfacing as a 503), and what is
stored afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

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
