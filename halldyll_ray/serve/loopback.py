"""Calls into the Ingress's own HTTP API, in process: how the other doors (MCP, GraphQL) reach
the same routes, permission matrix, validation, error mapping and audit as REST.

A :class:`Loopback` hands out an :class:`~halldyll_ray.client.AsyncHalldyllClient` whose
transport is :class:`httpx.ASGITransport` over the FastAPI app, carrying the caller's API key
and the outer request's id as ``X-Request-ID`` (so the audit rows of the inner calls carry
it). No network hop, no second set of rules. The ASGI transport buffers a response whole, so
streamed routes (the change feed, an export) are not for it.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI
from starlette.responses import Response

from halldyll_ray.client import AsyncHalldyllClient

# Headers of an API refusal that an answer relaying it keeps (Serve's proxy sets X-Request-ID
# on every response itself).
_RELAYED = ("content-type", "www-authenticate", "retry-after")

#: The base URL of in-process calls: never resolved, the ASGI transport answers them.
INTERNAL_URL = "http://ingress.internal"


class _Forwarding(httpx.AsyncBaseTransport):
    """An httpx transport that adds fixed headers to each request (the caller's request id)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, headers: dict[str, str]) -> None:
        self._inner = inner
        self._headers = headers

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.headers.update(self._headers)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Nothing to close: the ASGI transport is shared by every client of the Loopback."""


def bearer(header: str) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, as the Ingress reads it."""
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def authorization_of(scope: Any) -> str:
    """The ``Authorization`` header of a request (its ASGI scope), or ``""``."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return ""


def request_id_of(scope: Any) -> str | None:
    """The id the Ingress's request middleware gave a request (its ASGI scope's state)."""
    state = scope.get("state") or {}
    value = state.get("request_id") if isinstance(state, dict) else None
    return value if isinstance(value, str) else None


class Loopback:
    """In-process clients of ``app`` (the Ingress's FastAPI app).

    Args:
        app: The app whose routes the clients call.
    """

    def __init__(self, app: FastAPI) -> None:
        self._asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    def client(self, api_key: str, request_id: str | None) -> AsyncHalldyllClient:
        """A client acting with ``api_key``; its calls carry ``request_id`` when given."""
        headers = {"x-request-id": request_id} if request_id else {}
        transport = _Forwarding(self._asgi, headers)
        return AsyncHalldyllClient(INTERNAL_URL, api_key, timeout=300, transport=transport)

    async def check_key(self, authorization: str, request_id: str | None) -> httpx.Response:
        """The API's answer to ``GET /v1/me`` with this ``Authorization`` header: 200 with the
        caller, or the very refusal (401 body, ``WWW-Authenticate``, audit row) REST gives."""
        # The header's own bytes (authorization_of read them as Latin-1): httpx encodes a
        # str header as ASCII, so a key with a byte past 0x7F was a UnicodeEncodeError, a 500
        # where REST answers 401.
        headers: dict[bytes, bytes] = {}
        if authorization:
            headers[b"authorization"] = authorization.encode("latin-1", "replace")
        if request_id:
            headers[b"x-request-id"] = request_id.encode("ascii")
        async with httpx.AsyncClient(transport=self._asgi, base_url=INTERNAL_URL) as http:
            return await http.get("/v1/me", headers=headers)


def relay(answer: httpx.Response) -> Response:
    """An in-process API answer (a 401 of the key check) as this request's own response."""
    headers = {k: v for k, v in answer.headers.items() if k.lower() in _RELAYED}
    return Response(answer.content, status_code=answer.status_code, headers=headers)
