"""An error message repeats at most a short prefix of what the caller sent
(halldyll_ray.errors.quoted): a 10,000-character value, key or tag is refused with a message
that quotes its first characters and an ellipsis, never the whole of it, and nothing stored
changes."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from halldyll_ray import Fact, HalldyllError, MemoryEngine

#: halldyll_ray.errors.QUOTE_CHARS: the characters of a value a message repeats.
QUOTE_CHARS = 40
BIG = "Z" * 10_000
#: The longest a message may be: the product's wording plus one quoted prefix or two.
MAX_MESSAGE = 600


def test_quoted_cuts_long_values_only() -> None:
    from halldyll_ray.errors import QUOTE_CHARS as quote_chars
    from halldyll_ray.errors import quoted

    assert quote_chars == QUOTE_CHARS
    assert quoted("tea") == "'tea'"
    assert quoted(BIG) == repr("Z" * QUOTE_CHARS) + "…"
    assert quoted(7) == "'7'"


def _check(error: HalldyllError) -> None:
    text = error.message + json.dumps(error.fields, default=str)
    assert "Z" * (QUOTE_CHARS + 1) not in text, text[:300]
    assert len(text) < MAX_MESSAGE, text[:300]


CASES: list[tuple[str, Callable[[MemoryEngine, Any, Any], Awaitable[Any]]]] = [
    (
        "a tag",
        lambda e, u, m: e.store_memory(u, {"type": "fact", "statement": "x", "tags": [BIG]}),
    ),
    (
        "a transcription's language",
        lambda e, u, m: e.store_memory(u, {"type": "transcription", "text": "x", "language": BIG}),
    ),
    ("a memory type", lambda e, u, m: e.store_memory(u, {"type": BIG, "text": "x"})),
    ("an update's unknown field", lambda e, u, m: e.update_memory(u, m, {BIG: 1})),
    ("a metadata key's type", lambda e, u, m: e.update_memory(u, m, {"tags": {BIG: 1}})),
    ("a memory id", lambda e, u, m: e.get_memory(u, BIG)),
    ("a user id", lambda e, u, m: e.get_memory(BIG, m)),
    ("a model kind", lambda e, u, m: e.list_models(kind=BIG)),
    ("a model name", lambda e, u, m: e.get_model(BIG)),
    ("a username", lambda e, u, m: e.get_user_by_username(BIG)),
    ("a search tag", lambda e, u, m: e.search(u, "tea", tags=[BIG])),
    ("a search's session", lambda e, u, m: e.search(u, "tea", session_id=BIG)),
    (
        "an import's version",
        lambda e, u, m: e.import_memories(
            u, [json.dumps({"format": "halldyll-export", "version": BIG}) + "\n"]
        ),
    ),
]


@pytest.mark.parametrize(("what", "call"), CASES, ids=[what for what, _ in CASES])
async def test_a_huge_value_is_quoted_short(
    engine: MemoryEngine, what: str, call: Callable[[MemoryEngine, Any, Any], Awaitable[Any]]
) -> None:
    user = await engine.create_user("ada", None, "user")
    stored = await engine.store_memory(user.id, Fact(statement="Ada drinks green tea"))
    before = await engine.get_memory(user.id, stored.id)
    with pytest.raises(HalldyllError) as err:
        await call(engine, user.id, stored.id)
    _check(err.value)
    assert await engine.get_memory(user.id, stored.id) == before
    assert len((await engine.list_memories(user.id)).items) == 1
