"""A repeated search answered by the Ingress from the result cache: same bytes as Search's
answer, the same permission checks and audit, and never stale after a write."""

from __future__ import annotations

import json

import httpx
from support import bearer, user_with_key

from halldyll_ray.client.requests import _params


async def _search_audits(http: httpx.AsyncClient, admin_key: str, user_id: str) -> int:
    rows = (
        await http.get(
            f"/v1/audit?user_id={user_id}&operation=memory.search&limit=1000",
            headers=bearer(admin_key),
        )
    ).json()["items"]
    return len(rows)


async def test_a_cached_search_is_checked_audited_and_fresh(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    owner, owner_key = await user_with_key(http, admin_key)
    _, other_key = await user_with_key(http, admin_key)
    path = f"/v1/users/{owner['id']}/search"
    query = {"query": "which instrument does Ada play", "mode": "hybrid", "limit": 5}
    stored = await http.post(
        "/v1/users/me/memories",
        headers=bearer(owner_key),
        json={"type": "fact", "statement": "Ada plays the cello in an orchestra"},
    )
    assert stored.status_code == 201, stored.text

    first = await http.post(path, headers=bearer(owner_key), json=query)
    again = await http.post(path, headers=bearer(owner_key), json=query)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content  # the cached answer, byte for byte
    assert [r["memory"]["id"] for r in again.json()["results"]] == [stored.json()["id"]]

    # Cached for the owner, still refused to another user, and the refusal is audited.
    denied = await http.post(path, headers=bearer(other_key), json=query)
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "permission_denied"
    assert "cello" not in denied.text

    # The Admin's read of the owner's cached answer is audited once per search.
    before = await _search_audits(http, admin_key, owner["id"])
    for _ in range(2):
        read = await http.post(path, headers=bearer(admin_key), json=query)
        assert read.content == first.content
    assert await _search_audits(http, admin_key, owner["id"]) == before + 2
    # The owner's own searches are not audited as reads of another's data.
    await http.post(path, headers=bearer(owner_key), json=query)
    assert await _search_audits(http, admin_key, owner["id"]) == before + 2

    # A write makes the cached answer unreachable: the next search sees the new memory.
    newer = await http.post(
        "/v1/users/me/memories",
        headers=bearer(owner_key),
        json={"type": "fact", "statement": "Ada also plays the piano at home"},
    )
    assert newer.status_code == 201
    after = await http.post(path, headers=bearer(owner_key), json=query)
    ids = {r["memory"]["id"] for r in after.json()["results"]}
    assert newer.json()["id"] in ids and stored.json()["id"] in ids

    # Bad input is refused the same way whether or not an answer is cached.
    bad = await http.post(path, headers=bearer(owner_key), json={**query, "mode": "psychic"})
    assert bad.status_code == 422


async def test_swapped_time_window_is_a_422_on_every_read_path(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """since after until: 422 on ``until`` from the search (a miss, and again, when the Ingress
    would answer from the result cache) and from the listing, as from the engine; an empty
    answer said nothing was wrong."""
    owner, owner_key = await user_with_key(http, admin_key)
    stored = await http.post(
        "/v1/users/me/memories",
        headers=bearer(owner_key),
        json={"type": "fact", "statement": "Ada rides a red bike"},
    )
    assert stored.status_code == 201, stored.text
    window = {"since": "2025-01-02T00:00:00Z", "until": "2025-01-01T23:00:00-00:30"}
    path = f"/v1/users/{owner['id']}/search"
    for _ in range(2):
        refused = await http.post(
            path, headers=bearer(owner_key), json={"query": "bike", "mode": "fulltext", **window}
        )
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["field"] == "until"
    listed = await http.get(
        f"/v1/users/{owner['id']}/memories", headers=bearer(owner_key), params=window
    )
    assert listed.status_code == 422, listed.text
    assert listed.json()["error"]["field"] == "until"
    # the same window the right way round is fine, and finds nothing of today
    found = await http.post(
        path,
        headers=bearer(owner_key),
        json={
            "query": "bike",
            "mode": "fulltext",
            "since": window["until"],
            "until": window["since"],
        },
    )
    assert found.status_code == 200 and found.json()["results"] == []


async def test_an_empty_list_filter_is_no_filter_on_every_surface(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """``tags=[]``/``types=[]``: every memory, from the listing as from the search body and the
    engine. The client (and GraphQL, MCP through it) sends an empty list as ``tags=``, which
    the listing read as the one tag "" and refused with 422."""
    owner, owner_key = await user_with_key(http, admin_key)
    stored = await http.post(
        "/v1/users/me/memories",
        headers=bearer(owner_key),
        json={"type": "fact", "statement": "Ada rides a red bike", "tags": ["pets"]},
    )
    assert stored.status_code == 201, stored.text
    params = _params({"tags": [], "types": [], "limit": 10})  # as the client sends them
    assert params["tags"] == params["types"] == ""
    listed = await http.get(
        f"/v1/users/{owner['id']}/memories", headers=bearer(owner_key), params=params
    )
    assert listed.status_code == 200, listed.text
    assert [m["id"] for m in listed.json()["items"]] == [stored.json()["id"]]
    searched = await http.post(
        f"/v1/users/{owner['id']}/search",
        headers=bearer(owner_key),
        json={"query": "bike", "mode": "fulltext", "tags": [], "types": []},
    )
    assert [r["memory"]["id"] for r in searched.json()["results"]] == [stored.json()["id"]]


async def test_a_bad_query_parameter_is_named_as_every_surface_names_it(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """GET ...?limit=0 answered 422 on ``query.limit``: the engine, MCP, and the search body
    name the field ``limit`` (and ``since``, ``include_shared``)."""
    owner, owner_key = await user_with_key(http, admin_key)
    path = f"/v1/users/{owner['id']}/memories"
    for params, field in (
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"include_shared": "perhaps"}, "include_shared"),
    ):
        refused = await http.get(path, headers=bearer(owner_key), params=params)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["field"] == field, refused.text
    searched = await http.post(
        f"/v1/users/{owner['id']}/search",
        headers=bearer(owner_key),
        json={"query": "x", "limit": 0},
    )
    assert searched.status_code == 422 and searched.json()["error"]["field"] == "limit"


async def _search_requests(http: httpx.AsyncClient, admin_key: str) -> int:
    """The search requests the Ingress replica counted (``GET /v1/stats``, one replica)."""
    stats = (await http.get("/v1/stats", headers=bearer(admin_key))).json()
    route = ("POST", "/v1/users/{user_id}/search")
    return sum(r["requests"] for r in stats["routes"] if (r["method"], r["route"]) == route)


async def test_a_cached_search_answers_every_request_as_the_route_does(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """The Ingress answers a cached search before FastAPI's routing (serve/http.py
    ``FastLane``): whatever the request, the answer is the route's. Each request below is
    sent once the answer to its query is cached."""
    owner, owner_key = await user_with_key(http, admin_key)
    stored = await http.post(
        "/v1/users/me/memories",
        headers=bearer(owner_key),
        json={"type": "fact", "statement": "Ada keeps bees on the roof"},
    )
    assert stored.status_code == 201, stored.text
    path = f"/v1/users/{owner['id']}/search"
    query = {"query": "where are the bees", "mode": "fulltext"}
    first = await http.post(path, headers=bearer(owner_key), json=query)
    assert first.status_code == 200 and first.json()["results"], first.text
    body = json.dumps(query).encode()

    async def post(url: str = path, content: bytes = body, **headers: str) -> httpx.Response:
        headers.setdefault("Content-Type", "application/json")
        return await http.post(url, content=content, headers=headers)

    auth = bearer(owner_key)["Authorization"]
    counted = await _search_requests(http, admin_key)
    # Answered from the cache: the same bytes, through the ways a client may spell it.
    for same in (
        await post(Authorization=auth),
        await post(Authorization=auth, **{"Content-Type": "Application/JSON; charset=utf-8"}),
        await post(Authorization=auth, **{"Content-Type": "application/vnd.api+json"}),
        await post(Authorization="bearer  " + owner_key),
        await post(f"/v1/users/{owner['id'].upper()}/search", Authorization=auth),
        await post("/v1/users/me/search", Authorization=auth),
    ):
        assert same.status_code == 200, same.text
        assert same.content == first.content
    # The replica's metrics count them under the route, as the answers of the route.
    assert await _search_requests(http, admin_key) == counted + 6
    # A query string goes to the route, which takes none: the route's 422, not the cache's
    # answer (the lane declines any query string).
    unknown = await post(path + "?unused=1", Authorization=auth)
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "unused"

    # Credentials: 401 with the challenge, whatever the body.
    _, _, secret = owner_key.rpartition("_")
    wrong = owner_key[: -len(secret)] + ("A" if secret[0] != "A" else "B") + secret[1:]
    for refused in (
        await post(Authorization="Bearer " + wrong),
        await post(Authorization="Bearer not-a-key"),
        await post(Authorization="Basic " + owner_key),
        await post(Authorization="Bearer"),
        await post(),
        await post(content=b"[]", Authorization="Bearer " + wrong),
    ):
        assert refused.status_code == 401, refused.text
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert refused.json()["error"]["code"] == "unauthenticated"
        assert refused.json()["error"]["request_id"] == refused.headers["X-Request-ID"]

    # Input: 422 naming what is wrong, as for a search that is not cached.
    for content, content_type, field in (
        (b"[]", "application/json", None),
        (body.replace(b'"fulltext"', b'"psychic"'), "application/json", "mode"),
        (body[:-1] + b', "limit": NaN}', "application/json", None),
        (body[:-1] + b', "limit": 0}', "application/json", "limit"),
        (body, "text/plain", None),
        (body, "", "body"),  # no Content-Type: not JSON to FastAPI (strict_content_type)
        (b"", "application/json", None),
    ):
        headers = {"Content-Type": content_type} if content_type else {}
        bad = await http.post(path, content=content, headers={"Authorization": auth, **headers})
        assert bad.status_code == 422, (content, bad.text)
        assert bad.json()["error"]["code"] == "invalid_input"
        if field is not None:
            assert bad.json()["error"]["field"] == field

    # Another user's cached answer: 403 without a word of it; a revoked key: 401.
    other, other_key = await user_with_key(http, admin_key)
    denied = await post(Authorization=bearer(other_key)["Authorization"])
    assert denied.status_code == 403 and "bees" not in denied.text
    keys = await http.get(f"/v1/users/{other['id']}/keys", headers=bearer(admin_key))
    for key in keys.json()["items"]:
        await http.delete(f"/v1/keys/{key['id']}", headers=bearer(admin_key))
    revoked = await post(Authorization=bearer(other_key)["Authorization"])
    assert revoked.status_code == 401


async def test_a_search_miss_answers_as_the_route_does(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """A search whose answer is not cached is sent to Search by the fast lane itself
    (``Ingress._search_lane``), not after FastAPI's request cycle: its answer, its errors and
    what it leaves in the result cache are the route's. The route still answers a request
    the lane leaves to it (here: a Content-Type other than ``application/json``)."""
    owner, owner_key = await user_with_key(http, admin_key)
    auth = bearer(owner_key)
    for statement in ("Ada keeps bees on the roof", "Ada sells the honey at the market"):
        stored = await http.post(
            "/v1/users/me/memories", headers=auth, json={"type": "fact", "statement": statement}
        )
        assert stored.status_code == 201, stored.text
    path = f"/v1/users/{owner['id']}/search"
    body = json.dumps({"query": "what does Ada do with the honey", "mode": "hybrid"}).encode()

    async def forget_cached_answers() -> None:
        # A write changes the user's data version, so no cached answer is reachable; the
        # deletion leaves the memories as they were.
        extra = await http.post(
            "/v1/users/me/memories", headers=auth, json={"type": "fact", "statement": "x y z"}
        )
        gone = await http.delete(f"/v1/users/me/memories/{extra.json()['id']}", headers=auth)
        assert gone.status_code == 204, gone.text

    route = await http.post(
        path, content=body, headers={**auth, "Content-Type": "application/vnd.api+json"}
    )
    assert route.status_code == 200 and len(route.json()["results"]) == 2, route.text
    await forget_cached_answers()
    lane = await http.post(path, content=body, headers={**auth, "Content-Type": "application/json"})
    assert lane.status_code == 200
    assert lane.content == route.content
    # The lane kept Search's answer: the next request is a hit, byte for byte the same.
    again = await http.post(
        path, content=body, headers={**auth, "Content-Type": "application/json"}
    )
    assert again.content == lane.content

    # A search of a user who does not exist (an Admin's): the route's 404 either way.
    nobody = "/v1/users/00000000-0000-4000-8000-000000000000/search"
    answers = [
        await http.post(
            nobody, content=body, headers={**bearer(admin_key), "Content-Type": content_type}
        )
        for content_type in ("application/json", "application/vnd.api+json")
    ]
    assert [a.status_code for a in answers] == [404, 404], [a.text for a in answers]
    assert answers[0].json()["error"]["code"] == answers[1].json()["error"]["code"]
