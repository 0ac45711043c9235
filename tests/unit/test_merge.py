"""MergingEncoder: one model call at a time; requests that wait merge into the next call."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from halldyll_ray.embedding import MergingEncoder


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


def test_max_texts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_texts"):
        MergingEncoder(GatedModel(), max_texts=0)
