"""GraphQL at /graphql against the running app (issue 12 §2): queries and mutations through
the REST routes (same permissions, errors and audit), the limits, and subscriptions to the
change feed over WebSocket through HAProxy."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from support import bearer, user_with_key
from support import graphql as _gql
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

GQL = "/graphql"


async def test_queries_and_mutations_go_through_the_rest_rules(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    user, key = await user_with_key(http, admin_key)
    other, other_key = await user_with_key(http, admin_key)
    stored = await _gql(
        http,
        key,
        "mutation($m: JSON!) { storeMemory(memory: $m) { id type text tags } }",
        m={"type": "fact", "statement": "Hana climbs on Thursdays", "tags": ["sport"]},
    )
    memory = stored["data"]["storeMemory"]
    assert memory["type"] == "FACT" and memory["text"] == "Hana climbs on Thursdays"
    talk = (
        await _gql(
            http,
            key,
            "mutation($m: JSON!) { storeMemory(memory: $m) { id } }",
            m={"type": "conversation", "title": "Gym", "messages": []},
        )
    )["data"]["storeMemory"]["id"]
    appended = await _gql(
        http,
        key,
        "mutation($id: ID!, $ms: JSON!) { appendMessages(id: $id, messages: $ms) { seq content } }",
        id=talk,
        ms=[{"role": "user", "content": "Bouldering tonight?", "name": "Hana"}],
    )
    assert appended["data"]["appendMessages"] == [{"seq": 0, "content": "Bouldering tonight?"}]

    read = await _gql(
        http,
        key,
        """query($q: String!) {
             me { id username role }
             memories(types: [FACT], limit: 5) { items { id text } nextCursor }
             search(query: $q, limit: 3) { score source matched { part text } memory { id } }
             context(query: $q, maxTokens: 200) { text tokenCount sources }
           }""",
        q="when does Hana climb?",
    )
    data = read["data"]
    assert data["me"] == {"id": user["id"], "username": user["username"], "role": "user"}
    assert data["memories"]["items"] == [{"id": memory["id"], "text": memory["text"]}]
    assert data["search"][0]["memory"]["id"] == memory["id"]
    assert memory["id"] in data["context"]["sources"]

    updated = await _gql(
        http,
        key,
        'mutation($id: ID!) { updateMemory(id: $id, update: {tags: ["climbing"]}) { tags } }',
        id=memory["id"],
    )
    assert updated["data"]["updateMemory"]["tags"] == ["climbing"]

    # A summary resolves the memories it covers (the one recursive field).
    summary = await _gql(
        http,
        key,
        "mutation($m: JSON!) { storeMemory(memory: $m) { covers { id text } } }",
        m={"type": "summary", "text": "Hana's week", "covers": [memory["id"], talk]},
    )
    covered = summary["data"]["storeMemory"]["covers"]
    assert {c["id"] for c in covered} == {memory["id"], talk}

    # A bad value: the REST validation's message and field, as a GraphQL error.
    bad = await _gql(
        http,
        key,
        "mutation($m: JSON!) { storeMemory(memory: $m) { id } }",
        m={"type": "fact", "statement": "x", "confidence": 7},
    )
    assert bad["data"] is None
    assert bad["errors"][0]["extensions"]["code"] == "invalid_input"
    assert bad["errors"][0]["extensions"]["field"] == "fact.confidence"
    assert bad["errors"][0]["extensions"]["status_code"] == 422

    # Another user's memories: 403 as REST answers it, audited with this request's id.
    denied = await http.post(
        GQL,
        json={"query": f'{{ memories(userId: "{other["id"]}") {{ items {{ id }} }} }}'},
        headers={**bearer(key), "X-Request-ID": "gql-denied-1"},
    )
    error = denied.json()["errors"][0]
    assert error["extensions"]["code"] == "permission_denied"
    assert error["extensions"]["status_code"] == 403
    audit = await http.get(
        "/v1/audit", params={"outcome": "denied", "limit": 20}, headers=bearer(admin_key)
    )
    assert any(row["request_id"] == "gql-denied-1" for row in audit.json()["items"])

    deleted = await _gql(http, key, "mutation($id: ID!) { deleteMemory(id: $id) }", id=memory["id"])
    assert deleted["data"] == {"deleteMemory": True}
    gone = await _gql(http, key, "query($id: ID!) { memory(id: $id) { id } }", id=memory["id"])
    assert gone["errors"][0]["extensions"]["code"] == "not_found"
    assert other_key  # the other user exists and was never reached


async def test_without_a_valid_key_graphql_answers_401_like_rest(
    http: httpx.AsyncClient,
) -> None:
    for headers in ({}, bearer("hk_not-a-real-key"), {"Authorization": "Basic abc"}):
        response = await http.post(GQL, json={"query": "{ me { id } }"}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthenticated"
        assert response.headers["www-authenticate"] == "Bearer"
    assert (await http.get(GQL)).status_code in (401, 405)  # no IDE, no GET queries


async def test_a_document_of_several_operations_runs_only_the_one_it_names(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """The spec's GetOperation: several operations and no operationName is an error, and
    nothing runs (strawberry ran the first one, here a mutation)."""
    _, key = await user_with_key(http, admin_key)
    document = (
        "mutation Store($m: JSON!) { storeMemory(memory: $m) { id } } query Who { me { id } }"
    )
    fact = {"type": "fact", "statement": "Noor plays the oud"}
    for name in (None, "Nobody"):
        response = await http.post(
            GQL,
            json={"query": document, "variables": {"m": fact}, "operationName": name},
            headers=bearer(key),
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_input" and error["request_id"], error
        assert ("operationName" if name is None else name) in error["message"]
    listed = await http.get("/v1/users/me/memories", headers=bearer(key))
    assert listed.json()["items"] == []  # the mutation did not run
    named = await http.post(
        GQL,
        json={"query": document, "variables": {"m": fact}, "operationName": "Store"},
        headers=bearer(key),
    )
    assert named.status_code == 200 and named.json()["data"]["storeMemory"]["id"], named.text
    listed = await http.get("/v1/users/me/memories", headers=bearer(key))
    assert [m["id"] for m in listed.json()["items"]] == [named.json()["data"]["storeMemory"]["id"]]


async def test_a_subscription_over_post_is_sent_to_the_websocket(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    _, key = await user_with_key(http, admin_key)
    document = "subscription { memoryEvents { ... on MemoryEvent { id } } }"
    response = await http.post(GQL, json={"query": document}, headers=bearer(key))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input" and "WebSocket" in error["message"], error


async def _ws(
    url: str, headers: dict[str, str] | None = None, subprotocol: str = "graphql-transport-ws"
) -> Any:
    ws_url = url.replace("http://", "ws://") + GQL
    return connect(ws_url, subprotocols=[subprotocol], additional_headers=headers or {})  # type: ignore[list-item]


async def test_subscriptions_follow_the_change_feed_over_websocket(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    user, key = await user_with_key(http, admin_key)
    other, _ = await user_with_key(http, admin_key)
    subscribe = {
        "id": "1",
        "type": "subscribe",
        "payload": {
            "query": "subscription { memoryEvents { "
            "... on MemoryEvent { id kind memoryId memoryType } } }"
        },
    }
    # The key in connection_init, as a browser client sends it.
    async with await _ws(ray_serve["url"]) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": bearer(key)}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        await ws.send(json.dumps(subscribe))
        await asyncio.sleep(1.0)  # the subscription is open before the write
        r = await http.post(
            "/v1/users/me/memories",
            json={"type": "fact", "statement": "Ines keeps chickens"},
            headers=bearer(key),
        )
        assert r.status_code == 201
        message = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert message["type"] == "next", message
        assert message["payload"].get("data"), message
        event = message["payload"]["data"]["memoryEvents"]
        assert event["kind"] == "CREATED" and event["memoryId"] == r.json()["id"]
        assert event["memoryType"] == "FACT"
        first_id = event["id"]

    # The key in the handshake's header; resuming after an event loses nothing in between.
    r = await http.post(
        "/v1/users/me/memories",
        json={"type": "fact", "statement": "Ines sells eggs"},
        headers=bearer(key),
    )
    async with await _ws(ray_serve["url"], bearer(key)) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {}}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        resume = json.loads(json.dumps(subscribe))
        resume["payload"]["query"] = resume["payload"]["query"].replace(
            "memoryEvents {", f'memoryEvents(after: "{first_id}") {{'
        )
        await ws.send(json.dumps(resume))
        message = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert message["payload"]["data"]["memoryEvents"]["memoryId"] == r.json()["id"]

        # Another user's feed: refused as REST refuses it.
        denied = json.loads(json.dumps(subscribe))
        denied["id"] = "2"
        denied["payload"]["query"] = denied["payload"]["query"].replace(
            "memoryEvents {", f'memoryEvents(userId: "{other["id"]}") {{'
        )
        await ws.send(json.dumps(denied))
        message = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert message["id"] == "2"
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == "permission_denied"
    assert user["id"] != other["id"]

    # No key, or a bad one: the socket is closed with 4403 before any subscription, over
    # the legacy graphql-ws subprotocol too (after its connection_error message).
    for subprotocol in ("graphql-transport-ws", "graphql-ws"):
        for payload in ({}, bearer("hk_not-a-real-key")):
            async with await _ws(ray_serve["url"], subprotocol=subprotocol) as ws:
                await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                        assert message["type"] == "connection_error", message
                assert closed.value.rcvd is not None, subprotocol
                assert closed.value.rcvd.code == 4403, (subprotocol, closed.value.rcvd)
        async with await _ws(ray_serve["url"], subprotocol=subprotocol) as ws:
            await ws.send(json.dumps({"type": "connection_init", "payload": bearer(key)}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "connection_ack"


async def test_a_websocket_with_two_authorization_headers_is_refused(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    """The handshake's first of two Authorization headers was the caller (the HTTP
    middleware, which refuses them on requests, does not see WebSockets): now neither,
    even with a key in connection_init."""
    _, key = await user_with_key(http, admin_key)
    ws_url = ray_serve["url"].replace("http://", "ws://") + GQL
    headers = [("Authorization", f"Bearer {key}"), ("Authorization", f"Bearer {admin_key}")]
    async with connect(
        ws_url,
        subprotocols=["graphql-transport-ws"],
        additional_headers=headers,  # type: ignore[list-item]
    ) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": bearer(key)}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert message["type"] == "connection_error", message
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403


async def test_nested_covers_are_bounded_per_request(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """Nested covers multiply (50 a summary, 7 levels, 10 aliases): one query read memories
    for seconds and slowed every other user. A request reads at most MAX_COVER_READS covered
    memories, each once."""
    from halldyll_ray.serve.graphql_api import MAX_COVER_READS, MAX_COVERS

    _, key = await user_with_key(http, admin_key)
    groups = MAX_COVER_READS // MAX_COVERS + 1  # one more group of facts than the reads allow
    facts = [{"type": "fact", "statement": f"fact number {n} of many"} for n in range(groups * 50)]
    stored = await http.post(
        "/v1/users/me/memories/batch", json={"memories": facts}, headers=bearer(key)
    )
    assert stored.status_code == 201, stored.text
    ids = [m["id"] for m in stored.json()["memories"]]
    middle = []
    for g in range(groups):
        part = {"type": "summary", "text": f"group {g}", "covers": ids[g * 50 : (g + 1) * 50]}
        made = await http.post("/v1/users/me/memories", json=part, headers=bearer(key))
        middle.append(made.json()["id"])
    top = await http.post(
        "/v1/users/me/memories",
        json={"type": "summary", "text": "all groups", "covers": middle},
        headers=bearer(key),
    )
    top_id = top.json()["id"]
    one = await _gql(http, key, "query($id: ID!) { memory(id: $id) { covers { id } } }", id=top_id)
    assert len(one["data"]["memory"]["covers"]) == groups
    # The same summaries asked for twice (aliases) are read once: still within the bound.
    twice = await _gql(
        http,
        key,
        "query($id: ID!) { a: memory(id: $id) { covers { id } } "
        "b: memory(id: $id) { covers { id } } }",
        id=top_id,
    )
    assert "errors" not in twice, twice
    deep = await _gql(
        http, key, "query($id: ID!) { memory(id: $id) { covers { covers { id } } } }", id=top_id
    )
    assert deep["errors"][0]["extensions"]["code"] == "invalid_input", deep
    assert str(MAX_COVER_READS) in deep["errors"][0]["message"]


async def test_a_request_that_is_not_graphql_gets_the_api_error_shape(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    _, key = await user_with_key(http, admin_key)
    deep = (
        b'{"query": "mutation($m: JSON!) { storeMemory(memory: $m) { id } }", "variables": {"m": '
        + b'{"a": ' * 5000
        + b"1"
        + b"}" * 5002
    )
    for body in (b"{not json", b"{}", b'[{"query": "{ me { id } }"}]', deep):
        response = await http.post(
            GQL, content=body, headers={**bearer(key), "content-type": "application/json"}
        )
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_input" and error["message"] and error["request_id"]


async def test_every_refusal_carries_its_status_and_the_request_id(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """An id the client refuses before any route runs (empty, '.', holding a '/') came back
    with only code and field: no status_code nor request_id, which every other refusal
    (a malformed UUID the route refused, an unknown model) carries."""
    _, key = await user_with_key(http, admin_key)
    cases = (
        ('mutation { deleteMemory(id: "") }', "invalid_input", 422, "memory_id"),
        ('mutation { deleteMemory(id: "a/b") }', "invalid_input", 422, "memory_id"),
        ('{ memory(id: "..") { id } }', "invalid_input", 422, "memory_id"),
        ('{ job(id: "x", userId: "") { id } }', "invalid_input", 422, "user_id"),
        ('{ context(query: "tea", userId: "a/b") { text } }', "invalid_input", 422, "user_id"),
        # Refused by the route: these carried both already (and name the field alike).
        ('mutation { deleteMemory(id: "utf-8") }', "invalid_input", 422, "memory_id"),
        ('{ context(query: "tea", model: "nope") { text } }', "not_found", 404, None),
    )
    for query, code, status, field in cases:
        rid = f"gql-{uuid.uuid4().hex[:12]}"
        response = await http.post(
            GQL, json={"query": query}, headers={**bearer(key), "X-Request-ID": rid}
        )
        assert response.status_code == 200, response.text
        (error,) = response.json()["errors"]
        extensions = error["extensions"]
        assert extensions["code"] == code and extensions["status_code"] == status, (query, error)
        assert extensions.get("field") == field and extensions["request_id"] == rid, (query, error)


async def test_a_mutation_sends_its_json_argument_as_given(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """A mutation's JSON argument reaches REST as given: one message object is no list (it
    was wrapped in one and appended; REST refuses it), and a PATCH that is no object is
    refused as REST refuses it (it was wrapped in {"": ...}: "Extra inputs are not
    permitted"). Nothing changes."""
    _, key = await user_with_key(http, admin_key)
    talk = await _gql(
        http,
        key,
        "mutation($m: JSON!) { storeMemory(memory: $m) { id } }",
        m={"type": "conversation", "messages": [{"role": "user", "content": "hello"}]},
    )
    conversation = talk["data"]["storeMemory"]["id"]
    one = {"role": "user", "content": "one object, not a list"}
    rest = await http.post(
        f"/v1/users/me/memories/{conversation}/messages",
        json={"messages": one},
        headers=bearer(key),
    )
    assert rest.status_code == 422 and rest.json()["error"]["field"] == "messages", rest.text
    appended = await _gql(
        http,
        key,
        "mutation($id: ID!, $m: JSON!) { appendMessages(id: $id, messages: $m) { seq } }",
        id=conversation,
        m=one,
    )
    assert appended["data"] is None
    error = appended["errors"][0]
    assert error["extensions"]["status_code"] == 422, error
    assert error["extensions"]["field"] == "messages", error
    for update in ([1], "tags", 3):
        patched = await _gql(
            http,
            key,
            "mutation($id: ID!, $u: JSON!) { updateMemory(id: $id, update: $u) { id } }",
            id=conversation,
            u=update,
        )
        assert patched["data"] is None
        error = patched["errors"][0]
        assert error["extensions"]["field"] == "body", error
        assert "valid dictionary" in error["message"], error
    for memory in ("a fact", [{"type": "fact", "statement": "in a list"}]):
        stored = await _gql(
            http, key, "mutation($m: JSON!) { storeMemory(memory: $m) { id } }", m=memory
        )
        assert stored["data"] is None
        error = stored["errors"][0]
        assert error["extensions"]["field"] == "body", error
    r = await http.get(f"/v1/users/me/memories/{conversation}", headers=bearer(key))
    assert [m["content"] for m in r.json()["messages"]] == ["hello"]
    r = await http.get("/v1/users/me/memories", headers=bearer(key))
    assert [m["id"] for m in r.json()["items"]] == [conversation]


async def test_fragments_that_multiply_are_refused_without_holding_the_replica(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """196 tokens of fragments, each spreading the next twice, 20 deep: the depth and alias
    limits walked 2**20 spreads, 12.8 s of the Ingress's event loop. Refused at once, by the
    document's size with its fragments written out (MAX_SELECTIONS)."""
    _, key = await user_with_key(http, admin_key)
    lines = ["query Q { me { id ...F0 } }"]
    lines += [f"fragment F{n} on User {{ id ...F{n + 1} ...F{n + 1} }}" for n in range(20)]
    lines.append("fragment F20 on User { id }")
    started = asyncio.get_running_loop().time()
    answer = await http.post(GQL, json={"query": "\n".join(lines)}, headers=bearer(key))
    elapsed = asyncio.get_running_loop().time() - started
    body = answer.json()
    assert "data" not in body or body["data"] is None, body
    assert body["errors"][0]["extensions"]["code"] == "invalid_input", body
    assert "fragments written out" in body["errors"][0]["message"]
    assert elapsed < 5, elapsed
