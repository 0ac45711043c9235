"""The Python clients raise only typed errors, never repeat the API key, and the CLI turns a
bad argument into a usage error (no service: httpx.MockTransport stands in for it)."""

from __future__ import annotations

import argparse
import math
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from halldyll_ray import cli
from halldyll_ray.client import AsyncHalldyllClient, HalldyllClient
from halldyll_ray.errors import AuthenticationFailed, HalldyllError, InvalidInput, Unavailable

KEY = "hr_secret_key_0123456789"


def _never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"{request.method} {request.url} was sent")


def _sync(handler: Callable[[httpx.Request], httpx.Response] = _never) -> HalldyllClient:
    return HalldyllClient("http://svc", KEY, transport=httpx.MockTransport(handler))


def _async(handler: Callable[[httpx.Request], httpx.Response] = _never) -> AsyncHalldyllClient:
    return AsyncHalldyllClient("http://svc", KEY, transport=httpx.MockTransport(handler))


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


# --------------------------------------------------------------------------- requests not sent
@pytest.mark.parametrize(
    ("call", "field", "named"),
    [
        (lambda c: c.get_memory("x" * 100_000), "url", "GET /v1/users/me/memories/xxx"),
        (lambda c: c.list_memories(tags=["a" * 70_000]), "url", "GET /v1/users/me/memories"),
        (lambda c: c.get_memory("\ud800"), "memory_id", "memory_id"),
        (lambda c: c.list_memories(tags=["\ud800"]), "tags", "tags"),
        (
            lambda c: c.store_memory({"type": "fact", "statement": "x", "metadata": _nested(5000)}),
            "body",
            "the body is not JSON",
        ),
        (
            lambda c: c.store_memories([{"type": "fact", "statement": "x", "a": _nested(5000)}]),
            "body",
            "the body is not JSON",
        ),
    ],
)
async def test_a_request_that_cannot_be_written_is_invalid_input(
    call: Callable[[Any], Any], field: str, named: str
) -> None:
    with _sync() as sync, pytest.raises(InvalidInput) as raised:
        call(sync)
    async with _async() as client:
        with pytest.raises(InvalidInput) as raised_async:
            await call(client)
    for exc in (raised.value, raised_async.value):
        assert exc.field == field and exc.message.startswith(named), exc.message
        assert len(exc.message) < 400  # a 100,000-character id is not repeated whole


def test_the_export_and_import_streams_raise_typed_errors_too(tmp_path: Path) -> None:
    with _sync() as client:
        with pytest.raises(InvalidInput, match="URL"):
            b"".join(client.export_memories(user_id="u" * 70_000))
        with pytest.raises(InvalidInput, match="URL"):
            client.import_memories(b"{}\n", user_id="u" * 70_000)


# --------------------------------------------------------------------------- constructor
@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"base_url": "http://[::1"}, "base_url"),
        ({"base_url": "http://127.0.0.1:99999999"}, "base_url"),
        ({"base_url": ""}, "base_url"),
        ({"base_url": "ftp://svc"}, "base_url"),
        ({"base_url": "127.0.0.1:8000"}, "base_url"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"timeout": math.inf}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"api_key": "hr bad"}, "api_key"),
    ],
)
def test_a_client_with_a_bad_option_is_invalid_input(options: dict[str, Any], field: str) -> None:
    arguments: dict[str, Any] = {"base_url": "http://svc", "api_key": KEY, **options}
    for cls in (HalldyllClient, AsyncHalldyllClient):
        with pytest.raises(InvalidInput) as raised:
            cls(**arguments)
        assert raised.value.field == field, cls


def test_a_key_read_with_a_byte_order_mark_is_the_key() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"status": "ok"})

    transport = httpx.MockTransport(handler)
    with HalldyllClient("http://svc", f"\ufeff{KEY}\r\n", transport=transport) as client:
        client.healthz()
    assert sent[0].headers["authorization"] == f"Bearer {KEY}"


# --------------------------------------------------------------------------- secrets
def _reflecting(request: httpx.Request) -> httpx.Response:
    """A proxy whose error pages repeat the request's headers (and the key on its own)."""
    headers = "\n".join(f"{name}: {value}" for name, value in request.headers.items())
    if request.url.path == "/v1/me":
        return httpx.Response(502, text=f"Bad Gateway\n{headers}\nkey={KEY}")
    if request.url.path == "/healthz":
        raise httpx.ConnectError(f"proxy refused: Authorization: Bearer {KEY}", request=request)
    body = {"error": {"code": "invalid_input", "message": f"bad key {KEY}, Bearer other_tok"}}
    return httpx.Response(422, json=body)


async def test_error_messages_never_repeat_the_key() -> None:
    errors: list[HalldyllError] = []
    with _sync(_reflecting) as sync:
        for call in (sync.me, sync.healthz, sync.list_models):
            with pytest.raises(HalldyllError) as raised:
                call()
            errors.append(raised.value)
    async with _async(_reflecting) as client:
        with pytest.raises(Unavailable) as gateway:
            await client.me()
        errors.append(gateway.value)
    for exc in errors:
        assert KEY not in exc.message and KEY not in str(exc), exc.message
        assert "other_tok" not in exc.message and "[redacted]" in exc.message, exc.message
    assert "authorization: bearer [redacted]" in errors[0].message.lower()


def _closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_no_service_at_the_url_says_where_and_what_to_check() -> None:
    """The first thing a new user meets with a wrong port or no service started: the error
    names the address tried and what to check, not only the driver's "All connection
    attempts failed"; never the key."""
    url = f"http://127.0.0.1:{_closed_port()}"
    errors: list[Unavailable] = []
    with HalldyllClient(url, KEY) as sync, pytest.raises(Unavailable) as raised:
        sync.store_memory({"type": "fact", "statement": "Ada drinks green tea"})
    errors.append(raised.value)
    async with AsyncHalldyllClient(url, KEY) as client:
        with pytest.raises(Unavailable) as raised_async:
            await client.search("what does Ada drink?")
        errors.append(raised_async.value)
    for exc in errors:
        assert f"nothing answers at {url} (is the service running" in exc.message, exc.message
        assert KEY not in str(exc)
    assert errors[0].message.startswith("POST /v1/users/me/memories failed")


async def test_a_write_whose_answer_timed_out_says_it_may_have_been_applied() -> None:
    """A service that takes the request and never answers: a store that timed out said only
    "timed out", and a caller sending it again stored it twice. A write's error now says it
    may have been applied and what is safe to send again; a read's does not."""
    with socket.socket() as silent:  # listening, never accepting: the request goes out
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        writes: list[Unavailable] = []
        with HalldyllClient(url, KEY, timeout=0.3) as sync:
            with pytest.raises(Unavailable) as raised:
                sync.store_memory({"type": "fact", "statement": "Ada drinks green tea"})
            writes.append(raised.value)
            with pytest.raises(Unavailable) as read:
                sync.get_memory("6f1c1f52-3bde-4d0d-9b3a-6a0e2b8c1d10")
        async with AsyncHalldyllClient(url, KEY, timeout=0.3) as client:
            with pytest.raises(Unavailable) as raised_async:
                await client.record_turn("s1", "hi", "hello", idempotency_key="turn-1")
            writes.append(raised_async.value)
    for exc in writes:
        assert " timed out (it may or may not have been applied: " in exc.message, exc.message
        assert "idempotency_key" in exc.message and KEY not in str(exc)
    assert writes[0].message.startswith("POST /v1/users/me/memories timed out")
    assert read.value.message.startswith("GET /v1/users/me/memories/")
    assert "timed out" in read.value.message and "applied" not in read.value.message


async def test_an_answer_httpx_cannot_decode_is_a_typed_error() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not gzip", headers={"Content-Encoding": "gzip"})

    with _sync(broken) as sync, pytest.raises(HalldyllError, match="GET /healthz"):
        sync.healthz()
    async with _async(broken) as client:
        with pytest.raises(HalldyllError, match="GET /healthz"):
            await client.healthz()


# --------------------------------------------------------------------------- the command line
@pytest.mark.parametrize(
    "argv",
    [
        ["export", "--url", "http://[::1"],
        ["export", "--timeout", "-1"],
        ["import", "x.ndjson", "--timeout", "nan"],
        ["mcp", "--timeout", "inf"],
        ["mcp", "--url", "not a url"],
        ["create-key", "ada", "--expires-days", "3000000"],
        ["create-key", "ada", "--expires-days", "0"],
        ["purge-audit", "--older-than-days", "3000000"],
    ],
)
def test_a_bad_argument_is_a_usage_error(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HALLDYLL_API_KEY", KEY)
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err


def test_a_key_file_that_is_not_utf8_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"hr_bad\xff\xfe")
    assert cli.main(["export", "--key-file", str(key_file)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the key file") and "not UTF-8" in err
    assert "hr_bad" not in err and len(err.strip().splitlines()) == 1


def test_a_key_is_read_without_its_byte_order_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(f"\ufeff{KEY}\r\n".encode())
    assert cli._api_key(argparse.Namespace(key=None, key_file=str(key_file))) == KEY
    monkeypatch.setenv("HALLDYLL_API_KEY", f"\ufeff {KEY}\n")
    assert cli._api_key(argparse.Namespace(key=None, key_file=None)) == KEY


async def test_an_export_that_is_not_a_halldyll_export_is_an_error() -> None:
    """A proxy's or another server's 200 page was written as the export file."""
    header = (
        b'{"format": "halldyll-export", "version": 1, "user": {"id": '
        b'"00000000-0000-0000-0000-000000000001", "username": "ada"}, '
        b'"exported_at": "2026-11-30T00:00:00Z"}\n'
    )

    def answering(body: bytes) -> Callable[[httpx.Request], httpx.Response]:
        return lambda request: httpx.Response(200, content=body)

    for body in (b"<html><body>Welcome to nginx!</body></html>\n", b"", b"{}\n"):
        with _sync(answering(body)) as client, pytest.raises(HalldyllError, match="export"):
            b"".join(client.export_memories())
        async with _async(answering(body)) as aclient:
            with pytest.raises(HalldyllError, match="export"):
                _ = [piece async for piece in aclient.export_memories()]
    good = header + b'{"id": "x"}\n'
    with _sync(answering(good)) as client:
        assert b"".join(client.export_memories()) == good
    async with _async(answering(good)) as aclient:
        assert b"".join([piece async for piece in aclient.export_memories()]) == good


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "bad_request", InvalidInput),  # FastAPI's "There was an error parsing the body"
        (408, "request_timeout", Unavailable),  # the body did not arrive in time
        (415, "unsupported_media_type", InvalidInput),  # a Content-Encoding
        (401, "unauthenticated", AuthenticationFailed),
        (422, "invalid_input", InvalidInput),
        (503, "unavailable", Unavailable),
    ],
)
async def test_an_error_code_of_the_http_layer_is_typed_by_its_status(
    status: int, code: str, expected: type[HalldyllError]
) -> None:
    """The service answers the HTTP layer's refusals with the error shape and codes of their
    own ("bad_request", "request_timeout", "unsupported_media_type"): the client raised the
    bare HalldyllError for them, as if the status said nothing."""

    def answer(request: httpx.Request) -> httpx.Response:
        error = {"code": code, "message": "refused", "request_id": "r-1"}
        return httpx.Response(status, json={"error": error})

    with _sync(answer) as sync, pytest.raises(expected) as raised:
        sync.me()
    assert raised.value.fields["request_id"] == "r-1"
    assert raised.value.fields["status_code"] == status
    async with _async(answer) as client:
        with pytest.raises(expected):
            await client.me()


def _report(request: httpx.Request) -> httpx.Response:
    request.read()
    return httpx.Response(200, json={"lines": 0})


@pytest.mark.parametrize("data", [None, 5, 1.5, True, "export.ndjson", {"a": 1}, object()])
async def test_an_import_of_what_is_no_file_is_refused_before_sending(data: Any) -> None:
    # None or a number was a bare TypeError; a str (a path written as text) was sent one
    # character a piece, and httpx raised TypeError on the first.
    with pytest.raises(InvalidInput) as caught:
        _sync().import_memories(data)
    assert caught.value.field == "data"
    with pytest.raises(InvalidInput) as caught:
        await _async().import_memories(data)
    assert caught.value.field == "data"


@pytest.mark.parametrize("pieces", [[b"a", 5], [b"a", "text"], [None]])
async def test_an_import_piece_that_is_not_bytes_is_refused(pieces: list[Any]) -> None:
    with pytest.raises(InvalidInput) as caught:
        _sync(_report).import_memories(iter(pieces))
    assert caught.value.field == "data"
    with pytest.raises(InvalidInput) as caught:
        await _async(_report).import_memories(iter(pieces))
    assert caught.value.field == "data"


async def test_an_import_of_bytes_like_data_is_sent() -> None:
    for data in (bytearray(b"{}\n"), memoryview(b"{}\n")):
        assert _sync(_report).import_memories(data).lines == 0
        assert (await _async(_report).import_memories(data)).lines == 0


async def test_a_closed_client_says_so() -> None:
    # httpx's RuntimeError ("Cannot send a request, as the client has been closed") came out.
    client = _sync(_report)
    client.close()
    for call in (
        client.me,
        lambda: client.import_memories(b"x"),
        lambda: next(client.export_memories()),
    ):
        with pytest.raises(HalldyllError, match="the client is closed") as caught:
            call()
        assert not isinstance(caught.value, Unavailable)  # no retry can succeed
    aclient = _async(_report)
    await aclient.aclose()
    for acall in (aclient.me, lambda: aclient.import_memories(b"x")):
        with pytest.raises(HalldyllError, match="the client is closed"):
            await acall()
    with pytest.raises(HalldyllError, match="the client is closed"):
        await anext(aclient.export_memories())
