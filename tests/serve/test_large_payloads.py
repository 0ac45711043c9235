"""Calls between deployments larger than gRPC's default 4 MiB (the Serve environment's
``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``): requests within the API's limits whose hop
to or from another deployment crosses it were 500s (``RESOURCE_EXHAUSTED``)."""

from __future__ import annotations

from typing import Any

import httpx
from support import bearer
from support import user_with_key as _user_with_key

#: gRPC's default message limit, which Ray keeps unless the Serve environment raises it.
GRPC_DEFAULT = 4 * 1024 * 1024


async def test_a_transcription_whose_vectors_pass_4_mib_is_stored_and_read_back(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    _, key = await _user_with_key(http, admin_key)
    count = 3_000  # a chunk a segment: 3,000 x 384 float32 = 4.6 MB back from Embedding
    assert count * 384 * 4 > GRPC_DEFAULT
    segments = [{"start": i, "end": i + 1, "text": f"w{i}"} for i in range(count)]
    r = await http.post(
        "/v1/users/me/memories",
        json={"type": "transcription", "segments": segments},
        headers=bearer(key),
        timeout=300,
    )
    assert r.status_code == 201, r.text[:500]
    stored = r.json()
    got = await http.get(f"/v1/users/me/memories/{stored['id']}", headers=bearer(key))
    assert got.status_code == 200
    assert [s["text"] for s in got.json()["memory"]["segments"]] == [s["text"] for s in segments]
    hits = await http.post(
        "/v1/users/me/search", json={"query": "w2999", "mode": "fulltext"}, headers=bearer(key)
    )
    assert hits.status_code == 200 and hits.json()["results"][0]["memory"]["id"] == stored["id"]


async def test_a_page_of_memories_larger_than_4_mib_is_listed(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    _, key = await _user_with_key(http, admin_key)
    blob = "m" * 15_000  # under the 16 KB metadata limit
    for batch in range(25):  # 12 a request: the tests' body limit is 200,000 bytes
        memories = [
            {"type": "image", "prompt": f"picture {batch}-{i}", "metadata": {"blob": blob}}
            for i in range(12)
        ]
        r = await http.post(
            "/v1/users/me/memories/batch", json={"memories": memories}, headers=bearer(key)
        )
        assert r.status_code == 201, r.text[:500]
    page = await http.get("/v1/users/me/memories", params={"limit": 300}, headers=bearer(key))
    assert page.status_code == 200, page.text[:500]
    assert len(page.content) > GRPC_DEFAULT
    items = page.json()["items"]
    assert len(items) == 300 and all(m["metadata"]["blob"] == blob for m in items)
