"""The Serve-handle door's retry policy, over a stand-in handle (pure logic; the real handle
is exercised in tests/serve/test_llm_serve.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest
from llm_replay import recording
from ray.serve.exceptions import BackPressureError

from halldyll_ray.llm.client import LLMRequestRefused
from halldyll_ray.llm.protocol import LLMUnavailable
from halldyll_ray.serve.llm_handle import ServeHandleTransport


class _Call:
    """What ``handle.method.remote(body)`` returns: awaitable, cancellable."""

    def __init__(self, outcome: Any, delay: float = 0.0) -> None:
        self.outcome, self.delay, self.cancelled = outcome, delay, False

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self) -> Generator[Any, None, Any]:
        return self._run().__await__()

    async def _run(self) -> Any:
        await asyncio.sleep(self.delay)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class _Handle:
    """A handle whose ``chat_completions.remote`` answers each call with the next outcome."""

    def __init__(self, *outcomes: Any, delay: float = 0.0) -> None:
        self.outcomes, self.delay = list(outcomes), delay
        self.calls: list[_Call] = []

    @property
    def chat_completions(self) -> _Handle:
        return self

    def remote(self, body: dict[str, Any]) -> _Call:
        call = _Call(self.outcomes.pop(0), self.delay)
        self.calls.append(call)
        return call


def _transport(handle: _Handle, **options: Any) -> ServeHandleTransport:
    transport = ServeHandleTransport("llm", backoff_s=0.001, **options)
    transport._handle = handle
    return transport


RESPONSE = recording("summarize_conv26_session1")["exchanges"][0]["response"]


async def test_back_pressure_is_retried_until_an_answer() -> None:
    handle = _Handle(BackPressureError(num_queued_requests=1, max_queued_requests=1), RESPONSE)
    assert await _transport(handle, max_retries=2).complete({}) == RESPONSE
    assert len(handle.calls) == 2


async def test_persistent_failures_end_as_unavailable() -> None:
    busy = [BackPressureError(num_queued_requests=1, max_queued_requests=1) for _ in range(3)]
    handle = _Handle(*busy)
    with pytest.raises(LLMUnavailable, match="unavailable"):
        await _transport(handle, max_retries=2).complete({})
    assert len(handle.calls) == 3


async def test_an_error_body_that_refuses_is_not_retried() -> None:
    handle = _Handle({"error": {"message": "model 'x' not found", "code": 404}}, RESPONSE)
    with pytest.raises(LLMRequestRefused) as caught:
        await _transport(handle, max_retries=2).complete({})
    assert caught.value.status == 404 and len(handle.calls) == 1


async def test_an_upstream_failure_body_is_retried() -> None:
    handle = _Handle({"error": {"message": "busy", "code": 503}}, RESPONSE)
    assert await _transport(handle, max_retries=1).complete({}) == RESPONSE


async def test_a_slow_call_is_cancelled_and_counted_as_unavailable() -> None:
    handle = _Handle(RESPONSE, RESPONSE, delay=1.0)
    with pytest.raises(LLMUnavailable, match="did not answer within"):
        await _transport(handle, max_retries=1, timeout_s=0.01).complete({})
    assert len(handle.calls) == 2 and all(call.cancelled for call in handle.calls)
