"""Typed Python clients for the HTTP API: :class:`AsyncHalldyllClient` and :class:`HalldyllClient`.

Both clients share one description of every call:
:class:`~halldyll_ray.client.requests.Endpoints` builds the request (method, path, JSON body,
query parameters) and names the parser that turns the response into the typed model of
:mod:`halldyll_ray.models`. The two classes (``async_client``, ``sync_client``) only differ in
how they send it (``httpx.AsyncClient`` or ``httpx.Client``), so a route changes in one place.

Errors come back as the product's own exceptions: the server's error body
``{"error": {"code", "message", "request_id"}}`` becomes the matching
:class:`~halldyll_ray.errors.HalldyllError` subclass, with ``request_id`` and ``status_code``
as fields (and attributes); a connection failure or timeout, a 502/503/504, and a 500
without the error shape (what Serve's HAProxy answers for its own 502/503/504, the app never
having answered) become :class:`~halldyll_ray.errors.Unavailable`: retry.

Example::

    async with AsyncHalldyllClient("http://127.0.0.1:8000", api_key) as client:
        await client.store_memory(Fact(statement="Ada prefers tea"))
        hits = await client.search("what does Ada drink?")
"""

from halldyll_ray.client.async_client import AsyncHalldyllClient
from halldyll_ray.client.requests import MemoryInput
from halldyll_ray.client.sync_client import HalldyllClient

__all__ = ["AsyncHalldyllClient", "HalldyllClient", "MemoryInput"]
