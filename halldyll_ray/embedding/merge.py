"""One model call at a time, with everything that queued meanwhile merged into the next call.

Ray Serve's ``serve.batch`` forms a batch as soon as its wait time ends, whether or not the
model is free: under load it emits many small batches that then queue for the model one by
one (``benchmarks/serve_http.py`` saw a mean of 1.04 requests per batch with 64 concurrent
callers and the model busy all the time). :class:`MergingEncoder` sits between those batches
and the model: while one call runs, new requests wait, and the next call takes all of them.
A lone request still runs at once; under load, calls grow to ``max_texts``, where a text
costs least.

The same merging serves a replica that calls the Embedding deployment (:class:`MergingCaller`):
concurrent one-text requests (each search's query, with ``local_embedding_max_texts: 0`` on
GPU clusters) leave the replica as a few many-text calls instead of one Ray request each, the
per-request cost that held one-text requests to 0.7× the raw model's rate
(``benchmarks/serve_http.py``).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import numpy.typing as npt

from halldyll_ray.errors import Unavailable

Vectors = npt.NDArray[np.float32]


class _Merger(ABC):
    """Merges waiting requests into calls of up to ``max_texts`` texts, ``max_calls`` at once."""

    def __init__(
        self, max_texts: int, max_calls: int, observe: Callable[[int, int], None] | None
    ) -> None:
        if max_texts < 1:
            raise ValueError(f"max_texts must be at least 1, got {max_texts}")
        if max_calls < 1:
            raise ValueError(f"max_calls must be at least 1, got {max_calls}")
        self.max_texts = max_texts
        self.max_calls = max_calls
        self._observe = observe
        self._pending: deque[tuple[list[str], asyncio.Future[Vectors]]] = deque()
        self._workers: set[asyncio.Task[None] | None] = set()

    @abstractmethod
    async def _call(self, texts: list[str]) -> Vectors:
        """One call with the merged texts; returns their vectors in order."""

    async def encode(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts``; waits for the call in progress, then runs with whatever else waits."""
        texts = list(texts)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Vectors] = loop.create_future()
        self._pending.append((texts, future))
        if len(self._workers) < self.max_calls:
            self._workers.add(loop.create_task(self._drain()))
        return await future

    def _take(self) -> list[tuple[list[str], asyncio.Future[Vectors]]]:
        group = [self._pending.popleft()]
        count = len(group[0][0])
        while self._pending and count + len(self._pending[0][0]) <= self.max_texts:
            item = self._pending.popleft()
            group.append(item)
            count += len(item[0])
        return [(texts, future) for texts, future in group if not future.done()]

    async def _drain(self) -> None:
        group: list[tuple[list[str], asyncio.Future[Vectors]]] = []
        try:
            while self._pending:
                group = self._take()  # callers that gave up (cancelled) are dropped here
                if not group:
                    continue
                flat = [text for texts, _ in group for text in texts]
                try:
                    vectors = await self._call(flat)
                except Exception as exc:  # every caller of this call gets the error
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                if self._observe is not None:
                    self._observe(len(group), len(flat))
                start = 0
                for texts, future in group:
                    if not future.done():
                        future.set_result(vectors[start : start + len(texts)])
                    start += len(texts)
                group = []
        except BaseException:  # the loop is shutting down (the replica stops): a retry works
            # Unavailable, not a RuntimeError: what waited here answers 503 with Retry-After
            # and the caller's retry reaches a replica that runs (a bare error was a 500 when
            # a node went away with its replica under load, tests/cluster).
            for _, future in [*group, *self._pending]:
                if not future.done():
                    future.set_exception(
                        Unavailable(
                            "the embedding model stopped (its replica is shutting down); retry",
                            retry_after=1,
                        )
                    )
            self._pending.clear()
            raise
        finally:
            # At once, not in a done callback: a request queued after the last group was taken
            # must find room to start a worker.
            self._workers.discard(asyncio.current_task())


class MergingEncoder(_Merger):
    """Serializes calls to a blocking ``encode`` (run in a thread) and merges waiting requests.

    Args:
        encode: The model call, ``encode(texts) -> (len(texts), dimension)`` array. It runs in
            a worker thread, one call at a time.
        max_texts: Most texts merged into one call. A larger single request still runs whole
            (the encoder splits it into its own batches).
        observe: Called after each model call with (requests merged, texts encoded).

    Raises:
        ValueError: ``max_texts`` below 1.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], Vectors],
        max_texts: int,
        observe: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__(max_texts, 1, observe)
        self._encode = encode

    async def _call(self, texts: list[str]) -> Vectors:
        return await asyncio.to_thread(self._encode, texts)


class MergingCaller(_Merger):
    """Merges waiting requests into calls of an awaitable (the Embedding deployment's handle),
    with up to ``max_calls`` calls in flight.

    A request that finds fewer than ``max_calls`` calls in flight leaves at once; the others
    wait and leave together, up to ``max_texts`` texts a call, as soon as a call returns. Two
    calls in flight keep a remote model busy (one encodes while the next travels).

    Args:
        call: ``await call(texts)`` -> (len(texts), dimension) array.
        max_texts: Most texts merged into one call (the deployment's batch size).
        max_calls: Calls in flight at once.
        observe: Called after each call with (requests merged, texts sent).

    Raises:
        ValueError: ``max_texts`` or ``max_calls`` below 1.
    """

    def __init__(
        self,
        call: Callable[[list[str]], Awaitable[Vectors]],
        max_texts: int,
        max_calls: int = 2,
        observe: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__(max_texts, max_calls, observe)
        self._remote = call

    async def _call(self, texts: list[str]) -> Vectors:
        return await self._remote(texts)
