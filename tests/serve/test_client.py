"""The typed Python clients (async and sync) against the running Serve app, and offline."""

from __future__ import annotations

import asyncio
import json
import pickle
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from support import graphql, mcp_result, mcp_session

from halldyll_ray.client import AsyncHalldyllClient, HalldyllClient
from halldyll_ray.errors import (
    AuthenticationFailed,
    Conflict,
    HalldyllError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from halldyll_ray.models import (
    Conversation,
    Fact,
    Image,
    ImageSize,
    MemoryType,
    MemoryUpdate,
    Message,
    ModelKind,
    Role,
    Summary,
    Transcription,
)
from halldyll_ray.serve_local import free_port


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def _assert_error(exc: HalldyllError, status: int) -> None:
    request_id = exc.fields["request_id"]
    assert request_id and exc.request_id == request_id  # type: ignore[attr-defined]
    assert exc.fields["status_code"] == status and exc.message


# --------------------------------------------------------------------------- async client
async def test_async_client_round_trip(ray_serve: dict[str, Any], admin_key: str) -> None:
    url = ray_serve["url"]
    async with AsyncHalldyllClient(url, admin_key, timeout=60) as admin:
        assert (await admin.healthz()) == {"status": "ok"}
        ready = await admin.readyz()
        assert ready["ok"] and ready["model"] == {"ok": True}
        assert (await admin.me()).role is Role.ADMIN

        user = await admin.create_user(_name("ada"), "ada@example.com")
        assert user.role is Role.USER and user.email == "ada@example.com"
        new = await admin.create_api_key(user.id, name="agent")
        assert new.api_key.user_id == user.id and new.api_key.name == "agent"
        assert new.key.startswith(new.api_key.prefix)
        assert [k.id for k in await admin.list_api_keys(user.id)] == [new.api_key.id]
        llm = await admin.register_model(
            _name("Qwen2.5-14B-Instruct-"), ModelKind.LLM, version="2.5"
        )
        assert (await admin.get_model(llm.name)).id == llm.id
        assert llm.id in {m.id for m in await admin.list_models("llm")}
        # Hugging Face style names carry a "/": the path takes them whole.
        vlm = await admin.register_model(
            _name("Qwen/Qwen2.5-VL-7B-Instruct-"), ModelKind.VISION_LANGUAGE
        )
        assert (await admin.get_model(vlm.name)).id == vlm.id
        await admin.delete_model(vlm.name)
        with pytest.raises(NotFound):
            await admin.get_model(vlm.name)

    async with AsyncHalldyllClient(url, new.key, timeout=60) as client:
        assert (await client.me()).id == user.id
        conv = await client.store_memory(
            Conversation(
                title="Trip",
                session_id="s-1",
                messages=[Message(role="user", content="I want to hike the Dolomites in July")],
            )
        )
        fact = await client.store_memory(
            Fact(statement="Ada is afraid of heights", confidence=0.8, model=llm.name)
        )
        image = await client.store_memory(
            Image(
                prompt="a watercolor lighthouse in a thunderstorm at night",
                generator="RealVisXL_V5.0",
                seed=7,
                steps=30,
                size=ImageSize(width=1024, height=1024),
            )
        )
        transcription = await client.store_memory(
            {
                "type": "transcription",
                "segments": [
                    {"start": 0.0, "end": 2.5, "text": "Good morning everyone, welcome back."},
                    {"start": 2.5, "end": 6.0, "text": "Today we are talking about bread."},
                ],
                "duration_seconds": 6.0,
            }
        )
        summary = await client.store_memory(
            Summary(text="Ada plans a summer hiking trip in Italy.", covers=[conv.id])
        )
        assert fact.model_id == llm.id and conv.message_count == 1
        assert isinstance(transcription.memory, Transcription)
        assert transcription.memory.language == "en"  # detected, not given
        stored = [conv, fact, image, transcription, summary]
        assert [m.type for m in stored] == list(MemoryType)

        hits = await client.search("fear of high places", limit=3)
        assert hits[0].memory.id == fact.id
        hits = await client.search("painting of a lighthouse", types=["image"])
        assert [h.memory.id for h in hits] == [image.id] and hits[0].matched.part == "prompt"
        hits = await client.search("bread", mode="fulltext", model=llm.name)
        assert hits and hits[0].memory.id == transcription.id

        seen: list[uuid.UUID] = []
        cursor: str | None = None
        while True:
            page = await client.list_memories(limit=2, cursor=cursor)
            assert len(page.items) <= 2
            seen += [m.id for m in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert sorted(seen) == sorted(m.id for m in stored)
        page = await client.list_memories(types=[MemoryType.FACT, "image"])
        assert {m.id for m in page.items} == {fact.id, image.id} and page.next_cursor is None
        assert [m.id for m in (await client.list_memories(session_id="s-1")).items] == [conv.id]

        patched = await client.update_memory(fact.id, MemoryUpdate(tags=["health"], importance=0.9))
        # importance and confidence are stored as float4, hence approx.
        assert patched.tags == ["health"] and patched.importance == pytest.approx(0.9)
        patched = await client.update_memory(fact.id, {"confidence": 0.95})
        assert isinstance(patched.memory, Fact) and patched.memory.confidence == pytest.approx(0.95)
        assert patched.tags == ["health"]
        tagged = await client.list_memories(tags=["health"])
        assert [m.id for m in tagged.items] == [fact.id]

        appended = await client.append_messages(
            conv.id, [Message(role="assistant", content="Book the huts early.")]
        )
        assert [m.seq for m in appended] == [1]
        got = await client.get_memory(conv.id)
        assert [m.seq for m in got.messages] == [0, 1]

        context = await client.build_context("plan a mountain trip", max_tokens=200)
        assert context.token_count <= 200 == context.max_tokens and context.sources
        turn = await client.record_turn("chat-1", "I live in Munich.", "Close to the Alps!")
        assert turn.message_seqs == [0, 1]
        prepared = await client.prepare_context("chat-1", "Where do I live?")
        assert "Munich" in prepared.text
        # One model's memories only (the HTTP prepare request had no include_shared): the
        # shared session's turns are left out, the model's own fact is in.
        own = await client.prepare_context(
            "chat-1", "Where do I live, what am I afraid of?", model=llm.name, include_shared=False
        )
        assert "heights" in own.text and "Munich" not in own.text
        both = await client.prepare_context(
            "chat-1", "Where do I live, what am I afraid of?", model=llm.name
        )
        assert "heights" in both.text and "Munich" in both.text

        await client.delete_memory(image.id)
        with pytest.raises(NotFound) as caught:
            await client.get_memory(image.id)
        _assert_error(caught.value, 404)

    async with AsyncHalldyllClient(url, admin_key, timeout=60) as admin:
        rows = await admin.list_audit(user_id=user.id, operation="memory.delete")
        assert rows and rows[0]["outcome"] == "ok" and str(image.id) in rows[0]["target_ids"]


async def test_async_client_typed_errors(ray_serve: dict[str, Any], admin_key: str) -> None:
    url = ray_serve["url"]
    async with AsyncHalldyllClient(url, admin_key, timeout=60) as admin:
        user = await admin.create_user(_name("bob"))
        other = await admin.create_user(_name("eve"))
        key = await admin.create_api_key(user.id)

        async with AsyncHalldyllClient(url, "hr_not_a_key") as stranger:
            with pytest.raises(AuthenticationFailed) as auth:
                await stranger.me()
            _assert_error(auth.value, 401)

        async with AsyncHalldyllClient(url, key.key) as client:
            with pytest.raises(PermissionDenied) as denied:
                await client.list_users()
            _assert_error(denied.value, 403)
            with pytest.raises(PermissionDenied):
                await client.search("anything", user_id=other.id)
            with pytest.raises(NotFound) as missing:
                await client.get_memory(uuid.uuid4())
            _assert_error(missing.value, 404)
            with pytest.raises(InvalidInput) as invalid:
                await client.store_memory({"type": "fact", "statement": "x", "confidence": 3})
            _assert_error(invalid.value, 422)
            assert "confidence" in invalid.value.message
            # the dotted path in the body; a memory's type comes first (the union's variant)
            assert invalid.value.fields["field"] == "fact.confidence"
            with pytest.raises(InvalidInput):
                await client.get_memory("not-a-uuid")
            # The field at fault crosses HTTP, as the engine names it in-process: rejected by
            # the request schema (group, limit) or by the engine (session_id of a turn).
            for call, field in (
                (client.search("x", limit=1000), "limit"),
                (client.search("x", group="sentence"), "group"),
                (client.search("x", mode="Hybrid"), "mode"),
                (client.record_turn("s-1", "hi", "hello", user_name="x" * 201), "user_name"),
            ):
                with pytest.raises(InvalidInput) as bad:
                    await call
                assert bad.value.fields.get("field") == field, bad.value.message
            with pytest.raises(InvalidInput) as too_big:
                await client.store_memory({"type": "fact", "statement": "y" * 300_000})
            _assert_error(too_big.value, 413)

        # The request id on the exception is the one the audit log recorded for the denial.
        denials = await admin.list_audit(user_id=user.id, outcome="denied", limit=20)
        assert denied.value.fields["request_id"] in {row["request_id"] for row in denials}

        with pytest.raises(Conflict) as conflict:
            await admin.create_user(user.username)
        _assert_error(conflict.value, 409)

        rotated = await admin.rotate_api_key(key.api_key.id)
        async with (
            AsyncHalldyllClient(url, key.key) as old,
            AsyncHalldyllClient(url, rotated.key) as new,
        ):
            with pytest.raises(AuthenticationFailed):
                await old.me()
            assert (await new.me()).id == user.id
            revoked = await admin.revoke_api_key(rotated.api_key.id)
            assert revoked.revoked_at is not None
            with pytest.raises(AuthenticationFailed):
                await new.me()

        assert (await admin.update_user(other.id, disabled=True)).disabled
        assert (await admin.update_user(other.id, role="viewer")).role is Role.VIEWER
        page = await admin.list_users(limit=1)
        assert len(page.items) == 1 and page.next_cursor
        await admin.delete_user(other.id)
        with pytest.raises(NotFound):
            await admin.get_user(other.id)


# --------------------------------------------------------------------------- sync client
def _sync_scenario(url: str, admin_key: str) -> None:
    with HalldyllClient(url, admin_key, timeout=60) as admin:
        user = admin.create_user(_name("cy"), role=Role.USER)
        key = admin.create_api_key(user.id, name="sync")
    with HalldyllClient(url, key.key, timeout=60) as client:
        assert client.healthz() == {"status": "ok"} and client.readyz()["ok"]
        assert client.me().id == user.id and client.get_user("me").id == user.id
        fact = client.store_memory(Fact(statement="Cy keeps bees on the roof"))
        note = client.store_memory({"type": "fact", "statement": "Cy's sister lives in Oslo"})
        conv = client.store_memory(
            Conversation(messages=[Message(role="user", content="Hi, I am Cy.")])
        )
        assert client.search("who has beehives?", limit=2)[0].memory.id == fact.id
        first = client.list_memories(limit=2)
        rest = client.list_memories(limit=2, cursor=first.next_cursor)
        assert {m.id for m in [*first.items, *rest.items]} == {fact.id, note.id, conv.id}
        since = client.list_memories(since=datetime(2000, 1, 1, tzinfo=UTC), types=["fact"])
        assert {m.id for m in since.items} == {fact.id, note.id}
        assert client.update_memory(note.id, {"tags": ["family"]}).tags == ["family"]
        stored = client.append_messages(conv.id, [{"role": "assistant", "content": "Hello Cy!"}])
        assert stored[0].seq == 1 and client.get_memory(conv.id).message_count == 2
        context = client.build_context(
            messages=[Message(role="user", content="tell me about bees")]
        )
        assert fact.id in context.sources
        assert client.record_turn("sync-1", "I like jazz.", "Noted!").message_seqs == [0, 1]
        assert "jazz" in client.prepare_context("sync-1", "What music do I like?").text
        client.delete_memory(note.id)
        with pytest.raises(NotFound) as missing:
            client.get_memory(note.id)
        _assert_error(missing.value, 404)
        with pytest.raises(PermissionDenied) as denied:
            client.create_user(_name("nope"))
        _assert_error(denied.value, 403)
        with pytest.raises(InvalidInput) as invalid:
            client.search("", limit=1)
        _assert_error(invalid.value, 422)
    with HalldyllClient(url, "hr_wrong") as stranger, pytest.raises(AuthenticationFailed) as auth:
        stranger.list_memories()
    _assert_error(auth.value, 401)


async def test_dot_segments_never_reach_another_route(
    ray_serve: dict[str, Any], admin_key: str
) -> None:
    """An id of ``.`` or ``..`` would be removed by URL normalisation: a memory id of ``..``
    addressed ``/v1/users/<id>``, and an Admin's delete_memory erased the user."""
    url = ray_serve["url"]
    async with AsyncHalldyllClient(url, admin_key, timeout=60) as admin:
        victim = await admin.create_user(_name("vic"))
        for dots in (".", ".."):
            calls = [
                admin.delete_memory(dots, user_id=victim.id),
                admin.update_memory(dots, {"tags": ["x"]}, user_id=victim.id),
                admin.get_memory(dots, user_id=victim.id),
                admin.delete_user(dots),
                admin.get_model(dots),
            ]
            for call in calls:
                with pytest.raises(InvalidInput) as refused:
                    await call
                assert refused.value.field in {"memory_id", "user_id", "model"}
        assert (await admin.get_user(victim.id)).role.value == "user"
        # A '/' in an id reached another route once the server decoded %2F (a memory id
        # "<id>/history" read the history); None built the list's path.
        fact = await admin.store_memory({"type": "fact", "statement": "x"}, user_id=victim.id)
        for bad in (f"{fact.id}/history", f"{fact.id}/messages", None):
            with pytest.raises(InvalidInput) as refused:
                await admin.get_memory(bad, user_id=victim.id)  # type: ignore[arg-type]
            assert refused.value.field == "memory_id"
        with pytest.raises(InvalidInput):
            await admin.get_user(f"{victim.id}/keys")
        # A key as read from a file, newline and all, works; one with a line break inside is
        # refused without being repeated.
        async with AsyncHalldyllClient(url, admin_key + "\n", timeout=60) as padded:
            assert (await padded.me()).role.value == "admin"
    broken = admin_key[:10] + "\n" + admin_key[10:]
    with pytest.raises(InvalidInput) as refused:
        AsyncHalldyllClient(url, broken)
    assert refused.value.field == "api_key"
    assert admin_key[10:] not in str(refused.value) and admin_key[:10] not in str(refused.value)


async def test_sync_client(ray_serve: dict[str, Any], admin_key: str) -> None:
    # The test's event loop is running: the blocking client goes to a thread.
    await asyncio.to_thread(_sync_scenario, ray_serve["url"], admin_key)


# --------------------------------------------------------------------------- offline
async def test_connection_error_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncHalldyllClient(url, "k", timeout=5) as client:
        with pytest.raises(Unavailable, match="GET /healthz"):
            await client.healthz()
    with HalldyllClient(url, "k", timeout=5) as sync, pytest.raises(Unavailable):
        sync.me()


def test_requests_are_built_once_for_both_clients() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path.endswith("/memories"):
            return httpx.Response(200, json={"items": [], "next_cursor": None})
        return httpx.Response(204)

    transport = httpx.MockTransport(handler)
    with HalldyllClient("http://svc/prefix", "secret", transport=transport) as client:
        client.list_memories(
            types=["fact", MemoryType.IMAGE],
            tags=["a", "b"],
            include_shared=False,
            since=datetime(2024, 5, 1, 12, tzinfo=UTC),
            limit=5,
        )
        client.delete_model("org/model name")
    listed, deleted = sent
    assert listed.headers["authorization"] == "Bearer secret"
    assert listed.url.path == "/prefix/v1/users/me/memories"
    assert dict(listed.url.params) == {
        "types": "fact,image",
        "tags": "a,b",
        "include_shared": "false",
        "since": "2024-05-01T12:00:00+00:00",
        "limit": "5",
    }
    assert deleted.method == "DELETE"
    assert deleted.url.raw_path == b"/prefix/v1/models/org%2Fmodel%20name"


async def test_errors_without_the_error_shape() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/me":
            return httpx.Response(502, text="Bad Gateway", headers={"X-Request-ID": "r-1"})
        if request.url.path == "/readyz":
            return httpx.Response(503, json={"ok": False, "database": {"ok": False}})
        if request.url.path == "/v1/models":
            return httpx.Response(200, text="not json")
        if request.url.path == "/v1/users/me/jobs":  # a proxy's own 502/503/504, as Serve's
            return httpx.Response(500, text="Internal Server Error")
        if request.url.path == "/v1/users/me/keys":  # the app's own 500 has its error shape
            body = {"error": {"code": "internal_error", "message": "internal error"}}
            return httpx.Response(500, json=body)
        if request.url.path == "/v1/audit":
            body = {"error": {"code": "unavailable", "message": "down", "request_id": "r-3"}}
            return httpx.Response(503, json=body, headers={"Retry-After": "1"})
        return httpx.Response(
            422, json={"error": {"code": "invalid_input", "message": "bad", "request_id": "r-2"}}
        )

    client = AsyncHalldyllClient("http://svc", "k", transport=httpx.MockTransport(handler))
    try:
        with pytest.raises(Unavailable) as gateway:
            await client.me()
        assert gateway.value.fields == {"request_id": "r-1", "status_code": 502}
        assert (await client.readyz())["ok"] is False  # a report, not an exception
        with pytest.raises(HalldyllError, match="unexpected response"):
            await client.list_models()
        with pytest.raises(Unavailable) as bare:
            await client.list_jobs()
        assert bare.value.fields["status_code"] == 500
        with pytest.raises(HalldyllError) as internal:
            await client.list_api_keys()
        assert not isinstance(internal.value, Unavailable)
        with pytest.raises(InvalidInput) as invalid:
            await client.search("x", session_id="s", tags=["t"], threshold=0.5)
        # Errors pickle with their fields (they may cross Ray actors in a caller's app).
        again = pickle.loads(pickle.dumps(invalid.value))
        assert isinstance(again, InvalidInput) and again.request_id == "r-2"  # type: ignore[attr-defined]
        with pytest.raises(InvalidInput, match="user_id"):
            await client.get_user("")
        with pytest.raises(Unavailable) as busy:
            await client.list_audit()
        assert busy.value.fields == {"request_id": "r-3", "status_code": 503, "retry_after": 1}
    finally:
        await client.aclose()


def test_bodies_drop_unset_options() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"results": []})

    with HalldyllClient("http://svc", "k", transport=httpx.MockTransport(handler)) as client:
        assert client.search("hello", user_id=uuid.UUID(int=1)) == []
    assert bodies == [{"query": "hello", "include_shared": True, "group": "part"}]


async def test_a_search_in_the_basic_view_leaves_out_a_transcriptions_parts_on_every_surface(
    ray_serve: dict[str, Any], admin_key: str, http: httpx.AsyncClient, serve_db: str
) -> None:
    """``view="basic"`` (REST body, Python clients, GraphQL, MCP): each hit of a transcription
    without its text and segments, the rest as in the full view; an unknown view is a 422
    naming ``view``. And the client reads a record as the server sends it: a segment stored
    before a rule (a speaker with a line separator) failed the client's own validation."""
    url = ray_serve["url"]
    async with AsyncHalldyllClient(url, admin_key, timeout=60) as admin:
        user = await admin.create_user(_name("view"))
        key = (await admin.create_api_key(user.id)).key
    segments = [
        {"start": float(i), "end": i + 1.0, "text": f"item {i} of the ferry budget"}
        for i in range(30)
    ]
    async with AsyncHalldyllClient(url, key, timeout=60) as client:
        talk = await client.store_memory(
            {"type": "transcription", "segments": segments, "language": "en"}
        )
        full = await client.search("ferry budget item 3", limit=4)
        basic = await client.search("ferry budget item 3", limit=4, view="basic")
        assert [(h.memory.id, h.matched) for h in basic] == [(h.memory.id, h.matched) for h in full]
        assert {h.memory.id for h in basic} == {talk.id}
        assert all(len(h.memory.memory.segments) == 30 for h in full)  # type: ignore[union-attr]
        assert all(h.memory.memory.segments == [] for h in basic)  # type: ignore[union-attr]
        assert all(h.memory.memory.text == "" for h in basic)  # type: ignore[union-attr]
        with pytest.raises(InvalidInput) as bad:
            await client.search("ferry", view="compact")
        assert bad.value.fields["field"] == "view" and bad.value.fields["status_code"] == 422
        with HalldyllClient(url, key, timeout=60) as sync:
            hits = sync.search("ferry budget item 3", limit=4, view="basic")
            assert [h.matched for h in hits] == [h.matched for h in basic]

        conn = await asyncpg.connect(serve_db)
        try:
            await conn.execute(
                "UPDATE memories SET payload = jsonb_set(payload, '{segments,0,speaker}', "
                "to_jsonb($1::text)) WHERE id = $2",
                "Ana\u2028Bo",  # refused in a speaker's name since
                talk.id,
            )
        finally:
            await conn.close()
        read = await client.get_memory(talk.id)
        assert read.memory.segments[0].speaker == "Ana\u2028Bo"  # type: ignore[union-attr]
        listed = await client.list_memories()
        assert [m.id for m in listed.items] == [talk.id]

    texts = {}
    for view in ("FULL", "BASIC"):
        answer = await graphql(
            http,
            key,
            f'{{ search(query: "ferry budget item 3", limit: 2, view: {view}) '
            "{ matched { index } memory { id text } } }",
        )
        assert "errors" not in answer, answer
        texts[view] = {hit["memory"]["text"] for hit in answer["data"]["search"]}
    assert texts["BASIC"] == {""} and "item 29 of the ferry budget" in texts["FULL"].pop()

    async with mcp_session(url, key) as mcp:
        found = mcp_result(
            await mcp.call_tool(
                "search_memories", {"query": "ferry budget item 3", "limit": 2, "view": "basic"}
            )
        )
        assert [hit["memory"]["memory"]["segments"] for hit in found["results"]] == [[], []]
        assert found["results"][0]["matched"]["text"].startswith("item 3")
