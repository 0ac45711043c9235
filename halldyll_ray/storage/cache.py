"""Two cache tiers: an in-process LRU in front of a shared Redis (SPEC §4.6).

Redis is an accelerator, never a source of truth: every Redis error is swallowed, counted and
answered as a miss, and after a failure Redis is skipped for ``retry_after`` seconds so an
outage costs one short timeout, not one per call. Keys that hold user data always contain the
user id (``TieredCache.user_key``), so nothing cached for one user can be found under another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID

from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

from halldyll_ray.errors import Unavailable

log = logging.getLogger(__name__)


class BytesCache(Protocol):
    """What the engine needs of a cache tier."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Iterable[tuple[str, bytes]], ttl: float | None) -> None: ...

    async def delete(self, key: str) -> None: ...


class LocalLRU:
    """A thread-safe LRU of bytes with optional per-entry expiry."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._data: OrderedDict[str, tuple[float | None, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            expires, value = entry
            if expires is not None and expires < time.monotonic():
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        if self.capacity == 0:
            return
        expires = None if ttl is None else time.monotonic() + ttl
        with self._lock:
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def delete_containing(self, part: str) -> int:
        """Drop every key with ``part`` as one of its ``:``-separated fields; how many."""
        with self._lock:
            doomed = [key for key in self._data if part in key.split(":")]
            for key in doomed:
                del self._data[key]
        return len(doomed)

    def __len__(self) -> int:
        return len(self._data)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.get(key) for key in keys]

    async def set_many(self, items: Iterable[tuple[str, bytes]], ttl: float | None) -> None:
        for key, value in items:
            self.set(key, value, ttl)


class RedisTier:
    """Shared Redis tier; fails soft.

    Args:
        url: Redis URL.
        prefix: Prepended to every key.
        timeout: Socket timeout in seconds for each command.
        retry_after: Seconds to skip Redis after a failure.
    """

    def __init__(
        self, url: str, *, prefix: str, timeout: float = 0.25, retry_after: float = 2.0
    ) -> None:
        import redis.asyncio as aioredis

        self.prefix = prefix
        self.retry_after = retry_after
        self.errors = 0
        self._down_until = 0.0
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
            retry_on_timeout=False,
        )

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self._down_until = time.monotonic() + self.retry_after
        # The URL may carry a password: log the error type only.
        log.warning("redis unavailable (%s); serving without it", type(exc).__name__)

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except Exception as exc:
            self._failed(exc)
            return False

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys or not self.available:
            return [None] * len(keys)
        try:
            values = await self._client.mget([self.prefix + key for key in keys])
        except Exception as exc:
            self._failed(exc)
            return [None] * len(keys)
        return [value if isinstance(value, bytes) else None for value in values]

    async def set_many(self, items: Iterable[tuple[str, bytes]], ttl: float | None) -> None:
        items = list(items)
        if not items or not self.available:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(self.prefix + key, value, px=None if ttl is None else int(ttl * 1000))
                await pipe.execute()
        except Exception as exc:
            self._failed(exc)

    async def delete(self, key: str) -> None:
        if not self.available:
            return
        try:
            await self._client.delete(self.prefix + key)
        except Exception as exc:
            self._failed(exc)

    async def delete_many(self, keys: Sequence[str]) -> int:
        """Delete ``keys``; how many existed. Raises on a Redis error (an erasure must know)."""
        removed = 0
        for start in range(0, len(keys), 1000):
            removed += int(
                await self._client.unlink(*[self.prefix + k for k in keys[start : start + 1000]])
            )
        return removed

    async def delete_user_keys(self, user_id: UUID) -> int:
        """Delete every key of ``user_id`` (``kind:<user id>:...``, :meth:`TieredCache.user_key`);
        how many. SCAN, not KEYS: Redis keeps serving meanwhile. Raises on a Redis error."""
        removed = 0
        batch: list[bytes] = []
        async for key in self._client.scan_iter(match=f"{self.prefix}*:{user_id}:*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                removed += int(await self._client.unlink(*batch))
                batch = []
        if batch:
            removed += int(await self._client.unlink(*batch))
        return removed

    async def aclose(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # closing a dead connection must not fail shutdown
            log.debug("redis close: %s", type(exc).__name__)


#: Tries of an erasure's Redis deletion before it is Unavailable (:meth:`TieredCache.erase`).
ERASE_ATTEMPTS = 6


@dataclass
class CacheStats:
    hits_local: int = 0
    hits_redis: int = 0
    misses: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)

    def record(self, kind: str, local: int, remote: int, missed: int) -> None:
        self.hits_local += local
        self.hits_redis += remote
        self.misses += missed
        counts = self.by_kind.setdefault(kind, [0, 0, 0])
        counts[0] += local
        counts[1] += remote
        counts[2] += missed

    @property
    def hit_ratio(self) -> float:
        total = self.hits_local + self.hits_redis + self.misses
        return 0.0 if total == 0 else (self.hits_local + self.hits_redis) / total


class TieredCache:
    """The LRU in front of Redis (or the LRU alone when REDIS_URL is unset)."""

    def __init__(self, local: LocalLRU, remote: RedisTier | None) -> None:
        self.local = local
        self.remote = remote
        self.stats = CacheStats()

    @staticmethod
    def user_key(kind: str, user_id: UUID, *parts: str) -> str:
        return ":".join((kind, str(user_id), *parts))

    async def get_many(self, keys: Sequence[str], *, kind: str) -> list[bytes | None]:
        values = [self.local.get(key) for key in keys]
        local_hits = sum(value is not None for value in values)
        missing = [i for i, value in enumerate(values) if value is None]
        remote_hits = 0
        if missing and self.remote is not None:
            fetched = await self.remote.get_many([keys[i] for i in missing])
            for i, value in zip(missing, fetched, strict=True):
                if value is not None:
                    values[i] = value
                    remote_hits += 1
                    self.local.set(keys[i], value)
        self.stats.record(kind, local_hits, remote_hits, len(keys) - local_hits - remote_hits)
        return values

    async def get(self, key: str, *, kind: str) -> bytes | None:
        return (await self.get_many([key], kind=kind))[0]

    async def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl: float | None) -> None:
        for key, value in items:
            self.local.set(key, value, ttl)
        if self.remote is not None:
            await self.remote.set_many(items, ttl)

    async def set(self, key: str, value: bytes, *, ttl: float | None) -> None:
        await self.set_many([(key, value)], ttl=ttl)

    async def delete(self, key: str) -> None:
        self.local.delete(key)
        if self.remote is not None:
            await self.remote.delete(key)

    async def erase(self, user_id: UUID, keys: Sequence[str]) -> int:
        """Remove a user's keys (:meth:`user_key`) and ``keys`` (entries derived from their
        data under other names) from this process's LRU and from Redis; the count removed
        from Redis. Other processes' LRUs keep theirs until their TTL (at most
        SEARCH_CACHE_TTL_SECONDS for a search result).

        Raises:
            Unavailable: Redis failed: the caller must not report the erasure as complete.
        """
        self.local.delete_containing(str(user_id))
        for key in keys:
            self.local.delete(key)
        if self.remote is None:
            return 0
        remote = self.remote
        try:
            # An erasure is rare and must complete: a command past the cache's short socket
            # timeout (0.25 s, so that an outage costs a hot read little) is tried again, up
            # to ERASE_ATTEMPTS times over about 3 s (tenacity's backoff), instead of failing
            # the erasure on one slow reply of a loaded Redis. SCAN and UNLINK repeat safely.
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(ERASE_ATTEMPTS),
                wait=wait_exponential(multiplier=0.1, max=0.5),
                reraise=True,
            ):
                with attempt:
                    return await remote.delete_user_keys(user_id) + await remote.delete_many(
                        list(keys)
                    )
            raise AssertionError("unreachable: tenacity reraises the last failure")
        except Exception as exc:
            raise Unavailable(
                "the cache (Redis) is unreachable: the user's cached entries were not removed",
                retry_after=2,
            ) from exc

    async def aclose(self) -> None:
        if self.remote is not None:
            await self.remote.aclose()
