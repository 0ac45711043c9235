"""Over HTTP, a 422 (or 404) for a 10,000-character value, key or tag quotes a short prefix
of it (halldyll_ray.errors.quoted), never the whole; nothing stored changes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from support import bearer
from support import user_with_key as _user_with_key

BIG = "Z" * 10_000
QUOTE_CHARS = 40  # halldyll_ray.errors.QUOTE_CHARS

CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    # (what, method, path ({m}: a stored memory's id), request keywords)
    (
        "a tag",
        "POST",
        "/v1/users/me/memories",
        {"json": {"type": "fact", "statement": "x", "tags": [BIG]}},
    ),
    (
        "a transcription's language",
        "POST",
        "/v1/users/me/memories",
        {"json": {"type": "transcription", "text": "x", "language": BIG}},
    ),
    ("a memory type", "POST", "/v1/users/me/memories", {"json": {"type": BIG, "text": "x"}}),
    (
        "a batch's memory type",
        "POST",
        "/v1/users/me/memories/batch",
        {"json": {"memories": [{"type": BIG, "text": "x"}]}},
    ),
    ("an update's unknown field", "PATCH", "/v1/users/me/memories/{m}", {"json": {BIG: 1}}),
    ("a search's unknown field", "POST", "/v1/users/me/search", {"json": {"query": "x", BIG: 1}}),
    ("a search tag", "POST", "/v1/users/me/search", {"json": {"query": "x", "tags": [BIG]}}),
    ("a model kind", "GET", "/v1/models", {"params": {"kind": BIG[:4000]}}),
    ("a memory id", "GET", "/v1/users/me/memories/" + BIG[:4000], {}),
    (
        "a repeated query parameter",
        "GET",
        "/v1/users/me/memories?" + "&".join([BIG[:3000] + "=1"] * 2),
        {},
    ),
]


@pytest.mark.parametrize(
    ("what", "method", "path", "options"), CASES, ids=[case[0] for case in CASES]
)
async def test_a_huge_value_is_quoted_short_over_http(
    ray_serve: dict[str, Any],
    http: httpx.AsyncClient,
    admin_key: str,
    what: str,
    method: str,
    path: str,
    options: dict[str, Any],
) -> None:
    _, key = await _user_with_key(http, admin_key)
    stored = await http.post(
        "/v1/users/me/memories",
        json={"type": "fact", "statement": "Ada drinks green tea"},
        headers=bearer(key),
    )
    assert stored.status_code == 201, stored.text
    memory_id = stored.json()["id"]
    r = await http.request(method, path.replace("{m}", memory_id), headers=bearer(key), **options)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert "Z" * (QUOTE_CHARS + 1) not in r.text, r.text[:300]
    assert len(r.text) < 1000, r.text[:300]
    listed = await http.get("/v1/users/me/memories", headers=bearer(key))
    assert [m["id"] for m in listed.json()["items"]] == [memory_id]
