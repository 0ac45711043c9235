"""Protocol- and encoding-level edges of the served HTTP surface: what a body's bytes and a
header's bytes may be, answered the same way by REST, GraphQL and MCP."""

from __future__ import annotations

import gzip
import json
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
    for raw_id in (b"1.5", b"true", b"{}", b"[1]", b"null", b"NaN"):
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
    # A notification has no id, and is still taken as one.
    body = b'{"jsonrpc": "2.0", "method": "notifications/initialized"}'
    assert (await http.post("/mcp", content=body, headers=headers)).status_code == 202
