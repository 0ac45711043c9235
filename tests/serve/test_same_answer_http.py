"""The same bad input gets the same answer on every surface: REST with a raw body or URL,
the Python client, and GraphQL (which calls the API through that client): the same status,
error code and ``field``, and nothing stored changes."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from support import bearer
from support import user_with_key as _user_with_key

from halldyll_ray.client import AsyncHalldyllClient
from halldyll_ray.errors import InvalidInput

_FACT = {"type": "fact", "statement": "Ada drinks green tea"}


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert {"code", "message", "request_id"} <= set(error), error
    return dict(error)


async def _stored(http: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    r = await http.get("/v1/users/me/memories", headers=bearer(key))
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def test_a_url_that_is_not_utf8_is_a_422_naming_the_parameter(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """Percent-escapes that are not UTF-8 in a path segment or a query parameter were decoded
    as U+FFFD: ``GET /v1/models/%FF`` was a 404 naming '\\ufffd', ``?cursor=%FF`` a cursor of
    replacement characters, where a body that is not UTF-8 is a 422. A 422 naming the
    parameter now, on every route, and nothing stored changes."""
    _, key = await _user_with_key(http, admin_key)
    r = await http.post("/v1/users/me/memories", json=_FACT, headers=bearer(key))
    assert r.status_code == 201, r.text
    fact = r.json()
    before = await _stored(http, key)
    sent: list[tuple[str, str, Any, str]] = [
        ("GET", "/v1/models/%FF", None, "ref"),
        ("GET", "/v1/models/org%2F%FF", None, "ref"),
        ("DELETE", "/v1/models/%C3%28", None, "ref"),
        ("GET", "/v1/users/me/memories/%C3%28", None, "memory_id"),
        ("DELETE", "/v1/users/me/memories/%FF", None, "memory_id"),
        ("PATCH", "/v1/users/me/memories/%E9t%E9", {"tags": ["x"]}, "memory_id"),
        ("GET", "/v1/users/%FF/memories", None, "user_id"),
        ("GET", f"/v1/users/me/memories/{fact['id']}/%FF", None, "path"),
        ("GET", "/v1/users/me/memories?cursor=%FF", None, "cursor"),
        ("GET", "/v1/users/me/memories?limit=5&tags=caf%E9", None, "tags"),
        ("GET", "/v1/users/me/jobs?status=%FF", None, "status"),
        ("POST", "/v1/users/me/search?x=%C0%AF", {"query": "tea"}, "x"),
        ("GET", "/v1/users/me/memories?%FF=1", None, "%FF"),
    ]
    for method, path, body, field in sent:
        for headers in (bearer(key), {}):  # refused before the key is read, as a repeated parameter
            r = await http.request(method, path, json=body, headers=headers)
            error = _error(r, 422)
            assert error["code"] == "invalid_input", (path, error)
            assert error["field"] == field, (path, error)
            assert "not UTF-8" in error["message"], (path, error)
            assert "\ufffd" not in r.text, (path, r.text)
    assert await _stored(http, key) == before
    # Percent-escapes of UTF-8 text are the text they spell, as before.
    r = await http.get("/v1/models/caf%C3%A9", headers=bearer(key))
    assert _error(r, 404)["code"] == "not_found"
    assert "café" in r.json()["error"]["message"]
    r = await http.get("/v1/users/me/memories?tags=caf%C3%A9", headers=bearer(key))
    assert r.status_code == 200 and r.json()["items"] == [], r.text


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


async def _client_error(call: Callable[[], Awaitable[Any]]) -> InvalidInput:
    try:
        await call()
    except InvalidInput as exc:
        return exc
    raise AssertionError("no InvalidInput")


async def test_a_lone_surrogate_is_named_by_the_client_and_graphql_as_by_rest(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    """A lone UTF-16 surrogate anywhere in a body was the client's own InvalidInput on field
    ``body`` (GraphQL calls the API through the client), where REST names the field (a raw
    JSON body carries the surrogate as its escape). The client sends it as that escape now:
    the server's 422, on the same field, with its request id."""
    _, key = await _user_with_key(http, admin_key)
    h = {**bearer(key), "content-type": "application/json"}
    raw: list[tuple[str, dict[str, Any], Callable[[AsyncHalldyllClient], Awaitable[Any]]]] = [
        ("search", {"query": "a\ud800"}, lambda c: c.search("a\ud800")),
        ("search", {"query": "x", "tags": ["\udfff"]}, lambda c: c.search("x", tags=["\udfff"])),
        (
            "memories",
            {**_FACT, "statement": "x\udc97"},
            lambda c: c.store_memory({**_FACT, "statement": "x\udc97"}),
        ),
        (
            "memories",
            {**_FACT, "metadata": {"\ud800": 1}},
            lambda c: c.store_memory({**_FACT, "metadata": {"\ud800": 1}}),
        ),
        ("context", {"query": "\ud800"}, lambda c: c.build_context("\ud800")),
        # Nesting that JSON carries but pydantic's conversion in the client refused ("body").
        (
            "memories",
            {**_FACT, "metadata": _nested(300)},
            lambda c: c.store_memory({**_FACT, "metadata": _nested(300)}),
        ),
    ]
    async with AsyncHalldyllClient(ray_serve["url"], key, timeout=60) as client:
        for route, body, call in raw:
            r = await http.post(f"/v1/users/me/{route}", content=json.dumps(body), headers=h)
            rest = _error(r, 422)
            exc = await _client_error(lambda call=call: call(client))
            assert exc.fields["field"] == rest["field"] != "body", (body, rest, exc.fields)
            assert exc.fields["status_code"] == 422 and exc.fields["request_id"], exc.fields
            assert exc.message == rest["message"], (exc.message, rest)
    query = "query($q: String!) { search(query: $q) { score } }"
    r = await http.post(
        "/graphql",
        content=json.dumps({"query": query, "variables": {"q": "a\ud800"}}),
        headers=h,
    )
    assert r.status_code == 200, r.text
    (error,) = r.json()["errors"]
    assert error["extensions"]["field"] == "query", error
    assert error["extensions"]["status_code"] == 422, error
    assert await _stored(http, key) == []


async def test_the_client_sends_a_value_as_given_not_as_its_field_type_writes_it(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    """The client wrote each option through its field's type: ``limit=True`` went as ``1``
    and ``threshold=True`` as ``1.0``, answered as if given, where REST's raw ``true`` (and
    MCP's argument) is a 422 on the field. The value goes as given now: the same 422."""
    _, key = await _user_with_key(http, admin_key)
    h = {**bearer(key), "content-type": "application/json"}
    r = await http.post("/v1/users/me/memories", json=_FACT, headers=bearer(key))
    assert r.status_code == 201, r.text
    before = await _stored(http, key)
    raw: list[tuple[str, dict[str, Any], Callable[[AsyncHalldyllClient], Awaitable[Any]]]] = [
        ("search", {"query": "tea", "limit": True}, lambda c: c.search("tea", limit=True)),
        ("search", {"query": "tea", "threshold": True}, lambda c: c.search("tea", threshold=True)),
        ("search", {"query": "tea", "limit": 2.0}, lambda c: c.search("tea", limit=2.0)),
        (
            "context",
            {"query": "tea", "max_tokens": True},
            lambda c: c.build_context("tea", max_tokens=True),
        ),
    ]
    async with AsyncHalldyllClient(ray_serve["url"], key, timeout=60) as client:
        for route, body, call in raw:
            rest = _error(await http.post(f"/v1/users/me/{route}", json=body, headers=h), 422)
            exc = await _client_error(lambda call=call: call(client))
            assert exc.fields["field"] == rest["field"], (body, rest, exc.fields)
            assert exc.fields["status_code"] == 422, exc.fields
    assert await _stored(http, key) == before


async def test_graphql_names_a_bad_argument_as_rest_names_the_field(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """An argument GraphQL's own checks refuse (a value of the wrong type, not of its enum,
    unknown, required and missing, in the document or in a variable) was a GraphQL error
    without ``code``, ``status_code`` or ``field``, where REST answers 422 on the field and
    the API's own checks of the same argument (``limit: 0``) carry all three here too."""
    _, key = await _user_with_key(http, admin_key)
    h = {**bearer(key), "content-type": "application/json"}
    cases: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
        ({"query": "x", "limit": "5"}, 'search(query: "x", limit: "5")', {}),
        ({"query": "x", "mode": "bogus"}, 'search(query: "x", mode: BOGUS)', {}),
        (
            {"query": "x", "types": ["fact", "bogus"]},
            'search(query: "x", types: [FACT, BOGUS])',
            {},
        ),
        ({"query": "x", "bogus": 1}, 'search(query: "x", bogus: 1)', {}),
        ({"limit": 5}, "search(limit: 5)", {}),
        ({"query": "x", "limit": "5"}, 'search(query: "x", limit: $v)', {"v": "5", "t": "Int"}),
        (
            {"query": "x", "include_shared": "maybe"},
            'search(query: "x", includeShared: $v)',
            {"v": "maybe", "t": "Boolean"},
        ),
    ]
    for body, call, variable in cases:
        rest = _error(await http.post("/v1/users/me/search", json=body, headers=h), 422)
        head = f"query($v: {variable['t']})" if variable else "query"
        sent = {"query": f"{head} {{ {call} {{ score }} }}"}
        if variable:
            sent["variables"] = {"v": variable["v"]}
        r = await http.post("/graphql", json=sent, headers=h)
        (error,) = r.json()["errors"]
        extensions = error.get("extensions") or {}
        assert extensions.get("code") == rest["code"] == "invalid_input", (call, error)
        assert extensions.get("status_code") == 422, (call, error)
        assert extensions.get("field") == rest["field"], (call, error, rest)
    # Not about an argument: a malformed request's status, without a field.
    for document in ('{ search(query: "x") { nope } }', '{ search(query: "x" { score } }'):
        r = await http.post("/graphql", json={"query": document}, headers=h)
        (error,) = r.json()["errors"]
        assert error["extensions"] == {"code": "invalid_input", "status_code": 400}, error
