"""The MCP server on the Ingress: Streamable HTTP at ``/mcp``, behind the same API key.

:func:`mount_mcp` adds the route to the Ingress's FastAPI app and runs the MCP session
manager in that app's lifespan (Ray Serve runs an ingress app's lifespan in every replica; a
mounted sub-application's own lifespan would not run, so the manager is not a sub-app).

One more door into the same rooms, never a second set of rules:

- **Authentication.** Every request to ``/mcp`` is first checked as ``GET /v1/me`` with the
  request's own ``Authorization`` header, in process: a missing, malformed, unknown, expired or
  revoked key, or a disabled user, gets the REST API's 401 (its error body, its
  ``WWW-Authenticate``, its audit row), and a 503 of the API is answered as such. The check
  costs what a REST request's authentication costs (a key lookup), plus reading the user.
- **Every tool call is a REST call.** The tools (:mod:`halldyll_ray.mcp_server`) use an
  :class:`~halldyll_ray.client.AsyncHalldyllClient` whose transport is
  :class:`httpx.ASGITransport` over this same FastAPI app, carrying the caller's key and the
  ``/mcp`` request's id as ``X-Request-ID``: the same routes, permission matrix, validation,
  error mapping and audit rows (with that request id) as REST, without a network hop. The
  inner calls do not pass through Serve's proxy, so they take none of the replica's
  ``max_ongoing_requests`` slots (no deadlock under load); the route metrics count them under
  their own routes too.

**Stateless, JSON responses.** The session manager runs with ``stateless_http=True`` and
``json_response=True``: each POST carries one JSON-RPC message and gets its answer as one JSON
body; no ``Mcp-Session-Id`` is issued and nothing is kept between requests. The Ingress is
replicated behind a load balancer (Ray Serve's proxies, a Kubernetes Service) with no session
affinity, so a session kept in one replica's memory would be unknown to the replica the next
request lands on, and lost when a replica is replaced. The tools need no server-to-client
requests (sampling, elicitation) or streamed notifications, which are what a session and SSE
would buy. The identity is not session state either: every request brings its key.

**No DNS-rebinding check.** The SDK's Host/Origin allow-list protects an unauthenticated server
on localhost from a page in the user's browser; this one refuses any request without a valid
API key, which such a page does not have, and is reached under whatever host name the
deployment gives it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from mcp.server.mcpserver import Context
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from halldyll_ray import validation
from halldyll_ray.client import AsyncHalldyllClient
from halldyll_ray.errors import AuthenticationFailed, InvalidInput
from halldyll_ray.mcp_server import build_mcp_server, describe
from halldyll_ray.serve.http import error_response
from halldyll_ray.serve.loopback import (
    Loopback,
    authorization_of,
    bearer,
    relay,
    request_id_of,
)
from halldyll_ray.validation import error_location

#: Where the MCP endpoint is served.
MCP_PATH = "/mcp"


class McpEndpoint:
    """The ASGI app at ``/mcp``: the key check, then the MCP session manager.

    Args:
        app: The FastAPI app whose routes the tools call (the Ingress's ``api``).
    """

    def __init__(self, app: FastAPI) -> None:
        self._loopback = Loopback(app)
        self._manager: StreamableHTTPSessionManager | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve MCP while inside: the MCP server and its session manager's task group.

        A new manager each time (one can run only once), so an app whose lifespan runs again
        in the same process serves again.
        """
        server = build_mcp_server(self._clients)
        server.streamable_http_app(
            streamable_http_path=MCP_PATH,
            stateless_http=True,
            json_response=True,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        manager = server.session_manager
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    @asynccontextmanager
    async def _clients(self, ctx: Context[Any, Any]) -> AsyncIterator[AsyncHalldyllClient]:
        """The tools' client: the key and request id of the HTTP request the call came in."""
        request = ctx.request_context.request
        headers = getattr(request, "headers", None) or {}
        key = bearer(headers.get("authorization", ""))
        if key is None:  # the key check let the request in, so it had one
            raise AuthenticationFailed("no API key came with this MCP request")
        scope = getattr(request, "scope", {})
        async with self._loopback.client(key, request_id_of(scope)) as client:
            yield client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = request_id_of(scope) or ""
        manager = self._manager
        if manager is None:
            # Before the lifespan started (or after it ended) there is no manager to serve.
            message = "the MCP endpoint is not running"
            answer = error_response(
                503, "unavailable", message, request_id, headers={"Retry-After": "5"}
            )
            await answer(scope, receive, send)
            return
        checked = await self._loopback.check_key(authorization_of(scope), request_id_of(scope))
        if checked.status_code != 200:
            await relay(checked)(scope, receive, send)
            return
        if scope.get("method") == "POST":
            body, receive = await _buffered(receive)
            refused = _refusal(body) if _is_json(scope) else None
            if refused is not None:
                await refused(scope, receive, send)
                return
        await manager.handle_request(scope, receive, _without_rejected_values(send))


async def _buffered(receive: Receive) -> tuple[bytes, Receive]:
    """The request's whole body (the Ingress middleware bounds its size and pace), and a
    ``receive`` that hands it on once, then waits on the connection as before."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body, receive  # the client went away: the SDK sees the same
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return dict(await receive())
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return body, replay


def _is_json(scope: Scope) -> bool:
    """Whether the request says its body is JSON (any other the SDK refuses itself, 415)."""
    for name, value in scope.get("headers") or ():
        if name == b"content-type":
            return bool(value.split(b";")[0].strip().lower() == b"application/json")
    return False


def _refusal(body: bytes) -> Response | None:
    """The answer to a JSON-RPC body the SDK would misread, or None to let the SDK answer.

    The body is read as every other surface reads a client's JSON
    (:func:`~halldyll_ray.validation.json_loads`):

    - what that refuses (``NaN``, ``Infinity``, ``1e999``, an integer of thousands of
      digits, nesting past the parser's depth) is a parse error (-32700, HTTP 400) saying
      what and where, as REST's 422 "not valid JSON" does. The SDK's parser took ``NaN``,
      ``Infinity`` and ``1e999`` as numbers, handed on to the tools;
    - a lone UTF-16 surrogate (``"\\ud800"``: JSON, which REST refuses with a 422 naming
      the field) is a tool error naming the argument, or an invalid-params error naming
      where it is: the SDK's parser cannot hold one and refused the whole message as a
      parse error (-32700, HTTP 400), naming no field;
    - a request whose ``id`` is not one MCP takes is an invalid request
      (:func:`_bad_request_id`).

    Anything else, valid or not, is the SDK's to answer.
    """
    try:
        message = validation.json_loads(body)
    except json.JSONDecodeError as exc:
        return _json_rpc_error(400, _PARSE_ERROR, f"Parse error: {exc.msg} at character {exc.pos}")
    if not isinstance(message, dict):
        return None
    refusal = _bad_request_id(message)
    if refusal is not None:
        return _json_rpc_error(400, _INVALID_REQUEST, refusal)
    found = _lone_surrogate(message)
    if found is None:
        return None
    where, at = found
    text = f"text contains a lone UTF-16 surrogate at position {at}"
    request_id = message.get("id")
    params = message.get("params")
    if (
        message.get("method") == "tools/call"
        and isinstance(params, dict)
        and isinstance(params.get("arguments"), dict)
        and where[:2] == ["params", "arguments"]
        and len(where) > 2
    ):
        # As the SDK answers a call whose arguments fail the tool's schema (_Server).
        field = error_location(where[2:])
        error = describe(InvalidInput(f"{field}: {text}", field=field))
        result = {"content": [{"type": "text", "text": error}], "isError": True}
        answer = {"jsonrpc": "2.0", "id": request_id, "result": result}
        return Response(json.dumps(answer), media_type="application/json")
    field = error_location(where)
    code = _INVALID_PARAMS if where[:1] == ["params"] else _INVALID_REQUEST
    if "id" not in message:
        request_id = None
    error_body = {"code": code, "message": f"{field}: {text}", "data": {"field": field}}
    answer = {"jsonrpc": "2.0", "id": request_id, "error": error_body}
    return Response(json.dumps(answer), status_code=400, media_type="application/json")


def _lone_surrogate(value: Any) -> tuple[list[str], int] | None:
    """Where the first lone UTF-16 surrogate of a JSON ``value`` is: the path of the string
    that holds it (of the object, for a key), and its position in that string."""
    stack: list[tuple[list[str], Any]] = [([], value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found is not None:
                return path, found.start()
        elif isinstance(item, dict):
            for key in item:
                found = _SURROGATE.search(key)
                if found is not None:
                    return path, found.start()
            stack.extend(([*path, key], item[key]) for key in reversed(list(item)))
        elif isinstance(item, list):
            stack.extend(([*path, str(i)], v) for i, v in reversed(list(enumerate(item))))
    return None


def _bad_request_id(message: dict[str, Any]) -> str | None:
    """Why a JSON-RPC request's ``id`` is not one MCP takes, or None.

    MCP requires a string or an integer (never null). The SDK read a request with any other
    id (``1.5``, ``true``, ``{}``, ``null``) as a notification and answered 202 with no body:
    the client waited for a reply that never came. A message without a ``method`` and an
    ``id`` is left to the SDK, which answers it."""
    if "method" not in message or "id" not in message:
        return None
    value = message["id"]
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return None
    kind = "null" if value is None else type(value).__name__.replace("dict", "object")
    return f"a request's id must be a string or an integer (MCP), not {kind}"


def _json_rpc_error(status: int, code: int, message: str) -> Response:
    """A JSON-RPC error object with a null id, as the SDK's own refusals answer."""
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}
    return Response(json.dumps(body), status_code=status, media_type="application/json")


#: What a 400 for a message that is not JSON-RPC 2.0 says instead of the SDK's text.
_NOT_JSON_RPC = (
    "Validation error: the request is not a valid JSON-RPC 2.0 message (check jsonrpc, id, "
    "method and params)"
)


#: JSON-RPC's "Invalid Request" error code, of a refusal the SDK answers in plain text.
_INVALID_REQUEST = -32600
#: JSON-RPC's "Parse error" and "Invalid params" codes.
_PARSE_ERROR = -32700
_INVALID_PARAMS = -32602
#: A lone UTF-16 surrogate (what a JSON escape such as ``\ud800`` decodes to).
_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_rejected_values(send: Send) -> Send:
    """``send`` with the SDK's 4xx answers made JSON that says what was wrong without what
    was sent.

    Its 400 for a malformed message quotes pydantic's report, which repeats the rejected
    values (a tool's arguments can hold a secret). And its transport checks answer in plain
    text (``Invalid Content-Type header`` for a POST that is not ``application/json``): such a
    refusal becomes the JSON-RPC error object its other refusals are (code -32600, ``id``
    null), with the same words. Other answers pass unchanged."""
    start: dict[str, Any] | None = None
    body = b""

    async def guarded(message: dict[str, Any]) -> None:
        nonlocal start, body
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        body += message.get("body", b"")
        if message.get("more_body", False):
            return
        headers = list(start.get("headers", []))
        try:
            answer = json.loads(body)
        except ValueError:
            text = body.decode("utf-8", "replace").strip() or "invalid request"
            refusal = {"code": _INVALID_REQUEST, "message": text}
            body = json.dumps({"jsonrpc": "2.0", "id": None, "error": refusal}).encode()
            headers = [(n, v) for n, v in headers if n.lower() != b"content-type"]
            headers.append((b"content-type", b"application/json"))
        else:
            try:
                error = answer["error"]
                if str(error["message"]).startswith("Validation error"):
                    error["message"] = _NOT_JSON_RPC
                    body = json.dumps(answer).encode()
            except (KeyError, TypeError):
                pass
        headers = [
            (name, str(len(body)).encode() if name.lower() == b"content-length" else value)
            for name, value in headers
        ]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return guarded  # type: ignore[return-value]


def mount_mcp(app: FastAPI, *, path: str = MCP_PATH) -> McpEndpoint:
    """Serve MCP over Streamable HTTP at ``path`` of ``app``; call at import, in every process.

    Adds the route (outside the OpenAPI schema) and wraps the app's lifespan so that the
    session manager runs while the app does.

    Returns:
        The endpoint (its :meth:`McpEndpoint.running` is what the lifespan enters).
    """
    endpoint = McpEndpoint(app)
    # An ASGI app as the endpoint: Starlette hands it the raw request. POST only: stateless,
    # there is no stream for a GET to open (it would hang, empty) nor a session to DELETE;
    # anything else gets the API's own 405 with Allow: POST.
    app.router.add_route(path, endpoint, methods=["POST"], include_in_schema=False)  # type: ignore[arg-type]
    outer = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(asgi_app: Any) -> AsyncIterator[Any]:
        async with outer(asgi_app) as state, endpoint.running():
            yield state

    app.router.lifespan_context = lifespan
    return endpoint
