"""Background job status over HTTP and through both clients (issue #14 §2), with the
permission checks of reading a user's memories."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from support import bearer, graphql, mcp_result, mcp_session, user_with_key

from halldyll_ray import MemoryEngine, Settings
from halldyll_ray.client import AsyncHalldyllClient, HalldyllClient
from halldyll_ray.errors import InvalidInput, NotFound, PermissionDenied
from halldyll_ray.models import JobStatus


async def _queue(ray_serve: dict[str, Any], encoder: Any, user_id: str, n: int) -> list[str]:
    """Jobs of a kind no worker runs (they stay queued), queued as a write would."""
    env = {k.lower(): v for k, v in ray_serve["settings"].items()}
    settings = Settings.from_env(**env)
    async with MemoryEngine(settings, encoder=encoder, run_jobs=False) as engine:
        jobs = engine.components.jobs
        return [
            str(await jobs.submit(user_id, "probe", {"n": i}, request_id=f"probe-{i}"))
            for i in range(n)
        ]


async def test_job_status_over_http(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str, encoder: Any
) -> None:
    admin = (await http.get("/v1/me", headers=bearer(admin_key))).json()
    ada, ada_key = await user_with_key(http, admin_key)
    bob, bob_key = await user_with_key(http, admin_key)
    ada_jobs = await _queue(ray_serve, encoder, ada["id"], 3)
    [bob_job] = await _queue(ray_serve, encoder, bob["id"], 1)

    r = await http.get("/v1/users/me/jobs", params={"limit": 2}, headers=bearer(ada_key))
    assert r.status_code == 200, r.text
    page = r.json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    first = page["items"][0]
    assert first["status"] == "queued" and first["kind"] == "probe" and first["attempts"] == 0
    assert set(first) >= {"payload", "last_error", "result", "run_after", "finished_at"}
    r = await http.get(
        "/v1/users/me/jobs", params={"cursor": page["next_cursor"]}, headers=bearer(ada_key)
    )
    listed = [j["id"] for j in page["items"] + r.json()["items"]]
    assert sorted(listed) == sorted(ada_jobs)
    r = await http.get(f"/v1/users/{ada['id']}/jobs/{ada_jobs[0]}", headers=bearer(ada_key))
    assert r.status_code == 200 and r.json()["request_id"] == "probe-0"
    assert r.json()["payload"] == {"n": 0}

    # Filters, and bad ones answered 422.
    r = await http.get("/v1/users/me/jobs", params={"status": "done"}, headers=bearer(ada_key))
    assert r.json()["items"] == []
    for params in ({"status": "finished"}, {"kind": "Bad Kind"}, {"limit": 0}, {"cursor": "x"}):
        r = await http.get("/v1/users/me/jobs", params=params, headers=bearer(ada_key))
        assert r.status_code == 422, (params, r.text)
    r = await http.get("/v1/users/me/jobs/not-a-uuid", headers=bearer(ada_key))
    assert r.status_code == 422

    # Isolation: Bob's job is not found among Ada's, and Bob's list is refused to her.
    r = await http.get(f"/v1/users/me/jobs/{bob_job}", headers=bearer(ada_key))
    assert r.status_code == 404
    rid = f"peek-{uuid.uuid4().hex[:8]}"
    r = await http.get(
        f"/v1/users/{bob['id']}/jobs", headers={**bearer(ada_key), "X-Request-ID": rid}
    )
    assert r.status_code == 403
    denied = await http.get(
        "/v1/audit", params={"outcome": "denied", "limit": 50}, headers=bearer(admin_key)
    )
    assert any(
        row["request_id"] == rid and row["operation"] == "job.list"
        for row in denied.json()["items"]
    )
    r = await http.get(f"/v1/users/{bob['id']}/jobs/{bob_job}", headers=bearer(bob_key))
    assert r.status_code == 200 and r.json()["user_id"] == bob["id"]
    # An Admin reads anyone's jobs, and the read is audited.
    r = await http.get(f"/v1/users/{bob['id']}/jobs", headers=bearer(admin_key))
    assert [j["id"] for j in r.json()["items"]] == [bob_job]
    reads = await http.get(
        "/v1/audit",
        params={"operation": "job.list", "user_id": bob["id"], "outcome": "ok"},
        headers=bearer(admin_key),
    )
    assert [row["actor_id"] for row in reads.json()["items"]] == [admin["id"]]

    # A recorded turn says which jobs it queued (none: this app learns inline).
    r = await http.post(
        "/v1/users/me/sessions/s1/turns",
        json={"user_message": "I live in Lyon.", "assistant_message": "Nice."},
        headers=bearer(ada_key),
    )
    assert r.status_code == 201 and r.json()["job_ids"] == [] and r.json()["fact_ids"]


async def test_job_status_through_both_clients(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str, encoder: Any
) -> None:
    ada, ada_key = await user_with_key(http, admin_key)
    bob, _ = await user_with_key(http, admin_key)
    jobs = await _queue(ray_serve, encoder, ada["id"], 2)
    async with AsyncHalldyllClient(ray_serve["url"], ada_key, timeout=60) as client:
        page = await client.list_jobs(status=JobStatus.QUEUED, kind="probe", limit=10)
        assert sorted(str(j.id) for j in page.items) == sorted(jobs)
        assert page.next_cursor is None
        job = await client.get_job(jobs[1])
        assert (job.status, job.kind, job.payload) == (JobStatus.QUEUED, "probe", {"n": 1})
        with pytest.raises(NotFound):
            await client.get_job(uuid.uuid4())
        with pytest.raises(PermissionDenied):
            await client.list_jobs(user_id=bob["id"])
        with pytest.raises(InvalidInput):
            await client.list_jobs(status="sometimes")

    def sync_calls() -> None:
        with HalldyllClient(ray_serve["url"], admin_key, timeout=60) as admin:
            assert len(admin.list_jobs(user_id=ada["id"]).items) == 2
            assert str(admin.get_job(jobs[0], user_id=ada["id"]).id) == jobs[0]

    await asyncio.to_thread(sync_calls)


async def test_job_status_over_graphql_and_mcp(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str, encoder: Any
) -> None:
    ada, ada_key = await user_with_key(http, admin_key)
    bob, _ = await user_with_key(http, admin_key)
    jobs = await _queue(ray_serve, encoder, ada["id"], 2)

    listed = await graphql(
        http,
        ada_key,
        "query($s: String) { jobs(status: $s, limit: 10) { items { id kind status attempts }"
        " nextCursor } }",
        s="queued",
    )
    page = listed["data"]["jobs"]
    assert sorted(j["id"] for j in page["items"]) == sorted(jobs)
    assert {(j["kind"], j["status"], j["attempts"]) for j in page["items"]} == {
        ("probe", "queued", 0)
    }
    one = await graphql(http, ada_key, "query($id: ID!) { job(id: $id) { id } }", id=jobs[0])
    assert one["data"]["job"]["id"] == jobs[0]
    refused = await graphql(
        http, ada_key, "query($u: ID!) { jobs(userId: $u) { items { id } } }", u=bob["id"]
    )
    assert refused["errors"][0]["extensions"]["code"] == "permission_denied"
    bad = await graphql(http, ada_key, '{ jobs(status: "sometimes") { items { id } } }')
    assert bad["errors"][0]["extensions"]["code"] == "invalid_input"

    async with mcp_session(ray_serve["url"], ada_key) as mcp:
        found = mcp_result(await mcp.call_tool("list_jobs", {"status": "queued"}))
        assert sorted(j["id"] for j in found["items"]) == sorted(jobs)
        other = await mcp.call_tool("list_jobs", {"user_id": bob["id"]})
        assert other.is_error
