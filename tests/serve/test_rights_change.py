"""A change of a principal's rights takes effect at once on every surface: REST (the
Ingress's cached search too), GraphQL, MCP over HTTP, the handle API, and the open streams
of the change feed (SSE and GraphQL subscriptions) within EVENTS_RECHECK_SECONDS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from support import bearer, export_header, fact_line, ndjson, user_with_key
from support import mcp_session as _mcp
from test_events_http import _until_no_subscribers, stream
from test_graphql import _ws

from halldyll_ray.errors import AuthenticationFailed, PermissionDenied

SEARCH = {"query": "which instrument does Ada play", "mode": "hybrid", "limit": 5}
GQL_SEARCH = '{ search(userId: "%s", query: "which instrument does Ada play") { score } }'
GQL_FEED = 'subscription { memoryEvents(userId: "%s") { ... on MemoryEvent { id kind } } }'


async def _owner_with_memory(http: httpx.AsyncClient, admin_key: str) -> tuple[dict[str, Any], str]:
    owner, owner_key = await user_with_key(http, admin_key)
    r = await http.post(
        "/v1/users/me/memories",
        headers=bearer(owner_key),
        json={"type": "fact", "statement": "Ada plays the cello in an orchestra"},
    )
    assert r.status_code == 201, r.text
    return owner, owner_key


async def _surfaces(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, key: str, owner_id: str
) -> dict[str, Any]:
    """What each surface answers ``key`` for a search of ``owner_id``'s memories: an HTTP
    status (GraphQL: its error code), the handle API's exception name, MCP's tool result."""
    from ray import serve

    out: dict[str, Any] = {}
    path = f"/v1/users/{owner_id}/search"
    # Twice: the second is the Ingress's cached answer when the first was allowed.
    out["rest"] = (await http.post(path, headers=bearer(key), json=SEARCH)).status_code
    out["rest_cached"] = (await http.post(path, headers=bearer(key), json=SEARCH)).status_code
    r = await http.post("/graphql", headers=bearer(key), json={"query": GQL_SEARCH % owner_id})
    errors = r.json().get("errors") if r.status_code == 200 else None
    out["graphql"] = errors[0]["extensions"]["code"] if errors else r.status_code
    try:
        await serve.get_app_handle("halldyll").handle_search.remote(key, owner_id, "cello")
        out["handle"] = 200
    except (AuthenticationFailed, PermissionDenied) as exc:
        out["handle"] = type(exc).__name__
    r = await http.post(
        "/mcp",
        headers={**bearer(key), "Accept": "application/json, text/event-stream"},
        json={
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {
                "name": "search_memories",
                "arguments": {"query": "cello", "user_id": owner_id},
            },
        },
    )
    if r.status_code != 200:
        out["mcp"] = r.status_code
    else:
        result = r.json()["result"]
        out["mcp"] = "tool error" if result.get("isError") else 200
    return out


ALLOWED = {"rest": 200, "rest_cached": 200, "graphql": 200, "handle": 200, "mcp": 200}
UNAUTHENTICATED = {
    "rest": 401,
    "rest_cached": 401,
    "graphql": 401,
    "handle": "AuthenticationFailed",
    "mcp": 401,
}
DENIED = {
    "rest": 403,
    "rest_cached": 403,
    "graphql": "permission_denied",
    "handle": "PermissionDenied",
    "mcp": "tool error",
}


async def test_a_change_of_rights_refuses_the_next_request_on_every_surface(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    admin = bearer(admin_key)
    owner, owner_key = await _owner_with_memory(http, admin_key)

    # A Viewer's grant revoked: the cached answer it was given a moment ago is refused too.
    viewer, viewer_key = await user_with_key(http, admin_key, role="viewer")
    grants = f"/v1/users/{viewer['id']}/grants"
    assert (await http.post(grants, json={"owner_id": owner["id"]}, headers=admin)).is_success
    assert await _surfaces(ray_serve, http, viewer_key, owner["id"]) == ALLOWED
    assert (await http.delete(f"{grants}/{owner['id']}", headers=admin)).status_code == 204
    assert await _surfaces(ray_serve, http, viewer_key, owner["id"]) == DENIED

    # A rotated key: the old one is refused at once, the new one acts.
    key_id = (await http.get(f"/v1/users/{owner['id']}/keys", headers=admin)).json()["items"][0]
    assert await _surfaces(ray_serve, http, owner_key, owner["id"]) == ALLOWED
    r = await http.post(f"/v1/keys/{key_id['id']}/rotate", headers=admin)
    assert r.status_code == 201, r.text
    new_key, new_key_id = r.json()["key"], r.json()["id"]
    assert await _surfaces(ray_serve, http, owner_key, owner["id"]) == UNAUTHENTICATED
    assert await _surfaces(ray_serve, http, new_key, owner["id"]) == ALLOWED

    # A key past its expiry.
    soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    r = await http.post(
        f"/v1/users/{owner['id']}/keys", json={"name": "brief", "expires_at": soon}, headers=admin
    )
    brief = r.json()["key"]
    assert await _surfaces(ray_serve, http, brief, owner["id"]) == ALLOWED
    await asyncio.sleep(
        max(0.0, (datetime.fromisoformat(soon) - datetime.now(UTC)).total_seconds())
    )
    assert await _surfaces(ray_serve, http, brief, owner["id"]) == UNAUTHENTICATED

    # An Admin made a User: another's memories are refused.
    root, root_key = await user_with_key(http, admin_key, role="admin")
    assert await _surfaces(ray_serve, http, root_key, owner["id"]) == ALLOWED
    r = await http.patch(f"/v1/users/{root['id']}", json={"role": "user"}, headers=admin)
    assert r.status_code == 200, r.text
    assert await _surfaces(ray_serve, http, root_key, owner["id"]) == DENIED

    # A disabled user, then a deleted one.
    r = await http.patch(f"/v1/users/{owner['id']}", json={"disabled": True}, headers=admin)
    assert r.status_code == 200, r.text
    assert await _surfaces(ray_serve, http, new_key, owner["id"]) == UNAUTHENTICATED
    await http.patch(f"/v1/users/{owner['id']}", json={"disabled": False}, headers=admin)
    async with _mcp(ray_serve["url"], new_key) as session:  # an MCP session open meanwhile
        assert not (await session.call_tool("search_memories", {"query": "cello"})).is_error
        assert (await http.delete(f"/v1/keys/{new_key_id}", headers=admin)).status_code == 200
        refused = False
        try:
            refused = (await session.call_tool("search_memories", {"query": "cello"})).is_error
        except Exception:  # the 401 of the next POST ends the client's call
            refused = True
        assert refused
    assert (await http.delete(f"/v1/users/{owner['id']}", headers=admin)).status_code == 200
    assert await _surfaces(ray_serve, http, brief, owner["id"]) == UNAUTHENTICATED

    # Every refusal is audited, and no audit row holds a key.
    rows = (await http.get("/v1/audit?outcome=denied&limit=1000", headers=admin)).json()["items"]
    text = json.dumps(rows)
    for key in (viewer_key, owner_key, new_key, brief, root_key):
        assert key not in text
    actors = {r["actor_id"] for r in rows}
    assert {viewer["id"], root["id"]} <= actors


async def _sse_end(
    http: httpx.AsyncClient, key: str, user: str, change: Callable[[], Awaitable[Any]]
) -> Any:
    async with stream(http, key, user) as events:
        await change()
        return await events.next(within=10)  # EVENTS_RECHECK_SECONDS is 1 here


async def _graphql_end(url: str, key: str, user: str, change: Callable[[], Awaitable[Any]]) -> Any:
    async with await _ws(url) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": bearer(key)}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        subscribe = {"id": "1", "type": "subscribe", "payload": {"query": GQL_FEED % user}}
        await ws.send(json.dumps(subscribe))
        await asyncio.sleep(1.0)  # open before the change
        await change()
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        return errors[0]


@pytest.mark.parametrize("surface", ["sse", "graphql"])
async def test_open_streams_end_when_rights_change_and_say_why(
    surface: str, ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    admin = bearer(admin_key)

    async def ends(key: str, user: str, change: Callable[[], Awaitable[Any]]) -> tuple[str, str]:
        if surface == "sse":
            event = await _sse_end(http, key, user, change)
            assert event["event"] == "error", event
            code, message = event["data"]["code"], event["data"]["message"]
        else:
            error = await _graphql_end(ray_serve["url"], key, user, change)
            code, message = error["extensions"]["code"], error["message"]
        await _until_no_subscribers(http, admin_key)
        return code, message

    owner, owner_key = await user_with_key(http, admin_key)
    viewer, viewer_key = await user_with_key(http, admin_key, role="viewer")
    grants = f"/v1/users/{viewer['id']}/grants"
    await http.post(grants, json={"owner_id": owner["id"]}, headers=admin)

    async def revoke_grant() -> None:
        assert (await http.delete(f"{grants}/{owner['id']}", headers=admin)).status_code == 204

    assert (await ends(viewer_key, owner["id"], revoke_grant))[0] == "permission_denied"

    async def disable() -> None:
        r = await http.patch(f"/v1/users/{owner['id']}", json={"disabled": True}, headers=admin)
        assert r.status_code == 200

    code, _ = await ends(owner_key, owner["id"], disable)
    assert code in ("permission_denied", "unauthenticated")
    await http.patch(f"/v1/users/{owner['id']}", json={"disabled": False}, headers=admin)

    # An Admin made a User: refused, and the refusal names the role it has now.
    root, root_key = await user_with_key(http, admin_key, role="admin")

    async def demote() -> None:
        r = await http.patch(f"/v1/users/{root['id']}", json={"role": "user"}, headers=admin)
        assert r.status_code == 200

    code, message = await ends(root_key, owner["id"], demote)
    assert code == "permission_denied"
    assert message.startswith(f"user '{root['username']}' may not"), message

    soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    r = await http.post(
        f"/v1/users/{owner['id']}/keys", json={"name": "x", "expires_at": soon}, headers=admin
    )

    async def nothing() -> None:
        pass

    code, message = await ends(r.json()["key"], owner["id"], nothing)
    assert code == "unauthenticated" and r.json()["key"] not in message


async def test_an_import_in_flight_and_a_stream_end_as_their_caller_s_key_does(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """An import whose key is revoked while its body still arrives ends with the 401 a new
    request gets, and stores nothing it read after (it ran to its end and stored all); an
    open stream whose caller is disabled ends as the key's next request is refused, with
    ``unauthenticated`` (it said ``permission_denied``, where reconnecting got a 401)."""
    admin = bearer(admin_key)
    user, key = await user_with_key(http, admin_key)
    key_id = (await http.get(f"/v1/users/{user['id']}/keys", headers=admin)).json()["items"][0]

    async def body() -> Any:
        yield ndjson([export_header(), fact_line("Ada imports a fact about chess")])
        revoked = await http.delete(f"/v1/keys/{key_id['id']}", headers=admin)
        assert revoked.status_code == 200, revoked.text
        await asyncio.sleep(1.5)  # EVENTS_RECHECK_SECONDS is 1 here
        yield ndjson([fact_line("Ada imports a second fact about chess")])

    r = await http.post(
        "/v1/users/me/import",
        headers={**bearer(key), "Content-Type": "application/x-ndjson"},
        content=body(),
    )
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthenticated" and key not in r.text
    stored = await http.get(f"/v1/users/{user['id']}/memories", headers=admin)
    assert stored.json()["items"] == [], stored.text

    reader, reader_key = await user_with_key(http, admin_key)

    async def disable() -> None:
        r = await http.patch(f"/v1/users/{reader['id']}", json={"disabled": True}, headers=admin)
        assert r.status_code == 200

    event = await _sse_end(http, reader_key, "me", disable)
    assert event["event"] == "error", event
    assert event["data"]["code"] == "unauthenticated", event
    assert (await http.get("/v1/me", headers=bearer(reader_key))).status_code == 401
