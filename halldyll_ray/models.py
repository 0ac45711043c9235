"""Pydantic v2 models: the five memory types of SPEC §4.2, users, AI models and results.

Every input model bounds its sizes and values, so bad input fails here with a field name
before anything touches the database. Limits are module constants so the README, the HTTP
layer and the tests quote the same numbers.
"""

from __future__ import annotations

import json
import re
import unicodedata
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, Self, TypeVar
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    Strict,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from halldyll_ray.errors import quoted
from halldyll_ray.textproc import NEEDED_FORMAT

#: The error type of a model-level check that names the field at fault in its context
#: (``{"field": ..., "reason": ...}``): :func:`halldyll_ray.validation.error_field` reports it
#: on that field rather than on the model.
FIELD_CHECK = "field_check"

# --- limits -----------------------------------------------------------------------------------
MAX_TAGS = 32
MAX_TAG_LENGTH = 64
MAX_METADATA_BYTES = 16_384
MAX_MESSAGE_CHARS = 32_000
MAX_MESSAGES_PER_CALL = 1_000
MAX_MESSAGES_PER_CONVERSATION = 20_000
MAX_TITLE_CHARS = 300
MAX_FACT_CHARS = 2_000
MAX_PROMPT_CHARS = 4_000
MAX_TEXT_CHARS = 200_000
MAX_SEGMENTS = 10_000
MAX_SUMMARY_COVERS = 1_000
#: Sources a fact keeps (the newest): each reinforcement adds its own.
MAX_FACT_SOURCES = 10_000
MAX_URI_CHARS = 2_048
MAX_QUERY_CHARS = 4_000
MAX_SEARCH_LIMIT = 100
#: Most rows one page of a list (memories, jobs) holds: REST's limit, the MCP tools' and the
#: components' own check.
MAX_PAGE_SIZE = 500
#: Bytes of memory text and payload one page of memories holds by default (PAGE_MAX_BYTES).
PAGE_MAX_BYTES = 8 * 1024 * 1024
MAX_JSON_DEPTH = 32
MAX_KEY_NAME_CHARS = 100
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
TAG_PATTERN = re.compile(r"[\w][\w .:/+#@-]{0,63}")
#: An id as every surface takes it (REST paths and bodies, Python, GraphQL, MCP, LangGraph):
#: 8-4-4-4-12 hex digits, either case. Python's ``UUID()`` alone also took braces, ``urn:uuid:``,
#: 32 digits without hyphens, and whatever ``int(_, 16)`` does (a ``+``, an ``_`` between
#: digits, full-width digits): ``"0f8fa_5bd9cb..."`` read another memory than the one meant.
UUID_PATTERN = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UUID_TEXT = re.compile(UUID_PATTERN)
UUID_FORM = "8-4-4-4-12 hex digits"


class Role(StrEnum):
    """A user's role (SPEC §4.1)."""

    ADMIN = "admin"
    USER = "user"
    SERVICE = "service"
    VIEWER = "viewer"


class MemoryType(StrEnum):
    CONVERSATION = "conversation"
    FACT = "fact"
    IMAGE = "image"
    TRANSCRIPTION = "transcription"
    SUMMARY = "summary"


class MessageRole(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    TOOL = "tool"


class FactKind(StrEnum):
    PERMANENT = "permanent"
    EPHEMERAL = "ephemeral"


class ModelKind(StrEnum):
    """Specialty of a registered AI model (SPEC §4.3)."""

    LLM = "llm"
    VISION_LANGUAGE = "vision-language"
    IMAGE_GENERATION = "image-generation"
    CONTROL = "control"
    FACE_RECOGNITION = "face-recognition"
    EMBEDDING = "embedding"
    SPEECH = "speech"
    OTHER = "other"


class SearchMode(StrEnum):
    """How :meth:`MemoryEngine.search` retrieves.

    ``semantic``: vector search, falling back to full-text when nothing passes the threshold.
    ``hybrid``: the vector and BM25 full-text lists combined (cosine and BM25 coverage, then
    each part's neighbours and memory; ``components/search.py``). ``fulltext``: BM25 only.
    """

    SEMANTIC = "semantic"
    HYBRID = "hybrid"
    FULLTEXT = "fulltext"


class SearchGroup(StrEnum):
    """What one search result stands for.

    ``part``: one matching part (a message of a conversation, a segment of a transcription, a
    fact's statement ...): a memory can come back several times, once per part that earns a
    place, so ten hits can show ten turns of one long conversation. ``memory``: the best part of
    each memory only, one result per memory.
    """

    PART = "part"
    MEMORY = "memory"


class SearchView(StrEnum):
    """How much of each hit's memory a search returns (the names of Google's API design
    guide, AIP-157 "Partial responses": ``BASIC`` and ``FULL``).

    ``full``: the memory's whole record, as a read by id returns it, but a conversation's
    messages (``message_count`` says how many; the matched one is the hit's ``matched``).
    ``basic``: the same without the parts of a transcription either: its ``text`` is ``""``
    and its ``segments`` ``[]`` (the segment that matched is the hit's ``matched``). A
    transcription holds up to 10,000 segments and 200,000 characters, and every hit of it
    carried them all: ten hits of a 2,000-segment recording were a 3.2 MB answer.
    """

    FULL = "full"
    BASIC = "basic"


def _is_mark(char: str) -> bool:
    return unicodedata.category(char).startswith("M")


#: Zero-width non-joiner and joiner: how Persian and Indic spellings choose a letter's form.
_JOINERS = frozenset("\u200c\u200d")


def _in_word(char: str) -> bool:
    return char.isalnum() or _is_mark(char)


def tag_allowed(tag: str) -> bool:
    """Whether ``tag`` (NFKC, stripped) is 1-MAX_TAG_LENGTH characters matching
    :data:`TAG_PATTERN`, where a combining mark may follow any character but the first.

    Marks that no precomposed letter holds are how many scripts spell their words: Thai
    vowels and tone marks ("ข้าว"), Devanagari vowel signs ("हिंदी"), Arabic harakat, Hebrew
    points. ``\\w`` takes none of them, so a tag in Hindi or Thai was refused while one in
    Chinese or French was kept. A zero-width non-joiner or joiner is kept between two
    characters of a word (Persian "می‌خواهم"), refused anywhere else."""
    if not tag or len(tag) > MAX_TAG_LENGTH or _is_mark(tag[0]):
        return False
    kept: list[str] = []
    for i, char in enumerate(tag):
        if _is_mark(char):
            continue
        if char in _JOINERS:
            # Inside a word only: Persian "می‌خواهم" (ZWNJ), a Devanagari half form (ZWJ).
            if 0 < i < len(tag) - 1 and _in_word(tag[i - 1]) and _in_word(tag[i + 1]):
                continue
            return False
        kept.append(char)
    return TAG_PATTERN.fullmatch("".join(kept)) is not None


def _check_tags(tags: list[str], info: ValidationInfo) -> list[str]:
    """The tags stripped and NFKC-normalised (the form search and fact keys read text in),
    each once: "café" typed precomposed or as "e" + U+0301 (what macOS file names and some
    keyboards give) is one tag, and a fullwidth "ＡＢＣ" is "ABC". Without it the decomposed
    form was refused (a combining mark is not a word character) and a fullwidth tag was kept
    beside its ASCII twin, filtered apart from it. Tags read back from storage (context
    STORED) are as they were written: a tag stored before this rule may not match after it
    ("a½" is "a1⁄2"), and reading it must not fail. A combining mark NFKC does not compose
    (Thai, Devanagari) is kept (:func:`tag_allowed`)."""
    if info.context is STORED:
        return tags
    seen: dict[str, None] = {}
    for tag in tags:
        tag = unicodedata.normalize("NFKC", tag).strip()
        if not tag_allowed(tag):
            raise ValueError(
                f"tag {quoted(tag)} is not allowed: 1-{MAX_TAG_LENGTH} characters, starting with a "
                "letter, digit or underscore"
            )
        seen.setdefault(tag, None)
        if len(seen) > MAX_TAGS:
            # Counted once each, as they are kept: 33 tags of which two are one ("x", "x";
            # "café" and its decomposed form) are 32 tags. The count was of the list as sent,
            # before the duplicates went, and refused it "after validation, not 33".
            raise ValueError(f"at most {MAX_TAGS} different tags")
    return list(seen)


#: Characters no stored text may hold: NUL (PostgreSQL text cannot store it) and lone UTF-16
#: surrogates (what a JSON string with a broken emoji escape decodes to; not encodable as
#: UTF-8, so every later encode of the text would fail).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def check_text(value: str) -> str:
    """``value`` unchanged, or ValueError if it holds NUL or a lone surrogate."""
    found = _UNSTORABLE.search(value)
    if found is not None:
        what = "a NUL character" if found[0] == "\x00" else "a lone UTF-16 surrogate"
        raise ValueError(f"text contains {what} at position {found.start()}")
    return value


def storable(text: str) -> str:
    """``text`` with each character no stored text may hold (NUL, a lone UTF-16 surrogate:
    see :func:`check_text`) replaced by U+FFFD: for a text the service keeps about something
    that happened (a failed job's error, which can quote a third party's words), where
    refusing it would lose the record."""
    return _UNSTORABLE.sub("\ufffd", text)


def check_json_value(value: Any, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse what JSON or PostgreSQL cannot round-trip: nesting deeper than ``max_depth``,
    NaN and infinities, NUL and lone surrogates in strings and keys, keys that are not
    strings (ValueError).

    Iterative, so a 2,000-level value is refused instead of overflowing Python's stack; and
    bounded, so no later encoder (Redis cache, HTTP response) meets a recursion limit.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            check_text(item)
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                raise ValueError("numbers must be finite (no NaN or Infinity)")
        elif isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                raise ValueError(f"JSON values may nest at most {max_depth} levels deep")
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        # JSON has string keys only: json.dumps turned 1 into "1" (beside a
                        # "1" of the same object: one of them was lost) and raised TypeError
                        # for a tuple or bytes key.
                        raise ValueError(f"keys must be strings, not {type(key).__name__}")
                    check_text(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def compact_json(value: Any) -> str:
    """``value`` as the JSON its size limits count: compact (no space after ``,`` or ``:``),
    characters as themselves (not ``\\u`` escapes), values JSON cannot hold as strings.

    What a client measures of what it sends (``JSON.stringify``, ``json.dumps(...,
    separators=(",", ":"))``). Python's default separators (``", "``, ``": "``) added a byte
    a key and one an item: a metadata object of one key and 16,384 bytes as sent was counted
    16,385 and refused, one of 1,638 small keys (``"k0000":1``) at the limit was counted
    19,659."""
    return json.dumps(
        value, ensure_ascii=False, default=str, allow_nan=False, separators=(",", ":")
    )


def json_size(value: Any) -> int:
    """UTF-8 bytes of ``value`` as :func:`compact_json` writes it: what MAX_METADATA_BYTES
    counts (a 4-byte emoji is 4, whatever its length in characters)."""
    return len(compact_json(value).encode())


def check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """A metadata object as stored: JSON-safe (see :func:`check_json_value`), at most
    MAX_METADATA_BYTES of compact UTF-8 JSON (:func:`json_size`), values that JSON cannot
    hold turned to strings."""
    check_json_value(value)
    encoded = compact_json(value)
    size = len(encoded.encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(
            f"metadata takes {size} bytes of JSON (compact, UTF-8); at most {MAX_METADATA_BYTES}"
        )
    return json.loads(encoded)  # type: ignore[no-any-return]


#: A caller's text: a str, never bytes. Pydantic's lax mode decoded bytes as UTF-8, so in Python
#: ``{"statement": b"x"}``, a tag ``b"a"`` or a metadata key ``b"k"`` was stored as text,
#: where every other argument of the API (a query, a name, an id) refuses bytes. JSON has
#: only strings, so HTTP bodies read as before.
InputStr = Annotated[str, Strict()]


class _AtMostTags:
    """The JSON schema's ``maxItems`` of a tag list: what a client that sends each tag once may
    send (the check itself counts the tags as kept, :func:`_check_tags`). A metadata object, so
    that every schema built from the type's metadata (the MCP tools') says it too."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(core_schema), "maxItems": MAX_TAGS}


#: At most MAX_TAGS tags once the same tags are one (:func:`_check_tags`).
Tags = Annotated[list[InputStr], AfterValidator(_check_tags), _AtMostTags()]


def _metadata(value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    # Read back from storage (STORED): JSON already, and checked when written.
    return value if info.context is STORED else check_metadata(value)


Metadata = Annotated[dict[InputStr, Any], AfterValidator(_metadata)]
SessionId = Annotated[InputStr, StringConstraints(pattern=SESSION_ID_PATTERN)]
ModelRef = Annotated[
    InputStr, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)
]


def plain(value: str) -> bool:
    """Whether ``value`` holds no control, unassigned or surrogate character, no line or
    paragraph separator (U+2028, U+2029: line breaks that are not controls) and no format
    character but the joiners and tags scripts and emoji need (:data:`NEEDED_FORMAT`): none of
    what makes a name read as another one (a right-to-left override, a zero-width space, a
    soft hyphen) or forges a log line (a line break)."""
    return not any(
        unicodedata.category(c) in ("Cc", "Cn", "Cs", "Zl", "Zp")
        or (unicodedata.category(c) == "Cf" and not NEEDED_FORMAT.match(c))
        for c in value
    )


#: Letters and symbols that draw nothing: the Hangul fillers (U+115F, U+1160, U+3164, U+FFA0)
#: and the blank Braille pattern (U+2800), which Unicode classes as a letter or a symbol.
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def visible(text: str) -> bool:
    """Whether ``text`` holds a character one can see: not only spaces (Unicode Z*), control,
    format or unassigned code points (C*: zero-width spaces and joiners, direction marks,
    U+FFFF), combining marks with nothing to combine with (M*) and blank glyphs
    (:data:`_BLANK_GLYPHS`). Python's ``str.strip`` keeps U+200B, so a statement of zero-width
    spaces passed a blank check and was stored, shown and searched as an empty fact."""
    return any(unicodedata.category(c)[0] not in "ZCM" and c not in _BLANK_GLYPHS for c in text)


# Rows read back from storage (context STORED) passed these checks when written, or were
# written before a rule: read as they are. A segment stored before its text had to be visible
# failed every read of its transcription (a get, a list, a search hit), and the checks of
# thousands of segments' texts and speakers were done again on every read.
def _visible(value: str, info: ValidationInfo) -> str:
    if info.context is not STORED and not visible(value):
        raise ValueError("must hold a visible character, not only spaces or invisible ones")
    return value


def _plain(value: str, info: ValidationInfo) -> str:
    if info.context is not STORED and not plain(value):
        raise ValueError(
            "must not hold line breaks, control, unassigned or invisible format characters"
        )
    return value


# Text that must say something: stripped of whitespace, not empty, with a character one can
# see (:func:`visible`), and within its bound. Each states the bound in the one
# StringConstraints that strips it: a max_length in a second one came after the visibility
# check, where pydantic can no longer tell a string from a list ("Value should have at most
# 2000 items after validation").
#: A message's content, a transcription segment's text.
MessageText = Annotated[
    InputStr,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_MESSAGE_CHARS),
    AfterValidator(_visible),
]
#: A fact's statement.
FactText = Annotated[
    InputStr,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_FACT_CHARS),
    AfterValidator(_visible),
]
#: An image's prompt.
PromptText = Annotated[
    InputStr,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS),
    AfterValidator(_visible),
]
#: A summary's text.
LongText = Annotated[
    InputStr,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT_CHARS),
    AfterValidator(_visible),
]
#: A speaker's name (a message's, a transcription segment's): what people read beside what was
#: said, so visible (a blank name is no name: leave it out) and :func:`plain`.
SpeakerName = Annotated[
    InputStr,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(_visible),
    AfterValidator(_plain),
]


#: Short names a caller gives an image (its generator, its scheduler): :func:`plain`, so
#: that each holds no line break, control or invisible format character and reads as the one
#: name it is, as a speaker's name does (:data:`SpeakerName`): a context shows an image
#: "by {generator}", where "RealVis\\nXL" broke the item's line and a right-to-left override
#: drew another name.
GeneratorName = Annotated[InputStr, StringConstraints(max_length=200), AfterValidator(_plain)]
SchedulerName = Annotated[InputStr, StringConstraints(max_length=100), AfterValidator(_plain)]


def _title(value: str) -> str:
    return value if visible(value) else ""


#: A conversation's title: optional, so one with nothing visible in it (blanks, zero-width
#: spaces, a Hangul filler) is no title, "", rather than a refusal; it was indexed as a part of
#: its own that says nothing. Otherwise :func:`plain`, as a speaker's name is: a context shows
#: it on its conversation's line (``(day, conversation 'title') ...``), where a line or
#: paragraph separator (U+2028, U+2029), a newline or a right-to-left override was kept and
#: broke that line or drew another title.
Title = Annotated[
    InputStr,
    StringConstraints(max_length=MAX_TITLE_CHARS),
    AfterValidator(_title),
    AfterValidator(_plain),
]


#: The first and last instants Python can hold. asyncpg writes them as PostgreSQL's -infinity
#: and infinity and reads those back without a time zone: a memory stored at either broke
#: every later read that compared or converted its time (500s on search and context).
_FIRST_INSTANT = datetime.min.replace(tzinfo=UTC)
_LAST_INSTANT = datetime.max.replace(tzinfo=UTC)


def in_utc_range(value: datetime) -> datetime:
    """Refuse a time that has no UTC form (0001-01-01T00:00+01:00 is in year 0: the conversion
    raised OverflowError, a 500) or whose UTC form is the first or last instant of year 1 to
    9999 (:data:`_FIRST_INSTANT`, stored as an infinity). A naive time is UTC."""
    try:
        utc = value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    except OverflowError:
        utc = None
    if utc is None or not _FIRST_INSTANT < utc < _LAST_INSTANT:
        raise ValueError(
            "is out of range: a time must fall after 0001-01-01T00:00:00Z and before "
            "9999-12-31T23:59:59.999999Z"
        )
    return value


def _as_utc(value: datetime) -> datetime:
    """``value`` in UTC (a naive time is UTC): the form PostgreSQL gives back, so that what a
    store answers is what every later read shows ("+14:00" came back once, "Z" ever after)."""
    in_utc_range(value)
    return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)


# One way to read each number: "\d+\.?\d*" read a run of digits as any split between its two
# runs, so refusing "111...1x" tried them all (a 10,000-digit "since" held a replica 2.4 s,
# a 1 MiB body for hours).
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def iso_time_only(value: object) -> object:
    """Refuse a number (or a string of one) for a time: pydantic would read it as a Unix time
    ("until=0.5" meant 1970); the API takes ISO 8601 times and datetime objects only."""
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value)):
        raise ValueError("must be an ISO 8601 date-time, e.g. 2026-01-15T09:30:00Z")
    return value


#: A time given by a caller. One rule everywhere: ISO 8601 (or a datetime), and a naive
#: datetime means UTC (never the server's local time zone, which asyncpg would apply to it).
UtcDateTime = Annotated[datetime, BeforeValidator(iso_time_only), AfterValidator(_as_utc)]


#: Numbers and flags of an input: JSON true/false is not a number (pydantic's lax mode reads it
#: as 1/0), nor "3" a count.
StrictFloat = Annotated[float, Strict()]
StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]

#: Validation context of data read back from storage (a row, a cached result): it passed the
#: input checks when it was written, so :class:`_Input` does not walk it again.
STORED: dict[str, bool] = {"stored": True}


class _Input(BaseModel):
    """Base of every input model: unknown fields, NaN and infinities are refused, and every
    field's raw value passes :func:`check_json_value` before its own validation."""

    model_config = ConfigDict(
        extra="forbid", str_strip_whitespace=False, frozen=False, allow_inf_nan=False
    )

    @model_validator(mode="after")
    def _storable(self, info: ValidationInfo) -> Self:
        # One walk of this model's own field values (nested models walk theirs), after field
        # validation so that pydantic-core validates JSON without a detour through Python.
        # Rows read back from storage passed it when written (context STORED): skipped.
        if info.context is STORED:
            return self
        for key, value in self.__dict__.items():
            if isinstance(value, float) and value == 0.0:
                # -0.0 (as valid a JSON number as 0.0) is 0.0: it was stored, returned and
                # exported with its sign ("importance": -0.0).
                self.__dict__[key] = 0.0
            elif isinstance(value, str | dict | list | float):
                try:
                    check_json_value(value)
                except ValueError as exc:
                    raise PydanticCustomError(
                        "unstorable_value", "{reason}", {"field": key, "reason": str(exc)}
                    ) from None
        return self


class Message(_Input):
    """One message of a conversation."""

    role: MessageRole
    content: MessageText
    created_at: UtcDateTime | None = Field(
        default=None, description="Defaults to the store time; a naive time means UTC."
    )
    name: SpeakerName | None = Field(
        default=None,
        description="Speaker or tool name: visible text, no line break, control, unassigned or "
        "invisible format character.",
    )


class StoredMessage(BaseModel):
    """A message as stored: its position in the conversation and its time are known."""

    seq: int
    role: MessageRole
    content: str
    created_at: datetime
    name: str | None = None


class _MemoryBase(_Input):
    tags: Tags = Field(default_factory=list)
    metadata: Metadata = Field(default_factory=dict)
    importance: StrictFloat = Field(default=0.5, ge=0.0, le=1.0, description="Salience in [0, 1].")
    session_id: SessionId | None = None
    model: ModelRef | None = Field(
        default=None,
        description="Registered AI model (name or id) this memory belongs to; None: shared by "
        "all of the user's models.",
    )


class Conversation(_MemoryBase):
    type: Literal[MemoryType.CONVERSATION] = MemoryType.CONVERSATION
    title: Title | None = None
    messages: list[Message] = Field(default_factory=list, max_length=MAX_MESSAGES_PER_CALL)


class Fact(_MemoryBase):
    type: Literal[MemoryType.FACT] = MemoryType.FACT
    statement: FactText
    confidence: StrictFloat = Field(default=0.7, ge=0.0, le=1.0)
    source: Annotated[InputStr, StringConstraints(max_length=500)] | None = None
    kind: FactKind = FactKind.PERMANENT


class ImageSize(_Input):
    width: StrictInt = Field(ge=1, le=32_768)
    height: StrictInt = Field(ge=1, le=32_768)


class Image(_MemoryBase):
    """Metadata and parameters of a generated image; found by its prompt."""

    type: Literal[MemoryType.IMAGE] = MemoryType.IMAGE
    prompt: PromptText
    negative_prompt: Annotated[InputStr, StringConstraints(max_length=MAX_PROMPT_CHARS)] | None = (
        None
    )
    generator: GeneratorName | None = Field(
        default=None, description="Image model that made it, e.g. RealVisXL_V5.0."
    )
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    steps: StrictInt | None = Field(default=None, ge=1, le=10_000)
    guidance_scale: StrictFloat | None = Field(default=None, ge=0.0, le=100.0)
    size: ImageSize | None = None
    scheduler: SchedulerName | None = None
    controlnet: Metadata | None = Field(default=None, description="ControlNet settings.")
    instantid: Metadata | None = Field(default=None, description="InstantID settings.")
    uri: Annotated[InputStr, StringConstraints(max_length=MAX_URI_CHARS)] | None = None
    sha256: Annotated[InputStr, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None


class Segment(_Input):
    start: StrictFloat = Field(ge=0.0, le=1e7)
    end: StrictFloat = Field(ge=0.0, le=1e7)
    text: MessageText
    speaker: SpeakerName | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Segment:
        if self.end < self.start:
            raise ValueError("segment end is before its start")
        return self


class Transcription(_MemoryBase):
    type: Literal[MemoryType.TRANSCRIPTION] = MemoryType.TRANSCRIPTION
    text: Annotated[InputStr, StringConstraints(max_length=MAX_TEXT_CHARS)] = ""
    segments: list[Segment] = Field(default_factory=list, max_length=MAX_SEGMENTS)
    duration_seconds: StrictFloat | None = Field(default=None, ge=0.0, le=1e7)
    language: InputStr | None = Field(
        default=None, description="ISO 639-1 code; detected from the text when not given."
    )
    audio_uri: Annotated[InputStr, StringConstraints(max_length=MAX_URI_CHARS)] | None = None

    @field_validator("text")
    @classmethod
    def _blank_is_no_text(cls, value: str, info: ValidationInfo) -> str:
        # Text with nothing one can see (zero-width spaces, a Hangul filler) is no text, as for
        # every text that must say something: it was stored, embedded and ranked first. A row
        # stored before this rule is read as it is (STORED). A field validator, not the model
        # check below, which pydantic runs again on an instance a StoredMemory is built with.
        if info.context is STORED or visible(value):
            return value
        return ""

    @field_validator("language")
    @classmethod
    def _language(cls, value: str | None) -> str | None:
        from halldyll_ray.errors import InvalidInput
        from halldyll_ray.language import normalize_language_code

        try:
            return None if value is None else normalize_language_code(value)
        except InvalidInput as exc:  # let pydantic report it with the field's full path
            raise ValueError(exc.message) from None

    @field_validator("segments")
    @classmethod
    def _in_time_order(cls, value: list[Segment], info: ValidationInfo) -> list[Segment]:
        # Segments are indexed, shown and joined into the text in their order, and a hit's
        # neighbours are the segments beside it: given out of order, the transcript read
        # "b a" and a hit's context was another moment's. Overlaps (two speakers at once)
        # are fine; a start before the previous segment's is not. Rows stored before this
        # rule are read as they are (STORED).
        if info.context is STORED:
            return value
        for index in range(1, len(value)):
            if value[index].start < value[index - 1].start:
                raise PydanticCustomError(
                    "segment_order",
                    "segment {index} starts at {start} s, before segment {previous} "
                    "({previous_start} s): segments must be in order of start time",
                    {
                        "index": index,
                        "start": value[index].start,
                        "previous": index - 1,
                        "previous_start": value[index - 1].start,
                    },
                )
        return value

    @model_validator(mode="after")
    def _has_text(self, info: ValidationInfo) -> Transcription:
        if self.duration_seconds is not None and any(
            segment.end > self.duration_seconds for segment in self.segments
        ):
            raise ValueError("a segment ends after the recording (duration_seconds)")
        joined = " ".join(segment.text.strip() for segment in self.segments)
        # The segments are the transcript: together they are held to the text's limit. A
        # text joined from 10 segments of 30,000 characters was stored past MAX_TEXT_CHARS,
        # and then every read of it (get, list, search, export) failed on that limit.
        if len(joined) > MAX_TEXT_CHARS and info.context is not STORED:
            raise ValueError(
                f"the segments hold {len(joined)} characters of text together; a "
                f"transcription holds at most {MAX_TEXT_CHARS}"
            )
        if not self.text.strip():
            if not self.segments:
                if info.context is STORED:
                    # A search hit in the basic view (SearchView): its parts left out.
                    return self
                raise ValueError("a transcription needs text or segments")
            self.text = joined
        return self


def uuid_of(value: object) -> UUID:
    """``value`` as a UUID: a UUID, or its text in the one form ids are written
    (:data:`UUID_PATTERN`); ValueError otherwise."""
    if isinstance(value, UUID):
        return value
    if isinstance(value, str) and _UUID_TEXT.fullmatch(value):
        return UUID(value)
    raise ValueError(f"not a UUID of {UUID_FORM}")


def _id_text(value: Any) -> Any:
    if isinstance(value, str) and not _UUID_TEXT.fullmatch(value):
        raise PydanticCustomError(
            "uuid_parsing", "Input should be a UUID of {form}", {"form": UUID_FORM}
        )
    return value


#: A UUID a caller gives (a path, query or body field): text only in :data:`UUID_PATTERN`.
Id = Annotated[UUID, BeforeValidator(_id_text)]


def _once_each(ids: list[UUID]) -> list[UUID]:
    """The ids in their order, each once: a summary covers a memory or it does not."""
    return list(dict.fromkeys(ids))


class Summary(_MemoryBase):
    type: Literal[MemoryType.SUMMARY] = MemoryType.SUMMARY
    text: LongText
    covers: Annotated[list[Id], AfterValidator(_once_each)] = Field(
        default_factory=list,
        max_length=MAX_SUMMARY_COVERS,
        description="Ids of the memories this summary covers (all the same user's; an id "
        "given twice is kept once).",
    )


Memory = Annotated[
    Conversation | Fact | Image | Transcription | Summary, Field(discriminator="type")
]


class MemoryUpdate(_Input):
    """Fields that can change after a memory is stored; None leaves a field as it is."""

    tags: Tags | None = None
    metadata: Metadata | None = None
    importance: StrictFloat | None = Field(default=None, ge=0.0, le=1.0)
    title: Title | None = None
    statement: FactText | None = None
    confidence: StrictFloat | None = Field(default=None, ge=0.0, le=1.0)
    kind: FactKind | None = None
    text: LongText | None = None


# --- stored records ---------------------------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class User(_Record):
    id: UUID
    username: str
    email: str | None
    role: Role
    disabled: bool
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class AIModel(_Record):
    id: UUID
    name: str
    kind: ModelKind
    version: str | None
    metadata: dict[str, Any]
    created_at: datetime


class ApiKey(_Record):
    """An API key's public record; the key itself is shown once, at creation."""

    id: UUID
    user_id: UUID
    prefix: str
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class NewApiKey(_Record):
    """A freshly created key: ``key`` is the only time the secret is ever visible."""

    key: str
    api_key: ApiKey


class Principal(_Record):
    """The authenticated identity a call runs for.

    ``proof`` is set by :meth:`MemoryEngine.authenticate`: an HMAC, under the server's key
    secret, of who this is and when it was issued. The Search, Ingestion and Context
    deployments accept a principal only with a valid proof, so an app in the same Ray
    cluster cannot hand them a principal it made up (it authenticates through the Ingress's
    handle API with an API key instead). Never serialised.
    """

    user_id: UUID
    username: str
    role: Role
    key_id: UUID | None = None
    proof: str | None = Field(default=None, exclude=True, repr=False)


class ErasureReceipt(_Record):
    """What deleting a user removed: the proof an erasure request gets back (also written to
    the audit log as the ``user.delete`` row's details)."""

    user_id: UUID
    username: str
    erased_at: datetime
    erased_by: UUID | None = Field(description="The principal who asked; None in-process.")
    request_id: str | None
    memories: dict[str, int] = Field(description="Memories removed, by type.")
    messages: int = Field(description="Conversation messages removed.")
    chunks: int = Field(description="Indexed chunks (embeddings and text index) removed.")
    api_keys: int
    viewer_grants: int = Field(description="Read grants given to or by the user.")
    turn_requests: int = Field(description="Idempotency records of the agent loop.")
    events: int = Field(default=0, description="Change feed events of the user's memories.")
    jobs: int = Field(default=0, description="Background jobs (queued, running or finished).")
    cache_entries: int = Field(
        description="Redis entries removed: cached searches, session state and the embeddings "
        "of the user's stored texts (0 without Redis)."
    )


class StoredMemory(_Record):
    """A memory as stored, with its ids and times; ``memory`` is the typed payload."""

    id: UUID
    user_id: UUID
    type: MemoryType
    model_id: UUID | None
    session_id: str | None
    tags: list[str]
    metadata: dict[str, Any]
    importance: float
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None
    reinforcement_count: int = 0
    message_count: int = 0
    valid_from: datetime | None = Field(
        default=None,
        description="A fact: since when it holds (when it was stored, or the time of the turn "
        "it was learned from); None for other types.",
    )
    valid_to: datetime | None = Field(
        default=None,
        description="A fact: when it stopped holding, closed by an update or a contradiction; "
        "None while it holds. Closed facts leave searches, lists and contexts: read them by id "
        "or in their fact's history.",
    )
    superseded_by: UUID | None = Field(
        default=None, description="A closed fact: the fact that replaced it (an update)."
    )
    period: str | None = Field(
        default=None,
        description="A period summary: the calendar month (YYYY-MM, UTC) whose sessions it "
        "rolls up; its `covers` are their session summaries.",
    )
    sources: list[str] = Field(
        default_factory=list,
        description="A fact: the `source` of every store that stated it, oldest first (its "
        "reinforcements' too); empty for other types. Also shown as `metadata.sources` when "
        "the fact's own metadata has no `sources` key (the form before this field).",
    )
    memory: Memory
    messages: list[StoredMessage] = Field(
        default_factory=list, description="A conversation's messages, in order."
    )

    @property
    def text(self) -> str:
        """The memory's main text (statement, prompt, transcript, summary or title)."""
        payload = self.memory
        if isinstance(payload, Fact):
            return payload.statement
        if isinstance(payload, Image):
            return payload.prompt
        if isinstance(payload, Transcription | Summary):
            return payload.text
        return payload.title or ""


class MatchedPart(_Record):
    """Which part of a memory matched a search: a message, a segment, a prompt..."""

    part: str
    index: int
    text: str


class SearchResult(_Record):
    memory: StoredMemory
    score: float = Field(
        description="Ranking score: the cosine similarity (semantic), the BM25 score "
        "(full-text), or the hybrid ranking's probability (0-1) that the part holds what the "
        "query asks."
    )
    similarity: float | None = Field(description="Cosine similarity of the best part, if known.")
    source: Literal["semantic", "fulltext", "hybrid"]
    matched: MatchedPart


class ContextItem(_Record):
    memory_id: UUID | None
    type: str
    text: str
    score: float
    tokens: int


class ContextSection(_Record):
    name: str
    items: list[ContextItem]


class Context(_Record):
    """A prompt context block: text never longer than ``max_tokens`` tokens."""

    text: str
    token_count: int
    max_tokens: int
    sources: list[UUID]
    sections: list[ContextSection]


T = TypeVar("T")


class Page(_Record, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class TurnRecord(_Record):
    """What :meth:`MemoryEngine.record_turn` stored."""

    conversation_id: UUID
    message_seqs: list[int]
    summary_id: UUID | None
    fact_ids: list[UUID]
    #: True when an earlier call with the same idempotency key stored this turn: no message
    #: was written this time, and the ids are what that turn's learning made.
    replayed: bool = False
    job_ids: list[UUID] = Field(
        default_factory=list,
        description="Background jobs this turn queued (MEMORY_EXTRACTION=background): fact "
        "extraction, and the session summary every SESSION_SUMMARY_EVERY_N_TURNS turns; their "
        "facts and summary appear when the jobs are done (GET /v1/users/{id}/jobs/{job_id}). "
        "Empty with inline extraction.",
    )


class MemoryEventKind(StrEnum):
    """What happened to a memory (the change feed, migration 0008)."""

    CREATED = "created"
    UPDATED = "updated"
    #: A fact stored again (or a near-duplicate merged into it): ``reinforcement_count`` rose.
    REINFORCED = "reinforced"
    DELETED = "deleted"
    #: An ephemeral fact removed past its expiry (by the purge, or deleted once expired).
    EXPIRED = "expired"


class MemoryEvent(_Record):
    """One change of one memory of a user: ids, type, kind and time, never content.

    ``id`` grows with every event and is the Server-Sent Events id: resuming after it
    (``Last-Event-ID``) delivers every later event of the user exactly once.
    """

    id: int = Field(description="The event's number; increases in commit order per user.")
    user_id: UUID
    memory_id: UUID
    memory_type: MemoryType
    kind: MemoryEventKind
    at: datetime = Field(description="When the change was made (its transaction's time, UTC).")


class EventsResync(_Record):
    """The feed cannot vouch for the events right after ``after``: they may have been purged
    (older than EVENTS_RETENTION_HOURS) or ``after`` was not issued by this database. Re-read
    the state you mirror (list the memories); the feed goes on after ``resume_after``."""

    after: int = Field(description="The position the subscriber asked to resume after.")
    resume_after: int = Field(description="Events after this one follow.")
    reason: Literal["purged", "unknown_position"]


class JobStatus(StrEnum):
    """Where a background job stands."""

    QUEUED = "queued"  # waiting for a worker (or for its retry time)
    RUNNING = "running"  # a worker holds it under a lease
    DONE = "done"  # finished; ``result`` says what it did
    FAILED = "failed"  # gave up: a permanent error, or JOBS_MAX_ATTEMPTS tries failed


class Job(_Record):
    """A durable background job of one user (fact extraction, a session summary ...).

    Jobs are queued in the transaction of the write that causes them and run by workers in
    the Ingestion deployment (or an in-process engine); a failed try is retried with
    exponential backoff until ``max_attempts`` tries, then the job is ``failed`` with its
    error kept in ``last_error``.
    """

    id: UUID
    user_id: UUID
    kind: str = Field(description="What the job does: extract, summarize ...")
    status: JobStatus
    payload: dict[str, Any] = Field(
        description="Its input: ids and numbers (conversation, message seqs, model), no text."
    )
    attempts: int = Field(description="Tries started so far (a try whose worker died counts).")
    max_attempts: int
    run_after: datetime = Field(description="Not taken before this time (the retry backoff).")
    last_error: str | None = Field(
        description="Why the last try failed (error code and message, never a secret)."
    )
    result: dict[str, Any] | None = Field(description="What a done job did (ids it wrote).")
    request_id: str | None = Field(description="The request that queued it.")
    created_at: datetime
    started_at: datetime | None = Field(description="When its first try started.")
    finished_at: datetime | None = Field(description="When it became done or failed.")
