"""One model call at a time, with everything that queued meanwhile merged into the next call.

Ray Serve's ``serve.batch`` forms a batch as soon as its wait time ends, whether or not the
model is free: under load it emits many small batches that then queue for the model one by
one (``benchmarks/serve_http.py`` saw a mean of 1.04 requests per batch with 64 concurrent
callers and the model busy all the time). :class:`MergingEncoder` sits between those batches
and the model: while one call runs, new requests wait, and the next call takes all of them.
A lone request still runs at once; under load, calls grow to ``max_texts``, where a text
costs least.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]


class MergingEncoder:
    """Serializes calls to a blocking ``encode`` (run in a thread) and merges waiting requests.

    Args:
        encode: The model call, ``encode(texts) -> (len(texts), dimension)`` array. It runs in
            a worker thread, one call at a time.
        max_texts: Most texts merged into one call. A larger single request still runs whole
            (the encoder splits it into its own batches).
        observe: Called after each model call with (requests merged, texts encoded).
    """

    def __init__(
        self,
        encode: Callable[[list[str]], Vectors],
        max_texts: int,
        observe: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_texts < 1:
            raise ValueError(f"max_texts must be at least 1, got {max_texts}")
        self._encode = encode
        self.max_texts = max_texts
        self._observe = observe
        self._pending: deque[tuple[list[str], asyncio.Future[Vectors]]] = deque()
        self._worker: asyncio.Task[None] | None = None

    async def encode(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts``; waits for the call in progress, then runs with whatever else waits."""
        texts = list(texts)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Vectors] = loop.create_future()
        self._pending.append((texts, future))
        if self._worker is None:
            self._worker = loop.create_task(self._drain())
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
                    vectors = await asyncio.to_thread(self._encode, flat)
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
        except BaseException as exc:  # the loop is shutting down: nobody is left waiting
            for _, future in [*group, *self._pending]:
                if not future.done():
                    future.set_exception(RuntimeError(f"encoder stopped: {exc!r}"))
            self._pending.clear()
            raise
        finally:
            self._worker = None
