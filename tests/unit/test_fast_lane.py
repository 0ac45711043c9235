"""The request middleware's fast lanes (serve/http.py ``FastLane``): a lane answers its
route's requests before FastAPI when it can, and when it declines the route gets the very
same request (every body part, the limits, the metrics). Pure ASGI, no services."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi.responses import JSONResponse, Response

from halldyll_ray.serve import http as served
from halldyll_ray.serve.http import FastLane, RecentRequests, add_fast_lane

PATH = "/v1/users/me/search"


class _App:
    """The application behind the middleware: records what reached it, echoes the body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.states: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self.bodies.append(b"".join(parts))
        self.states.append(dict(scope["state"]))
        await Response(b"route:" + b"".join(parts))(scope, receive, send)


class _Lane:
    """A lane that answers bodies starting with ``fast`` and declines the others."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    async def answer(self, scope: Any, body: bytes, request_id: str) -> Response | None:
        self.seen.append(body)
        if body.startswith(b"fast"):
            return JSONResponse({"lane": body.decode(), "request_id": request_id})
        scope["state"]["learned"] = len(body)
        return None


@pytest.fixture
def lane() -> Iterator[_Lane]:
    fake = _Lane()
    saved = list(served._LANES)
    metrics = getattr(served.api.state, "metrics", None)
    served.api.state.metrics = RecentRequests()
    add_fast_lane(FastLane("POST", re.compile(r"/v1/users/[^/]+/search"), PATH, fake.answer))
    try:
        yield fake
    finally:
        served._LANES[:] = saved
        served.api.state.metrics = metrics


async def _client(app: _App) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=served._RequestContext(app))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def _routes() -> dict[str, int]:
    snapshot = served.api.state.metrics.snapshot()
    return {row["route"]: row["requests"] for row in snapshot["routes"]}


async def test_a_lane_answers_its_requests_without_the_route(lane: _Lane) -> None:
    app = _App()
    async with await _client(app) as client:
        answer = await client.post(PATH, content=b"fast one", headers={"X-Request-ID": "r-1"})
    assert answer.status_code == 200
    assert answer.json() == {"lane": "fast one", "request_id": "r-1"}
    assert app.bodies == []  # the route never ran
    assert lane.seen == [b"fast one"]
    assert _routes() == {PATH: 1}  # named as the route would be, not "unmatched"


async def _parts(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_a_declined_request_reaches_the_route_whole(lane: _Lane) -> None:
    app = _App()
    async with await _client(app) as client:
        plain = await client.post(PATH, content=b'{"query": "slow"}')
        # A body in several parts (chunked): the route reads every part, in order.
        chunked = await client.post(PATH, content=_parts(b'{"query": ', b'"in parts"', b"}"))
    assert plain.content == b'route:{"query": "slow"}'
    assert chunked.content == b'route:{"query": "in parts"}'
    assert app.bodies == [b'{"query": "slow"}', b'{"query": "in parts"}']
    assert lane.seen == app.bodies
    # What the lane learned travels with the request to the route.
    assert [s["learned"] for s in app.states] == [17, 21]
    assert _routes() == {"unmatched": 2}  # the stand-in app sets no route; the lane did not


async def test_only_the_lanes_method_and_path_take_it(lane: _Lane) -> None:
    app = _App()
    async with await _client(app) as client:
        other_path = await client.post("/v1/users/me/searches", content=b"fast")
        other_method = await client.put(PATH, content=b"fast")
        deeper = await client.post(PATH + "/more", content=b"fast")
    assert [r.content for r in (other_path, other_method, deeper)] == [b"route:fast"] * 3
    assert lane.seen == []


async def test_the_body_limit_holds_in_front_of_a_lane(lane: _Lane) -> None:
    app = _App()
    limit = served.api.state.max_body_bytes
    async with await _client(app) as client:
        declared = await client.post(PATH, content=b"fast" + b"x" * limit)
        streamed = await client.post(PATH, content=_parts(b"fast", b"x" * limit))
    assert declared.status_code == streamed.status_code == 413
    assert declared.json()["error"]["code"] == "payload_too_large"
    assert lane.seen == []  # neither body reached the lane whole
    assert all(len(body) <= limit for body in app.bodies)
