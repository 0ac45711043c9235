"""The Ray Serve application over real HTTP, the handle API, batching, and the config."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from support import bearer
from support import user_with_key as _user_with_key

from halldyll_ray.models import SearchResult


async def test_health(http: httpx.AsyncClient, admin_key: str) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    # Serve's own health route (KubeRay's probe), answered by HAProxy in front of the app.
    assert (await http.get("/-/healthz")).status_code == 200
    # Readiness answers anyone: each dependency's status, no versions, no counters.
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ok": True,
        "database": {"ok": True},
        "redis": {"ok": True},
        "model": {"ok": True},
    }
    # The full report is an Admin's: PostgreSQL's version, the model, this replica's counters.
    full = await http.get("/v1/admin/health", headers=bearer(admin_key))
    assert full.status_code == 200, full.text
    body = full.json()
    assert body["ok"] and body["database"]["ok"] and body["database"]["version"]
    assert body["redis"] == {"ok": True, "configured": True}
    assert body["model"]["dimension"] == 384 and body["events"]["reconnects"] >= 0
    _, key = await _user_with_key(http, admin_key)
    denied = await http.get("/v1/admin/health", headers=bearer(key))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
    assert (await http.get("/v1/admin/health")).status_code == 401
    assert (await http.get("/openapi.json")).json()["info"]["title"] == "halldyll-ray"


async def test_memory_round_trip_over_http(http: httpx.AsyncClient, admin_key: str) -> None:
    user, key = await _user_with_key(http, admin_key)
    h = bearer(key)
    created = await http.post(
        "/v1/users/me/memories",
        headers=h,
        json={
            "type": "conversation",
            "title": "Trip",
            "session_id": "s-1",
            "messages": [{"role": "user", "content": "I want to hike the Dolomites in July"}],
        },
    )
    assert created.status_code == 201, created.text
    conv = created.json()
    fact = (
        await http.post(
            f"/v1/users/{user['id']}/memories",
            headers=h,
            json={"type": "fact", "statement": "Ada is afraid of heights", "confidence": 0.8},
        )
    ).json()
    image = (
        await http.post(
            "/v1/users/me/memories",
            headers=h,
            json={"type": "image", "prompt": "a mountain lake at sunrise", "seed": 7},
        )
    ).json()
    assert image["type"] == "image"
    r = await http.post(
        f"/v1/users/me/memories/{conv['id']}/messages",
        headers=h,
        json={"messages": [{"role": "assistant", "content": "Book huts early."}]},
    )
    assert r.status_code == 201 and r.json()["items"][0]["seq"] == 1

    r = await http.post(
        "/v1/users/me/search", headers=h, json={"query": "fear of high places", "limit": 3}
    )
    assert r.status_code == 200, r.text
    results = [SearchResult.model_validate(x) for x in r.json()["results"]]
    assert results[0].memory.id == uuid.UUID(fact["id"])

    got = (await http.get(f"/v1/users/me/memories/{conv['id']}", headers=h)).json()
    assert [m["seq"] for m in got["messages"]] == [0, 1]
    page = (await http.get("/v1/users/me/memories?types=fact,image&limit=1", headers=h)).json()
    assert len(page["items"]) == 1 and page["next_cursor"]
    patched = await http.patch(
        f"/v1/users/me/memories/{fact['id']}", headers=h, json={"tags": ["health"]}
    )
    assert patched.json()["tags"] == ["health"]

    context = (
        await http.post(
            "/v1/users/me/context",
            headers=h,
            json={"query": "plan a mountain trip", "max_tokens": 200},
        )
    ).json()
    assert context["token_count"] <= 200 and context["sources"]
    turn = await http.post(
        "/v1/users/me/sessions/chat-1/turns",
        headers=h,
        json={"user_message": "I live in Munich.", "assistant_message": "Close to the Alps!"},
    )
    assert turn.status_code == 201 and turn.json()["message_seqs"] == [0, 1]
    prepared = (
        await http.post(
            "/v1/users/me/sessions/chat-1/prepare",
            headers=h,
            json={"user_message": "Where do I live?"},
        )
    ).json()
    assert "Munich" in prepared["text"]

    assert (await http.delete(f"/v1/users/me/memories/{image['id']}", headers=h)).status_code == 204
    missing = await http.get(f"/v1/users/me/memories/{image['id']}", headers=h)
    assert missing.status_code == 404


async def test_errors_have_one_shape(http: httpx.AsyncClient, admin_key: str) -> None:
    user, key = await _user_with_key(http, admin_key)
    other, _ = await _user_with_key(http, admin_key)
    cases = [
        (await http.get("/v1/me"), 401, "unauthenticated"),
        (await http.get("/v1/me", headers=bearer("hr_nope")), 401, "unauthenticated"),
        (await http.get("/v1/users", headers=bearer(key)), 403, "permission_denied"),
        (
            await http.post(
                f"/v1/users/{other['id']}/search", headers=bearer(key), json={"query": "x"}
            ),
            403,
            "permission_denied",
        ),
        (
            await http.get(f"/v1/users/me/memories/{uuid.uuid4()}", headers=bearer(key)),
            404,
            "not_found",
        ),
        (
            await http.post(
                "/v1/users/me/memories",
                headers=bearer(key),
                json={"type": "fact", "statement": "x", "confidence": 3},
            ),
            422,
            "invalid_input",
        ),
        (
            await http.post("/v1/users/me/search", headers=bearer(key), json={"query": ""}),
            422,
            "invalid_input",
        ),
        (
            await http.get("/v1/users/me/memories/not-a-uuid", headers=bearer(key)),
            422,
            "invalid_input",
        ),
        (
            await http.post(
                "/v1/users/me/memories", headers=bearer(key), content=b"{" + b" " * 300_000 + b"}"
            ),
            413,
            "payload_too_large",
        ),
        (
            await http.post(
                "/v1/users", headers=bearer(admin_key), json={"username": user["username"]}
            ),
            409,
            "conflict",
        ),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (status, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"]
        assert error["request_id"] == response.headers["X-Request-ID"]

    async def chunks():
        yield b'{"type": "fact", "statement": "'
        for _ in range(30):
            yield b"x" * 10_000
        yield b'"}'

    chunked = await http.post("/v1/users/me/memories", headers=bearer(key), content=chunks())
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "payload_too_large"
    unknown = await http.get("/v1/no-such-route", headers=bearer(key))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    patched = await http.patch(
        "/v1/users/me", headers=bearer(admin_key), json={"email": "root@example.com"}
    )
    assert patched.status_code == 200 and patched.json()["email"] == "root@example.com"
    assert (
        await http.patch("/v1/users/me", headers=bearer(key), json={"role": "admin"})
    ).status_code == 403
    echoed = await http.get("/v1/me", headers={"X-Request-ID": "trace-123", **bearer(key)})
    assert echoed.headers["X-Request-ID"] == "trace-123"
    # An id that logs and audit rows could not carry as sent is refused, not replaced.
    for bad in ("x" * 129, "two words", "a/b", "é".encode()):
        refused = await http.get("/v1/me", headers={"X-Request-ID": bad, **bearer(key)})
        assert refused.status_code == 400, bad
        assert refused.json()["error"]["field"] == "X-Request-ID"
    audit = (await http.get("/v1/audit?outcome=denied&limit=20", headers=bearer(admin_key))).json()[
        "items"
    ]
    assert any(row["actor_id"] == user["id"] for row in audit)


async def test_service_acts_for_users_over_http(http: httpx.AsyncClient, admin_key: str):
    user, _ = await _user_with_key(http, admin_key)
    admin_me = (await http.get("/v1/me", headers=bearer(admin_key))).json()
    _, svc_key = await _user_with_key(http, admin_key, role="service")
    r = await http.post(
        f"/v1/users/{user['id']}/memories",
        headers=bearer(svc_key),
        json={"type": "fact", "statement": "prefers window seats"},
    )
    assert r.status_code == 201 and r.json()["user_id"] == user["id"]
    r = await http.post(
        f"/v1/users/{admin_me['id']}/search", headers=bearer(svc_key), json={"query": "anything"}
    )
    assert r.status_code == 403


async def test_handle_api_and_batching(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    from ray import serve

    user, _ = await _user_with_key(http, admin_key)
    _, svc_key = await _user_with_key(http, admin_key, role="service")
    ingress = serve.get_app_handle("halldyll")
    stored = await ingress.handle_store_memory.remote(
        svc_key, user["id"], {"type": "fact", "statement": "owns a red bicycle"}
    )
    assert str(stored.user_id) == user["id"]
    hits = await ingress.handle_search.remote(svc_key, user["id"], "what bike do they ride?")
    assert hits[0].memory.id == stored.id
    context = await ingress.handle_build_context.remote(svc_key, user["id"], "bicycle")
    assert stored.id in context.sources
    # "me" is the caller, as on every other surface (it was an InvalidInput on user_id)
    _, own_key = await _user_with_key(http, admin_key)
    mine = await ingress.handle_store_memory.remote(
        own_key, "me", {"type": "fact", "statement": "keeps bees"}
    )
    assert [h.memory.id for h in await ingress.handle_search.remote(own_key, "me", "bees")] == [
        mine.id
    ]
    assert [h.memory.id for h in await ingress.handle_search.remote(own_key, None, "bees")] == [
        mine.id
    ]

    embedding = serve.get_deployment_handle("Embedding", app_name="halldyll")
    stats = await embedding.stats.remote()
    # build_app's args reach serve.batch through its setters (conftest: a 20 ms wait).
    assert (stats["max_batch_size"], stats["batch_wait_timeout_s"]) == (32, 0.02)
    before = stats["batch_sizes"]
    texts = [
        [f"concurrent sentence number {i} about {w}"]
        for i, w in enumerate("abcdefghijklmnopqrstuvwx")
    ]
    vectors = await asyncio.gather(*(embedding.embed.remote(t) for t in texts))
    assert all(v.shape == (1, 384) for v in vectors)
    calls = (await embedding.stats.remote())["batch_sizes"][len(before) :]
    assert sum(calls) == 24  # requests per model call, for these 24 requests
    assert len(calls) <= 12 and max(calls) > 1  # requests were merged into model calls
    # Each caller got its own text's vector back, whatever it was merged with.
    for i in (0, 11, 23):
        alone = await embedding.embed.remote(texts[i])
        assert np.allclose(vectors[i], alone, atol=1e-4)
        assert not np.allclose(vectors[i], vectors[(i + 1) % 24], atol=1e-2)


async def test_single_texts_are_embedded_in_the_replica(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    """local_embedding_max_texts=1 (the default): a query is encoded by the Search replica
    itself, a conversation's several chunks go to the Embedding deployment."""
    from ray import serve

    embedding = serve.get_deployment_handle("Embedding", app_name="halldyll")
    _, key = await _user_with_key(http, admin_key)
    before = (await embedding.stats.remote())["texts"]
    r = await http.post(
        "/v1/users/me/search",
        json={"query": "a query nobody asked before 7f3a"},
        headers=bearer(key),
    )
    assert r.status_code == 200
    assert (await embedding.stats.remote())["texts"] == before
    messages = [
        {"role": "user", "content": "We are planning a trip to Lisbon in May."},
        {"role": "assistant", "content": "Lisbon in May is warm; book the tram tour early."},
        {"role": "user", "content": "My sister Ana will join us from Porto."},
    ]
    r = await http.post(
        "/v1/users/me/memories",
        json={"type": "conversation", "title": "Lisbon trip", "messages": messages},
        headers=bearer(key),
    )
    assert r.status_code == 201, r.text
    assert (await embedding.stats.remote())["texts"] >= before + 2


async def test_metrics_reach_prometheus(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    """The halldyll_* metrics are exported by the node's Prometheus endpoint."""
    _, key = await _user_with_key(http, admin_key)
    for i in range(3):
        r = await http.post(
            "/v1/users/me/search", json={"query": f"metrics probe {i}"}, headers=bearer(key)
        )
        assert r.status_code == 200
    wanted = {
        "halldyll_http_requests",
        "halldyll_http_latency_ms",
        "halldyll_cache_hit_ratio",
    }
    found: set[str] = set()
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=10) as scraper:
        while time.monotonic() < deadline:
            text = (await scraper.get(ray_serve["metrics_url"])).text
            found = {name for name in wanted if name in text}
            if found == wanted and 'route="/v1/users/{user_id}/search"' in text:
                break
            await asyncio.sleep(1)
    assert found == wanted
    assert 'route="/v1/users/{user_id}/search"' in text


def test_the_http_port_is_served_by_haproxy(ray_serve: dict[str, Any]) -> None:
    """The product's Serve environment is in force: HAProxy, not Serve's Python proxy."""
    import psutil

    port = int(ray_serve["url"].rsplit(":", 1)[1])
    listeners = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid
    }
    assert {psutil.Process(pid).name() for pid in listeners} == {"haproxy"}


def test_serve_config_validates_against_rays_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(__file__).parents[2] / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "halldyll_ray.serve.app:build_app"
    names = {d.name for d in app.deployments}
    assert {"Embedding", "Search", "Ingestion", "Context", "Ingress"} <= names


def test_with_options_sets_every_deployment_but_the_kept_ones() -> None:
    from ray.serve import Application

    from halldyll_ray.serve import build_app, with_options
    from halldyll_ray.serve.app import QUEUED

    app = with_options(
        build_app({"settings": {"DATABASE_URL": "postgresql://u@127.0.0.1:1/db"}}),
        keep=("Embedding",),
        max_ongoing_requests=7,
        health_check_period_s=1,
    )
    seen: dict[str, tuple[int, float, int]] = {}

    def walk(node: object) -> None:
        if isinstance(node, Application):
            dep = node._bound_deployment
            config = dep._deployment_config
            seen[dep.name] = (
                config.max_ongoing_requests,
                config.health_check_period_s,
                config.max_queued_requests,
            )
            for arg in [*dep.init_args, *dep.init_kwargs.values()]:
                walk(arg)

    walk(app)
    assert set(seen) == {"Ingress", "Search", "Ingestion", "Context", "Embedding"}
    assert seen.pop("Embedding") == (64, 10, QUEUED)  # as build_app made it
    assert seen.pop("Ingress") == (7, 1, -1)  # left at Serve's default
    assert set(seen.values()) == {(7, 1, QUEUED)}  # the calls the Ingress makes are bounded


async def test_colocated_app_uses_the_handle_api(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    """The example inference app runs beside ours in one cluster and calls it by handle."""
    from ray import serve

    from examples.llm_app import Assistant

    user, _ = await _user_with_key(http, admin_key)
    _, svc_key = await _user_with_key(http, admin_key, role="service")
    r = await http.post(
        f"/v1/users/{user['id']}/memories",
        headers=bearer(svc_key),
        json={"type": "fact", "statement": "Ada is allergic to penicillin"},
    )
    fact_id = r.json()["id"]
    assistant = serve.run(Assistant.bind(svc_key), name="assistant", route_prefix=None)
    try:
        reply = await assistant.chat.remote(user["id"], "which medicine must I avoid?")
        assert fact_id in reply["sources"] and "penicillin" in reply["answer"]
        page = await http.get(
            f"/v1/users/{user['id']}/memories?types=conversation", headers=bearer(svc_key)
        )
        assert page.json()["items"][0]["memory"]["title"] == "assistant chat"
        # The Service key gives no reach beyond end users: not over an Admin's data.
        admin_id = (await http.get("/v1/me", headers=bearer(admin_key))).json()["id"]
        try:
            await assistant.chat.remote(admin_id, "hello")
            raise AssertionError("a service acted for an admin")
        except Exception as exc:  # the PermissionDenied comes back wrapped by Ray
            assert "PermissionDenied" in type(exc).__name__ or "may not" in str(exc)
    finally:
        serve.delete("assistant")


async def test_every_list_has_one_shape(
    ray_serve: dict[str, Any], http: httpx.AsyncClient, admin_key: str
) -> None:
    """{"items": [...]} everywhere, with "next_cursor" where the list pages."""
    h = bearer(admin_key)
    await http.post(
        "/v1/models", headers=h, json={"name": f"m-{uuid.uuid4().hex[:6]}", "kind": "llm"}
    )
    await http.post("/v1/users/me/memories", headers=h, json={"type": "fact", "statement": "x1"})
    paged = ("/v1/users?limit=1", "/v1/users/me/memories?limit=1")
    for path in (*paged, "/v1/users/me/keys", "/v1/models", "/v1/audit?limit=2"):
        r = await http.get(path, headers=h)
        assert r.status_code == 200, (path, r.text)
        body = r.json()
        assert isinstance(body, dict) and body["items"], (path, body)
        assert ("next_cursor" in body) == (path in paged), path


async def test_credentials_are_checked_before_the_input(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """A request without a valid key is a 401 whatever its input: bad bodies, bad path and
    query parameters, on any route; the same request with a valid key is the 422."""
    _, key = await _user_with_key(http, admin_key)
    bad = [
        ("POST", "/v1/users/me/memories/batch", {"memories": [{"type": "transcription"}]}),
        ("POST", "/v1/users/me/memories", {"type": "fact", "statement": "x", "confidence": 3}),
        ("POST", "/v1/users/me/search", {"query": "x", "mode": "psychic"}),
        ("POST", "/v1/users/nobody/search", {"query": "x"}),
        ("GET", "/v1/users/me/memories?limit=-4", None),
        ("GET", "/v1/users/me/memories/not-a-uuid", None),
        ("POST", "/v1/users/me/context", []),
    ]
    for method, path, body in bad:
        for headers in ({}, {"Authorization": "Basic YWRhOnB3"}, bearer("hr_" + "z" * 40)):
            r = await http.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "unauthenticated"
            assert r.headers["www-authenticate"] == "Bearer"
        valid = await http.request(method, path, json=body, headers=bearer(key))
        assert valid.status_code == 422, (method, path, valid.text)


async def test_a_path_named_literally_belongs_to_its_route(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """``.../memories/batch`` is the batch route's path: another method there is a 405 with
    ``Allow: POST`` (as for any route), not ``.../memories/{memory_id}`` with "batch"."""
    _, key = await _user_with_key(http, admin_key)
    usual = await http.put("/v1/users/me/search", headers=bearer(key), json={"query": "x"})
    assert usual.status_code == 405
    for method in ("GET", "PATCH", "DELETE", "PUT"):
        r = await http.request(
            method, "/v1/users/me/memories/batch", headers=bearer(key), json={"tags": ["x"]}
        )
        assert r.status_code == 405, (method, r.text)
        assert r.headers["allow"] == "POST"
        assert r.json()["error"]["code"] == usual.json()["error"]["code"] == "method_not_allowed"
    # The parameter route still answers for a memory id, and for "batches".
    missing = await http.get(f"/v1/users/me/memories/{uuid.uuid4()}", headers=bearer(key))
    assert missing.status_code == 404
    near = await http.get("/v1/users/me/memories/batches", headers=bearer(key))
    assert near.status_code == 422 and near.json()["error"]["field"] == "memory_id"
    # A path or header parameter is named as the engine names it, without FastAPI's "path."
    assert near.json()["error"]["message"].startswith("memory_id: ")
    header = await http.post(
        "/v1/users/me/sessions/s1/turns",
        headers={**bearer(key), "Idempotency-Key": "has space"},
        json={"user_message": "a", "assistant_message": "b"},
    )
    assert header.status_code == 422 and "header." not in header.text, header.text


async def test_a_body_not_sent_as_json_says_how_to_send_it(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """``curl -d`` sends a form's media type: the 422 said only "Input should be a valid
    dictionary", leaving the caller to guess. Nothing is stored."""
    _, key = await _user_with_key(http, admin_key)
    body = b'{"type": "fact", "statement": "Ada likes tea"}'
    for media in ("application/x-www-form-urlencoded", None, "text/plain"):
        headers = bearer(key) | ({"Content-Type": media} if media else {})
        r = await http.post("/v1/users/me/memories", content=body, headers=headers)
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "Content-Type: application/json" in message and (media or "none") in message
    sent = await http.post(
        "/v1/users/me/memories",
        content=body,
        headers=bearer(key) | {"Content-Type": "application/json"},
    )
    assert sent.status_code == 201
    listed = await http.get("/v1/users/me/memories", headers=bearer(key))
    assert len(listed.json()["items"]) == 1
    # A tag that is refused names its field once ("invalid tags: tags: ..." said it twice),
    # without pydantic's "Value error, ".
    refused = await http.get("/v1/users/me/memories?tags=%00", headers=bearer(key))
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    assert "tags: tags" not in message and "Value error" not in message, message


async def test_unicode_forms_and_bad_segments_over_http(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """A decomposed or fullwidth tag is its NFC/ASCII twin (it was a 422, or a second tag);
    segments out of order and a generator with a line break are a 422 naming the field, and
    nothing is stored."""
    _, key = await _user_with_key(http, admin_key)
    h = bearer(key)
    stored = await http.post(
        "/v1/users/me/memories",
        headers=h,
        json={"type": "fact", "statement": "Ada drinks espresso", "tags": ["cafe\u0301", "ＶＩＰ"]},
    )
    assert stored.status_code == 201, stored.text
    assert stored.json()["tags"] == ["café", "VIP"]
    listed = await http.get("/v1/users/me/memories", headers=h, params={"tags": "cafe\u0301"})
    assert [m["id"] for m in listed.json()["items"]] == [stored.json()["id"]]
    bad = [
        (
            {
                "type": "transcription",
                "segments": [
                    {"start": 5.0, "end": 6.0, "text": "second"},
                    {"start": 0.0, "end": 1.0, "text": "first"},
                ],
            },
            "segments",
        ),
        ({"type": "image", "prompt": "a cat", "generator": "Real\nVis"}, "generator"),
    ]
    for body, field in bad:
        answer = await http.post("/v1/users/me/memories", headers=h, json=body)
        assert answer.status_code == 422, answer.text
        assert field in answer.json()["error"]["field"], answer.text
    listed = await http.get("/v1/users/me/memories", headers=h)
    assert [m["id"] for m in listed.json()["items"]] == [stored.json()["id"]]
