"""One error root for the whole product, with typed subclasses.

Driver exceptions (asyncpg, redis, onnxruntime) are translated into these in the layer that
talks to the driver; callers above never see a driver exception. Every class pickles (its
fields are passed to ``__init__`` through ``args``) because errors cross Ray actors.
"""

from __future__ import annotations

import re
from typing import Any

#: What a message shows instead of a secret.
REDACTED = "[redacted]"
# Credentials that a text can carry: the password (or token) of a URL's userinfo
# (postgresql://u:PASS@host, redis://:PASS@host, https://TOKEN@host), a bearer token (not a
# placeholder such as ``Bearer <API key>``), the secret part of one of our API keys (its
# public ``hr_<16 characters>`` prefix stays) and OpenAI-style keys.
_CREDENTIALS = re.compile(
    r"(?P<url>(?<![A-Za-z0-9+.-])[a-z][a-z0-9+.-]*://(?:[^\s/:@\"']*:)?)[^\s/\"']*@"
    r"|(?P<bearer>\b(?i:bearer)\s+)(?!<)[^\s\"']+"
    r"|(?P<key>\bhr_[A-Za-z0-9]{16}_)[A-Za-z0-9_-]+"
    r"|\bsk-[A-Za-z0-9_-]{8,}"
)
#: Secrets this process holds and sends to others (LLM_API_KEY): hidden wherever they appear,
#: with or without a scheme before them (a server may echo the key it was sent).
_KNOWN: frozenset[str] = frozenset()
#: Shorter values are not secrets worth a search (and would hide ordinary words).
_MIN_KNOWN = 8


def register_secret(value: str | None) -> None:
    """Hide ``value`` from every text :func:`redact` sees (every product error message) from
    now on, in this process: for a secret sent to a third party, which may echo it."""
    global _KNOWN
    if value and len(value) >= _MIN_KNOWN:
        _KNOWN = _KNOWN | {value}  # replaced, never changed: a reader in a thread is safe


def redact(text: str, *secrets: str | None) -> str:
    """``text`` without credentials: ``secrets``, the values given to
    :func:`register_secret`, URL passwords, bearer tokens, API keys (see ``_CREDENTIALS``).

    The one redaction of the product: every :class:`HalldyllError`'s message passes through
    it (the text of a third party, an LLM server's error page or a driver's exception, ends
    up in job rows, audit rows, HTTP answers and logs), and so do the texts kept or logged
    outside one (span attributes, the request log). Idempotent.
    """
    for secret in (*secrets, *_KNOWN):
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return _CREDENTIALS.sub(_hide, text)


#: Characters of a caller's value that an error message repeats: enough to recognise it,
#: never the whole of an input whose size the caller chose.
QUOTE_CHARS = 40


def clip(text: str, limit: int = QUOTE_CHARS) -> str:
    """``text`` cut to its first ``limit`` characters, with an ellipsis after a cut."""
    return text if len(text) <= limit else text[:limit] + "…"


def field_path(field: str) -> str:
    """A dotted field path with each part :func:`clip`-ped: a part can be a key the caller
    chose (an argument or a field that does not exist, a query parameter's name)."""
    return ".".join(clip(part) for part in field.split("."))


def quoted(value: object, limit: int = QUOTE_CHARS) -> str:
    """``value`` as an error message shows it: the ``repr`` of its first ``limit``
    characters, with an ellipsis after it when there was more. The one way a message built
    from user input echoes that input."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + "…"


# What a library's message quotes of a caller's input: a name ('...' or "...", no spaces),
# any long run without a space; and the most of such a message said at all.
_LONG_QUOTE = re.compile(rf"(['\"])([^'\"\s]{{{QUOTE_CHARS + 1},}})\1")
_LONG_WORD = re.compile(rf"\S{{{2 * QUOTE_CHARS + 1},}}")
MESSAGE_CHARS = 1000


def bound_quotes(text: str) -> str:
    """A library's message (graphql-core's, strawberry's) with what it quotes of the
    caller's input cut as :func:`quoted` cuts it, and the whole at most
    :data:`MESSAGE_CHARS`: such a message repeats a field, an enum value or an operation
    name whole ("Cannot query field '<10,000 characters>' on type 'Query'")."""
    text = _LONG_QUOTE.sub(lambda m: m[1] + m[2][:QUOTE_CHARS] + m[1] + "…", text)
    return clip(_LONG_WORD.sub(lambda m: clip(m[0]), text), MESSAGE_CHARS)


def _hide(match: re.Match[str]) -> str:
    if match["url"]:
        return match["url"] + REDACTED + "@"
    return (match["bearer"] or match["key"] or "") + REDACTED


class HalldyllError(Exception):
    """Root of every error the product raises on purpose.

    Attributes:
        code: A stable machine-readable code (``not_found``, ``invalid_input``, ...).
        message: A human sentence that says what is wrong and, where possible, how to fix it.
    """

    code = "error"

    def __init__(self, message: str, **fields: Any) -> None:
        # Messages quote what they were given (a driver's text, an LLM server's error body,
        # the caller's input): no credential in them goes further (see :func:`redact`).
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.fields))

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.fields}


def _rebuild(cls: type[HalldyllError], message: str, fields: dict[str, Any]) -> HalldyllError:
    err = cls.__new__(cls)
    HalldyllError.__init__(err, message, **fields)
    for name, value in fields.items():
        setattr(err, name, value)
    return err


class ConfigurationError(HalldyllError):
    """A setting is missing or wrong; the message names the variable and the fix."""

    code = "configuration_error"


class InvalidInput(HalldyllError):
    """The caller sent a value that cannot be accepted; ``field`` names it."""

    code = "invalid_input"

    def __init__(self, message: str, *, field: str | None = None, **fields: Any) -> None:
        field = None if field is None else field_path(field)
        super().__init__(message, field=field, **fields)
        self.field = field


class NotFound(HalldyllError):
    """The thing asked for does not exist (or is not visible to the caller)."""

    code = "not_found"


class Conflict(HalldyllError):
    """The request conflicts with what is stored (a duplicate username, say)."""

    code = "conflict"


class AuthenticationFailed(HalldyllError):
    """No valid credential: a missing, malformed, unknown, expired or revoked API key, or a
    disabled user."""

    code = "unauthenticated"


class PermissionDenied(HalldyllError):
    """The acting principal may not perform this operation."""

    code = "permission_denied"


class Unavailable(HalldyllError):
    """A dependency (PostgreSQL, the model) cannot be reached; retrying later may work."""

    code = "unavailable"


class MigrationError(HalldyllError):
    """The database schema cannot be brought up to date (missing extension, failed file)."""

    code = "migration_error"
