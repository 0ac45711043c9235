"""Two boundaries of the in-process surfaces:

- an id takes one form in Python as over HTTP (models.UUID_PATTERN): ``UUID()`` alone took
  braces, ``urn:uuid:``, 32 digits without hyphens, and what ``int(_, 16)`` takes, so a
  ``_`` between two digits read another memory than the one meant;
- ``halldyll create-user`` checks its key's name before it makes the user;
- ``SEARCH_TOP_K`` is bounded as the limit of a search.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import pytest
from support import make_settings

from halldyll_ray import Fact, MemoryEngine
from halldyll_ray.embedding import OnnxEncoder
from halldyll_ray.errors import ConfigurationError, InvalidInput, NotFound
from halldyll_ray.models import MAX_SEARCH_LIMIT


async def test_an_id_takes_one_form_in_process(engine: MemoryEngine) -> None:
    user = await engine.create_user(f"ids{uuid.uuid4().hex[:8]}", None, "user")
    # 32 characters with a "_" between two digits: int(_, 16) reads them as another id.
    fact = await engine.store_memory(user.id, Fact(statement="Noor grows basil"))
    digits = fact.id.hex
    shifted = "0" + digits[:5] + digits[6:]  # the id "0" + digits without its 6th digit
    underscored = digits[:5] + "_" + digits[6:]  # 32 characters that int() reads as shifted
    assert int(underscored, 16) == int(shifted, 16)
    text = str(fact.id)
    got = await engine.get_memory(str(user.id).upper(), text.upper())
    assert got.id == fact.id
    odd = {
        "braces": "{" + text + "}",
        "urn": f"urn:uuid:{text}",
        "no hyphens": digits,
        "an underscore": underscored,
        "a plus": "+" + digits[1:],
        "full-width digit": "\uff10" + text[1:] if text[0] == "0" else "\uff11" + text[1:],
        "spaces": f" {text} ",
    }
    for name, form in odd.items():
        with pytest.raises(InvalidInput) as err:
            await engine.get_memory(user.id, form)
        assert err.value.fields["field"] == "memory_id", name
        with pytest.raises(InvalidInput) as err:
            await engine.get_memory(form.replace(text, str(user.id)), fact.id)
        assert err.value.fields["field"] == "user_id", name
        with pytest.raises(InvalidInput):
            await engine.update_memory(user.id, form, {"importance": 0.9})
        with pytest.raises(InvalidInput):
            await engine.store_memory(user.id, {"type": "summary", "text": "s", "covers": [form]})
    assert (await engine.get_memory(user.id, fact.id)).importance == 0.5
    assert len((await engine.list_memories(user.id)).items) == 1
    # Every component parses ids with validation.parse_uuid: a job's too.
    with pytest.raises(InvalidInput):
        await engine.get_job(user.id, "{" + str(uuid.uuid4()) + "}")


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "halldyll_ray.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_create_user_refuses_a_bad_key_name_before_making_the_user(
    engine: MemoryEngine, database_url: str
) -> None:
    env = {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "warning"}
    env.pop("REDIS_URL", None)
    name = f"cli{uuid.uuid4().hex[:8]}"
    code, err = await _cli(env, "create-user", name, "--key-name", "k" * 101)
    assert code == 2, err
    assert "--key-name" in err and "at most 100 characters" in err, err
    assert "Traceback" not in err
    with pytest.raises(NotFound):
        await engine.get_user_by_username(name)
    code, err = await _cli(env, "create-user", name, "--key-name", "k" * 100)
    assert code == 0, err
    user = await engine.get_user_by_username(name)
    assert [k.name for k in await engine.list_api_keys(user.id)] == ["k" * 100]
    code, err = await _cli(env, "create-key", name, "--name", "bad\u202ename")
    assert code == 2 and "--name" in err and "Traceback" not in err, err
    assert len(await engine.list_api_keys(user.id)) == 1


async def test_the_default_result_count_is_a_count_a_search_takes(
    database_url: str, redis_url: str, encoder: OnnxEncoder
) -> None:
    """SEARCH_TOP_K is bounded as a search's limit is (MAX_SEARCH_LIMIT): 101 started, and
    then every search that named no limit was refused on a ``limit`` it had not sent."""
    settings = make_settings(database_url, redis_url, search_top_k=MAX_SEARCH_LIMIT)
    async with MemoryEngine(settings, encoder=encoder) as engine:
        user = await engine.create_user(f"topk{uuid.uuid4().hex[:8]}", None, "user")
        await engine.store_memory(user.id, Fact(statement="Omar repairs clocks"))
        hits = await engine.search(user.id, "who repairs clocks?")
        assert [h.memory.memory.statement for h in hits] == ["Omar repairs clocks"]
    with pytest.raises(ConfigurationError, match="SEARCH_TOP_K"):
        make_settings(database_url, redis_url, search_top_k=MAX_SEARCH_LIMIT + 1)
