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
    assert len(tools) == 17
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


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [
        ("store_fact", {}, "invalid_input: statement: Field required (field: statement)"),
        (
            "search_memories",
            {"query": "tea", "limit": "hr_secret_in_a_bad_value"},
            # REST's StrictInt, as the API says it for a body's string
            "invalid_input: limit: Input should be a valid integer (field: limit)",
        ),
        (
            "search_memories",
            {"query": "tea", "limit": 0},
            "invalid_input: limit: Input should be greater than or equal to 1 (field: limit)",
        ),
        (
            "search_memories",
            {"query": "tea", "mode": "fuzzy"},
            "invalid_input: mode: Input should be 'hybrid', 'semantic' or 'fulltext' (field: mode)",
        ),
        (
            "store_conversation",
            {"messages": [{"role": "robot", "content": "hi"}]},
            "invalid_input: messages.0.role:",
        ),
        ("get_memory", {"memory_id": 5}, "invalid_input: memory_id: Input should be a valid"),
        (
            "store_fact",
            {"statement": "Ada drinks tea", "confidance": 0.99, "tagz": ["x"]},
            "invalid_input: confidance: Extra inputs are not permitted (field: confidance)",
        ),
        (
            "list_models",
            {"bogus": "hr_secret_in_an_unknown_argument"},
            "invalid_input: bogus: Extra inputs are not permitted (field: bogus)",
        ),
    ],
)
async def test_bad_arguments_read_as_the_apis_invalid_input(
    tool: str, arguments: dict[str, Any], expected: str
) -> None:
    # The API is unreachable: a call that got as far as the API would say "unavailable".
    async with Client(build_mcp_server(_unreachable())) as client:
        result = await client.call_tool(tool, arguments)
    assert result.is_error
    block = result.content[0]
    assert isinstance(block, TextContent)
    assert block.text.startswith(expected), block.text
    assert "hr_secret" not in block.text and "input_value" not in block.text
    assert "Arguments" not in block.text  # the SDK's internal model name


def test_the_stdio_command_needs_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HALLDYLL_URL", raising=False)
    monkeypatch.delenv("HALLDYLL_API_KEY", raising=False)
    assert cli.main(["mcp", "--url", "http://127.0.0.1:8000"]) == 1
    assert "error: no API key" in capsys.readouterr().err


async def test_every_tool_refuses_an_argument_it_does_not_have() -> None:
    async with Client(build_mcp_server(_unreachable())) as client:
        tools = (await client.list_tools()).tools
        for tool in tools:
            assert tool.input_schema.get("additionalProperties") is False, tool.name
            if tool.input_schema.get("required"):
                continue
            result = await client.call_tool(tool.name, {"zz_unknown": "hr_secret"})
            assert result.is_error, tool.name
            block = result.content[0]
            assert isinstance(block, TextContent)
            assert block.text == (
                "invalid_input: zz_unknown: Extra inputs are not permitted (field: zz_unknown)"
            ), block.text


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("get_memory", {"memory_id": "x" * 100_000}),
        ("list_memories", {"tags": ["a" * 70_000]}),
    ],
)
async def test_a_url_too_long_is_a_tool_error_naming_the_request(
    tool: str, arguments: dict[str, Any]
) -> None:
    async with Client(build_mcp_server(_unreachable())) as client:
        result = await client.call_tool(tool, arguments)
    assert result.is_error
    block = result.content[0]
    assert isinstance(block, TextContent)
    assert "invalid_input: GET /v1/users/me/memories" in block.text, block.text[:300]
    assert "too long (field: url)" in block.text and len(block.text) < 500


def test_the_stdio_command_refuses_a_bad_timeout_as_usage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HALLDYLL_API_KEY", "hr_x")
    for timeout in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit) as exited:
            cli.main(["mcp", "--timeout", timeout])
        assert exited.value.code == 2
        assert "argument --timeout" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments",
    [
        {"statement": "x", "Z" * 10_000: 1},  # an argument the tool does not have
        {"statement": "x", "tags": ["Z" * 10_000]},
        {"statement": "x", "source": "Z" * 10_000},
        {"statement": "x", "metadata": {"Z" * 10_000: ["Z" * 10_000]}, "importance": "Z" * 10_000},
    ],
)
async def test_a_huge_argument_is_quoted_short_in_the_tool_error(arguments: dict[str, Any]) -> None:
    async with Client(build_mcp_server(_unreachable())) as client:
        result = await client.call_tool("store_fact", arguments)
    assert result.is_error
    block = result.content[0]
    assert isinstance(block, TextContent)
    assert block.text.startswith("invalid_input: "), block.text[:300]
    assert "Z" * 41 not in block.text and len(block.text) < 400, block.text[:300]
