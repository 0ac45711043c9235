"""Who is acting, for the audit rows written deep inside the engine.

The access layer sets these for the duration of one authorised call; the engine's audit
writer reads them. A context variable follows the call through ``await`` without threading
an argument through every method, and it never leaks into another task's call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True)
class RequestContext:
    actor_id: UUID | None = None
    request_id: str | None = None
    #: The background job whose handler is running (its audit rows name it).
    job_id: UUID | None = None


_CURRENT: ContextVar[RequestContext] = ContextVar(
    "halldyll_request",
    default=RequestContext(),  # noqa: B039 - frozen, so sharing it is safe
)


def current() -> RequestContext:
    return _CURRENT.get()


@contextmanager
def acting(
    actor_id: UUID | None, request_id: str | None, *, job_id: UUID | None = None
) -> Iterator[None]:
    token = _CURRENT.set(RequestContext(actor_id, request_id, job_id))
    try:
        yield
    finally:
        _CURRENT.reset(token)
