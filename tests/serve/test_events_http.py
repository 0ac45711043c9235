"""The change feed over real HTTP (issue 12 §2): GET /v1/users/{id}/events as Server-Sent
Events through HAProxy and the Ingress, carrying writes made through the REST API (served by
the Ingestion deployment, another process: the notification crosses PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from support import bearer, user_with_key

EVENTS = "/v1/users/{}/events"


class SSE:
    """The messages of one open event stream, parsed as the SSE spec says."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, within: float = 20) -> dict[str, Any]:
        """The next message (event), skipping comments."""
        return await asyncio.wait_for(self._message(), within)

    async def comment(self, within: float = 20) -> str:
        """The next comment line (a keep-alive), with no message before it."""
        line = await asyncio.wait_for(anext(self._lines), within)
        assert line.startswith(":"), line
        return line

    async def _message(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        async for line in self._lines:
            if not line:
                if fields:
                    if "data" in fields:
                        fields["data"] = json.loads(fields["data"])
                    return fields
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = fields[name] + "\n" + value if name in fields else value
        raise EOFError("the stream ended")


@asynccontextmanager
async def stream(
    http: httpx.AsyncClient, key: str, user: str = "me", **headers: str
) -> AsyncIterator[SSE]:
    async with http.stream(
        "GET", EVENTS.format(user), headers={**bearer(key), **headers}, timeout=60
    ) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        yield SSE(response)


async def _subscribers(http: httpx.AsyncClient, admin_key: str) -> int:
    report = (await http.get("/v1/admin/health", headers=bearer(admin_key))).json()
    return int(report["events"]["subscribers"])


async def _until_no_subscribers(http: httpx.AsyncClient, admin_key: str) -> None:
    for _ in range(100):
        if await _subscribers(http, admin_key) == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the Ingress still serves a subscription after the client left")


async def test_the_stream_carries_writes_made_through_the_rest_api(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    user, key = await user_with_key(http, admin_key)
    memories = f"/v1/users/{user['id']}/memories"
    async with stream(http, key) as events:
        stored = await http.post(
            memories, json={"type": "fact", "statement": "Ada keeps bees"}, headers=bearer(key)
        )
        assert stored.status_code == 201, stored.text
        memory_id = stored.json()["id"]
        created = await events.next()
        assert created["event"] == "created"
        assert created["data"]["memory_id"] == memory_id
        assert created["data"]["user_id"] == user["id"]
        assert created["data"]["memory_type"] == "fact"
        assert created["id"] == str(created["data"]["id"])
        assert "bees" not in json.dumps(created)  # never content
        r = await http.patch(f"{memories}/{memory_id}", json={"tags": ["x"]}, headers=bearer(key))
        assert r.status_code == 200, r.text
        r = await http.delete(f"{memories}/{memory_id}", headers=bearer(key))
        assert r.status_code == 204, r.text
        updated, deleted = await events.next(), await events.next()
        assert [updated["event"], deleted["event"]] == ["updated", "deleted"]
        assert int(created["id"]) < int(updated["id"]) < int(deleted["id"])
        # Idle, the stream sends keep-alive comments (EVENTS_KEEPALIVE_SECONDS=1 here).
        assert (await events.comment(within=5)).startswith(": ping")
    # The client left: the Ingress's subscription ends with the request.
    await _until_no_subscribers(http, admin_key)


async def test_a_dropped_connection_resumes_with_last_event_id(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    user, key = await user_with_key(http, admin_key)
    memories = f"/v1/users/{user['id']}/memories"

    async def store(text: str) -> str:
        r = await http.post(memories, json={"type": "fact", "statement": text}, headers=bearer(key))
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async with stream(http, key, user["id"]) as events:
        first = await store("first")
        seen = await events.next()
        assert seen["data"]["memory_id"] == first
    await _until_no_subscribers(http, admin_key)
    meanwhile = [await store(text) for text in ("second", "third")]
    async with stream(http, key, **{"Last-Event-ID": seen["id"]}) as events:
        replayed = [await events.next(), await events.next()]
        assert [m["data"]["memory_id"] for m in replayed] == meanwhile
        assert [m["event"] for m in replayed] == ["created", "created"]
        live = await store("fourth")
        assert (await events.next())["data"]["memory_id"] == live
    # A position older than anything this database issued (or purged): told to resync.
    async with stream(http, key, **{"Last-Event-ID": str(2**62)}) as events:
        resync = await events.next()
        assert resync["event"] == "resync"
        assert resync["data"]["reason"] == "unknown_position"
        assert resync["id"] == str(resync["data"]["resume_after"])


async def test_who_may_follow_and_bad_requests(http: httpx.AsyncClient, admin_key: str) -> None:
    owner, owner_key = await user_with_key(http, admin_key)
    stranger, stranger_key = await user_with_key(http, admin_key)
    viewer, viewer_key = await user_with_key(http, admin_key, "viewer")
    path = EVENTS.format(owner["id"])

    r = await http.get(path)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    r = await http.get(path, headers=bearer("hr_not-a-real-key"))
    assert r.status_code == 401
    r = await http.get(path, headers={**bearer(stranger_key), "X-Request-ID": "ev-denied-1"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    audit = await http.get(
        "/v1/audit",
        params={"operation": "memory.events", "outcome": "denied"},
        headers=bearer(admin_key),
    )
    rows = [row for row in audit.json()["items"] if row["request_id"] == "ev-denied-1"]
    assert [(row["actor_id"], row["acting_for"]) for row in rows] == [(stranger["id"], owner["id"])]
    r = await http.get(path, headers={**bearer(viewer_key)})
    assert r.status_code == 403  # no grant yet
    r = await http.post(
        f"/v1/users/{viewer['id']}/grants",
        json={"owner_id": owner["id"]},
        headers=bearer(admin_key),
    )
    assert r.status_code == 201, r.text
    for key in (viewer_key, admin_key):
        async with stream(http, key, owner["id"]) as events:
            r = await http.post(
                f"/v1/users/{owner['id']}/memories",
                json={"type": "fact", "statement": "granted reading"},
                headers=bearer(owner_key),
            )
            assert r.status_code == 201
            assert (await events.next())["data"]["memory_id"] == r.json()["id"]
    for bad in ("-1", "abc", "9" * 30):
        r = await http.get(path, headers={**bearer(owner_key), "Last-Event-ID": bad})
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["field"] == "Last-Event-ID"
    r = await http.get(
        EVENTS.format("00000000-0000-4000-8000-000000000000"), headers=bearer(admin_key)
    )
    assert r.status_code == 404
    r = await http.get(EVENTS.format("nobody"), headers=bearer(admin_key))
    assert r.status_code == 422
    await _until_no_subscribers(http, admin_key)


async def test_a_revoked_key_loses_its_stream_with_an_error_event(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    user, key = await user_with_key(http, admin_key)
    keys = (await http.get(f"/v1/users/{user['id']}/keys", headers=bearer(admin_key))).json()
    async with stream(http, key) as events:
        r = await http.delete(f"/v1/keys/{keys['items'][0]['id']}", headers=bearer(admin_key))
        assert r.status_code == 200, r.text
        # Within EVENTS_RECHECK_SECONDS (1 s here): an error event, then the end.
        error = await events.next(within=10)
        assert error["event"] == "error"
        assert error["data"]["code"] == "unauthenticated"
        try:
            extra = await events.next(within=10)
        except EOFError:
            extra = None
        assert extra is None
    await _until_no_subscribers(http, admin_key)


async def test_past_events_max_streams_a_replica_answers_503_and_keeps_serving_the_api(
    http: httpx.AsyncClient, admin_key: str, ray_serve: dict[str, Any]
) -> None:
    limit = int(ray_serve["settings"]["EVENTS_MAX_STREAMS"])
    keys = [(await user_with_key(http, admin_key))[1] for _ in range(limit + 1)]
    key = keys[0]
    async with contextlib.AsyncExitStack() as stack:
        # One user holds at most a quarter of the streams (one of these 4).
        await stack.enter_async_context(stream(http, key))
        r = await http.get(EVENTS.format("me"), headers=bearer(key))
        assert r.status_code == 503 and "of this user" in r.json()["error"]["message"]
        for other in keys[1:limit]:
            await stack.enter_async_context(stream(http, other))
        assert await _subscribers(http, admin_key) == limit
        r = await http.get(EVENTS.format("me"), headers=bearer(keys[limit]))
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "EVENTS_MAX_STREAMS" in r.json()["error"]["message"]
        r = await http.get("/v1/me", headers=bearer(key))  # the REST API still answers
        assert r.status_code == 200
    await _until_no_subscribers(http, admin_key)
    async with stream(http, key):
        pass


async def test_a_reader_that_stops_reading_never_holds_up_writers(
    http: httpx.AsyncClient, admin_key: str, ray_serve: dict[str, Any]
) -> None:
    """A client that opens the stream and then reads nothing (a 4 KB receive window), while
    its user's memories change by the thousand: the writes go on at their own pace (the
    events wait in the table, the stream reads ahead at most one batch), and when the
    client hangs up with events still unsent, its subscription is released. (A send that
    cannot go out for EVENTS_RECHECK_SECONDS ends the stream: tests/integration/
    test_events.py; here the kernel's buffers take megabytes first.)"""
    user, key = await user_with_key(http, admin_key)
    url = httpx.URL(ray_serve["url"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (url.host, url.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(
        f"GET /v1/users/{user['id']}/events HTTP/1.1\r\nHost: {url.host}\r\n"
        f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 20)).startswith(b"HTTP/1.1 200")
    try:
        for batch in range(3):
            summaries = [{"type": "summary", "text": f"s{batch}-{n}"} for n in range(500)]
            started = asyncio.get_running_loop().time()
            r = await http.post(
                f"/v1/users/{user['id']}/memories/batch",
                json={"memories": summaries},
                headers=bearer(key),
            )
            assert r.status_code == 201, r.text
            assert asyncio.get_running_loop().time() - started < 30
        assert await _subscribers(http, admin_key) == 1
    finally:
        writer.close()
    await _until_no_subscribers(http, admin_key)
