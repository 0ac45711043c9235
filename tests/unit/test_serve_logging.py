"""The product's loggers write through whatever handlers Serve has on ``ray.serve`` now."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from halldyll_ray.serve.deployments import use_serve_logging


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def loggers() -> Iterator[tuple[logging.Logger, logging.Logger]]:
    serve, ours = logging.getLogger("ray.serve"), logging.getLogger("halldyll_ray")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (serve, ours)]
    yield serve, ours
    for lg, handlers, level, propagate in saved:
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def test_records_follow_serves_handlers_at_log_level(loggers) -> None:
    serve, _ = loggers
    first, second = _Keep(), _Keep()
    serve.handlers[:] = [first]
    use_serve_logging("info")
    log = logging.getLogger("halldyll_ray.engine")
    log.debug("below LOG_LEVEL")
    log.info("kept")
    serve.handlers[:] = [second]  # Serve reconfigured (a new logging_config)
    log.warning("after")
    assert [(r.levelname, r.getMessage()) for r in first.records] == [("INFO", "kept")]
    assert [(r.levelname, r.name) for r in second.records] == [("WARNING", "halldyll_ray.engine")]
    use_serve_logging("debug")
    log.debug("now kept")
    assert second.records[-1].getMessage() == "now kept"
