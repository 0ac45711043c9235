"""The memory change feed (issue 12 §2): events of every write path, from any replica to a
subscriber on any other, resumed after a disconnect with nothing lost, and never another
user's."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
import pytest_asyncio
from support import make_settings

from halldyll_ray import Conversation, Fact, MemoryEngine, Message, NotFound
from halldyll_ray.components.events import Subscription
from halldyll_ray.errors import InvalidInput, PermissionDenied, Unavailable
from halldyll_ray.models import EventsResync, MemoryEvent, Principal


@pytest_asyncio.fixture(loop_scope="session")
async def other_replica(database_url: str, redis_url: str, encoder) -> AsyncIterator[MemoryEngine]:
    """A second engine on the same database: another Ingress replica, its own LISTEN."""
    engine = MemoryEngine(make_settings(database_url, redis_url), encoder=encoder)
    await engine.initialize()
    yield engine
    await engine.close()


async def _user(engine: MemoryEngine, role: str = "user") -> uuid.UUID:
    return (await engine.create_user(f"u{uuid.uuid4().hex[:10]}", None, role)).id


async def _next(subscription: Subscription, within: float = 10) -> MemoryEvent | EventsResync:
    return await asyncio.wait_for(anext(subscription), within)


async def _nothing_within(subscription: Subscription, seconds: float) -> bool:
    try:
        await asyncio.wait_for(anext(subscription), seconds)
    except TimeoutError:
        return True
    return False


async def _events(subscription: Subscription, n: int) -> list[MemoryEvent]:
    got = [await _next(subscription) for _ in range(n)]
    assert all(isinstance(e, MemoryEvent) for e in got), got
    return got  # type: ignore[return-value]


async def test_a_write_through_one_replica_reaches_a_subscriber_on_another(
    engine: MemoryEngine, other_replica: MemoryEngine
) -> None:
    user = await _user(engine)
    async with (
        await other_replica.subscribe_events(user) as on_b,
        await engine.subscribe_events(user) as on_a,
    ):
        assert other_replica.components.events.state()["listening"] is True
        assert other_replica.components.events.subscribers() == 1
        stored = await engine.store_memory(user, Fact(statement="Ada keeps bees"))
        event = await _next(on_b)
        assert isinstance(event, MemoryEvent)
        assert (event.user_id, event.memory_id, event.memory_type, event.kind) == (
            user,
            stored.id,
            "fact",
            "created",
        )
        assert abs((event.at - datetime.now(UTC)).total_seconds()) < 60
        assert "Ada" not in event.model_dump_json()  # ids, type and kind only: never content
        assert await _next(on_a) == event  # the writer's own replica too, the same event
        assert on_b.position == event.id
        # And back: a write through B reaches the subscriber on A.
        await other_replica.delete_memory(user, stored.id)
        deleted = await _next(on_a)
        assert isinstance(deleted, MemoryEvent)
        assert (deleted.kind, deleted.memory_id) == ("deleted", stored.id)
        assert deleted.id > event.id
        assert await _next(on_b) == deleted
    assert other_replica.components.events.subscribers() == 0


async def test_every_write_path_emits_its_kind_once(engine: MemoryEngine) -> None:
    user = await _user(engine)
    async with await engine.subscribe_events(user) as feed:
        fact = await engine.store_memory(user, Fact(statement="Bob's sister lives in Oslo"))
        again = await engine.store_memory(user, Fact(statement="Bob's sister lives in Oslo"))
        assert again.id == fact.id
        await engine.update_memory(user, fact.id, {"tags": ["family"]})
        # Stored with its messages (an INSERT and an UPDATE in one transaction): one event.
        chat = await engine.store_memory(
            user, Conversation(messages=[Message(role="user", content="hello")])
        )
        await engine.append_messages(user, chat.id, [Message(role="assistant", content="hi")])
        await engine.delete_memory(user, chat.id)
        short = await engine.store_memory(user, Fact(statement="Bob is in Rome", kind="ephemeral"))
        async with engine.db.scoped(admin=True) as conn:
            await conn.execute(
                "UPDATE memories SET expires_at = now() - interval '1 minute' WHERE id = $1",
                short.id,
            )
        assert await engine.purge_expired() == 1
        got = await _events(feed, 9)
        assert [(e.kind.value, e.memory_id) for e in got] == [
            ("created", fact.id),
            ("reinforced", fact.id),
            ("updated", fact.id),
            ("created", chat.id),
            ("updated", chat.id),
            ("deleted", chat.id),
            ("created", short.id),
            ("updated", short.id),  # the backdating above is a change like any other
            ("expired", short.id),
        ]
        assert [e.memory_type.value for e in got[3:6]] == ["conversation"] * 3
        assert [e.id for e in got] == sorted({e.id for e in got})
        assert await _nothing_within(feed, 0.5)


async def test_the_agent_loop_is_covered_too(engine: MemoryEngine) -> None:
    user = await _user(engine)
    async with await engine.subscribe_events(user) as feed:
        turn = await engine.record_turn(user, "s1", "I moved to Bergen in May", "Nice!")
        kinds = {(e.kind.value, e.memory_id) for e in await _events(feed, 2 + len(turn.fact_ids))}
        assert ("created", turn.conversation_id) in kinds
        assert all(("created", f) in kinds for f in turn.fact_ids)


async def test_a_dropped_subscriber_resumes_with_nothing_lost_and_nothing_twice(
    engine: MemoryEngine, other_replica: MemoryEngine
) -> None:
    user = await _user(engine)
    first = await other_replica.subscribe_events(user)
    await engine.store_memory(user, Fact(statement="one"))
    seen = await _events(first, 1)
    position = first.position
    await first.aclose()  # the connection drops
    meanwhile = [
        (await engine.store_memory(user, Fact(statement=text))).id
        for text in ("two", "three", "four")
    ]
    async with await other_replica.subscribe_events(user, after=str(position)) as again:
        replayed = await _events(again, 3)
        assert [e.memory_id for e in replayed] == meanwhile
        assert replayed[0].id > seen[0].id
        # Then live, on the same cursor: the next write, once.
        live = await engine.store_memory(user, Fact(statement="five"))
        assert (await _next(again)).memory_id == live.id  # type: ignore[union-attr]
        assert await _nothing_within(again, 0.5)
    # From the very start (Last-Event-ID 0): the whole history of the user, in order.
    async with await engine.subscribe_events(user, after=0) as everything:
        history = await _events(everything, 5)
        assert [e.memory_id for e in history][1:4] == meanwhile


async def test_a_user_never_sees_another_users_events(
    engine: MemoryEngine, other_replica: MemoryEngine
) -> None:
    ada, bob = await _user(engine), await _user(engine)
    async with (
        await other_replica.subscribe_events(ada) as adas,
        await other_replica.subscribe_events(bob) as bobs,
    ):
        bob_fact = await engine.store_memory(bob, Fact(statement="Bob's PIN is secret"))
        event = await _next(bobs)
        assert isinstance(event, MemoryEvent) and event.memory_id == bob_fact.id
        assert await _nothing_within(adas, 1.0)
        ada_fact = await engine.store_memory(ada, Fact(statement="Ada likes tea"))
        mine = await _next(adas)
        assert isinstance(mine, MemoryEvent) and mine.memory_id == ada_fact.id
    # Replaying from 0 gives Ada only her own event, though Bob's has a smaller id.
    async with await engine.subscribe_events(ada, after=0) as replay:
        assert [e.memory_id for e in await _events(replay, 1)] == [ada_fact.id]
        assert await _nothing_within(replay, 0.5)
    # Row-level security hides Bob's events from a transaction acting for Ada, even with
    # no user filter at all, and refuses writing one in his name.
    async with engine.db.scoped(ada) as conn:
        assert {r["user_id"] for r in await conn.fetch("SELECT user_id FROM memory_events")} == {
            ada
        }
    with pytest.raises(PermissionDenied):
        async with engine.db.scoped(ada) as conn:
            await conn.execute(
                "INSERT INTO memory_events (user_id, memory_id, memory_type, kind) "
                "VALUES ($1, $2, 'fact', 'created')",
                bob,
                uuid.uuid4(),
            )


async def test_the_listener_reconnects_when_postgres_drops_it(
    engine: MemoryEngine, other_replica: MemoryEngine, database_url: str
) -> None:
    user = await _user(engine)
    feed = other_replica.components.events
    feed.reconnect_delay_s = 0.2
    async with await other_replica.subscribe_events(user) as subscription:
        pid = feed._connection.get_server_pid()  # type: ignore[union-attr]
        admin = await asyncpg.connect(database_url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        # Written at once, very likely while nobody listens: the table still has it, and
        # the reconnect reads it.
        stored = await engine.store_memory(user, Fact(statement="written during the outage"))
        event = await _next(subscription, within=15)
        assert isinstance(event, MemoryEvent) and event.memory_id == stored.id
        for _ in range(100):
            if feed.listening and feed._connection is not None:
                break
            await asyncio.sleep(0.05)
        assert feed.state()["reconnects"] >= 1
        assert feed._connection.get_server_pid() != pid  # type: ignore[union-attr]
        later = await engine.store_memory(user, Fact(statement="after the reconnect"))
        assert (await _next(subscription)).memory_id == later.id  # type: ignore[union-attr]


async def test_retention_purge_and_resync(engine: MemoryEngine, database_url: str) -> None:
    user = await _user(engine)
    old = [(await engine.store_memory(user, Fact(statement=t))).id for t in ("a1", "a2")]
    async with engine.db.scoped(user) as conn:
        first_id = await conn.fetchval("SELECT min(id) FROM memory_events")
    await _age_events(database_url, old)
    new = (await engine.store_memory(user, Fact(statement="b1"))).id
    with pytest.raises(InvalidInput):
        await engine.purge_events(older_than_hours=0)
    assert await engine.purge_events() == 2  # EVENTS_RETENTION_HOURS: 168 by default
    assert await engine.purge_events() == 0
    # Resuming from before the purge: told to resync, then the events that remain.
    async with await engine.subscribe_events(user, after=first_id) as feed:
        resync = await _next(feed)
        assert isinstance(resync, EventsResync) and resync.reason == "purged"
        assert resync.after == first_id and resync.resume_after >= first_id + 1
        assert feed.position == resync.resume_after
        assert [e.memory_id for e in await _events(feed, 1)] == [new]
    # A position this database never issued: resync, then from now on.
    async with await engine.subscribe_events(user, after=2**62) as feed:
        resync = await _next(feed)
        assert isinstance(resync, EventsResync) and resync.reason == "unknown_position"
        assert await _nothing_within(feed, 0.3)
    rows = await engine.list_audit(operation="events.purge")
    assert rows and rows[0]["details"]["count"] == 2


async def _age_events(database_url: str, memory_ids: list[uuid.UUID]) -> None:
    owner = await asyncpg.connect(database_url)  # the table owner may rewrite history
    try:
        await owner.execute(
            "UPDATE memory_events SET at = now() - interval '10 days' WHERE memory_id = ANY($1)",
            memory_ids,
        )
    finally:
        await owner.close()


async def test_a_purge_of_events_not_yet_read_is_a_resync_on_an_open_stream(
    engine: MemoryEngine, database_url: str
) -> None:
    """A purge that deleted events an open stream had not read yet (a reader behind, a long
    replay, a purge right after subscribing): they were silently missing, the stream going
    on with the next one. Now the stream says resync, as a resume from its position does."""
    user = await _user(engine)
    async with await engine.subscribe_events(user) as feed:
        seen = (await engine.store_memory(user, Fact(statement="read at once"))).id
        assert [e.memory_id for e in await _events(feed, 1)] == [seen]
        position = feed.position
        # The reader falls behind: two more events, the first purged before it reads on.
        lost = (await engine.store_memory(user, Fact(statement="purged unread"))).id
        after = (await engine.store_memory(user, Fact(statement="kept"))).id
        await _age_events(database_url, [lost])
        assert await engine.purge_events() >= 1
        resync = await _next(feed)
        assert isinstance(resync, EventsResync), resync
        assert resync.reason == "purged" and resync.after == position
        assert feed.position == resync.resume_after > position
        assert [e.memory_id for e in await _events(feed, 1)] == [after]
    # Right after subscribing, before the first read: the same.
    async with await engine.subscribe_events(user) as feed:
        lost = (await engine.store_memory(user, Fact(statement="purged at once"))).id
        await _age_events(database_url, [lost])
        assert await engine.purge_events() == 1
        assert isinstance(await _next(feed), EventsResync)


async def test_a_purge_of_other_users_events_leaves_a_quiet_stream_alone(
    engine: MemoryEngine, database_url: str
) -> None:
    """A stream whose user wrote nothing since its last read lost nothing to a purge, even
    one that deleted later ids (other users' events): no resync, and its next event comes."""
    quiet, busy = await _user(engine), await _user(engine)
    await engine.store_memory(quiet, Fact(statement="long ago"))
    feed = engine.components.events
    async with await engine.subscribe_events(quiet) as stream:
        assert await _nothing_within(stream, 0.3)  # its first read: nothing new
        feed.idle_check_s = 0.2  # read on a quiet stream, and so see the horizon move
        try:
            old = [(await engine.store_memory(busy, Fact(statement=t))).id for t in "xy"]
            await _age_events(database_url, old)
            assert await engine.purge_events() == 2
            assert await _nothing_within(stream, 1.0)
        finally:
            feed.idle_check_s = 30.0
        later = await engine.store_memory(quiet, Fact(statement="now"))
        event = await _next(stream)
        assert isinstance(event, MemoryEvent) and event.memory_id == later.id


async def test_bad_positions_and_unknown_users_are_refused(engine: MemoryEngine) -> None:
    user = await _user(engine)
    for bad in ("-1", "abc", "1.5", "", "9" * 30, "0" * 20 + "9" * 20, -3, True):
        with pytest.raises(InvalidInput) as refused:
            await engine.subscribe_events(user, after=bad)  # type: ignore[arg-type]
        assert refused.value.fields.get("field") == "Last-Event-ID"
    # Leading zeros are not digits of the id: "0…01" is 1, whatever its length.
    async with (
        await engine.subscribe_events(user, after="1") as plain,
        await engine.subscribe_events(user, after="0" * 30 + "1") as padded,
    ):
        assert padded.position == plain.position
    with pytest.raises(NotFound):
        await engine.subscribe_events(uuid.uuid4())
    with pytest.raises(InvalidInput):
        await engine.subscribe_events("not-a-uuid")
    assert engine.components.events.subscribers() == 0


async def test_erasing_a_user_leaves_no_events(engine: MemoryEngine) -> None:
    gone, kept = await _user(engine), await _user(engine)
    for who in (gone, kept):
        await engine.store_memory(who, Fact(statement="likes rain"))
        await engine.store_memory(who, Conversation(messages=[Message(role="user", content="x")]))
    async with await engine.subscribe_events(gone) as feed:
        receipt = await engine.delete_user(gone)
        assert receipt.events == 2
        # The deletion of their memories announces nothing, and the feed ends by itself.
        engine.components.events.idle_check_s = 0.2
        try:
            with pytest.raises(StopAsyncIteration):
                await _next(feed, within=5)
        finally:
            engine.components.events.idle_check_s = 30.0
    async with engine.db.scoped(admin=True) as conn:
        assert (
            await conn.fetchval("SELECT count(*) FROM memory_events WHERE user_id = $1", gone) == 0
        )
        assert (
            await conn.fetchval("SELECT count(*) FROM memory_events WHERE user_id = $1", kept) == 2
        )


async def test_who_may_follow_whom(engine: MemoryEngine) -> None:
    owner, stranger = await _user(engine), await _user(engine)
    admin, service = await _user(engine, "admin"), await _user(engine, "service")
    viewer = await _user(engine, "viewer")
    await engine.grant_viewer(viewer, owner)

    async def as_(user_id: uuid.UUID) -> object:
        user = await engine.get_user(user_id)
        return engine.authorized(Principal(user_id=user.id, username=user.username, role=user.role))

    for allowed in (owner, admin, service, viewer):
        api = await as_(allowed)
        async with await api.subscribe_events(owner) as feed:  # type: ignore[attr-defined]
            stored = await engine.store_memory(owner, Fact(statement=f"note {allowed}"))
            assert (await _next(feed)).memory_id == stored.id  # type: ignore[union-attr]
    with pytest.raises(PermissionDenied):
        await (await as_(stranger)).subscribe_events(owner)  # type: ignore[attr-defined]
    denied = await engine.list_audit(operation="memory.events", outcome="denied")
    assert [(r["actor_id"], r["acting_for"]) for r in denied] == [(stranger, owner)]
    reads = await engine.list_audit(operation="memory.events", outcome="ok")
    assert {r["actor_id"] for r in reads} == {admin, service, viewer}
    assert engine.components.events.subscribers() == 0

    # A grant revoked while the Viewer follows: the next check ends the feed, whether it is
    # quiet or an event waits to be delivered.
    engine.components.events.idle_check_s = 0.3
    try:
        for busy in (False, True):
            await engine.grant_viewer(viewer, owner)
            feed = await (await as_(viewer)).subscribe_events(owner)  # type: ignore[attr-defined]
            await engine.revoke_viewer_grant(viewer, owner)
            if busy:
                await asyncio.sleep(0.4)
                await engine.store_memory(owner, Fact(statement="after the revocation"))
            with pytest.raises(PermissionDenied):
                await _next(feed, within=5)
            assert engine.components.events.subscribers() == 0
    finally:
        engine.components.events.idle_check_s = 30.0


async def test_a_process_serves_at_most_max_subscribers(engine: MemoryEngine) -> None:
    user, other, third_user = [await _user(engine) for _ in range(3)]
    feed = engine.components.events
    assert feed.max_subscribers == 16  # EVENTS_MAX_STREAMS
    feed.max_subscribers = 2
    try:
        first = await engine.subscribe_events(user)
        second = await engine.subscribe_events(other)
        with pytest.raises(Unavailable) as full:
            await engine.subscribe_events(third_user)
        assert full.value.fields["retry_after"] == 5
        assert feed.subscribers() == 2
        await first.aclose()
        async with await engine.subscribe_events(user) as third:
            stored = await engine.store_memory(user, Fact(statement="room again"))
            assert (await _next(third)).memory_id == stored.id  # type: ignore[union-attr]
        await second.aclose()
    finally:
        feed.max_subscribers = 16
    assert feed.subscribers() == 0


async def test_one_user_holds_at_most_a_quarter_of_the_streams(engine: MemoryEngine) -> None:
    """One user's 16 streams left every other user only 503s."""
    user, other = await _user(engine), await _user(engine)
    feed = engine.components.events
    assert feed.max_per_user() == 4
    held = [await engine.subscribe_events(user) for _ in range(4)]
    try:
        with pytest.raises(Unavailable) as full:
            await engine.subscribe_events(user)
        assert "of this user" in full.value.message
        async with await engine.subscribe_events(other):
            assert feed.subscribers() == 5
    finally:
        for subscription in held:
            await subscription.aclose()
    assert feed.subscribers() == 0


async def test_halldyll_purge_expired_also_purges_old_events(
    engine: MemoryEngine, database_url: str
) -> None:
    """The maintenance path (the hourly CronJob's command), in a real process."""
    user = await _user(engine)
    kept = await engine.store_memory(user, Fact(statement="recent"))
    old = await engine.store_memory(user, Fact(statement="old"))
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute(
            "UPDATE memory_events SET at = now() - interval '3 hours' WHERE memory_id = $1", old.id
        )
    finally:
        await owner.close()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(DATABASE_URL=database_url, EVENTS_RETENTION_HOURS="2")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "halldyll_ray.cli", "purge-expired"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "purged 0 expired memories" in done.stdout
    assert "purged 1 change feed events older than EVENTS_RETENTION_HOURS" in done.stdout
    async with engine.db.scoped(user) as conn:
        left = await conn.fetch("SELECT memory_id FROM memory_events")
    assert [r["memory_id"] for r in left] == [kept.id]


async def test_a_stream_whose_client_reads_nothing_ends_and_frees_its_slot(
    engine: MemoryEngine,
) -> None:
    """The SSE response over a real subscription, with a client whose window is full: every
    send waits for good. The send waited for as long as the load balancer's client timeout
    (an hour, HAProxy's), holding the stream's slot, with the rechecks unrun; once a send
    has waited EVENTS_RECHECK_SECONDS the stream now ends, quietly, and its subscription is
    released (the client resumes with Last-Event-ID)."""
    from halldyll_ray.serve.ingress import event_stream_response

    user = await _user(engine)
    feed = engine.components.events
    subscription = await engine.subscribe_events(user, after=0)
    assert feed.subscribers() == 1
    settings = engine.settings.model_copy(
        update={"events_recheck_seconds": 0.5, "events_keepalive_seconds": 0.2}
    )
    response = event_stream_response(subscription, settings)
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # the client reads nothing: no send completes

    async def receive() -> dict[str, object]:
        await asyncio.Event().wait()  # nor does it hang up
        raise AssertionError

    await engine.store_memory(user, Fact(statement="Gus reads nothing"))
    scope = {"type": "http", "method": "GET", "path": "/v1/users/me/events", "headers": []}
    await asyncio.wait_for(response(scope, receive, send), 10)  # type: ignore[arg-type]
    assert [m["type"] for m in sent][:2] == ["http.response.start", "http.response.body"]
    assert feed.subscribers() == 0
