"""An id takes one form on every route (models.UUID_PATTERN: 8-4-4-4-12 hex digits, either
case): a memory, key, job or grant owner in a path or query took braces, ``urn:uuid:`` and
32 digits without hyphens, which a user id in the same path refused."""

from __future__ import annotations

import uuid

import httpx
from support import bearer, user_with_key


def _odd_forms(value: str) -> dict[str, str]:
    return {
        "braces": "{" + value + "}",
        "urn": f"urn:uuid:{value}",
        "no hyphens": value.replace("-", ""),
    }


async def test_every_route_takes_an_id_in_one_form(http: httpx.AsyncClient, admin_key: str) -> None:
    owner, key = await user_with_key(http, admin_key)
    viewer, _ = await user_with_key(http, admin_key, role="viewer")
    headers = bearer(key)
    r = await http.post(
        "/v1/users/me/memories",
        json={"type": "fact", "statement": "Ines keeps bees"},
        headers=headers,
    )
    memory = r.json()["id"]
    r = await http.post("/v1/users/me/keys", json={"name": "second"}, headers=headers)
    second_key = r.json()["id"]
    job = str(uuid.uuid4())
    viewer_grants = f"/v1/users/{viewer['id']}/grants"
    admin = bearer(admin_key)

    def routes(u: str, m: str, k: str, j: str, o: str) -> list[tuple[str, str, dict]]:
        return [
            ("GET", f"/v1/users/{u}", {}),
            ("GET", f"/v1/users/{u}/memories/{m}", {}),
            ("GET", f"/v1/users/me/memories/{m}/history", {}),
            ("PATCH", f"/v1/users/me/memories/{m}", {"json": {"importance": 0.9}}),
            ("GET", f"/v1/users/me/jobs/{j}", {}),
            ("POST", f"/v1/keys/{k}/rotate", {}),
            ("DELETE", f"/v1/keys/{k}", {}),
            ("DELETE", f"/v1/users/me/memories/{m}", {}),
            ("DELETE", f"{viewer_grants}/{o}", {"headers": admin}),
            ("POST", viewer_grants, {"json": {"owner_id": o}, "headers": admin}),
            ("GET", "/v1/audit", {"params": {"user_id": o}, "headers": admin}),
        ]

    forms = {
        what: _odd_forms(value)
        for what, value in (
            ("user", owner["id"]),
            ("memory", memory),
            ("key", second_key),
            ("job", job),
        )
    }
    odd = {
        name: routes(
            forms["user"][name],
            forms["memory"][name],
            forms["key"][name],
            forms["job"][name],
            forms["user"][name],
        )
        for name in forms["user"]
    }
    for name, calls in odd.items():
        for method, path, options in calls:
            r = await http.request(method, path, **{"headers": headers, **options})
            assert r.status_code == 422, (name, method, path, r.text)
            assert "8-4-4-4-12" in r.json()["error"]["message"] or "pattern" in r.text, r.text
    # Nothing changed: the memory, the key and the viewer's (absent) grant are as they were.
    r = await http.get(f"/v1/users/me/memories/{memory}", headers=headers)
    assert r.status_code == 200 and r.json()["importance"] == 0.5, r.text
    r = await http.get("/v1/users/me/keys", headers=headers)
    assert {k["id"]: k["revoked_at"] for k in r.json()["items"]}[second_key] is None
    r = await http.get(viewer_grants, headers=admin)
    assert r.json()["items"] == []
    # Either letter case is the one form: upper case reaches the same rows on every route.
    for method, path, options in routes(
        owner["id"].upper(), memory.upper(), second_key.upper(), job.upper(), owner["id"].upper()
    ):
        r = await http.request(method, path, **{"headers": headers, **options})
        assert r.status_code != 422, (method, path, r.text)
