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
    saved = [(lg, lg.handlers[:], lg.filters[:], lg.level, lg.propagate) for lg in (serve, ours)]
    yield serve, ours
    for lg, handlers, filters, level, propagate in saved:
        lg.handlers[:], lg.filters[:], lg.level, lg.propagate = handlers, filters, level, propagate


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


def test_access_log_records_can_be_dropped_before_any_handler(loggers) -> None:
    serve, _ = loggers
    kept = _Keep()
    serve.handlers[:] = [kept]
    serve.setLevel(logging.INFO)

    def access_line(n: int) -> None:  # as Serve's replica writes one per call it serves
        serve.info(f"CALL search_json OK {n}ms", extra={"serve_access_log": True})

    use_serve_logging("info", access_log=False)
    access_line(1)
    serve.info("a record of Serve's own")
    logging.getLogger("halldyll_ray.http").warning("the product's")
    use_serve_logging("info", access_log=False)  # again (a redeploy): one filter, same effect
    access_line(2)
    assert [r.getMessage() for r in kept.records] == ["a record of Serve's own", "the product's"]
    use_serve_logging("info", access_log=True)
    access_line(3)
    assert kept.records[-1].getMessage() == "CALL search_json OK 3ms"
