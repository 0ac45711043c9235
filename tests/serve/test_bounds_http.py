"""Boundaries of numbers and pages over HTTP: a query's numbers and flags are read as the
other surfaces read them, and a cursor pages only the list that returned it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from support import bearer
from support import user_with_key as _user_with_key


async def _gql(http: httpx.AsyncClient, key: str, query: str, **variables: Any) -> Any:
    r = await http.post(
        "/graphql", json={"query": query, "variables": variables}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize(
    ("method", "path", "query", "field"),
    [
        ("GET", "/v1/users", "limit=10.0", "limit"),
        ("GET", "/v1/users/me/memories", "limit=1_0", "limit"),
        ("GET", "/v1/users/me/memories", "limit=%2B5", "limit"),
        ("GET", "/v1/users/me/memories", "limit=%205", "limit"),
        ("GET", "/v1/users/me/memories", "include_shared=1", "include_shared"),
        ("GET", "/v1/users/me/memories", "include_shared=no", "include_shared"),
        ("GET", "/v1/users/me/jobs", "limit=5.0", "limit"),
        ("GET", "/v1/audit", "before_id=5.0", "before_id"),
        ("GET", "/v1/audit", "limit=1e2", "limit"),
        ("POST", "/v1/users/me/import", "atomic=1", "atomic"),
    ],
)
async def test_a_query_number_or_flag_is_written_as_json_writes_it(
    http: httpx.AsyncClient, admin_key: str, method: str, path: str, query: str, field: str
) -> None:
    """``?limit=10.0``, ``1_0`` or ``+5`` was 10 or 5, and ``?include_shared=no`` false
    (pydantic's lax reading of text), where the same value is refused as a body's number, a
    Python argument or a GraphQL argument: a 422 naming the parameter."""
    _, key = await _user_with_key(http, admin_key)
    content = None
    if method == "POST":  # an import: a real export file of another user
        _, other = await _user_with_key(http, admin_key)
        r = await http.post(
            "/v1/users/me/memories",
            json={"type": "fact", "statement": "imported"},
            headers=bearer(other),
        )
        assert r.status_code == 201, r.text
        content = (await http.get("/v1/users/me/export", headers=bearer(other))).content
    caller = admin_key if path in ("/v1/users", "/v1/audit") else key
    r = await http.request(method, f"{path}?{query}", content=content, headers=bearer(caller))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_input" and error["field"] == field, error
    listed = await http.get("/v1/users/me/memories", headers=bearer(key))
    assert listed.status_code == 200 and listed.json()["items"] == [], listed.text


async def test_query_numbers_and_flags_in_their_own_form_still_read(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    _, key = await _user_with_key(http, admin_key)
    for query in ("limit=10&include_shared=false", "limit=500&include_shared=true"):
        r = await http.get(f"/v1/users/me/memories?{query}", headers=bearer(key))
        assert r.status_code == 200, r.text
    for query in ("limit=0", "limit=-1", "limit=501", f"limit={2**64}"):
        r = await http.get(f"/v1/users/me/memories?{query}", headers=bearer(key))
        assert r.status_code == 422 and r.json()["error"]["field"] == "limit", r.text


async def test_a_cursor_pages_only_its_own_list_over_rest_and_graphql(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """Another user's cursor, the users list's cursor or one with a character added was
    taken as a position in this list (200, paged from wherever its time fell): a 422 on
    ``cursor``, and GraphQL's invalid_input on ``cursor``."""
    _, ada = await _user_with_key(http, admin_key)
    _, bob = await _user_with_key(http, admin_key)
    cursors = {}
    for name, key in (("ada", ada), ("bob", bob)):
        for i in range(3):
            r = await http.post(
                "/v1/users/me/memories",
                json={"type": "fact", "statement": f"{name} fact {i}"},
                headers=bearer(key),
            )
            assert r.status_code == 201, r.text
        r = await http.get("/v1/users/me/memories?limit=1", headers=bearer(key))
        cursors[name] = r.json()["next_cursor"]
    r = await http.get("/v1/users?limit=1", headers=bearer(admin_key))
    users_cursor = r.json()["next_cursor"]
    assert cursors["ada"] and cursors["bob"] and users_cursor
    for cursor in (cursors["bob"], users_cursor, cursors["ada"] + "!", " " + cursors["ada"]):
        r = await http.get("/v1/users/me/memories", params={"cursor": cursor}, headers=bearer(ada))
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "cursor", r.text
        answer = await _gql(
            http,
            ada,
            "query($c: String) { memories(limit: 1, cursor: $c) { items { id } } }",
            c=cursor,
        )
        error = answer["errors"][0]["extensions"]
        assert error["code"] == "invalid_input" and error["field"] == "cursor", answer
    r = await http.get(
        "/v1/users?limit=1", params={"cursor": cursors["ada"]}, headers=bearer(admin_key)
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "cursor", r.text
    own = await http.get(
        "/v1/users/me/memories", params={"cursor": cursors["ada"]}, headers=bearer(ada)
    )
    assert own.status_code == 200 and len(own.json()["items"]) == 2, own.text
