"""The export format of a user's memories (NDJSON), and what an import reports.

An export is UTF-8 text, one JSON object a line (``application/x-ndjson``):

- line 1, :class:`ExportHeader`: ``{"format": "halldyll-export", "version": 1, "user": ...,
  "exported_at": ..., "memories": {"fact": 3, ...}, "messages": 120}``;
- then one :class:`ExportedMemory` a line: the memory as a client would store it (``memory``:
  the typed body, with its AI model by name), its conversation's ``messages``, a fact's
  ``sources``, and what the service adds (``id``, times, ``expires_at``,
  ``reinforcement_count``, the agent loop's ``session_role``; a fact's validity
  ``valid_from``, ``valid_to`` and ``superseded_by``, a summary's ``period`` and span: all
  optional, so files written before them import unchanged).

Closed facts are exported too (they are their facts' history) and imported closed.

Summaries come last, so an import meets the memories a summary ``covers`` before the summary.
The same models validate an import, line by line: an export of this version always imports.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from datetime import datetime
from typing import Annotated, Any, Final, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    model_validator,
)
from pydantic_core import PydanticCustomError

from halldyll_ray import validation
from halldyll_ray.errors import InvalidInput, quoted
from halldyll_ray.models import (
    FIELD_CHECK,
    MAX_FACT_SOURCES,
    MAX_MESSAGES_PER_CONVERSATION,
    Conversation,
    Fact,
    Memory,
    Message,
    Summary,
    UtcDateTime,
    check_json_value,
)
from halldyll_ray.textproc import article

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "MAX_LINE_BYTES",
    "ExportHeader",
    "ExportedMemory",
    "ImportProblem",
    "ImportReport",
    "numbered_lines",
    "parse_header",
    "parse_memory_line",
]

EXPORT_FORMAT: Final = "halldyll-export"
EXPORT_VERSION: Final = 1
#: The longest line an import reads (bytes): a conversation of 20,000 messages of 2 KB each
#: fits; a longer line is reported as an error of that line, and the import goes on.
MAX_LINE_BYTES = 64 * 1024 * 1024
#: Problems an import report lists; past this only ``error_count`` grows.
MAX_REPORTED_PROBLEMS = 1_000


def _at(field: str, message: str) -> PydanticCustomError:
    """A line's check across its fields, reported on the one ``field`` at fault
    (:func:`halldyll_ray.validation.error_field`): raised as a plain ValueError, it was on
    the whole line (``memory (line 11)``), which names no field of it."""
    return PydanticCustomError(FIELD_CHECK, "{reason}", {"field": field, "reason": message})


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _storable_text(value: str) -> str:
    check_json_value(value)  # NUL and lone surrogates: what PostgreSQL cannot store
    return value


#: A month, YYYY-MM, of the years 1 to 9999 (there is no year 0).
Period = Annotated[
    str,
    StringConstraints(
        pattern=r"^([1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])-(0[1-9]|1[0-2])$"
    ),
]
Source = Annotated[str, StringConstraints(max_length=500), AfterValidator(_storable_text)]


class ExportedUser(_Line):
    id: UUID
    username: str


class ExportHeader(_Line):
    """The first line of an export."""

    format: Literal["halldyll-export"] = EXPORT_FORMAT
    version: Literal[1] = EXPORT_VERSION
    user: ExportedUser = Field(description="Whose memories these are.")
    exported_at: datetime
    # Counts of none or more: with a negative one ({"fact": 3, "summary": -3}) a file cut
    # short added up to what it held, and an atomic import committed it.
    memories: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description="How many memory lines follow, by type."
    )
    messages: int = Field(default=0, ge=0, description="Conversation messages in those lines.")


class ExportedMemory(_Line):
    """One memory line of an export.

    ``memory`` is what :meth:`MemoryEngine.store_memory` takes, with ``model`` as the AI
    model's name (ids differ between installations) and a conversation's messages in
    ``messages`` instead (a conversation may hold more than one store call accepts).
    """

    id: UUID = Field(description="The memory's id where it was exported.")
    memory: Memory
    messages: list[Message] = Field(default_factory=list, max_length=MAX_MESSAGES_PER_CONVERSATION)
    sources: list[
        Annotated[str, StringConstraints(max_length=500), AfterValidator(_storable_text)]
    ] = Field(
        default_factory=list,
        max_length=MAX_FACT_SOURCES,
        description="A fact's sources, oldest first.",
    )
    created_at: UtcDateTime
    updated_at: UtcDateTime
    expires_at: UtcDateTime | None = Field(
        default=None, description="An ephemeral fact's expiry (ignored for anything else)."
    )
    reinforcement_count: int = Field(default=0, ge=0, le=2**31 - 1)
    session_role: Literal["log", "summary"] | None = Field(
        default=None, description="The agent loop's own conversation log or rolling summary."
    )
    valid_from: UtcDateTime | None = Field(
        default=None, description="A fact: since when it holds (None: since created_at)."
    )
    valid_to: UtcDateTime | None = Field(
        default=None, description="A closed fact: when it stopped holding (None: it holds)."
    )
    superseded_by: UUID | None = Field(
        default=None, description="A closed fact: the exported id of the fact that replaced it."
    )
    period: Period | None = Field(
        default=None, description="A period summary: the month it rolls up (YYYY-MM)."
    )
    span_start: UtcDateTime | None = Field(
        default=None, description="A summary: the time of the first thing it covers."
    )
    span_end: UtcDateTime | None = Field(
        default=None, description="A summary: the time of the last thing it covers."
    )

    @model_validator(mode="before")
    @classmethod
    def _blank_names_are_none(cls, data: Any) -> Any:
        """An export written before a speaker's name had to be visible may hold blank names
        ("" or spaces): they were no name, and are read as none."""
        if not isinstance(data, dict):
            return data
        memory = data.get("memory")
        groups = [(data.get("messages"), "name")]
        if isinstance(memory, dict):
            groups += [(memory.get("messages"), "name"), (memory.get("segments"), "speaker")]
        for items, key in groups:
            for item in items if isinstance(items, list) else ():
                value = item.get(key) if isinstance(item, dict) else None
                if isinstance(value, str) and not value.strip():
                    item[key] = None
        return data

    @model_validator(mode="after")
    def _parts_of_their_type(self) -> ExportedMemory:
        memory = self.memory
        if isinstance(memory, Conversation):
            if memory.messages:
                if self.messages:
                    raise _at(
                        "messages",
                        "a conversation's messages go in `messages` or `memory.messages`, not both",
                    )
                # A conversation written as a client stores it: its messages move here.
                self.messages = list(memory.messages)
                self.memory = memory.model_copy(update={"messages": []})
        elif self.messages:
            raise _at("messages", f"{article(memory.type.value)} has no messages")
        if self.sources and not isinstance(memory, Fact):
            raise _at("sources", f"{article(memory.type.value)} has no sources")
        if not isinstance(memory, Fact) and (
            self.valid_from is not None or self.valid_to is not None
        ):
            raise _at(
                "valid_from" if self.valid_from is not None else "valid_to",
                f"{article(memory.type.value)} has no validity (valid_from, valid_to)",
            )
        if self.updated_at < self.created_at:
            raise _at("updated_at", "updated_at is before created_at")
        if self.superseded_by is not None and self.valid_to is None:
            raise _at(
                "superseded_by", "superseded_by names what replaced a closed fact: give valid_to"
            )
        if (
            self.valid_to is not None
            and self.valid_from is not None
            and self.valid_to < self.valid_from
        ):
            raise _at("valid_to", "valid_to is before valid_from")
        if self.period is not None and not isinstance(memory, Summary):
            raise _at("period", f"{article(memory.type.value)} has no period")
        if (self.span_start is not None or self.span_end is not None) and not isinstance(
            memory, Summary
        ):
            raise _at(
                "span_start" if self.span_start is not None else "span_end",
                f"{article(memory.type.value)} has no span",
            )
        if (
            self.span_start is not None
            and self.span_end is not None
            and self.span_end < self.span_start
        ):
            raise _at("span_end", "span_end is before span_start")
        if self.session_role is not None and memory.session_id is None:
            raise _at(
                "session_role", "session_role belongs to a memory of a session: give session_id"
            )
        if self.session_role == "log" and not isinstance(memory, Conversation):
            raise _at("session_role", "a session's log is a conversation")
        if self.session_role == "summary" and not isinstance(memory, Summary):
            raise _at("session_role", "a session's rolling summary is a summary")
        return self


class ImportProblem(BaseModel):
    """A line an import could not take."""

    line: int = Field(description="1-based line number in the file.")
    message: str
    field: str | None = Field(default=None, description="Dotted path of the value at fault.")


class ImportReport(BaseModel):
    """What an import did.

    ``created + merged + unchanged + expired + error_count == lines`` (memory lines, the header
    and blank lines not counted).
    """

    lines: int = 0
    created: dict[str, int] = Field(default_factory=dict, description="New memories, by type.")
    merged: int = Field(default=0, description="Facts that reinforced a fact already stored.")
    unchanged: int = Field(default=0, description="Lines imported before (or ids already here).")
    expired: int = Field(default=0, description="Ephemeral facts already past their expiry.")
    error_count: int = 0
    errors: list[ImportProblem] = Field(
        default_factory=list, description=f"The first {MAX_REPORTED_PROBLEMS} problems."
    )
    missing: int = Field(
        default=0,
        description="Memory lines the header announces that the file does not hold: a file "
        "cut short (an atomic import of one is refused).",
    )
    atomic: bool = False
    committed: bool = Field(
        default=True, description="False when an atomic import was refused: nothing stored."
    )

    def problem(self, line: int, message: str, field: str | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_PROBLEMS:
            self.errors.append(ImportProblem(line=line, message=message, field=field))


_HEADER: TypeAdapter[ExportHeader] = TypeAdapter(ExportHeader)
_MEMORY_LINE: TypeAdapter[ExportedMemory] = TypeAdapter(ExportedMemory)


_BOM = "\ufeff".encode()


async def numbered_lines(
    chunks: AsyncIterable[bytes | str], *, max_line_bytes: int = MAX_LINE_BYTES
) -> AsyncIterator[tuple[int, bytes]]:
    """Split a stream of byte (or str) chunks into ``(line number, line)``, 1-based.

    Lines end with ``\\n`` (``\\r\\n`` too); blank lines keep their number but are skipped.
    A UTF-8 byte order mark opening the file is not part of its first line: editors on
    Windows (Notepad, Excel's "UTF-8" CSV/text) write one when they save, and RFC 8259 lets
    a JSON reader ignore it. The first line was "not JSON" (Python's parser refuses a BOM),
    so an export opened and saved again could not be imported.
    A line longer than ``max_line_bytes`` (counted without its line end and, on the first
    line, the byte order mark) comes out as ``b""`` followed by nothing of it: the caller
    reports it (its content is dropped as it arrives, so memory stays bounded). The count
    does not depend on how the file is cut into chunks: a line that came whole in one chunk
    (the whole file as one ``bytes``, what Python callers pass) was read at any length, and
    one of exactly the limit ending in ``\r\n`` was refused when a chunk ended between them.
    """
    buffer = bytearray()
    number = 0
    overlong = False
    async for chunk in chunks:
        # Only the new chunk can hold the next line's end: searching the whole buffer again
        # for each chunk was quadratic (a 48 MB line in 4 KB chunks: 6.5 s of one core).
        searched = len(buffer)
        if isinstance(chunk, str):
            # A lone surrogate (text read with errors="surrogateescape") is kept as the bytes
            # it stands for, which its line then reports as not UTF-8: encoding it strictly
            # raised UnicodeEncodeError out of the import.
            buffer += chunk.encode("utf-8", "surrogatepass")
        elif isinstance(chunk, bytes | bytearray | memoryview):
            buffer += chunk
        else:
            raise InvalidInput(
                f"the import's chunks must be bytes or text, not {type(chunk).__name__}",
                field="lines",
            )
        while True:
            end = buffer.find(b"\n", searched)
            searched = 0
            if end < 0:
                break
            number += 1
            line = bytes(buffer[:end]).rstrip(b"\r")
            if number == 1:
                line = line.removeprefix(_BOM)
            del buffer[: end + 1]
            if overlong or len(line) > max_line_bytes:
                overlong = False
                yield number, b""
            elif line.strip():
                yield number, line
        # Room for what the line's count leaves out (a BOM, a "\r" whose "\n" is to come).
        if len(buffer) > max_line_bytes + len(_BOM) + 1:
            overlong = True
            buffer.clear()
    if overlong:
        yield number + 1, b""
    elif buffer.strip():
        line = bytes(buffer).rstrip(b"\r")
        if number == 0:
            line = line.removeprefix(_BOM)
        yield number + 1, b"" if len(line) > max_line_bytes else line


def _json(number: int, line: bytes) -> Any:
    if not line:
        raise InvalidInput(f"line {number} is longer than {MAX_LINE_BYTES} bytes", field="line")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"line {number} is not UTF-8: {exc.reason}", field="line") from None
    try:
        return validation.json_loads(text)
    except json.JSONDecodeError as exc:  # nested too deeply, an endless integer, ...
        raise InvalidInput(f"line {number} is not JSON: {exc}", field="line") from None


def parse_header(number: int, line: bytes) -> ExportHeader:
    """The export header of a file's first line.

    Raises:
        InvalidInput: The line is not JSON, not a header, or of another format version.
    """
    data = _json(number, line)
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise InvalidInput(
            f'line {number} is not a halldyll export header ({{"format": "{EXPORT_FORMAT}", ...}})',
            field="format",
        )
    version = data.get("version")
    if type(version) is not int or version != EXPORT_VERSION:  # true and 1.0 equal 1 too
        raise InvalidInput(
            f"export format version {quoted(version)} is not supported "
            f"(this service reads version {EXPORT_VERSION})",
            field="version",
        )
    return validation.validate(_HEADER, data, f"header (line {number})")


def parse_memory_line(number: int, line: bytes) -> ExportedMemory:
    """One memory line, validated as :meth:`MemoryEngine.store_memory` validates a memory.

    Raises:
        InvalidInput: The line is not JSON or not a valid memory; ``field`` is the dotted
            path of the value at fault (``memory.confidence``).
    """
    data = _json(number, line)
    if not isinstance(data, dict):
        # Reported on the line, as a line that is not JSON is: pydantic's error of a whole
        # value has no location, and the fallback named ``memory (line N)``, no field.
        raise InvalidInput(
            f'line {number} is not a JSON object (a memory line: {{"id": ..., '
            f'"memory": {{...}}, ...}}), but {_json_kind(data)}',
            field="line",
        )
    return validation.validate(_MEMORY_LINE, data, f"memory (line {number})")


def _json_kind(value: Any) -> str:
    """What a JSON value is, in words: ``an array``, ``a string``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    return "a number"


async def file_chunks(
    chunks: AsyncIterable[bytes | str] | Iterable[bytes | str],
) -> AsyncIterator[bytes | str]:
    """An import's file as an async iterator of its chunks, async or not; a lone ``bytes`` or
    ``str`` is the whole file (iterating bytes gave ints). InvalidInput (``lines``) for what
    is neither."""
    if isinstance(chunks, bytes | bytearray | str):
        yield chunks
    elif isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    elif isinstance(chunks, Iterable):
        for chunk in chunks:
            yield chunk
    else:
        raise InvalidInput("lines must be an iterable of bytes or text chunks", field="lines")
