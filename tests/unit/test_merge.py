"""MergingEncoder: one model call at a time; requests that wait merge into the next call."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from halldyll_ray.embedding import MergingCaller, MergingEncoder
from halldyll_ray.errors import Unavailable


class GatedModel:
    """A blocking 'model' whose vector for a text is [len(text), call number]; calls can be held."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_next = False
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            self.calls.append(list(texts))
            self.entered.set()
            self.gate.wait(5)
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("model failed")
            n = len(self.calls)
            return np.array([[len(t), n] for t in texts], dtype=np.float32)
        finally:
            with self._lock:
                self.running -= 1


async def _until(event: threading.Event) -> None:
    for _ in range(500):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the model was never called")


async def test_a_lone_request_runs_at_once_and_gets_its_rows() -> None:
    model = GatedModel()
    seen: list[tuple[int, int]] = []
    merger = MergingEncoder(model, max_texts=8, observe=lambda r, t: seen.append((r, t)))
    out = await merger.encode(["ab", "abcd"])
    assert out.tolist() == [[2.0, 1.0], [4.0, 1.0]]
    assert model.calls == [["ab", "abcd"]]
    assert seen == [(1, 2)]


async def test_requests_that_wait_for_a_busy_model_merge_into_one_call() -> None:
    model = GatedModel()
    seen: list[tuple[int, int]] = []
    merger = MergingEncoder(model, max_texts=8, observe=lambda r, t: seen.append((r, t)))
    model.gate.clear()
    first = asyncio.create_task(merger.encode(["x"]))
    await _until(model.entered)
    waiting = [asyncio.create_task(merger.encode(["y" * i])) for i in range(1, 6)]
    await asyncio.sleep(0.05)
    assert len(model.calls) == 1  # one call at a time: the others wait
    model.gate.set()
    assert (await first).tolist() == [[1.0, 1.0]]
    results = await asyncio.gather(*waiting)
    assert model.calls == [["x"], ["y", "yy", "yyy", "yyyy", "yyyyy"]]
    assert [r.tolist() for r in results] == [[[float(i), 2.0]] for i in range(1, 6)]
    assert seen == [(1, 1), (5, 5)]
    assert model.most_running == 1


async def test_merged_calls_stop_at_max_texts_but_a_large_request_runs_whole() -> None:
    model = GatedModel()
    merger = MergingEncoder(model, max_texts=4)
    model.gate.clear()
    first = asyncio.create_task(merger.encode(["a"]))
    await _until(model.entered)
    rest = [
        asyncio.create_task(merger.encode(texts))
        for texts in (["b", "c"], ["d", "e"], ["f"], ["g", "h", "i", "j", "k", "l"])
    ]
    await asyncio.sleep(0.05)
    model.gate.set()
    await first
    out = await asyncio.gather(*rest)
    assert model.calls == [["a"], ["b", "c", "d", "e"], ["f"], ["g", "h", "i", "j", "k", "l"]]
    assert [len(o) for o in out] == [2, 2, 1, 6]


async def test_a_failed_call_fails_its_callers_only() -> None:
    model = GatedModel()
    merger = MergingEncoder(model, max_texts=8)
    model.gate.clear()
    model.fail_next = True
    first = asyncio.create_task(merger.encode(["a"]))
    await _until(model.entered)
    second = asyncio.create_task(merger.encode(["b"]))
    await asyncio.sleep(0.05)
    model.gate.set()
    with pytest.raises(RuntimeError, match="model failed"):
        await first
    assert (await second).tolist() == [[1.0, 2.0]]
    assert (await merger.encode(["cc"])).tolist() == [[2.0, 3.0]]


async def test_a_caller_that_gives_up_is_not_encoded() -> None:
    model = GatedModel()
    merger = MergingEncoder(model, max_texts=8)
    model.gate.clear()
    first = asyncio.create_task(merger.encode(["a"]))
    await _until(model.entered)
    gone = asyncio.create_task(merger.encode(["gone"]))
    kept = asyncio.create_task(merger.encode(["kept"]))
    await asyncio.sleep(0.02)
    gone.cancel()
    model.gate.set()
    await first
    assert (await kept).tolist() == [[4.0, 2.0]]
    assert model.calls == [["a"], ["kept"]]
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_requests_waiting_when_the_worker_stops_are_unavailable() -> None:
    """A replica shutting down cancels the merger's worker with requests queued: they get
    Unavailable (a 503 with Retry-After; their retry reaches a running replica), not a
    RuntimeError that the API answered 500."""
    model = GatedModel()
    merger = MergingEncoder(model, max_texts=8)
    model.gate.clear()
    first = asyncio.create_task(merger.encode(["a"]))
    await _until(model.entered)
    queued = asyncio.create_task(merger.encode(["b"]))
    await asyncio.sleep(0.02)
    [worker] = [w for w in merger._workers if w is not None]
    worker.cancel()
    for waiting in (first, queued):
        with pytest.raises(Unavailable) as stopped:
            await waiting
        assert stopped.value.fields["retry_after"] == 1
    model.gate.set()


def test_max_texts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_texts"):
        MergingEncoder(GatedModel(), max_texts=0)


class GatedCall:
    """An awaitable 'remote model' whose calls are held until released one by one."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release: asyncio.Queue[Exception | None] = asyncio.Queue()
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            outcome = await self.release.get()
            if outcome is not None:
                raise outcome
            return np.array([[len(t), len(self.calls)] for t in texts], dtype=np.float32)
        finally:
            self.in_flight -= 1


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_caller_sends_up_to_max_calls_at_once_and_merges_the_rest() -> None:
    remote = GatedCall()
    seen: list[tuple[int, int]] = []
    caller = MergingCaller(
        remote, max_texts=4, max_calls=2, observe=lambda r, t: seen.append((r, t))
    )
    tasks = []
    for i in range(7):  # one after the other: the first two leave at once, one call each
        tasks.append(asyncio.create_task(caller.encode(["x" * (i + 1)])))
        await _settle()
    assert remote.calls == [["x"], ["xx"]]  # the five others wait
    remote.release.put_nowait(None)
    await _settle()
    # The freed slot takes the next four waiting requests in one call (max_texts 4).
    assert remote.calls[2] == ["xxx", "xxxx", "xxxxx", "xxxxxx"]
    for _ in range(3):
        remote.release.put_nowait(None)
    out = await asyncio.gather(*tasks)
    assert [row[0][0] for row in out] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert remote.calls[3] == ["x" * 7]
    assert remote.most_in_flight == 2
    assert sorted(r for r, _ in seen) == [1, 1, 1, 4]


async def test_caller_error_reaches_every_request_of_that_call_only() -> None:
    remote = GatedCall()
    caller = MergingCaller(remote, max_texts=8, max_calls=1)
    first = asyncio.create_task(caller.encode(["a"]))
    await _settle()
    merged = [asyncio.create_task(caller.encode([t])) for t in ("b", "c")]
    await _settle()
    remote.release.put_nowait(None)
    assert (await first).shape == (1, 2)
    remote.release.put_nowait(RuntimeError("replica died"))
    for task in merged:
        with pytest.raises(RuntimeError, match="replica died"):
            await task
    remote.release.put_nowait(None)  # the caller still works afterwards
    assert (await caller.encode(["d"])).tolist() == [[1.0, 3.0]]


async def test_caller_requests_arriving_together_leave_merged() -> None:
    remote = GatedCall()
    caller = MergingCaller(remote, max_texts=3, max_calls=2)
    tasks = [asyncio.create_task(caller.encode([str(i)])) for i in range(5)]
    await _settle()
    assert remote.calls == [["0", "1", "2"], ["3", "4"]]
    remote.release.put_nowait(None)
    remote.release.put_nowait(None)
    assert len(await asyncio.gather(*tasks)) == 5


async def test_caller_a_request_after_the_last_call_finds_a_worker() -> None:
    remote = GatedCall()
    caller = MergingCaller(remote, max_texts=8, max_calls=1)
    for n in range(1, 4):
        remote.release.put_nowait(None)
        assert (await caller.encode(["t"])).tolist() == [[1.0, float(n)]]


def test_caller_refuses_no_calls_in_flight() -> None:
    with pytest.raises(ValueError, match="max_calls"):
        MergingCaller(GatedCall(), max_texts=8, max_calls=0)
