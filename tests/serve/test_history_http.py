"""A fact's history over HTTP and through both Python clients (issue #14 §3)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from scripted_model import ScriptedMemoryModel, act_on_closest
from support import bearer, graphql, mcp_result, mcp_session, user_with_key

from halldyll_ray import MemoryEngine, Settings
from halldyll_ray.client import AsyncHalldyllClient, HalldyllClient
from halldyll_ray.components.consolidation import Consolidation
from halldyll_ray.errors import InvalidInput, NotFound
from halldyll_ray.llm.protocol import Action, FactCandidate


async def test_a_fact_history_over_http_and_both_clients(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str, encoder
) -> None:
    user, key = await user_with_key(http, admin_key)
    _, stranger_key = await user_with_key(http, admin_key)
    env = {k.lower(): v for k, v in ray_serve["settings"].items()}
    model = ScriptedMemoryModel(facts=[FactCandidate(statement="The user lives in Oslo")])
    async with MemoryEngine(Settings.from_env(**env), encoder=encoder) as engine:
        c = engine.components
        learn = Consolidation(
            engine.db, c.embeddings, c.models, c.ingestion, engine.settings, model
        )
        changes = []
        for said in ("I live in Oslo.", "I moved to Bergen."):
            turn = await engine.record_turn(user["id"], "s", said, "Ok.", extract_facts=False)
            changes += await learn.learn_from_turn(
                user["id"], turn.conversation_id, turn.message_seqs, job_id="j", model_id=None
            )
            model.facts = [FactCandidate(statement="The user lives in Bergen")]
            model.decide = act_on_closest(Action.UPDATE)
    old, new = str(changes[0].fact_id), str(changes[1].fact_id)

    r = await http.get(f"/v1/users/me/memories/{old}/history", headers=bearer(key))
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [i["id"] for i in items] == [old, new]
    assert items[0]["valid_to"] is not None and items[0]["superseded_by"] == new
    assert items[1]["valid_to"] is None and items[1]["valid_from"] == items[0]["valid_to"]
    listed = await http.get("/v1/users/me/memories", params={"types": "fact"}, headers=bearer(key))
    assert [i["id"] for i in listed.json()["items"]] == [new]  # closed facts are not listed
    r = await http.get(f"/v1/users/me/memories/{old}", headers=bearer(key))
    assert r.status_code == 200 and r.json()["superseded_by"] == new  # but read by id

    memories = (await http.get("/v1/users/me/memories", headers=bearer(key))).json()["items"]
    log = next(m["id"] for m in memories if m["type"] == "conversation")  # not a fact
    r = await http.get(f"/v1/users/me/memories/{log}/history", headers=bearer(key))
    assert r.status_code == 422 and r.json()["error"]["field"] == "memory_id"
    r = await http.get(
        f"/v1/users/{user['id']}/memories/{old}/history", headers=bearer(stranger_key)
    )
    assert r.status_code == 403
    r = await http.get(f"/v1/users/me/memories/{old}/history", headers=bearer(stranger_key))
    assert r.status_code == 404

    async with AsyncHalldyllClient(ray_serve["url"], key, timeout=60) as client:
        history = await client.fact_history(old)
        assert [str(m.id) for m in history] == [old, new]
        assert history[1].memory.statement == "The user lives in Bergen"
        with pytest.raises(InvalidInput) as bad:
            await client.fact_history(log)
        assert bad.value.fields["field"] == "memory_id"

    def sync() -> None:
        with HalldyllClient(ray_serve["url"], key, timeout=60) as client:
            assert [str(m.id) for m in client.fact_history(new, user_id=user["id"])] == [old, new]
            with pytest.raises(NotFound):
                client.fact_history("00000000-0000-4000-8000-000000000000")

    await asyncio.to_thread(sync)

    # The same history over GraphQL and MCP.
    versions = await graphql(
        http,
        key,
        "query($id: ID!) { factHistory(id: $id) { id text validTo supersededBy } }",
        id=new,
    )
    got = versions["data"]["factHistory"]
    assert [(v["id"], v["supersededBy"]) for v in got] == [(old, new), (new, None)]
    assert got[0]["validTo"] is not None and got[1]["text"] == "The user lives in Bergen"
    wrong = await graphql(http, key, "query($id: ID!) { factHistory(id: $id) { id } }", id=log)
    assert wrong["errors"][0]["extensions"]["code"] == "invalid_input"
    async with mcp_session(ray_serve["url"], key) as mcp:
        result = mcp_result(await mcp.call_tool("fact_history", {"memory_id": old}))
        assert [m["id"] for m in result["items"]] == [old, new]
        assert result["items"][0]["superseded_by"] == new
        stranger = await mcp.call_tool("fact_history", {"memory_id": log})
        assert stranger.is_error
