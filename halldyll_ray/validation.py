"""The rules every boundary of the core uses: ids, names, session ids, times, limits, metadata.

One module, so that every component checks a value the same way before its first write, and
no component reaches into another's private helpers. Each function returns the value in the
form the storage layer takes, or raises :class:`~halldyll_ray.errors.InvalidInput` naming
the field.

Patterns are matched with :func:`re.fullmatch`: ``re.match`` with a ``$`` anchor accepts a
trailing newline, which pydantic's own pattern check (Rust ``regex``) then refuses when the
stored row is read back.
"""

from __future__ import annotations

import base64
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

from pydantic import BaseModel, TypeAdapter, ValidationError

from halldyll_ray.errors import QUOTE_CHARS, InvalidInput, clip, quoted
from halldyll_ray.models import (
    FIELD_CHECK,
    MAX_KEY_NAME_CHARS,
    SESSION_ID_PATTERN,
    UUID_FORM,
    MemoryType,
    Role,
    check_metadata,
    check_text,
    in_utc_range,
    plain,
    uuid_of,
)

_T = TypeVar("_T")

USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,185}\.[^@\s]{2,63}")
SESSION_ID = re.compile(SESSION_ID_PATTERN.removeprefix("^").removesuffix("$"))


#: A JSON string (skipped), or a bracket (nesting).
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|([\[\]{}])')


class _Refused(Exception):
    """A token :func:`json_loads` does not take: ``literal`` as written, and why."""

    def __init__(self, literal: str, reason: str) -> None:
        self.literal = literal
        self.reason = reason


def _refuse_constant(name: str) -> Any:
    raise _Refused(name, f"{name} is not a JSON number (RFC 8259)")


def _parse_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        # 1e999 is a JSON number that Python's parser reads as inf: the Infinity it refuses.
        raise _Refused(literal, f"{clip(literal)} is too large a number (it reads as Infinity)")
    return value


def _parse_int(literal: str) -> int:
    digits = len(literal.lstrip("-"))
    if digits > sys.get_int_max_str_digits() > 0:
        raise _Refused(literal, f"an integer of {digits} digits is longer than any value here")
    return int(literal)


class _Duplicate(Exception):
    """A key given twice in one JSON object."""

    def __init__(self, key: str) -> None:
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once (``object_pairs_hook``)."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return value


#: A JSON string followed by ":" (a key: group 1), another string, or a brace.
_KEY_OR_BRACE = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")\s*:|"[^"\\]*(?:\\.[^"\\]*)*"|([{}])')


def _duplicate_at(text: str) -> int:
    """Where the JSON ``text`` first gives a key again in the same object (0: not found)."""
    objects: list[set[str]] = []
    for match in _KEY_OR_BRACE.finditer(text):
        if match.group(2) == "{":
            objects.append(set())
        elif match.group(2) == "}":
            if objects:
                objects.pop()
        elif match.group(1) and objects:
            key = json.loads(match.group(1))
            if key in objects[-1]:
                return match.start(1)
            objects[-1].add(key)
    return 0


def _where(text: str, literal: str) -> int:
    """Where ``literal`` first stands outside a string in the JSON ``text`` (0: not found)."""
    pattern = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|(' + re.escape(literal) + ")")
    return next((m.start(1) for m in pattern.finditer(text) if m.group(1)), 0)


def _deepest(text: str) -> tuple[int, int]:
    """The deepest nesting of the JSON ``text`` and where it is first reached."""
    depth = deepest = at = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        bracket = match.group(1)
        if bracket in ("[", "{"):
            depth += 1
            if depth > deepest:
                deepest, at = depth, match.start(1)
        elif bracket:
            depth -= 1
    return deepest, at


def json_loads(data: str | bytes) -> Any:
    """:func:`json.loads` for what a client sends (REST bodies, GraphQL requests, import
    lines), where every refusal is a :class:`json.JSONDecodeError` at its position.

    Refused besides what is not JSON:

    - ``NaN``, ``Infinity`` and ``-Infinity``: RFC 8259 (section 6) has no such numbers,
      but Python's parser takes them: a ``"confidence": NaN`` was refused as "less than or
      equal to 1", and a number field without bounds took the value as given;
    - a number too large for a float (``1e999``, ``-1e400``): JSON has it, but Python reads
      it as ``inf``, the Infinity refused above (RFC 8259 lets a parser limit the range);
    - an integer of more digits than Python converts (``sys.get_int_max_str_digits()``,
      4,300 by default; RFC 8259 lets a parser limit the range of numbers): it was a bare
      ValueError, a 500 where a caller expected only JSONDecodeError;
    - nesting deeper than the parser recurses (about 1,000 levels): a RecursionError;
    - a key given twice in one object (``{"a": 1, "a": 2}``): RFC 8259 (section 4) leaves
      what it means to each reader; Python's kept the last, others keep the first or refuse
      it, so a proxy or a client that checked the first value saw another request than the
      one stored.

    Bytes that are not text in the encoding :func:`json.loads` detects (UTF-8 unless the
    first bytes say UTF-16 or UTF-32) are a syntax error too, at the first bad byte: a gzip
    body sent without its ``Content-Encoding``, or Latin-1 text, was a ``UnicodeDecodeError``
    that GraphQL answered with a 500.

    Raises:
        json.JSONDecodeError: any of these; ``pos`` is where.
    """
    try:
        return json.loads(
            data,
            object_pairs_hook=_object,
            parse_constant=_refuse_constant,
            parse_float=_parse_float,
            parse_int=_parse_int,
        )
    except UnicodeDecodeError as exc:
        message = f"the body is not {exc.encoding.upper()} text ({exc.reason})"
        raise json.JSONDecodeError(message, "", exc.start) from None
    except _Refused as exc:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        raise json.JSONDecodeError(exc.reason, text, _where(text, exc.literal)) from None
    except _Duplicate as exc:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        message = (
            f"the key {quoted(exc.key)} is given twice in one object (each key once: JSON "
            "readers differ on which one counts)"
        )
        raise json.JSONDecodeError(message, text, _duplicate_at(text)) from None
    except RecursionError:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        depth, at = _deepest(text)
        message = f"nested {depth} levels deep, deeper than JSON is read here"
        raise json.JSONDecodeError(message, text, at) from None


def first_error(errors: Sequence[Any], *, skip: Iterable[str] = ()) -> InvalidInput:
    """A request's first validation error (pydantic's ``errors()``) as InvalidInput:
    ``"<field>: <message>"`` on the field, its location dotted without its first part when
    that is in ``skip`` (FastAPI's ``body``, ``query``). Never the rejected value: pydantic's
    own text repeats it, and an argument can hold a secret. The HTTP API's 422 and the MCP
    tools' argument errors both read this way."""
    first: Mapping[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = list(first["loc"])
    message = error_message(first)
    if first.get("type") == "json_invalid":
        # FastAPI puts the character offset of a JSON syntax error where a field would be.
        at = loc.pop() if loc and isinstance(loc[-1], int) else None
        detail = (first.get("ctx") or {}).get("error")
        if detail and at is not None:
            # Python's own text for a raw control character ends in "at" (it expects the
            # position to follow): "Invalid control character at", not "... at at character".
            detail = str(detail).removesuffix(" at")
        message = "not valid JSON" + (f": {detail}" if detail else "")
        message += "" if at is None else f" at character {at}"
    # The location a request's value came from (FastAPI's "body", "query") when it is in
    # ``skip``: the field is named as every other surface names it ("limit", not
    # "query.limit"). Only the first part: a field can be called "query" (a search's body).
    # The location names the field only when nothing follows it (the body as a whole).
    named = loc[1:] if loc and loc[0] in set(skip) else loc
    field = error_field({**first, "loc": named}) or (error_location(loc[:1]))
    return InvalidInput(f"{field}: {message}" if field else message, field=field or None)


#: pydantic's error types of a number's bounds (``ge``, ``gt``, ``le``, ``lt``).
_BOUNDS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def error_message(error: Mapping[str, Any]) -> str:
    """pydantic's message of one error, with the caller's text it repeats (the input, or a
    value of its context such as a union's tag: ``Input tag '<tag>' found ...``) cut as
    :func:`~halldyll_ray.errors.quoted` cuts it. The one wording of every surface's
    validation error (:func:`first_error`, :func:`validate`, the request models' parse)."""
    # A check of ours raising ValueError reads as its own words, without pydantic's prefix.
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if isinstance(value, float) and not math.isfinite(value) and error.get("type") in _BOUNDS:
        # NaN compares false with everything: pydantic said "less than or equal to 1" of it.
        # The words of pydantic's own check of a field that refuses NaN (allow_inf_nan).
        return "Input should be a finite number"
    # The context's other values (expected tags, a pattern) are ours: said in full.
    for value in (error.get("input"), (error.get("ctx") or {}).get("tag")):
        if isinstance(value, str) and len(value) > QUOTE_CHARS and value in message:
            message = message.replace(repr(value), quoted(value))
            message = message.replace(value, clip(value))
    return message


def error_location(loc: Iterable[Any]) -> str:
    """A pydantic error's location, dotted, each part cut as :func:`error_message` cuts a
    value: a part can be a key the caller chose (an argument or field it does not have)."""
    return ".".join(clip(text) for text in (str(part) for part in loc) if text)


def error_field(error: Mapping[str, Any]) -> str:
    """The dotted field of one pydantic error: its location, plus ``type`` for a memory
    whose type tag is missing or unknown, plus the field a model-level check of every raw
    value names in its context (``unstorable_value``: a NUL in ``fact.statement`` is
    reported on the model, ``fact``), or that a check across fields names (``FIELD_CHECK``:
    an export line's ``updated_at`` before its ``created_at``). The one mapping for
    :func:`first_error` (HTTP, MCP) and :func:`validate` (Python)."""
    loc = [str(part) for part in error["loc"]]
    if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        loc.append("type")
    elif error.get("type") in ("unstorable_value", FIELD_CHECK):
        loc.append(str((error.get("ctx") or {}).get("field") or ""))
    return error_location(loc)


def _as_data(value: Any) -> Any:
    """``value`` with each model instance in it (at its top or as an item of a list or tuple)
    dumped to its fields, for :func:`validate` to check again."""
    if isinstance(value, BaseModel):
        return value.model_dump(warnings=False)
    if isinstance(value, list | tuple) and any(isinstance(v, BaseModel) for v in value):
        return [v.model_dump(warnings=False) if isinstance(v, BaseModel) else v for v in value]
    return value


def validate(adapter: TypeAdapter[_T], data: Any, what: str) -> _T:
    """``data`` validated by ``adapter``; the first error becomes InvalidInput on its field.

    A model instance given (a ``Fact``, a list of ``Message``) is checked again as every
    dict is: input models are mutable, and pydantic does not validate an assignment
    (``fact.statement = "\\x00"``) nor what ``model_construct`` was given, so such an
    instance reached SQL (a NUL, a NaN), the chunker (a blank statement: IndexError) or
    ``len`` (a number: TypeError).

    An error in an item of a list (``data`` the list argument ``what``) is on
    ``<what>.<index>...``, as the HTTP API's 422 names it (``messages.0.content``): it was on
    ``0.content``, which names no argument."""
    try:
        return adapter.validate_python(_as_data(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        message = error_message(first)
        field = error_field(first)
        if first["loc"] and isinstance(first["loc"][0], int):
            field = f"{what}.{field}"
        field = field or what
        raise InvalidInput(invalid_message(what, field, message), field=field) from None


def invalid_message(what: str, field: str, message: str) -> str:
    """``"invalid <what>: <field>: <message>"``, the field left out when it is ``what``
    itself (``invalid tags: tags: ...`` said it twice)."""
    return f"invalid {what}: {message}" if field == what else f"invalid {what}: {field}: {message}"


def parse_uuid(value: UUID | str, field: str) -> UUID:
    """A UUID from a UUID or its text (:data:`~halldyll_ray.models.UUID_PATTERN`, the one
    form every surface takes); InvalidInput naming ``field`` otherwise."""
    try:
        return uuid_of(value)
    except ValueError:
        raise InvalidInput(
            f"{field} must be a UUID of {UUID_FORM}, got {quoted(value)}", field=field
        ) from None


def text(value: object, field: str) -> str:
    """A caller's text as given, or InvalidInput if it is not a string or holds what no
    stored or encoded text may (NUL, a lone UTF-16 surrogate)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string", field=field)
    try:
        return check_text(value)
    except ValueError as exc:
        raise InvalidInput(f"{field}: {exc}", field=field) from None


def looks_like_uuid(value: object) -> bool:
    try:
        uuid_of(value)
    except ValueError:
        return False
    return True


def username(value: object) -> str:
    if not isinstance(value, str) or not USERNAME.fullmatch(value):
        raise InvalidInput(
            "username must be 1-64 characters: letters, digits, '.', '_' or '-', starting "
            "with a letter or digit",
            field="username",
        )
    return value


def label(value: object, field: str, *, max_chars: int) -> str:
    """A name people read (an API key's, a model's version) as given, or InvalidInput: text
    of at most ``max_chars`` characters that is :func:`plain`."""
    if len(text(value, field)) > max_chars:
        raise InvalidInput(f"{field} must be at most {max_chars} characters", field=field)
    assert isinstance(value, str)
    if not plain(value):
        raise InvalidInput(
            f"{field} must not hold line breaks, control, unassigned or invisible format "
            "characters",
            field=field,
        )
    return value


def key_name(value: object) -> str:
    """An API key's name as given (``""`` for none), or InvalidInput: a :func:`label` of at
    most MAX_KEY_NAME_CHARS characters. The engine checks it when it makes a key; the CLI's
    ``create-user`` checks it before it makes the user, so a bad ``--key-name`` leaves no
    user without its key behind."""
    return label(value, "name", max_chars=MAX_KEY_NAME_CHARS)


def email(value: object) -> str | None:
    """An address as given, or InvalidInput: one ``@``, a dot in the domain, no spaces, and
    :func:`plain` (a right-to-left override or a zero-width space makes an address read as
    another one)."""
    if value is None:
        return None
    if not isinstance(value, str) or not EMAIL.fullmatch(text(value, "email")) or not plain(value):
        raise InvalidInput("email is not a valid address", field="email")
    local, _, domain = value.rpartition("@")
    labels = domain.split(".")
    if (
        ".." in local
        or local.startswith(".")
        or local.endswith(".")
        or any(not label or label.startswith("-") or label.endswith("-") for label in labels)
    ):  # RFC 5321: dots separate atoms and labels; a label neither starts nor ends with "-"
        raise InvalidInput("email is not a valid address", field="email")
    return value


def role(value: Role | str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidInput(
            "role must be one of: admin, user, service, viewer", field="role"
        ) from None


def metadata(value: dict[str, Any] | None) -> dict[str, Any]:
    """A metadata object as stored (JSON round trip, size bounded); ``{}`` for None."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput("metadata must be a JSON object", field="metadata")
    try:
        return check_metadata(value)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="metadata") from None


def limit(value: int, maximum: int) -> int:
    """A page or result size from 1 to ``maximum``."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise InvalidInput(f"limit must be an integer from 1 to {maximum}", field="limit")
    return value


def items(values: object, field: str) -> list[Any]:
    """The items of a collection argument (messages, ids, texts) as a list: a list, tuple,
    set or any other iterable (a generator), never a string, bytes, a mapping or a model
    (one message given without its list). InvalidInput naming ``field`` otherwise: ``None``
    or a number was a bare TypeError, and ``len`` of a generator one too; a string was read
    as its characters (five messages refused on field ``0``) and a dict as its keys.
    MemTensor/MemOS#1274 (a plain string sent as ``messages``, silently skipped) and
    agentUniverse#3242 (``str`` and ``dict`` message forms crashing a reader) are the same
    mistake elsewhere."""
    if isinstance(values, str | bytes | bytearray | memoryview | Mapping | BaseModel) or not (
        isinstance(values, Iterable)
    ):
        raise InvalidInput(f"{field} must be a list", field=field)
    return list(values)


def count(value: object, field: str, *, minimum: int = 1, maximum: int = 2**63 - 1) -> int:
    """A whole number from ``minimum`` to ``maximum`` (by default what PostgreSQL's bigint
    holds), or InvalidInput naming ``field``: never a bool (``True`` was taken as 1), a
    float or a string."""
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise InvalidInput(
            f"{field} must be a whole number from {minimum} to {maximum}", field=field
        )
    return value


def age_cutoff(value: object, field: str, *, unit: str, whole: bool = False) -> datetime:
    """The time ``value`` ``unit`` (``hours``, ``days``) before now: the bound of a purge of
    what is older. A positive number (``whole``: an integer), never a bool or NaN, or
    InvalidInput naming ``field``. An age older than any time (``10**30`` hours,
    ``float("inf")``) is the first instant: nothing is that old (timedelta's OverflowError
    was raised instead)."""
    kinds = int if whole else int | float
    if (
        isinstance(value, bool) or not isinstance(value, kinds) or not value > 0  # NaN too
    ):
        what = "a positive integer" if whole else "a positive number"
        raise InvalidInput(f"{field} must be {what}", field=field)
    try:
        return datetime.now(UTC) - timedelta(**{unit: value})
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)


def filter_list(values: object, field: str) -> list[Any]:
    """The items of a list filter (``types``, ``tags``) as the HTTP API takes them: a list,
    tuple or set. A lone string is InvalidInput, as it is a 422 in a body: ``tags="pets"``
    was read as the tags p, e, t and s, and ``types="fact"`` found what the API refused."""
    if isinstance(values, str | bytes) or not isinstance(values, list | tuple | set | frozenset):
        raise InvalidInput(f"{field} must be a list", field=field)
    return list(values)


def memory_types(values: Iterable[MemoryType | str] | None) -> list[str] | None:
    """Sorted distinct memory type names, or None for "all types"."""
    if values is None:
        return None
    try:
        names = sorted({MemoryType(t).value for t in filter_list(values, "types")})
    except ValueError:
        allowed = ", ".join(t.value for t in MemoryType)
        raise InvalidInput(f"types must be among: {allowed}", field="types") from None
    return names or None


def _matching(value: object, pattern: re.Pattern[str], field: str, rule: str) -> str | None:
    """``value`` when it is None or a string that ``pattern`` matches whole; otherwise
    InvalidInput ``"<field> must be <rule>"`` naming ``field``."""
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(f"{field} must be {rule}", field=field)
    return value


def session_id(value: str | None) -> str | None:
    return _matching(
        value, SESSION_ID, "session_id", "1-128 characters of letters, digits and . _ : @ -"
    )


def timestamp(value: datetime | None, field: str) -> datetime | None:
    """An aware datetime; a naive one is taken as UTC. InvalidInput for one with no UTC form
    (or one PostgreSQL stores as an infinity: :func:`halldyll_ray.models.in_utc_range`)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInput(f"{field} must be a datetime", field=field)
    try:
        in_utc_range(value)
    except ValueError as exc:
        raise InvalidInput(f"{field} {exc}", field=field) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def time_range(
    since: datetime | None, until: datetime | None
) -> tuple[datetime | None, datetime | None]:
    """A filter's window ``[since, until)`` as :func:`timestamp` checks each end, or
    InvalidInput naming ``until`` when it falls before ``since``: a window no memory can be in
    is the caller's mistake (swapped ends), not an empty answer."""
    start, end = timestamp(since, "since"), timestamp(until, "until")
    if start is not None and end is not None and end < start:
        raise InvalidInput("until must not be before since", field="until")
    return start, end


def flag(value: object, field: str) -> bool:
    """A yes/no option: a bool, as every other surface takes it (a string such as "no" is
    truthy in Python and reached SQL as a type error)."""
    if not isinstance(value, bool):
        raise InvalidInput(f"{field} must be true or false", field=field)
    return value


#: A cursor as :func:`encode_cursor` writes it: unpadded URL-safe base64, and no longer than
#: the longest it writes (a listing's name with a user id, a time, an id: under 200).
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,256}")


def encode_cursor(created_at: datetime, row_id: UUID, *, listing: str) -> str:
    """An opaque page cursor of ``listing`` (``users``, ``memories/<user id>``,
    ``jobs/<user id>``): the last row's (created_at, id)."""
    raw = f"{listing}|{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: object, *, listing: str) -> tuple[datetime | None, UUID | None]:
    """(created_at, id) of a cursor that ``listing`` returned; (None, None) for the first page.

    Only a cursor exactly as :func:`encode_cursor` wrote it for the same listing is taken
    (README: "a cursor must be one the API returned"); InvalidInput on ``cursor`` otherwise.
    Before, the position was all a cursor held and base64 dropped what it could not read: a
    cursor with characters added (``!``, a space, a newline), with its time edited (a date
    alone, no zone, any offset) or its id in another form (braces, 32 digits), the users
    list's cursor given to a memory listing, or one user's given to another's, each paged
    from wherever its time fell instead of being refused."""
    if cursor is None:
        return None, None
    try:
        if not isinstance(cursor, str) or not _CURSOR.fullmatch(cursor):
            raise ValueError("not a cursor")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        scope, stamp, row_id = raw.split("|")
        at, after = in_utc_range(datetime.fromisoformat(stamp)), UUID(row_id)
        # A time without a zone would be read in the server's own zone (asyncpg): ours
        # always has one.
        written = encode_cursor(at, after, listing=listing)
        if scope != listing or at.tzinfo is None or written != cursor:
            raise ValueError("not this listing's cursor, or not as written")
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput(
            "cursor is not one this API returned for this list: pass back the next_cursor "
            "of the previous page of the same list",
            field="cursor",
        ) from None
    return at, after


#: A request id: what an HTTP request's X-Request-ID may be (a fresh one replaces any other).
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(value: object) -> str | None:
    """A caller's request id as given (None for none), or InvalidInput: 1-128 letters, digits
    and ``. _ : -`` (:data:`REQUEST_ID`, as the HTTP API takes the header). It is written to
    audit rows, so it is checked before anything else is: a number or a NUL failed the
    audit write, after a turn's session log was created."""
    return _matching(value, REQUEST_ID, "request_id", "1-128 letters, digits, '.', '_', ':' or '-'")


IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,128}")


def idempotency_key(value: str | None) -> str | None:
    """A client's idempotency key: 1-128 printable ASCII characters without spaces."""
    return _matching(
        value,
        IDEMPOTENCY_KEY,
        "idempotency_key",
        "1-128 printable ASCII characters without spaces",
    )
