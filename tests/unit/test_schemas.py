"""One schema module for the HTTP bodies: the Ingress reads them, the client writes them."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from halldyll_ray import schemas, validation
from halldyll_ray.client import HalldyllClient
from halldyll_ray.client.requests import Endpoints as _Endpoints
from halldyll_ray.errors import InvalidInput
from halldyll_ray.models import MemoryType, Principal, Role
from halldyll_ray.schemas import ContextRequest, SearchRequest


def test_the_ingress_routes_read_the_shared_schemas() -> None:
    from halldyll_ray.serve.ingress import api

    spec = api.openapi()
    bodies = {
        (method.upper(), path): op["requestBody"]["content"]["application/json"]["schema"]
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if "application/json" in op.get("requestBody", {}).get("content", {})
    }
    # The one body that is not JSON: an export file, streamed.
    raw = {
        (method.upper(), path): set(op["requestBody"]["content"])
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if "requestBody" in op and (method.upper(), path) not in bodies
    }
    assert raw == {("POST", "/v1/users/{user_id}/import"): {"application/x-ndjson"}}
    named = {route: body.get("$ref", "").rsplit("/", 1)[-1] for route, body in bodies.items()}
    users, memory = "/v1/users/{user_id}", "/v1/users/{user_id}/memories/{memory_id}"
    session = "/v1/users/{user_id}/sessions/{session_id}"
    assert named == {
        ("POST", "/v1/users"): "UserCreate",
        ("PATCH", users): "UserUpdate",
        ("POST", f"{users}/keys"): "ApiKeyCreate",
        ("POST", f"{users}/grants"): "GrantCreate",
        ("POST", "/v1/models"): "ModelCreate",
        ("POST", f"{users}/memories"): "",  # the memory union itself (models.Memory)
        ("POST", f"{users}/memories/batch"): "StoreMemoriesRequest",
        ("PATCH", memory): "MemoryUpdate",
        ("POST", f"{memory}/messages"): "AppendMessagesRequest",
        ("POST", f"{users}/search"): "SearchRequest",
        ("POST", f"{users}/context"): "ContextRequest",
        ("POST", f"{session}/prepare"): "PrepareContextRequest",
        ("POST", f"{session}/turns"): "TurnRequest",
    }
    for name in set(named.values()) - {"", "MemoryUpdate"}:
        shared = getattr(schemas, name)
        served = spec["components"]["schemas"][name]
        assert set(served["properties"]) == set(shared.model_fields), name
        assert served.get("additionalProperties") is False, name  # extra="forbid"


def test_the_client_builds_its_search_body_from_the_schema() -> None:
    request = SearchRequest(query="tea", limit=3, types=["fact"])
    built = _Endpoints.search(request, user_id="me")
    assert (built.method, built.path) == ("POST", "/v1/users/me/search")
    assert built.json == {
        "query": "tea",
        "limit": 3,
        "types": ["fact"],
        "include_shared": True,
        "group": "part",
    }  # no mode: the server's SEARCH_MODE decides
    with pytest.raises(TypeError):
        _Endpoints.search(request, "me")  # type: ignore[misc]  # keyword-only past the first

    bodies: list[dict[str, Any]] = []

    def handler(sent: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(sent.content))
        return httpx.Response(200, json={"results": []})

    with HalldyllClient("http://svc", "k", transport=httpx.MockTransport(handler)) as client:
        client.search("tea", limit=3, types=[MemoryType.FACT], mode="hybrid", threshold=0.5)
        client.search("", limit=1000)  # the server judges the body, and answers with its id
    assert SearchRequest.model_validate(bodies[0]) == SearchRequest(
        query="tea", limit=3, types=["fact"], mode="hybrid", threshold=0.5
    )
    assert bodies[1] == {"query": "", "limit": 1000, "include_shared": True, "group": "part"}


def test_parse_accepts_what_pydantic_accepts_and_fails_as_invalid_input() -> None:
    request = SearchRequest(query="tea")
    assert schemas.parse(SearchRequest, request) is request
    assert schemas.parse(SearchRequest, {"query": "tea"}) == request
    with pytest.raises(InvalidInput, match=r"^limit: Input should be less than or equal to 100"):
        schemas.parse(SearchRequest, {"query": "tea", "limit": 101})
    with pytest.raises(InvalidInput) as wrong:
        schemas.parse(SearchRequest, ContextRequest(query="tea"))
    assert "valid dictionary or instance of SearchRequest" in wrong.value.message


def test_the_client_and_the_schemas_import_without_ray_or_fastapi() -> None:
    code = (
        "import sys, halldyll_ray.client, halldyll_ray.schemas; "
        "print(sorted({'ray', 'fastapi', 'starlette'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture
def product_logger() -> Iterator[None]:
    """Deployments route the product's logger to Serve's at start; put it back after."""
    logger = logging.getLogger("halldyll_ray")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.usefixtures("product_logger")
async def test_a_deployment_method_takes_its_request_as_pydantic_validates_it() -> None:
    from halldyll_ray.serve.deployments import ContextBuilder, Ingestor, Searcher

    principal = Principal(user_id=uuid.uuid4(), username="ada", role=Role.USER)
    searcher = Searcher(embedder=None)
    wrong: Any = ContextRequest(query="tea")  # another schema, as a caller's mistake
    with pytest.raises(InvalidInput, match="valid dictionary or instance of SearchRequest"):
        await searcher.search(principal, wrong, user_id=None, request_id=None)
    loose: Any = {"query": "tea", "limit": 0}
    with pytest.raises(InvalidInput, match=r"^limit: Input should be greater than or equal"):
        await searcher.search_json(principal, loose, user_id=None, request_id=None)
    loose = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    with pytest.raises(InvalidInput, match=r"^max_tokens: Input should be greater than or"):
        await ContextBuilder(embedder=None).build_context(
            principal, loose, user_id=None, request_id=None
        )
    loose = {"type": "fact", "statement": "x", "confidence": 3}
    with pytest.raises(InvalidInput, match=r"^fact\.confidence:"):
        await Ingestor(embedder=None).store_memory(principal, loose, user_id=None, request_id=None)
    assert searcher._engine is None  # rejected before the engine (and the database) is touched


@pytest.mark.parametrize(
    "stamp",
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-14:00",
        "0001-01-01T00:29:59+00:30",
        # The first and last instants: stored as -infinity and infinity, read back naive.
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00",
        "9999-12-31T23:59:59.999999Z",
        "9999-12-31T23:59:59.999999+00:00",
    ],
)
def test_a_time_with_no_utc_form_is_invalid_everywhere_a_time_enters(stamp: str) -> None:
    """Year 0 or year 10000 once in UTC: OverflowError (a 500) where it was converted. The
    first and last instants: an infinity in PostgreSQL, a naive time when read (500s)."""
    from pydantic import ValidationError

    from halldyll_ray.models import Message
    from halldyll_ray.schemas import ApiKeyCreate

    with pytest.raises(ValidationError, match="out of range"):
        Message(role="user", content="x", created_at=stamp)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="out of range"):
        SearchRequest.model_validate({"query": "x", "since": stamp})
    with pytest.raises(ValidationError, match="out of range"):
        ApiKeyCreate.model_validate({"expires_at": stamp})
    with pytest.raises(InvalidInput) as given:
        validation.timestamp(datetime.fromisoformat(stamp), "until")
    assert given.value.field == "until"
    cursor = validation.encode_cursor(datetime.fromisoformat(stamp), uuid.uuid4(), listing="users")
    with pytest.raises(InvalidInput) as paged:
        validation.decode_cursor(cursor, listing="users")
    assert paged.value.field == "cursor"
    # The last representable times on either side still are times.
    for edge in ("0001-01-01T00:00:00.000001+00:00", "9999-12-31T23:59:59.999998+00:00"):
        assert Message(role="user", content="x", created_at=edge).created_at  # type: ignore[arg-type]


def test_recent_messages_for_a_context_are_bounded() -> None:
    message = {"role": "user", "content": "w"}
    assert len(ContextRequest.model_validate({"messages": [message] * 1000}).messages or []) == 1000
    with pytest.raises(ValueError, match="1000"):
        ContextRequest.model_validate({"messages": [message] * 1001})


@pytest.mark.parametrize(
    ("text", "seen"),
    [
        ("\u200b\u200b", False),  # zero-width spaces (Cf)
        ("\u200e\ufeff\u2060", False),  # a direction mark, a BOM, a word joiner
        ("\u3000 \t\n", False),  # ideographic and other spaces
        ("\uffff", False),  # a noncharacter (Cn)
        ("a\u200b", True),
        ("\u05d0", True),  # Hebrew alef
        ("🙂", True),
        ("\u0301\u0301", False),  # combining accents on nothing
        ("e\u0301", True),
        ("\u3164\u115f \u2800\uffa0", False),  # Hangul fillers, the blank Braille pattern
        ("\u3164a", True),
        ("\u0e01\u0e31", True),  # Thai: a consonant and its vowel mark
    ],
)
def test_visible_text(text: str, seen: bool) -> None:
    from pydantic import ValidationError

    from halldyll_ray.models import Fact, visible

    assert visible(text) is seen
    if seen:
        assert Fact(statement=text).statement
    else:
        with pytest.raises(ValidationError):  # blank once stripped, or nothing visible
            Fact(statement=text)


@pytest.mark.parametrize(
    ("memory", "reason"),
    [
        ({"type": "fact", "statement": "x", "metadata": {"a": float("nan")}}, "not JSON"),
        ({"type": "fact", "statement": "x", "confidence": float("inf")}, "not JSON"),
    ],
)
def test_the_client_refuses_a_body_json_cannot_carry(memory: dict[str, Any], reason: str) -> None:
    """InvalidInput before anything is sent, not httpx's bare ValueError (the MCP server's
    tools call this client)."""
    sent: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(500))
    client = HalldyllClient("http://halldyll.invalid", "key", transport=transport)
    with client, pytest.raises(InvalidInput, match=reason) as refused:
        client.store_memory(memory)
    assert refused.value.field == "body" and sent == []


@pytest.mark.parametrize(
    "memory",
    [
        {"type": "fact", "statement": "x\udc97"},
        {"type": "fact", "statement": "x", "metadata": {"\ud800": "é"}},
    ],
)
def test_the_client_sends_a_lone_surrogate_as_its_json_escape(memory: dict[str, Any]) -> None:
    """A lone surrogate has no UTF-8 form: it goes as its JSON escape, as a raw body carries
    it, so the server names the field at fault (it was the client's own InvalidInput on
    ``body``, where REST names ``fact.statement``)."""
    sent: list[httpx.Request] = []
    refusal = {"error": {"code": "invalid_input", "message": "m", "request_id": "r", "field": "f"}}
    transport = httpx.MockTransport(
        lambda request: sent.append(request) or httpx.Response(422, json=refusal)
    )
    client = HalldyllClient("http://halldyll.invalid", "key", transport=transport)
    with client, pytest.raises(InvalidInput) as refused:
        client.store_memory(memory)
    assert refused.value.fields["field"] == "f"
    (request,) = sent
    assert request.content.isascii()
    assert json.loads(request.content) == memory


def test_a_summary_covers_each_memory_once() -> None:
    from halldyll_ray.models import Summary

    first, second = uuid.uuid4(), uuid.uuid4()
    summary = Summary(text="x", covers=[first, second, first, second, first])
    assert summary.covers == [first, second]


@pytest.mark.parametrize(
    "since",
    ["1" * 1_000_000 + "x", "1" * 500_000 + "." + "1" * 500_000 + "e", "2024-01-02T03:04:05Z"],
)
def test_a_time_that_is_a_long_run_of_digits_is_read_once(since: str) -> None:
    # "Is it a number?" read a run of digits as every split into "\d+" and "\d*": refusing
    # a 1 MiB body's "since" (within the body limit) took hours. Nothing here is timed: the
    # old pattern simply did not return.
    if since.endswith("Z"):
        assert schemas.parse(SearchRequest, {"query": "tea", "since": since}).since
    else:
        with pytest.raises(InvalidInput, match=r"^since: "):
            schemas.parse(SearchRequest, {"query": "tea", "since": since})
    for number in ("1", "-1.5", ".5", "1.", "+2e10", "1700000000"):
        with pytest.raises(InvalidInput, match="ISO 8601"):
            schemas.parse(SearchRequest, {"query": "tea", "since": number})


def test_negative_zero_is_zero_in_every_float_of_an_input() -> None:
    """``-0.0`` (a JSON number, as valid as 0.0) was stored, returned and exported with its
    sign: ``"importance": -0.0``. One rule for every float field of a stored input (the
    model check every input runs, ``_Input._storable``)."""
    import math

    from halldyll_ray.models import Fact, MemoryUpdate, Segment, Transcription

    fact = Fact.model_validate_json('{"statement": "x", "importance": -0.0, "confidence": -0}')
    segment = Segment.model_validate_json('{"start": -0.0, "end": 1.5, "text": "hi"}')
    values = [
        fact.importance,
        fact.confidence,
        segment.start,
        MemoryUpdate.model_validate({"importance": -0.0}).importance,
        Transcription.model_validate(
            {"text": "hi", "duration_seconds": -0.0, "segments": []}
        ).duration_seconds,
    ]
    assert values == [0.0] * 5
    assert all(math.copysign(1.0, v) == 1.0 for v in values)
    assert '"importance":0.0' in fact.model_dump_json()
    assert Segment.model_validate({"start": 2.5, "end": 3.0, "text": "a"}).start == 2.5


@pytest.mark.parametrize(
    ("given", "read"),
    [
        ("2024-03-01", "2024-03-01T00:00:00+00:00"),
        ("2024-03-01T10:00", "2024-03-01T10:00:00+00:00"),
        ("2024-03-01 10:00:00", "2024-03-01T10:00:00+00:00"),
        ("2024-03-01T10:00+02:00", "2024-03-01T08:00:00+00:00"),
    ],
)
def test_a_date_alone_or_a_time_without_offset_is_read_as_utc(given: str, read: str) -> None:
    """The README's rule, pinned: a time without a zone is UTC and a date alone is that day's
    midnight UTC, on every time a caller gives (a message's created_at, since, expires_at);
    neither is refused, and the server's own zone never applies."""
    from datetime import datetime

    from halldyll_ray import validation
    from halldyll_ray.models import Message
    from halldyll_ray.schemas import ApiKeyCreate

    expected = datetime.fromisoformat(read)
    message = Message(role="user", content="x", created_at=given)  # type: ignore[arg-type]
    assert message.created_at == expected and message.created_at.tzinfo is not None
    search = schemas.parse(SearchRequest, {"query": "tea", "since": given, "until": given})
    # A search's window is checked where the engine takes it (validation.time_range).
    assert validation.time_range(search.since, search.until) == (expected, expected)
    expires_at = ApiKeyCreate.model_validate({"expires_at": given}).expires_at
    assert validation.timestamp(expires_at, "expires_at") == expected


def _raw_cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def test_a_cursor_is_taken_only_as_written_for_its_own_list() -> None:
    """A cursor is the one its list returned, or InvalidInput on ``cursor``: base64 dropped
    what it could not read (a ``!``, a space, a newline added), and the position was all a
    cursor held, so an edited time (a date alone, no zone), another form of the id, the
    users list's cursor in a memory listing or one user's in another's paged from wherever
    its time fell."""
    at = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
    row, owner, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    listing = f"memories/{owner}"
    cursor = validation.encode_cursor(at, row, listing=listing)
    assert validation.decode_cursor(cursor, listing=listing) == (at, row)
    assert validation.decode_cursor(None, listing=listing) == (None, None)
    stamp = at.isoformat()
    refused = [
        cursor + "!!",
        "!!" + cursor,
        " " + cursor,
        cursor + "\n",
        cursor + "=",
        cursor[:-3],
        cursor.upper(),
        "",
        "a" * 100_000,
        validation.encode_cursor(at, row, listing="users"),
        validation.encode_cursor(at, row, listing=f"jobs/{owner}"),
        validation.encode_cursor(at, row, listing=f"memories/{other}"),
        _raw_cursor(f"{stamp}|{row}"),  # the old form: no list named
        _raw_cursor(f"{listing}|2026-03-01|{row}"),
        _raw_cursor(f"{listing}|2026-03-01T12:30:15|{row}"),
        _raw_cursor(f"{listing}|{stamp}|{{{row}}}"),
        _raw_cursor(f"{listing}|{stamp}|{row.hex}"),
        _raw_cursor(f"{listing}|{stamp}|{str(row).upper()}"),
        _raw_cursor(f"{listing}|{stamp}|{row}|x"),
        base64.urlsafe_b64encode(b"\xff\xfe|x|y").decode(),
        12,
    ]
    for bad in refused:
        with pytest.raises(InvalidInput) as caught:
            validation.decode_cursor(bad, listing=listing)
        assert caught.value.field == "cursor", bad
