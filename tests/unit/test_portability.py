"""The export format's line splitting and line parsing (pure logic)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from halldyll_ray.errors import InvalidInput
from halldyll_ray.portability import numbered_lines, parse_header, parse_memory_line


async def _pieces(*parts: bytes | str) -> AsyncIterator[bytes | str]:
    for part in parts:
        yield part


async def _lines(*parts: bytes | str, limit: int = 1 << 20) -> list[tuple[int, bytes]]:
    return [x async for x in numbered_lines(_pieces(*parts), max_line_bytes=limit)]


async def test_lines_are_numbered_across_pieces_and_blank_lines_keep_their_number() -> None:
    assert await _lines(b'{"a"', b": 1}\r\n\n  \n", "{}\n{", b'"b": 2}') == [
        (1, b'{"a": 1}'),
        (4, b"{}"),
        (5, b'{"b": 2}'),  # the last line needs no newline
    ]
    assert await _lines() == [] and await _lines(b"\n\n") == []


async def test_an_overlong_line_is_dropped_as_it_arrives_and_reported_empty() -> None:
    long = b"x" * 50
    assert await _lines(b"{}\n", long, long, b"tail\n{}\n", limit=60) == [
        (1, b"{}"),
        (2, b""),
        (3, b"{}"),
    ]
    assert await _lines(b"{}\n", long, long, limit=60) == [(1, b"{}"), (2, b"")]


async def test_a_line_is_held_to_its_limit_however_the_file_is_cut() -> None:
    # A line that came whole in one piece (the whole file as one bytes, as Python callers
    # pass it) was read at any length; one of exactly the limit lost it when a piece ended
    # between its "\r" and "\n", or when the file opened with a byte order mark.
    at, over = b"x" * 10, b"x" * 11
    for pieces in [(over + b"\n{}\n",), (b"{}\n" + over,), (b"x" * 5, b"x" * 6 + b"\n{}\n")]:
        assert b"" in [line for _, line in await _lines(*pieces, limit=10)], pieces
    for pieces in [
        (at + b"\r", b"\n{}\n"),
        (b"\xef\xbb\xbf" + at, b"\r\n{}\n"),
        (at + b"\r\n{}\n",),
        (b"{}\n", at),
    ]:
        assert at in [line for _, line in await _lines(*pieces, limit=10)], pieces


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (b"", "line"),  # what numbered_lines gives for an overlong line
        (b"\xff", "line"),
        (b"{", "line"),
        (b"[" * 50_000, "line"),
        (b'"text"', "line"),  # JSON, but not an object: the line's fault, as not JSON is
        (b'{"id": "00000000-0000-4000-8000-000000000000"}', "memory"),
    ],
)
def test_a_bad_memory_line_names_its_number_and_field(line: bytes, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_memory_line(7, line)
    assert caught.value.field == field
    assert "7" in caught.value.message


def test_a_line_with_nan_or_infinity_is_not_json() -> None:
    line = (
        b'{"id": "00000000-0000-4000-8000-000000000000", "memory": {"type": "fact", '
        b'"statement": "NaN", "confidence": NaN}}'
    )
    with pytest.raises(InvalidInput) as caught:
        parse_memory_line(7, line)
    assert caught.value.field == "line"
    assert "line 7 is not JSON: NaN is not a JSON number" in caught.value.message
    assert f"char {line.index(b'NaN}')}" in caught.value.message


def test_a_header_of_another_version_or_format_is_refused() -> None:
    ok = b'{"format": "halldyll-export", "version": 1, "user": {"id": '
    ok += b'"00000000-0000-4000-8000-000000000000", "username": "a"}, "exported_at": "2026-01-01"}'
    assert parse_header(1, ok).version == 1
    for line, field in [
        (b'{"format": "halldyll-export", "version": 2}', "version"),
        (b'{"format": "x", "version": 1}', "format"),
        (b"[]", "format"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            parse_header(1, line)
        assert caught.value.field == field


def _summary_line(**extra: object) -> bytes:
    import json

    record = {
        "id": "00000000-0000-4000-8000-000000000001",
        "memory": {"type": "summary", "text": "What happened"},
        "created_at": "2024-03-01T00:00:00Z",
        "updated_at": "2024-03-01T00:00:00Z",
        **extra,
    }
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    ("extra", "reason", "field"),
    [
        (
            {"span_start": "2024-03-02T00:00:00Z", "span_end": "2024-03-01T00:00:00Z"},
            "span_end is before span_start",
            "span_end",
        ),
        ({"session_role": "summary"}, "give session_id", "session_role"),
        (
            {"session_role": "log", "memory": {"type": "summary", "text": "x", "session_id": "s1"}},
            "a session's log is a conversation",
            "session_role",
        ),
    ],
)
def test_an_inconsistent_line_is_refused(extra: dict[str, object], reason: str, field: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as caught:
        parse_memory_line(3, _summary_line(**extra))
    assert caught.value.field == field  # the field at fault, not "memory (line 3)"
    # The same line without the inconsistency is taken.
    assert parse_memory_line(3, _summary_line()).memory.type.value == "summary"
