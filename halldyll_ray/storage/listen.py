"""One dedicated LISTEN connection that stays open: reconnects after every loss.

A pooled connection cannot LISTEN (the pool's reset drops listeners, and it would hold a pool
slot for the process's lifetime), so a process that waits for notifications keeps one
connection of its own with the login role (LISTEN needs no privilege). Notifications sent
while it was down are lost: ``on_connect`` runs after every (re)connection so that the owner
reads again what it may have missed. The change feed (:mod:`halldyll_ray.components.events`)
follows the same pattern with its own health reporting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from halldyll_ray.storage.database import connect

log = logging.getLogger(__name__)


class Listener:
    """LISTEN on ``channel`` for the life of :meth:`start` ... :meth:`close`.

    Args:
        dsn: The login URL.
        channel: The notification channel.
        on_notify: Called with each notification's payload (in the event loop; keep it short).
        on_connect: Called after each (re)connection, for the notifications missed meanwhile.
        reconnect_delay_s: First pause before reopening a lost connection; doubled up to 30 s
            while PostgreSQL stays out of reach.
        ping_s: The connection is pinged this often, to find a half-open socket.
    """

    def __init__(
        self,
        dsn: str,
        channel: str,
        on_notify: Callable[[str], None],
        *,
        on_connect: Callable[[], None] | None = None,
        reconnect_delay_s: float = 1.0,
        ping_s: float = 30.0,
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_notify = on_notify
        self.on_connect = on_connect
        self.reconnect_delay_s = reconnect_delay_s
        self.ping_s = ping_s
        self.reconnects = 0
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        """Whether the connection is up now."""
        return self._up.is_set()

    def start(self) -> None:
        """Open the connection in a background task (idempotent); see :meth:`wait_up`."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"listen-{self.channel}")

    async def wait_up(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the connection; whether it is up."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout_s)
        return self.listening

    async def close(self) -> None:
        """Stop listening and close the connection; idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        delay = self.reconnect_delay_s
        while True:
            try:
                await self._once()
                delay = self.reconnect_delay_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the connection: reconnect
                log.warning(
                    "LISTEN %s: connection failed (%s), retrying in %.1f s",
                    self.channel,
                    type(exc).__name__,
                    delay,
                )
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)

    async def _once(self) -> None:
        lost = asyncio.Event()
        connection = await connect(self.dsn)
        try:
            connection.add_termination_listener(lambda _c: lost.set())
            await connection.add_listener(self.channel, self._notified)
            self._up.set()
            if self.on_connect is not None:
                self.on_connect()
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), self.ping_s)
                except TimeoutError:
                    await connection.execute("SELECT 1", timeout=10)
        finally:
            self._up.clear()
            if not connection.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), 5)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self.on_notify(str(payload))
