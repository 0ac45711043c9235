"""Protocol- and encoding-level edges of the served HTTP surface: what a body's bytes and a
header's bytes may be, answered the same way by REST, GraphQL and MCP."""

from __future__ import annotations

import gzip
import json
import uuid
from typing import Any

import httpx
from support import bearer
from support import user_with_key as _user_with_key

_FACT = {"type": "fact", "statement": "Ada drinks green tea"}
_MCP_LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
_MCP_ACCEPT = "application/json, text/event-stream"


async def _stored(http: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    r = await http.get("/v1/users/me/memories", headers=bearer(key))
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert {"code", "message", "request_id"} <= set(error), error
    return dict(error)


async def test_a_body_with_a_content_coding_is_refused_on_every_surface(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """No route decodes a Content-Encoding: a gzip body was a 400 on REST and a 500 on
    GraphQL, and a plain body labelled gzip or br was stored as if unlabelled. Each is a 415
    with ``Accept-Encoding: identity`` before the body is read, and nothing is stored."""
    _, key = await _user_with_key(http, admin_key)
    fact = json.dumps(_FACT).encode()
    sent = [
        ("/v1/users/me/memories", gzip.compress(fact), "gzip"),
        ("/v1/users/me/memories", fact, "gzip"),
        ("/v1/users/me/memories", fact, "br"),
        ("/v1/users/me/memories", fact, "identity, deflate"),
        ("/v1/users/me/memories/batch", json.dumps({"memories": [_FACT]}).encode(), "GZIP"),
        ("/graphql", gzip.compress(b'{"query": "{ me { id } }"}'), "gzip"),
        ("/mcp", gzip.compress(json.dumps(_MCP_LIST).encode()), "gzip"),
        ("/mcp", json.dumps(_MCP_LIST).encode(), "x-gzip"),
    ]
    for path, body, coding in sent:
        headers = {
            **bearer(key),
            "content-type": "application/json",
            "content-encoding": coding,
            "accept": _MCP_ACCEPT,
        }
        r = await http.post(path, content=body, headers=headers)
        error = _error(r, 415)
        assert error["code"] == "unsupported_media_type", error
        assert error["field"] == "Content-Encoding", error
        assert r.headers["accept-encoding"] == "identity", r.headers
    assert await _stored(http, key) == []
    # What RFC 9110 calls no coding at all is a body as sent.
    r = await http.post(
        "/v1/users/me/memories",
        content=fact,
        headers={**bearer(key), "content-type": "application/json", "content-encoding": "identity"},
    )
    assert r.status_code == 201, r.text


async def test_a_body_that_is_not_text_is_a_client_error_on_every_surface(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """Bytes that are not UTF-8 (Latin-1 text, a compressed body without its header, a lone
    continuation byte) were a UnicodeDecodeError: GraphQL answered 500, REST a 400 that did
    not say why. Now "not valid JSON" at the first bad byte, the REST 422 and GraphQL 400 of
    any other malformed body, and nothing is stored."""
    _, key = await _user_with_key(http, admin_key)
    bodies = [
        '{"type": "fact", "statement": "Ada likes café"}'.encode("latin-1"),
        gzip.compress(json.dumps(_FACT).encode()),
        b'{"type": "fact", "statement": "\x80"}',
    ]
    for body in bodies:
        for path, status in (("/v1/users/me/memories", 422), ("/graphql", 400)):
            r = await http.post(
                path, content=body, headers={**bearer(key), "content-type": "application/json"}
            )
            error = _error(r, status)
            assert error["code"] == "invalid_input", error
            assert "not valid JSON" in error["message"], error
            assert "not UTF-8 text" in error["message"], error
    assert await _stored(http, key) == []


async def test_an_authorization_header_past_ascii_is_a_401_on_every_surface(
    http: httpx.AsyncClient,
) -> None:
    """A header's bytes past 0x7F (Latin-1 or UTF-8 text in a key) were a 500 on GraphQL and
    MCP, whose key check re-sent the header through httpx (ASCII only), where REST answers
    401: the same 401 on all three now."""
    for value in ("Bearer caf\xe9".encode("latin-1"), "Bearer clé€".encode()):
        for path, body in (
            ("/v1/me", None),
            ("/graphql", b'{"query": "{ me { id } }"}'),
            ("/mcp", json.dumps(_MCP_LIST).encode()),
        ):
            headers = [
                ("authorization", value),
                ("content-type", "application/json"),
                ("accept", _MCP_ACCEPT),
            ]
            method = "GET" if body is None else "POST"
            r = await http.request(method, path, content=body, headers=headers)
            error = _error(r, 401)
            assert error["code"] == "unauthenticated", (path, error)
            assert r.headers["www-authenticate"] == "Bearer", (path, r.headers)


async def test_a_graphql_body_that_is_not_an_object_is_a_400(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """strawberry reads the body as an object: a JSON number, string, boolean or null was a
    500. A 400 in the API's error shape now, as for a body that is not JSON."""
    _, key = await _user_with_key(http, admin_key)
    for body in (b"1", b"null", b'"{ me { id } }"', b"true", b"-0.5"):
        r = await http.post(
            "/graphql", content=body, headers={**bearer(key), "content-type": "application/json"}
        )
        error = _error(r, 400)
        assert error["code"] == "invalid_input", error
        assert "JSON object" in error["message"], error


async def test_a_lone_surrogate_quoted_in_an_error_is_escaped(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """An error that quotes the caller's text (strawberry's unknown operation name) with a
    lone surrogate in it could not be encoded as UTF-8: a 500 instead of the refusal. The
    surrogate is written as its escape now, on every error body of the API."""
    _, key = await _user_with_key(http, admin_key)
    h = {**bearer(key), "content-type": "application/json"}
    for name in ("A\ud800", "\udfffB", "A\ud800\ud800"):
        body = json.dumps({"query": "query A { me { id } }", "operationName": name})
        r = await http.post("/graphql", content=body.encode(), headers=h)
        error = _error(r, 400)
        assert error["code"] == "invalid_input", error
        assert "\\ud800" in error["message"] or "\\udfff" in error["message"], error
    # REST quotes field names a body does not have: a 422 as before, never a 500.
    body = json.dumps({**_FACT, "\ud800": 1}).encode()
    _error(await http.post("/v1/users/me/memories", content=body, headers=h), 422)
    assert await _stored(http, key) == []


async def test_an_mcp_transport_refusal_is_json(http: httpx.AsyncClient, admin_key: str) -> None:
    """The MCP SDK's transport check answered a POST that is not ``application/json`` with a
    plain-text 400; it is the JSON-RPC error object of its other refusals now."""
    _, key = await _user_with_key(http, admin_key)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {**bearer(key), "accept": _MCP_ACCEPT}
        if content_type:
            headers["content-type"] = content_type
        r = await http.post("/mcp", content=json.dumps(_MCP_LIST).encode(), headers=headers)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json", r.headers
        answer = r.json()
        assert answer["jsonrpc"] == "2.0" and answer["id"] is None, answer
        assert answer["error"]["code"] == -32600, answer
        assert "Content-Type" in answer["error"]["message"], answer


async def test_an_mcp_request_whose_id_mcp_does_not_take_is_refused(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """MCP takes a request id that is a string or an integer. The SDK read any other (a
    float, a boolean, an object, null, NaN) as a notification and answered 202 with no body,
    so the client waited for an answer that never came: a 400 with JSON-RPC's Invalid
    Request now. A string or integer id is answered as before."""
    _, key = await _user_with_key(http, admin_key)
    headers = {**bearer(key), "content-type": "application/json", "accept": _MCP_ACCEPT}
    for raw_id in (b"1.5", b"true", b"{}", b"[1]", b"null"):
        body = b'{"jsonrpc": "2.0", "id": ' + raw_id + b', "method": "tools/list"}'
        r = await http.post("/mcp", content=body, headers=headers)
        assert r.status_code == 400, (raw_id, r.status_code, r.text)
        answer = r.json()
        assert answer["id"] is None and answer["error"]["code"] == -32600, answer
        assert "string or an integer" in answer["error"]["message"], answer
    for good_id in ("7", '"seven"'):
        body = '{"jsonrpc": "2.0", "id": ' + good_id + ', "method": "tools/list"}'
        r = await http.post("/mcp", content=body.encode(), headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["id"] == json.loads(good_id) and "tools" in r.json()["result"], r.text
    # NaN is no JSON at all (RFC 8259): a parse error, as REST's 422 "not valid JSON".
    body = b'{"jsonrpc": "2.0", "id": NaN, "method": "tools/list"}'
    r = await http.post("/mcp", content=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == -32700, r.text
    # A notification has no id, and is still taken as one.
    body = b'{"jsonrpc": "2.0", "method": "notifications/initialized"}'
    assert (await http.post("/mcp", content=body, headers=headers)).status_code == 202


def _mcp_call(name: str, arguments: Any, request_id: int = 5) -> bytes:
    """A tools/call body as a client writes it: a lone surrogate as its JSON escape."""
    params = {"name": name, "arguments": arguments}
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
    ).encode()


async def test_a_lone_surrogate_in_an_mcp_argument_is_a_tool_error_naming_it(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """A lone UTF-16 surrogate (``"\\ud800"``, a broken emoji escape) is JSON: REST answers
    a 422 naming the field. The MCP SDK's parser cannot hold one and refused the whole
    message as a parse error (-32700, HTTP 400) naming nothing. It is a tool error naming
    the argument now, as for any other argument the tool refuses, and nothing is stored."""
    _, key = await _user_with_key(http, admin_key)
    headers = {**bearer(key), "content-type": "application/json", "accept": _MCP_ACCEPT}
    calls = [
        ("store_fact", {"statement": "tea\ud800"}, "statement", 3),
        (
            "store_fact",
            {"statement": "tea", "metadata": {"mood": ["ok", "\udfff"]}},
            "metadata.mood.1",
            0,
        ),
        ("store_fact", {"statement": "tea", "metadata": {"\ud800": 1}}, "metadata", 0),
        (
            "store_conversation",
            {"title": "t", "messages": [{"role": "user", "content": "a\ud83d"}]},
            "messages.0.content",
            1,
        ),
        ("search_memories", {"query": "\udc97x"}, "query", 0),
    ]
    for number, (tool, arguments, field, at) in enumerate(calls):
        r = await http.post("/mcp", content=_mcp_call(tool, arguments, number), headers=headers)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["id"] == number and answer["result"]["isError"] is True, answer
        text = answer["result"]["content"][0]["text"]
        assert text == (
            f"invalid_input: {field}: text contains a lone UTF-16 surrogate at position {at} "
            f"(field: {field})"
        ), text
    # The same value over REST: its 422 names the field too.
    body = json.dumps({**_FACT, "statement": "tea\ud800"}).encode()
    rest = _error(await http.post("/v1/users/me/memories", content=body, headers=headers), 422)
    assert rest["field"] == "fact.statement", rest
    # Outside a tool's arguments: JSON-RPC's invalid params, naming where.
    r = await http.post("/mcp", content=_mcp_call("store_fact\ud800", {}), headers=headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == -32602 and error["message"].startswith("params.name: "), error
    assert await _stored(http, key) == []


async def test_a_number_too_large_for_a_float_is_not_json_on_every_surface(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """``1e999`` is a JSON number Python reads as inf: it went on as an Infinity (a metadata
    value's own check, a bound's "finite number", the MCP SDK's parser took it as given),
    where the literal ``Infinity`` is refused as not JSON. The same refusal now, at its
    position, on REST, GraphQL, MCP and the import; nothing stored."""
    user, key = await _user_with_key(http, admin_key)
    headers = {**bearer(key), "content-type": "application/json", "accept": _MCP_ACCEPT}
    for literal in ("1e999", "-1E+400", "1" + "0" * 400 + ".5"):
        reason = "is too large a number (it reads as Infinity)"
        for path, body in (
            ("/v1/users/me/memories", '{"type": "fact", "statement": "x", "importance": N}'),
            ("/v1/users/me/memories", '{"type": "fact", "statement": "x", "metadata": {"w": N}}'),
            ("/v1/users/me/search", '{"query": "tea", "threshold": N}'),
            ("/v1/users/me/context", '{"query": "tea", "max_tokens": N}'),
        ):
            content = body.replace("N", literal)
            error = _error(await http.post(path, content=content.encode(), headers=headers), 422)
            assert error["code"] == "invalid_input", error
            assert reason in error["message"], (path, error)
            assert f"at character {content.index(literal)}" in error["message"], error
            query = "mutation($m: JSON!) { storeMemory(memory: $m) { id } }"
            graphql = '{"query": "' + query + '", "variables": {"m": ' + content + "}}"
            r = await http.post("/graphql", content=graphql.encode(), headers=headers)
            assert reason in _error(r, 400)["message"], r.text
        call = (
            '{"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": '
            '"store_fact", "arguments": {"statement": "x", "metadata": {"w": N}}}}'
        ).replace("N", literal)
        r = await http.post("/mcp", content=call.encode(), headers=headers)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == -32700 and reason in error["message"], error
        assert f"at character {call.index(literal)}" in error["message"], error
        exported = json.dumps(
            {
                "format": "halldyll-export",
                "version": 1,
                "user": {"id": user["id"], "username": "x"},
                "exported_at": "2026-01-01T00:00:00Z",
            }
        )
        line = (
            (
                '{"id": "ID", "memory": {"type": "fact", "statement": "x", "confidence": N}, '
                '"created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"}'
            )
            .replace("ID", str(uuid.uuid4()))
            .replace("N", literal)
        )
        r = await http.post(
            "/v1/users/me/import",
            content=(exported + "\n" + line + "\n").encode(),
            headers={**bearer(key), "content-type": "application/x-ndjson"},
        )
        assert r.status_code == 200, r.text
        (problem,) = r.json()["errors"]
        assert problem["line"] == 2 and reason in problem["message"], problem
    assert await _stored(http, key) == []


async def test_a_header_we_read_past_ascii_is_a_client_error_naming_it(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    """X-Request-ID and Idempotency-Key with bytes past 0x7F: a 4xx naming the header on
    every surface, never a 500, and nothing stored.

    Only the UTF-8 form of X-Request-ID reaches this service: Ray Serve's proxy decodes that
    header as UTF-8 itself (``proxy.py``, ``value.decode()``) before any of our code runs,
    and answers Latin-1 bytes there with its own plain-text 500."""
    _, key = await _user_with_key(http, admin_key)
    base = [("authorization", f"Bearer {key}".encode()), ("content-type", b"application/json")]
    for path, body in (
        ("/v1/me", None),
        ("/graphql", b'{"query": "{ me { id } }"}'),
        ("/mcp", json.dumps(_MCP_LIST).encode()),
    ):
        headers = [*base, ("accept", _MCP_ACCEPT.encode()), ("x-request-id", "clé€".encode())]
        method = "GET" if body is None else "POST"
        r = await http.request(method, path, content=body, headers=headers)
        assert _error(r, 400)["field"] == "X-Request-ID", (path, r.text)
    turn = json.dumps({"user_message": "hi", "assistant_message": "hello"}).encode()
    for value in ("caf\xe9".encode("latin-1"), "clé€".encode()):
        r = await http.post(
            "/v1/users/me/sessions/s1/turns",
            content=turn,
            headers=[*base, ("idempotency-key", value)],
        )
        assert _error(r, 422)["field"] == "idempotency-key", r.text
    assert await _stored(http, key) == []
