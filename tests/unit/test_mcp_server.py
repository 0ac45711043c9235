"""The MCP server's tool surface, in process through the SDK's own client (no service: the
calls that need one are in tests/serve/test_mcp.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from mcp import Client
from mcp.types import TextContent

from halldyll_ray import cli
from halldyll_ray.client import AsyncHalldyllClient
from halldyll_ray.errors import InvalidInput, PermissionDenied
from halldyll_ray.mcp_server import build_mcp_server, describe
from halldyll_ray.serve_local import free_port


def _unreachable() -> Any:
    """A client source whose API is a closed loopback port."""
    url = f"http://127.0.0.1:{free_port()}"

    @asynccontextmanager
    async def clients(ctx: Any) -> AsyncIterator[AsyncHalldyllClient]:
        async with AsyncHalldyllClient(url, "hr_secret_never_shown", timeout=5) as client:
            yield client

    return clients


def test_an_api_error_reads_as_code_message_field_and_request_id() -> None:
    error = InvalidInput("must be a UUID", field="memory_id", request_id="r-1")
    assert describe(error) == "invalid_input: must be a UUID (field: memory_id) [request_id r-1]"
    assert describe(PermissionDenied("a viewer may not write")) == (
        "permission_denied: a viewer may not write"
    )


async def test_every_argument_is_described_for_the_model() -> None:
    async with Client(build_mcp_server(_unreachable())) as client:
        tools = (await client.list_tools()).tools
    assert len(tools) == 16
    for tool in tools:
        properties = tool.input_schema["properties"]
        undescribed = [name for name, spec in properties.items() if not spec.get("description")]
        assert undescribed == [], tool.name
        assert tool.output_schema is not None, tool.name
    store_image = next(t for t in tools if t.name == "store_image").input_schema
    assert store_image["required"] == ["prompt"] and "user_id" in store_image["properties"]


async def test_an_unreachable_api_is_a_tool_error_without_the_key() -> None:
    async with Client(build_mcp_server(_unreachable())) as client:
        result = await client.call_tool("store_fact", {"statement": "Ada drinks tea"})
    assert result.is_error
    block = result.content[0]
    assert isinstance(block, TextContent)
    assert "unavailable: POST /v1/users/me/memories failed" in block.text
    assert "hr_secret_never_shown" not in block.text


def test_the_stdio_command_needs_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HALLDYLL_URL", raising=False)
    monkeypatch.delenv("HALLDYLL_API_KEY", raising=False)
    assert cli.main(["mcp", "--url", "http://127.0.0.1:8000"]) == 1
    assert "error: no API key" in capsys.readouterr().err
