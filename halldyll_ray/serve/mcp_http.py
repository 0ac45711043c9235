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

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from mcp.server.mcpserver import Context
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from halldyll_ray.client import AsyncHalldyllClient
from halldyll_ray.errors import AuthenticationFailed
from halldyll_ray.mcp_server import build_mcp_server
from halldyll_ray.serve.http import error_response

#: Where the MCP endpoint is served.
MCP_PATH = "/mcp"
# The base URL of in-process calls: never resolved, the ASGI transport answers them.
_INTERNAL_URL = "http://ingress.internal"
# Headers of an API refusal that the /mcp answer keeps.
# (Serve's proxy sets X-Request-ID on every response itself.)
_RELAYED = ("content-type", "www-authenticate", "retry-after")


class _Forwarding(httpx.AsyncBaseTransport):
    """An httpx transport that adds fixed headers to each request (the caller's request id).

    Closing it leaves the inner transport, which every call shares, open.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, headers: dict[str, str]) -> None:
        self._inner = inner
        self._headers = headers

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.headers.update(self._headers)
        return await self._inner.handle_async_request(request)


def _bearer(header: str) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, as the Ingress reads it."""
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _request_id(scope: Scope) -> str | None:
    """The id the Ingress's request middleware gave this request."""
    state = scope.get("state") or {}
    value = state.get("request_id") if isinstance(state, dict) else None
    return value if isinstance(value, str) else None


class McpEndpoint:
    """The ASGI app at ``/mcp``: the key check, then the MCP session manager.

    Args:
        app: The FastAPI app whose routes the tools call (the Ingress's ``api``).
    """

    def __init__(self, app: FastAPI) -> None:
        self._asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)
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

    def _client(self, api_key: str, request_id: str | None) -> AsyncHalldyllClient:
        headers = {"x-request-id": request_id} if request_id else {}
        transport = _Forwarding(self._asgi, headers)
        return AsyncHalldyllClient(_INTERNAL_URL, api_key, timeout=300, transport=transport)

    @asynccontextmanager
    async def _clients(self, ctx: Context[Any, Any]) -> AsyncIterator[AsyncHalldyllClient]:
        """The tools' client: the key and request id of the HTTP request the call came in."""
        request = ctx.request_context.request
        headers = getattr(request, "headers", None) or {}
        key = _bearer(headers.get("authorization", ""))
        if key is None:  # the key check let the request in, so it had one
            raise AuthenticationFailed("no API key came with this MCP request")
        scope = getattr(request, "scope", {})
        async with self._client(key, _request_id(scope)) as client:
            yield client

    async def _refusal(self, scope: Scope) -> httpx.Response | None:
        """The API's answer to this request's credentials when it is not 200, else None."""
        headers: dict[str, str] = {}
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                headers["authorization"] = value.decode("latin-1")
        request_id = _request_id(scope)
        if request_id:
            headers["x-request-id"] = request_id
        async with httpx.AsyncClient(transport=self._asgi, base_url=_INTERNAL_URL) as http:
            response = await http.get("/v1/me", headers=headers)
        return None if response.status_code == 200 else response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = _request_id(scope) or ""
        manager = self._manager
        if manager is None:
            # Before the lifespan started (or after it ended) there is no manager to serve.
            message = "the MCP endpoint is not running"
            answer = error_response(
                503, "unavailable", message, request_id, headers={"Retry-After": "5"}
            )
            await answer(scope, receive, send)
            return
        refusal = await self._refusal(scope)
        if refusal is not None:
            relayed = {k: v for k, v in refusal.headers.items() if k.lower() in _RELAYED}
            answer = Response(refusal.content, status_code=refusal.status_code, headers=relayed)
            await answer(scope, receive, send)
            return
        await manager.handle_request(scope, receive, send)


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
