"""GET /v1/admin/reembedding over real HTTP: the state of a change of embedding model, for
Admins only (a refusal is audited like any other)."""

from __future__ import annotations

import httpx
from support import bearer, user_with_key


async def test_reembedding_status_for_admins_only(http: httpx.AsyncClient, admin_key: str) -> None:
    r = await http.get("/v1/admin/reembedding", headers=bearer(admin_key))
    assert r.status_code == 200, r.text
    body = r.json()
    # the served database has always had the packaged model: nothing to do
    assert body["state"] == "idle"
    assert body["active_model"].startswith("onnx:") and body["active_model"].endswith(":256")
    assert body["active_dimension"] == 384 and body["target_model"] is None
    _, user_key = await user_with_key(http, admin_key)
    denied = await http.get("/v1/admin/reembedding", headers=bearer(user_key))
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "permission_denied"
    assert (await http.get("/v1/admin/reembedding")).status_code == 401
