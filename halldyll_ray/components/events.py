"""The memory change feed: every change of a user's memories, as an async iterator per user.

The events are rows of ``memory_events``, written by a trigger on ``memories`` in the
transaction of each change (migration 0008), which also sends ``pg_notify`` with the user's
id and the event's id. :class:`EventFeed` holds ONE dedicated connection per process that
LISTENs for those notifications and wakes the subscribers of that user; a subscriber then
reads its user's rows after the last one it delivered, as that user (row-level security).
So a write through any replica reaches the subscribers of every replica, and the table, not
the notification, is what a subscriber delivers: replay and live use one query and one
cursor, with no gap and no duplicate between them.

Used by the SSE route ``GET /v1/users/{id}/events`` and meant for any other push transport
(GraphQL subscriptions) of the same feed: ``async for event in await feed.subscribe(user)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import asyncpg

from halldyll_ray import validation
from halldyll_ray.components.audit import write_audit
from halldyll_ray.components.base import require_user
from halldyll_ray.errors import InvalidInput, NotFound, Unavailable
from halldyll_ray.models import EventsResync, MemoryEvent
from halldyll_ray.storage.database import Database, connect
from halldyll_ray.storage.sql import q

log = logging.getLogger(__name__)

#: The notification channel of migration 0008's trigger.
CHANNEL = "halldyll_memory_events"
#: Rows one read of a subscriber takes (a long replay reads in pages of this many).
BATCH = 500
#: The largest event id a client may name (bigint).
MAX_EVENT_ID = 2**63 - 1

#: What a subscription yields.
FeedItem = MemoryEvent | EventsResync
#: A check run while a subscription idles: raise (PermissionDenied ...) to end it.
Recheck = Callable[[], Awaitable[None]]


def parse_event_id(value: object, field: str = "Last-Event-ID") -> int:
    """An event id (0 to 2**63-1) from an int or its decimal text; InvalidInput otherwise."""
    if isinstance(value, bool):
        raise InvalidInput(f"{field} must be an event id (a whole number)", field=field)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        # Leading zeros do not count towards the 19 digits of the largest id ("0…01" is 1).
        digits = value.strip().lstrip("0") or "0"
        number = int(digits) if len(digits) <= 19 else MAX_EVENT_ID + 1
    else:
        raise InvalidInput(f"{field} must be an event id (a whole number)", field=field)
    if not 0 <= number <= MAX_EVENT_ID:
        raise InvalidInput(f"{field} must be between 0 and {MAX_EVENT_ID}", field=field)
    return number


def _event(row: Any) -> MemoryEvent:
    return MemoryEvent(
        id=row["id"],
        user_id=row["user_id"],
        memory_id=row["memory_id"],
        memory_type=row["memory_type"],
        kind=row["kind"],
        at=row["at"],
    )


class Subscription:
    """The events of one user after a position, replayed and then followed live.

    An async iterator of :class:`~halldyll_ray.models.MemoryEvent` (and, first, one
    :class:`~halldyll_ray.models.EventsResync` when the feed cannot vouch for the position
    asked for). Every ``idle_check_s`` it checks that the user still exists (else it ends)
    and runs its rechecks (one that raises ends it with that error), before delivering
    anything more; ``aclose()`` (or ``async with``) releases it. Made by
    :meth:`EventFeed.subscribe`.

    Attributes:
        user_id: Whose events.
        position: The id of the last event delivered (the next ``Last-Event-ID``).
    """

    def __init__(
        self,
        feed: EventFeed,
        user_id: UUID,
        *,
        position: int,
        pending: list[FeedItem],
        rechecks: list[Recheck],
    ) -> None:
        self._feed = feed
        self.user_id = user_id
        self.position = position
        self._read_to = position
        #: The horizon (purged_through) this position was checked against: a read that finds
        #: it raised past the position resyncs.
        self._vouched = 0
        self._unread = True  # a notification (or the first read) since the last full read
        self._buffer: deque[FeedItem] = deque(pending)
        self._rechecks = rechecks
        self._wake = asyncio.Event()
        self._stale = True  # read before waiting: the replay, then after each wake-up
        self._closed = False
        self._checked_at = asyncio.get_running_loop().time()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> FeedItem:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise StopAsyncIteration
            due = self._checked_at + self._feed.idle_check_s
            if loop.time() >= due:
                await self._check()
                continue
            if self._buffer:
                break
            if self._stale:
                # Cleared before the read: a notification that arrives during it wakes the
                # next wait at once, so nothing committed after the read is waited past.
                self._wake.clear()
                # Whether events of the user may have been committed since the last full
                # read: notified since, never read yet, a partial page, or no LISTEN.
                suspect = self._unread or not self._feed.listening
                self._unread = False
                found = await self._feed.db.fetch(
                    q("events_after"), self.user_id, self._read_to, BATCH, user_id=self.user_id
                )
                purged_through = int(found[0]["purged_through"])
                if suspect and purged_through > max(self._read_to, self._vouched):
                    # A purge since the last read deleted events after the position, and
                    # some of them may be this user's, not read yet (a reader that fell
                    # behind, a long replay, a purge right after subscribe): they were
                    # silently missing. Resync, as a resume from that position would, and
                    # read on after the horizon. A quiet user's stream (nothing committed
                    # since its last full read) lost nothing: the horizon just moves.
                    self._buffer.append(
                        EventsResync(
                            after=self._read_to, resume_after=purged_through, reason="purged"
                        )
                    )
                    self._read_to = self._vouched = purged_through
                    continue  # still stale: read the events after the horizon
                self._vouched = purged_through
                rows = [row for row in found if row["id"] is not None]
                self._buffer.extend(_event(row) for row in rows)
                if rows:
                    self._read_to = rows[-1]["id"]
                self._stale = len(rows) == BATCH
                if self._stale:  # the rest, visible now, may be purged before the next read
                    self._unread = True
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), due - loop.time())
            # Woken, or the check is due: read again either way (a notification may have
            # been lost with a dropped LISTEN connection).
            self._stale = True
        item = self._buffer.popleft()
        if isinstance(item, MemoryEvent):
            self.position = item.id
        else:
            self.position = item.resume_after
        return item

    async def _check(self) -> None:
        """Every ``idle_check_s``, busy or quiet: the user must still exist (else the
        iteration ends) and every recheck pass (else its error ends it)."""
        self._checked_at = asyncio.get_running_loop().time()
        try:
            await require_user(self._feed.db, self.user_id)
            for recheck in self._rechecks:
                await recheck()  # raises PermissionDenied and so on: the caller sees why
        except NotFound:
            await self.aclose()
            raise StopAsyncIteration from None
        except BaseException:
            await self.aclose()
            raise

    def _notify(self) -> None:
        self._unread = True
        self._wake.set()

    async def aclose(self) -> None:
        """Stop following; idempotent."""
        if not self._closed:
            self._closed = True
            self._buffer.clear()
            self._feed._drop(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class EventFeed:
    """The change feed of one process: one LISTEN connection, any number of subscriptions.

    The connection opens at the first subscription and reconnects (every
    ``reconnect_delay_s``) when PostgreSQL drops it; after a reconnect every subscription
    reads again, for the notifications sent while nobody listened.

    Args:
        db: The pool subscriptions read through (as their user).
        dsn: The login URL for the LISTEN connection (LISTEN needs no privilege).
        retention_hours: EVENTS_RETENTION_HOURS, for :meth:`purge`.
        idle_check_s: How often (EVENTS_RECHECK_SECONDS) a subscription checks that its
            user still exists and runs its rechecks; a quiet one also reads then, whatever
            the notifications said. The LISTEN connection is pinged as often.
        reconnect_delay_s: Pause between attempts to reopen the LISTEN connection.
        connect_timeout_s: How long :meth:`subscribe` waits for the LISTEN connection before
            it raises Unavailable.
        max_subscribers: Subscriptions this process serves at once (EVENTS_MAX_STREAMS);
            past it, or past a quarter of it for one user's changes (:meth:`max_per_user`),
            :meth:`subscribe` raises Unavailable. Under Ray Serve each SSE stream
            holds one of the Ingress replica's ``max_ongoing_requests`` for as long as it is
            open: without this bound, that many streams would leave the replica no slot for
            any other request (measured: with 32 streams open, ``GET /v1/me`` waited past
            20 s).
    """

    def __init__(
        self,
        db: Database,
        dsn: str,
        *,
        retention_hours: float = 168,
        idle_check_s: float = 30.0,
        reconnect_delay_s: float = 1.0,
        connect_timeout_s: float = 10.0,
        max_subscribers: int = 16,
    ) -> None:
        self.db = db
        self.dsn = dsn
        self.retention_hours = retention_hours
        self.idle_check_s = idle_check_s
        self.reconnect_delay_s = reconnect_delay_s
        self.connect_timeout_s = connect_timeout_s
        self.max_subscribers = max_subscribers
        self._subscribers: dict[UUID, set[Subscription]] = {}
        self._listening = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._connection: asyncpg.Connection | None = None
        self._reconnects = 0

    def max_per_user(self) -> int:
        """Streams of one user's changes this process serves at once: a quarter of
        ``max_subscribers`` (at least one), so that one user cannot hold them all."""
        return max(1, self.max_subscribers // 4)

    # ------------------------------------------------------------------ subscribing
    async def subscribe(
        self,
        user_id: UUID | str,
        *,
        after: int | str | None = None,
        rechecks: list[Recheck] | None = None,
    ) -> Subscription:
        """Follow the user's memory changes.

        Args:
            user_id: Whose changes.
            after: Resume after this event id (an SSE ``Last-Event-ID``): every later event
                of the user is delivered, none twice. None: only changes from now on.
            rechecks: Awaited every ``idle_check_s``; one that raises ends the
                subscription with its error (a revoked grant, a disabled caller).

        Returns:
            A :class:`Subscription` (async iterator of MemoryEvent; first an EventsResync
            when the events after ``after`` may have been purged or ``after`` is not this
            database's, then the events after ``resume_after``).

        Raises:
            InvalidInput: a bad user id or ``after``.
            NotFound: no such user.
            Unavailable: PostgreSQL is out of reach (also for the LISTEN connection), or
                this process already serves ``max_subscribers`` subscriptions.
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        start = None if after is None else parse_event_id(after)
        if self.subscribers() >= self.max_subscribers:
            raise Unavailable(
                f"this replica already serves {self.max_subscribers} change feed streams "
                "(EVENTS_MAX_STREAMS); retry later",
                retry_after=5,
            )
        per_user = self.max_per_user()
        if len(self._subscribers.get(user_id, ())) >= per_user:
            # One user's streams held every slot: the others got only 503s.
            raise Unavailable(
                f"this replica already serves {per_user} change feed streams of this user (a "
                "quarter of EVENTS_MAX_STREAMS): close one, or retry later",
                retry_after=5,
            )
        subscription = Subscription(self, user_id, position=0, pending=[], rechecks=[])
        # Registered before the first read: a change committed after that read notifies it.
        self._subscribers.setdefault(user_id, set()).add(subscription)
        try:
            await self._listen_now()
            await require_user(self.db, user_id)
            pending: list[FeedItem] = []
            async with self.db.scoped(user_id, readonly=True) as conn:
                horizon = await conn.fetchrow(q("events_horizon"))
                if start is None:
                    position = int(await conn.fetchval(q("events_head"), user_id))
                else:
                    position = start
                    if start > horizon["issued"]:
                        position = int(await conn.fetchval(q("events_head"), user_id))
                        pending.append(
                            EventsResync(
                                after=start, resume_after=position, reason="unknown_position"
                            )
                        )
                    elif start < horizon["purged_through"]:
                        position = int(horizon["purged_through"])
                        pending.append(
                            EventsResync(after=start, resume_after=position, reason="purged")
                        )
        except BaseException:
            self._drop(subscription)
            raise
        subscription.position = subscription._read_to = position
        subscription._vouched = int(horizon["purged_through"])
        subscription._buffer.extend(pending)
        subscription._rechecks = list(rechecks or [])
        return subscription

    def subscribers(self) -> int:
        """How many subscriptions this process serves now."""
        return sum(len(s) for s in self._subscribers.values())

    @property
    def listening(self) -> bool:
        """Whether the LISTEN connection is up now."""
        return self._listening.is_set()

    def state(self) -> dict[str, Any]:
        """For health reports: listening (None before the first subscription), how many
        subscriptions, how many times the LISTEN connection was lost."""
        return {
            "listening": None if self._listener is None else self.listening,
            "subscribers": self.subscribers(),
            "reconnects": self._reconnects,
        }

    def _drop(self, subscription: Subscription) -> None:
        mine = self._subscribers.get(subscription.user_id)
        if mine is not None:
            mine.discard(subscription)
            if not mine:
                del self._subscribers[subscription.user_id]

    # ------------------------------------------------------------------ the LISTEN connection
    async def _listen_now(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="halldyll-event-listener")
        try:
            await asyncio.wait_for(self._listening.wait(), self.connect_timeout_s)
        except TimeoutError:
            raise Unavailable(
                "the change feed cannot listen to PostgreSQL now", retry_after=5
            ) from None

    async def _listen(self) -> None:
        """Keep one LISTEN connection open: reopen it after every loss, the pause doubling
        (from ``reconnect_delay_s`` to 30 s) while PostgreSQL stays out of reach."""
        delay = self.reconnect_delay_s
        while True:
            try:
                await self._listen_once()
                delay = self.reconnect_delay_s  # it was up: the next attempt comes soon
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the connection: reconnect
                log.warning(
                    "change feed: LISTEN connection failed (%s), retrying in %.1f s",
                    type(exc).__name__,
                    delay,
                )
            self._reconnects += 1
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)

    async def _listen_once(self) -> None:
        """Open the connection, LISTEN, and return when PostgreSQL closes it."""
        lost = asyncio.Event()
        connection = await connect(self.dsn)
        try:
            connection.add_termination_listener(lambda _c: lost.set())
            await connection.add_listener(CHANNEL, self._notified)
            self._connection = connection
            self._listening.set()
            # Changes committed while nobody listened were not announced: read again.
            self._wake_all()
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), self.idle_check_s)
                except TimeoutError:
                    # A connection that died without a word (a half-open socket).
                    await connection.execute("SELECT 1", timeout=self.connect_timeout_s)
            log.warning("change feed: PostgreSQL closed the LISTEN connection, reconnecting")
        finally:
            self._listening.clear()
            self._connection = None
            if not connection.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), 5)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        user, _, _event_id = str(payload).partition(" ")
        try:
            user_id = UUID(user)
        except ValueError:
            return
        for subscription in self._subscribers.get(user_id, ()):
            subscription._notify()

    def _wake_all(self) -> None:
        for subscriptions in self._subscribers.values():
            for subscription in subscriptions:
                subscription._notify()

    async def close(self) -> None:
        """End every subscription and the LISTEN connection; idempotent."""
        for subscriptions in list(self._subscribers.values()):
            for subscription in list(subscriptions):
                await subscription.aclose()
                subscription._notify()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener

    # ------------------------------------------------------------------ retention
    async def purge(self, *, older_than_hours: float | None = None) -> int:
        """Delete events older than EVENTS_RETENTION_HOURS; return how many went.

        A subscriber that later resumes from before the newest deleted event gets an
        :class:`~halldyll_ray.models.EventsResync` first. Audited (``events.purge``). The
        events of a user whose row an erasure or a role change holds are left for the next
        purge (storage/sql/events.sql: lock_event_owners), not waited for.
        """
        hours = self.retention_hours if older_than_hours is None else older_than_hours
        cutoff = validation.age_cutoff(hours, "older_than_hours", unit="hours")
        async with self.db.scoped(admin=True) as conn:
            # Their users' rows first, as an erasure's (storage/sql/events.sql).
            owners = [r["id"] for r in await conn.fetch(q("lock_event_owners"), cutoff)]
            row = await conn.fetchrow(q("purge_events"), cutoff, owners)
            if row["purged"]:
                await write_audit(
                    conn,
                    "events.purge",
                    None,
                    [],
                    None,
                    details={
                        "count": row["purged"],
                        "before": cutoff.isoformat(),
                        "purged_through": row["purged_through"],
                    },
                )
        return int(row["purged"])
