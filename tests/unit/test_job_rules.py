"""The pure rules of the job queue: backoff, the error text kept on a job, job kinds."""

from __future__ import annotations

import asyncio

import pytest

from halldyll_ray.components.jobs import (
    KIND,
    MAX_RETRY_DELAY_S,
    PERMANENT,
    describe_error,
    retry_delay,
)
from halldyll_ray.errors import InvalidInput, NotFound, Unavailable
from halldyll_ray.llm.protocol import LLMOutputInvalid, LLMUnavailable


def test_backoff_doubles_with_equal_jitter_up_to_the_cap() -> None:
    assert [retry_delay(n, 2.0, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [2, 4, 8, 16]
    assert [retry_delay(n, 2.0, rand=lambda: 0.0) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert retry_delay(40, 2.0, rand=lambda: 1.0) == MAX_RETRY_DELAY_S
    assert retry_delay(40, 2.0, rand=lambda: 0.0) == MAX_RETRY_DELAY_S / 2
    assert 1.0 <= retry_delay(1, 2.0) <= 2.0


def test_the_kept_error_names_our_errors_and_masks_secrets() -> None:
    assert describe_error(LLMUnavailable("timed out")) == "unavailable: timed out"
    assert describe_error(InvalidInput("bad seqs", field="seqs")) == "invalid_input: bad seqs"
    assert describe_error(TimeoutError()).startswith("timeout:")
    text = describe_error(
        ConnectionError(
            "postgresql://app:s3cret@db:5432/x Authorization: Bearer abc.def "
            "key sk-proj-1234567890 hr_ABCDEFGHabcdefgh_rest"
        )
    )
    assert text.startswith("ConnectionError: postgresql://app:[redacted]@db:5432/x")
    for secret in ("s3cret", "abc.def", "sk-proj-1234567890", "hr_ABCDEFGHabcdefgh_rest"):
        assert secret not in text
    # Our own errors quote third parties too (an LLM server's error body): masked as well.
    text = describe_error(
        LLMUnavailable("the LLM endpoint kept failing (500): bad credentials: Bearer tok-123")
    )
    assert (
        text
        == "unavailable: the LLM endpoint kept failing (500): bad credentials: Bearer [redacted]"
    )
    assert len(describe_error(RuntimeError("x" * 5000))) == 1000
    # A long scheme-like run is read once (it was read again from each of its letters: hours
    # for this size); a secret behind it is still masked.
    run = "a." * 500_000
    masked = describe_error(RuntimeError(f"{run} {run}x://user:pw@host"))
    assert masked.startswith("RuntimeError: a.a.") and len(masked) == 1000
    assert "pw@" not in describe_error(RuntimeError(f"{run[:800]}http://user:pw@host"))
    assert describe_error(asyncio.CancelledError()) == "CancelledError"


def test_what_fails_at_once() -> None:
    assert isinstance(NotFound("gone"), PERMANENT)
    # A model that answered badly or not at all is retried.
    assert not isinstance(LLMOutputInvalid("no JSON"), PERMANENT)
    assert not isinstance(LLMUnavailable("down"), PERMANENT)
    assert not isinstance(Unavailable("down"), PERMANENT)


@pytest.mark.parametrize("kind", ["extract", "summarize", "roll_up", "a.b_c9"])
def test_good_kinds(kind: str) -> None:
    assert KIND.fullmatch(kind)


@pytest.mark.parametrize("kind", ["", "Extract", "9x", "a b", "x" * 65, "é"])
def test_bad_kinds(kind: str) -> None:
    assert not KIND.fullmatch(kind)
