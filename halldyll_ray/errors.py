"""One error root for the whole product, with typed subclasses.

Driver exceptions (asyncpg, redis, onnxruntime) are translated into these in the layer that
talks to the driver; callers above never see a driver exception. Every class pickles (its
fields are passed to ``__init__`` through ``args``) because errors cross Ray actors.
"""

from __future__ import annotations

from typing import Any


class HalldyllError(Exception):
    """Root of every error the product raises on purpose.

    Attributes:
        code: A stable machine-readable code (``not_found``, ``invalid_input``, ...).
        message: A human sentence that says what is wrong and, where possible, how to fix it.
    """

    code = "error"

    def __init__(self, message: str, **fields: Any) -> None:
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
