"""Bulk store over HTTP (issue #17 §2): ``POST /v1/users/{user_id}/memories/batch`` through
the Ingress, the Ingestion deployment and the Embedding deployment; all or nothing; the
Python clients and the handle API."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from support import bearer
from support import user_with_key as _user_with_key

from halldyll_ray.client import AsyncHalldyllClient, HalldyllClient
from halldyll_ray.errors import InvalidInput, PermissionDenied
from halldyll_ray.models import Fact, Image, MemoryType, Message

BATCH = [
    {
        "type": "conversation",
        "title": "Sailing plans",
        "messages": [
            {"role": "user", "name": "Ada", "content": "I want to sail around Corsica in June."},
            {"role": "assistant", "content": "The mistral can be strong in early summer."},
        ],
    },
    {"type": "fact", "statement": "Ada is learning to play the oboe"},
    {"type": "image", "prompt": "a watercolor of a red sailboat in a storm", "seed": 3},
    {"type": "summary", "text": "Ada restores antique clocks on weekends."},
]


async def _count(http: httpx.AsyncClient, key: str, user: str = "me") -> int:
    r = await http.get(f"/v1/users/{user}/memories", headers=bearer(key), params={"limit": 500})
    assert r.status_code == 200, r.text
    return len(r.json()["items"])


async def test_a_batch_is_stored_in_order_through_the_embedding_deployment(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    from ray import serve

    _, key = await _user_with_key(http, admin_key)
    embedding = serve.get_deployment_handle("Embedding", app_name="halldyll")
    calls = len((await embedding.stats.remote())["batch_sizes"])
    r = await http.post(
        "/v1/users/me/memories/batch", headers=bearer(key), json={"memories": BATCH}
    )
    assert r.status_code == 201, r.text
    stored = r.json()["memories"]
    assert [m["type"] for m in stored] == ["conversation", "fact", "image", "summary"]
    assert stored[0]["message_count"] == 2
    assert stored[2]["memory"]["prompt"].startswith("a watercolor")
    # Six texts (a title, two messages, three others): one request to Embedding.
    assert len((await embedding.stats.remote())["batch_sizes"]) == calls + 1
    assert await _count(http, key) == 4
    for query, memory in [
        ("sailing around Corsica", stored[0]),
        ("oboe lessons", stored[1]),
        ("red sailboat painting", stored[2]),
        ("antique clock restoration", stored[3]),
    ]:
        hits = await http.post(
            "/v1/users/me/search", headers=bearer(key), json={"query": query, "limit": 3}
        )
        assert hits.json()["results"][0]["memory"]["id"] == memory["id"], query


async def test_a_bad_batch_is_refused_whole_and_names_the_item(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    _, key = await _user_with_key(http, admin_key)
    await http.post("/v1/users/me/memories", headers=bearer(key), json=BATCH[1])
    before = await _count(http, key)

    bad = [*BATCH, {"type": "fact", "statement": "x", "confidence": 3}]
    r = await http.post("/v1/users/me/memories/batch", headers=bearer(key), json={"memories": bad})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "memories.4.fact.confidence"

    unknown_model = [*BATCH, {"type": "fact", "statement": "y", "model": "no-such-model"}]
    r = await http.post(
        "/v1/users/me/memories/batch", headers=bearer(key), json={"memories": unknown_model}
    )
    assert r.status_code == 404, r.text
    assert r.json()["error"]["message"].startswith("memories.4: ")

    too_many = [{"type": "fact", "statement": f"fact {i}"} for i in range(501)]
    r = await http.post(
        "/v1/users/me/memories/batch", headers=bearer(key), json={"memories": too_many}
    )
    assert r.status_code == 422 and "STORE_BATCH_MAX" in r.json()["error"]["message"]
    for body in ({"memories": []}, {"memories": BATCH, "extra": 1}, BATCH):
        r = await http.post("/v1/users/me/memories/batch", headers=bearer(key), json=body)
        assert r.status_code == 422, body
    assert await _count(http, key) == before


async def test_another_users_batch_is_forbidden(http: httpx.AsyncClient, admin_key: str) -> None:
    ada, ada_key = await _user_with_key(http, admin_key)
    _, bea_key = await _user_with_key(http, admin_key)
    r = await http.post(
        f"/v1/users/{ada['id']}/memories/batch",
        headers=bearer(bea_key),
        json={"memories": BATCH},
    )
    assert r.status_code == 403, r.text
    assert await _count(http, ada_key) == 0
    assert await _count(http, bea_key) == 0
    # A Service stores for the user it names, as with single stores.
    _, svc_key = await _user_with_key(http, admin_key, role="service")
    r = await http.post(
        f"/v1/users/{ada['id']}/memories/batch",
        headers=bearer(svc_key),
        json={"memories": BATCH[1:3]},
    )
    assert r.status_code == 201 and {m["user_id"] for m in r.json()["memories"]} == {ada["id"]}


async def test_clients_and_the_handle_api_store_batches(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    from ray import serve

    ada, key = await _user_with_key(http, admin_key)
    url = ray_serve["url"]
    async with AsyncHalldyllClient(url, key, timeout=60) as client:
        stored = await client.store_memories(
            [Fact(statement="Ada collects stamps"), BATCH[2], Image(prompt="a stamp album")]
        )
        assert [m.type for m in stored] == [MemoryType.FACT, MemoryType.IMAGE, MemoryType.IMAGE]
        with pytest.raises(InvalidInput) as refused:
            await client.store_memories([BATCH[1], {"type": "fact"}])
        assert refused.value.field is not None and refused.value.field.startswith("memories.1")

    def sync_store() -> list[Any]:
        with HalldyllClient(url, key, timeout=60) as client:
            return client.store_memories(
                [{"type": "conversation", "messages": [Message(role="user", content="hi")]}]
            )

    (conversation,) = await asyncio.to_thread(sync_store)
    assert conversation.message_count == 1

    _, bea_key = await _user_with_key(http, admin_key)
    ingress = serve.get_app_handle("halldyll")
    handled = await ingress.handle_store_memories.remote(key, None, BATCH[1:2])
    assert [m.type for m in handled] == [MemoryType.FACT]
    assert handled[0].memory.statement == "Ada is learning to play the oboe"
    with pytest.raises(Exception) as denied:  # PermissionDenied, as Ray raises it again
        await ingress.handle_store_memories.remote(bea_key, ada["id"], BATCH[1:2])
    assert isinstance(denied.value, PermissionDenied) or "may not" in str(denied.value)
    assert await _count(http, key) == 5


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        ("/v1/users/me/memories/batch", b'{"memories": ', "body: not valid JSON: Expecting value"),
        ("/v1/users/me/memories", b'{"type": "fact",}', "body: not valid JSON: Expecting property"),
        ("/v1/users/me/search", b"tea", "body: not valid JSON: Expecting value at character 0"),
        ("/v1/users/me/memories", b"", "body: Field required"),
        ("/v1/users/me/search", b"[1, 2]", "body: Input should be a valid dictionary"),
    ],
)
async def test_a_body_that_is_not_the_routes_json_is_a_422_on_the_body(
    http: httpx.AsyncClient, admin_key: str, route: str, body: bytes, message: str
) -> None:
    _, key = await _user_with_key(http, admin_key)
    await http.post("/v1/users/me/memories", headers=bearer(key), json=BATCH[1])
    headers = {**bearer(key), "Content-Type": "application/json"}
    r = await http.post(route, headers=headers, content=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    # the body is at fault, never a character offset posing as a field
    assert error["field"] == "body" and error["message"].startswith(message), error
    assert await _count(http, key) == 1


async def test_graphql_and_mcp_store_batches_all_or_nothing(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    from mcp.types import TextContent
    from support import graphql, mcp_result, mcp_session

    _, key = await _user_with_key(http, admin_key)
    mutation = "mutation($m: JSON!) { storeMemories(memories: $m) { id type text } }"
    stored = await graphql(http, key, mutation, m=BATCH)
    assert "errors" not in stored, stored
    memories = stored["data"]["storeMemories"]
    assert [m["type"] for m in memories] == ["CONVERSATION", "FACT", "IMAGE", "SUMMARY"]
    assert memories[1]["text"] == "Ada is learning to play the oboe"
    assert await _count(http, key) == 4

    # A bad item, a batch that is not a list, an empty one: refused, nothing stored.
    for given, field in [
        ([BATCH[1], {"type": "fact", "statement": ""}], "memories.1"),
        ([BATCH[1], "a fact"], "memories.1"),
        ({"type": "fact", "statement": "one"}, "memories"),
        ([], "memories"),
    ]:
        refused = await graphql(http, key, mutation, m=given)
        error = refused["errors"][0]["extensions"]
        assert error["code"] == "invalid_input", refused
        assert str(error["field"]).startswith(field), refused
    assert await _count(http, key) == 4

    async with mcp_session(ray_serve["url"], key) as mcp:
        result = mcp_result(
            await mcp.call_tool(
                "store_memories",
                {"memories": [{"type": "fact", "statement": "Ada sails a red boat"}, BATCH[2]]},
            )
        )
        assert [m["type"] for m in result["memories"]] == ["fact", "image"]
        for bad in ([BATCH[1], {"type": "fact"}], []):
            refused = await mcp.call_tool("store_memories", {"memories": bad})
            assert refused.is_error, refused
            block = refused.content[0]
            assert isinstance(block, TextContent) and "invalid_input: memories" in block.text
    assert await _count(http, key) == 6


async def test_the_client_refuses_a_batch_that_is_not_a_list_of_json(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    _, key = await _user_with_key(http, admin_key)
    async with AsyncHalldyllClient(ray_serve["url"], key, timeout=60) as client:
        for given in ({"type": "fact", "statement": "x"}, "facts", None):
            with pytest.raises(InvalidInput) as refused:
                await client.store_memories(given)  # type: ignore[arg-type]
            assert refused.value.field == "memories"
        with pytest.raises(InvalidInput) as item:
            await client.store_memories([BATCH[1], 42])  # type: ignore[list-item]
        assert item.value.field is not None and item.value.field.startswith("memories.1")
        with pytest.raises(InvalidInput) as opaque:
            await client.store_memory(object())  # type: ignore[arg-type]
        assert opaque.value.field == "body"
        with pytest.raises(InvalidInput):
            await client.store_memory("a fact")  # type: ignore[arg-type]
    assert await _count(http, key) == 0
