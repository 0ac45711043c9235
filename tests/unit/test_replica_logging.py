"""Serve's "Request failed." record: a caller's 4xx becomes one INFO line, the rest stays."""

from __future__ import annotations

import logging
import sys

from halldyll_ray.errors import InvalidInput, NotFound, PermissionDenied, Unavailable
from halldyll_ray.serve.deployments import _client_errors_as_info


def _failed(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", None, info)


def test_a_callers_mistake_is_one_info_line_without_a_traceback() -> None:
    for exc, status in (
        (InvalidInput("memory_id is not a fact", field="memory_id"), 422),
        (NotFound("memory 1 not found"), 404),
        (PermissionDenied("viewers may not write"), 403),
    ):
        record = _failed(exc)
        assert _client_errors_as_info(record)
        assert record.levelno == logging.INFO and record.levelname == "INFO"
        assert record.exc_info is None
        assert record.getMessage().startswith(f"Request refused ({status} {exc.code}): ")
        assert exc.message in record.getMessage()


def test_server_errors_and_other_records_stay_as_serve_logs_them() -> None:
    for exc in (Unavailable("PostgreSQL is unreachable"), RuntimeError("boom")):
        record = _failed(exc)
        assert _client_errors_as_info(record)
        assert record.levelno == logging.ERROR and record.exc_info is not None
        assert record.getMessage() == "Request failed."
    other = logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "other", None, None)
    assert _client_errors_as_info(other) and other.levelno == logging.ERROR
