"""Property-based isolation: random operation sequences by several users never cross users.

Hypothesis drives stores, gets, lists, searches, contexts, deletes and Service calls by three
users and one Service through the authorised API, against real PostgreSQL and Redis. A
model of who owns what is kept beside it; after every step no get, list, search, count,
context, cache hit or delete may touch a memory outside the target user's set, and every
cross-user attempt by a plain user must be refused.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from halldyll_ray import Fact, MemoryEngine, NotFound, PermissionDenied

PEOPLE = ["ada", "bob", "cid"]
TEXTS = [
    "likes green tea",
    "has a dog named Rex",
    "works night shifts",
    "collects stamps",
    "is learning the cello",
    "lives near the harbour",
]
QUERIES = ["tea", "pets", "work schedule", "hobbies", "music", "where does she live"]

actors = st.sampled_from([*PEOPLE, "svc"])
targets = st.sampled_from(PEOPLE)
step = st.one_of(
    st.tuples(st.just("store"), actors, targets, st.sampled_from(TEXTS)),
    st.tuples(st.just("search"), actors, targets, st.sampled_from(QUERIES)),
    st.tuples(st.just("list"), actors, targets, st.none()),
    st.tuples(st.just("context"), actors, targets, st.sampled_from(QUERIES)),
    st.tuples(st.just("get"), actors, targets, st.integers(0, 50)),
    st.tuples(st.just("delete"), actors, targets, st.integers(0, 50)),
)


@pytest.fixture
async def world(engine: MemoryEngine) -> dict[str, Any]:
    users = {name: await engine.create_user(name, None, "user") for name in PEOPLE}
    users["svc"] = await engine.create_user("svc", None, "service")
    apis = {}
    for name, user in users.items():
        key = await engine.create_api_key(user.id)
        apis[name] = engine.authorized(await engine.authenticate(key.key))
    return {"users": users, "apis": apis, "owned": {n: [] for n in PEOPLE}, "all": []}


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(step, min_size=1, max_size=8))
async def test_random_operations_never_cross_users(world: dict[str, Any], steps) -> None:
    users, apis, owned, every = world["users"], world["apis"], world["owned"], world["all"]
    for op, actor, target_name, arg in steps:
        api = apis[actor]
        target = users[target_name]
        allowed = actor == "svc" or actor == target_name
        mine = {m for m in owned[target_name]}

        async def call(op=op, arg=arg, api=api, target=target, target_name=target_name) -> Any:
            if op == "store":
                return await api.store_memory(target.id, Fact(statement=f"{target_name} {arg}"))
            if op == "search":
                return await api.search(target.id, arg, threshold=-1.0, limit=50)
            if op == "list":
                return await api.list_memories(target.id, limit=500)
            if op == "context":
                return await api.build_context(target.id, arg, max_tokens=300)
            memory_id = every[arg % len(every)] if every else None
            if memory_id is None:
                return None
            if op == "get":
                return await api.get_memory(target.id, memory_id)
            return await api.delete_memory(target.id, memory_id)

        if not allowed:
            with pytest.raises(PermissionDenied):
                await call()
            continue
        try:
            result = await call()
        except NotFound:
            memory_id = every[arg % len(every)] if every else None
            assert op in ("get", "delete") and memory_id not in mine
            continue
        if op == "store":
            assert result.user_id == target.id
            if result.id not in mine:
                owned[target_name].append(result.id)
                every.append(result.id)
        elif op == "search":
            assert {r.memory.id for r in result} <= mine
            assert all(r.memory.user_id == target.id for r in result)
        elif op == "list":
            assert {m.id for m in result.items} == mine  # exact count, nobody else's
        elif op == "context":
            assert set(result.sources) <= mine
            for other in PEOPLE:
                if other != target_name:
                    assert f"{other} " not in result.text.replace(f"{target_name} ", "")
        elif op == "get" and result is not None:
            assert result.id in mine and result.user_id == target.id
        elif op == "delete" and every:
            memory_id = every[arg % len(every)]
            assert memory_id in mine
            owned[target_name].remove(memory_id)
    # Whatever happened, each user's rows are exactly the model's.
    for name in PEOPLE:
        page = await world["apis"]["svc"].list_memories(users[name].id, limit=500)
        assert {m.id for m in page.items} == set(owned[name])
