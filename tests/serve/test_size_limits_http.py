"""Sizes and shapes at their limits over HTTP: every surface (REST, GraphQL, MCP, import)
counts them as the Python API does, and a refusal stores nothing."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from support import bearer, user_with_key

from halldyll_ray.models import MAX_METADATA_BYTES, MAX_TAGS

_MCP = {"Accept": "application/json, text/event-stream"}
_STORE = "mutation($m: JSON!) { storeMemory(memory: $m) { id tags } }"


async def _facts(http: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    r = await http.get("/v1/users/me/memories", headers=bearer(key), params={"limit": 500})
    assert r.status_code == 200, r.text
    return [m for m in r.json()["items"] if m["type"] == "fact"]


def _tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments}
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}


async def test_a_key_given_twice_in_one_object_is_refused_on_every_surface(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    # Python's parser kept the last value: {"statement": "a", "statement": "b"} stored "b"
    # where a proxy, a log or a client that reads the first saw "a".
    _, key = await user_with_key(http, admin_key)
    headers = {**bearer(key), "Content-Type": "application/json"}
    twice = '{"type":"fact","statement":"Ada likes tea","statement":"Ada likes coffee"}'
    r = await http.post("/v1/users/me/memories", headers=headers, content=twice)
    assert r.status_code == 422, r.text
    assert "the key 'statement' is given twice" in r.json()["error"]["message"]
    assert f"at character {twice.rindex('statement') - 1}" in r.json()["error"]["message"]
    body = '{"memories":[{"type":"fact","statement":"x","metadata":{"a":1,"a":2}}]}'
    r = await http.post("/v1/users/me/memories/batch", headers=headers, content=body)
    assert r.status_code == 422, r.text
    variables = '{"m":' + twice + "}"
    r = await http.post(
        "/graphql",
        headers=headers,
        content=f'{{"query":{json.dumps(_STORE)},"variables":{variables}}}',
    )
    assert r.status_code == 400 and "given twice" in r.json()["error"]["message"], r.text
    call = (
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"store_fact",'
        '"arguments":{"statement":"Ada likes tea","statement":"Ada likes coffee"}}}'
    )
    r = await http.post("/mcp", headers={**headers, **_MCP}, content=call)
    assert r.status_code == 400 and "given twice" in r.json()["error"]["message"], r.text
    header = {
        "format": "halldyll-export",
        "version": 1,
        "user": {"id": str(uuid.uuid4()), "username": "x"},
        "exported_at": "2026-01-01T00:00:00Z",
        "memories": {"fact": 1},
        "messages": 0,
    }
    line = (
        f'{{"id":"{uuid.uuid4()}","memory":{twice},"messages":[],'
        '"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z"}'
    )
    r = await http.post(
        "/v1/users/me/import",
        headers={**bearer(key), "Content-Type": "application/x-ndjson"},
        content=f"{json.dumps(header)}\n{line}\n",
    )
    assert r.status_code == 200, r.text
    (error,) = r.json()["errors"]
    assert error["line"] == 2 and "given twice" in error["message"]
    assert await _facts(http, key) == []


async def test_metadata_and_tags_are_counted_alike_on_every_surface(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    _, key = await user_with_key(http, admin_key)
    metadata = {"a": "x" * (MAX_METADATA_BYTES - len('{"a":""}'))}  # at the limit, compact
    tags = [*(f"t{i}" for i in range(MAX_TAGS)), "t0", " t1 "]  # 34 given, 32 kept
    fact = {"type": "fact", "metadata": metadata, "tags": tags}
    r = await http.post(
        "/v1/users/me/memories", headers=bearer(key), json={**fact, "statement": "rest"}
    )
    assert r.status_code == 201, r.text
    r = await http.post(
        "/graphql",
        headers=bearer(key),
        json={"query": _STORE, "variables": {"m": {**fact, "statement": "graphql"}}},
    )
    assert r.status_code == 200 and "errors" not in r.json(), r.text
    arguments = {"statement": "mcp", "metadata": metadata, "tags": tags}
    r = await http.post(
        "/mcp", headers={**bearer(key), **_MCP}, json=_tool("store_fact", arguments)
    )
    assert r.json()["result"]["isError"] is False, r.text
    stored = await _facts(http, key)
    assert len(stored) == 3
    assert all(m["metadata"] == metadata and len(m["tags"]) == MAX_TAGS for m in stored)
    over = {"a": metadata["a"] + "x"}
    r = await http.post(
        "/v1/users/me/memories",
        headers=bearer(key),
        json={"type": "fact", "statement": "over", "metadata": over},
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "fact.metadata", r.text
    arguments = {"statement": "over", "tags": [f"t{i}" for i in range(MAX_TAGS + 1)]}
    r = await http.post(
        "/mcp", headers={**bearer(key), **_MCP}, json=_tool("store_fact", arguments)
    )
    assert r.json()["result"]["isError"] is True, r.text
    assert len(await _facts(http, key)) == 3
