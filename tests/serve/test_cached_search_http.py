"""A repeated search answered by the Ingress from the result cache: same bytes as Search's
answer, the same permission checks and audit, and never stale after a write."""

from __future__ import annotations

import httpx
from support import bearer, user_with_key


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
