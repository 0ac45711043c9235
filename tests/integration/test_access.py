"""The permission matrix on every operation, API keys, and audit completeness."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from halldyll_ray import (
    AuthenticationFailed,
    Conflict,
    Fact,
    InvalidInput,
    MemoryEngine,
    NotFound,
    PermissionDenied,
)
from halldyll_ray.access import PERMISSIONS, AuthorizedEngine, Operation, permission_table
from halldyll_ray.models import Principal, Role


@dataclass
class World:
    engine: MemoryEngine
    users: dict[str, Any]
    keys: dict[str, str]
    memory_of: dict[str, Any]
    job_of: dict[str, Any]

    async def api(self, name: str) -> AuthorizedEngine:
        principal = await self.engine.authenticate(self.keys[name])
        return self.engine.authorized(principal, request_id=f"req-{name}")


@pytest.fixture
async def world(engine: MemoryEngine) -> World:
    users, keys, memory_of = {}, {}, {}
    for name, role in [
        ("admin", "admin"),
        ("ada", "user"),
        ("bob", "user"),
        ("svc", "service"),
        ("eve", "viewer"),
        ("root2", "admin"),
    ]:
        users[name] = await engine.create_user(name, None, role)
        keys[name] = (await engine.create_api_key(users[name].id, name="test")).key
        memory_of[name] = await engine.store_memory(
            users[name].id, Fact(statement=f"{name} keeps a secret number {len(name)}")
        )
    await engine.grant_viewer(users["eve"].id, users["bob"].id)
    job_of = {
        str(u.id): await engine.components.jobs.submit(u.id, "extract", {}) for u in users.values()
    }
    return World(engine, users, keys, memory_of, job_of)


_EXPORT_HEADER = (
    b'{"format": "halldyll-export", "version": 1, "exported_at": "2026-01-01T00:00:00Z", '
    b'"user": {"id": "00000000-0000-4000-8000-000000000000", "username": "x"}}\n'
)


async def _export(api: AuthorizedEngine, user_id: Any) -> list[bytes]:
    return [line async for line in await api.export_memories(user_id)]


async def _follow(api: AuthorizedEngine, user_id: Any) -> None:
    """Open the change feed of ``user_id`` (the check is at the opening) and close it."""
    subscription = await api.subscribe_events(user_id)
    await subscription.aclose()


async def _job_of(api: AuthorizedEngine, user_id: Any, world: World) -> None:
    """Read the target's one job (queued when the world was made)."""
    with pytest.raises(NotFound):  # a job id that is not the target's is not found
        await api.get_job(user_id, world.memory_of["ada"].id)
    job_id = world.job_of[str(user_id)]
    assert (await api.get_job(user_id, job_id)).id == job_id


# Each action: (operation it needs, coroutine factory taking (api, target user, world)).
def _actions() -> dict[str, tuple[Operation, Any]]:
    return {
        "store": (
            Operation.MEMORY_WRITE,
            lambda api, t, w: api.store_memory(t.id, Fact(statement="new fact")),
        ),
        "search": (Operation.MEMORY_READ, lambda api, t, w: api.search(t.id, "secret number")),
        "get": (
            Operation.MEMORY_READ,
            lambda api, t, w: api.get_memory(t.id, w.memory_of[t.username].id),
        ),
        "list": (Operation.MEMORY_READ, lambda api, t, w: api.list_memories(t.id)),
        "update": (
            Operation.MEMORY_WRITE,
            lambda api, t, w: api.update_memory(t.id, w.memory_of[t.username].id, {"tags": ["x"]}),
        ),
        "context": (
            Operation.MEMORY_READ,
            lambda api, t, w: api.build_context(t.id, "secret", max_tokens=100),
        ),
        "turn": (
            Operation.MEMORY_WRITE,
            lambda api, t, w: api.record_turn(t.id, "s1", "hello", "hi"),
        ),
        "export": (Operation.MEMORY_READ, lambda api, t, w: _export(api, t.id)),
        "import": (
            Operation.MEMORY_WRITE,
            lambda api, t, w: api.import_memories(t.id, [_EXPORT_HEADER]),
        ),
        "events": (Operation.MEMORY_READ, lambda api, t, w: _follow(api, t.id)),
        "jobs": (Operation.MEMORY_READ, lambda api, t, w: api.list_jobs(t.id, status="failed")),
        "job.get": (Operation.MEMORY_READ, lambda api, t, w: _job_of(api, t.id, w)),
        "user.get": (Operation.USER_READ, lambda api, t, w: api.get_user(t.id)),
        "user.update": (
            Operation.USER_MANAGE,
            lambda api, t, w: api.update_user(t.id, metadata={"k": 1}),
        ),
        "key.create": (Operation.KEY_MANAGE, lambda api, t, w: api.create_api_key(t.id)),
        "key.list": (Operation.KEY_MANAGE, lambda api, t, w: api.list_api_keys(t.id)),
    }


# Explicit expectations, written independently of PERMISSIONS: role -> target -> allowed set.
MEMORY = {"store", "search", "get", "list", "update", "context", "turn", "export", "import"}
MEMORY |= {"events", "jobs", "job.get"}
READS = {"search", "get", "list", "context", "export", "events", "jobs", "job.get"}
EXPECTED: dict[str, dict[str, set[str]]] = {
    "admin": {"self": set(_actions()), "ada": set(_actions()), "root2": set(_actions())},
    "ada": {"self": MEMORY | {"user.get", "key.create", "key.list"}, "bob": set(), "admin": set()},
    "svc": {
        "self": MEMORY | {"user.get", "key.create", "key.list"},
        "ada": MEMORY | {"user.get"},
        "eve": MEMORY | {"user.get"},
        "admin": set(),
        "root2": set(),
    },
    "eve": {"self": READS | {"user.get", "key.create", "key.list"}, "bob": READS, "ada": set()},
}


async def _denied_rows(engine: MemoryEngine) -> int:
    return len(await engine.list_audit(outcome="denied", limit=1000))


@pytest.mark.parametrize("actor", list(EXPECTED))
async def test_permission_matrix(world: World, actor: str) -> None:
    engine = world.engine
    for target_name, allowed in EXPECTED[actor].items():
        target = world.users[actor if target_name == "self" else target_name]
        for action, (operation, call) in _actions().items():
            api = await world.api(actor)
            before = await _denied_rows(engine)
            if action in allowed:
                await call(api, target, world)
                assert await _denied_rows(engine) == before, (actor, target_name, action)
            else:
                with pytest.raises(PermissionDenied):
                    await call(api, target, world)
                rows = await engine.list_audit(outcome="denied", limit=1)
                assert await _denied_rows(engine) == before + 1, (actor, target_name, action)
                assert rows[0]["actor_id"] == world.users[actor].id
                assert rows[0]["acting_for"] == target.id
                assert rows[0]["request_id"] == f"req-{actor}"
            # The code's matrix agrees with the expectation for this role.
            role = world.users[actor].role
            if target_name == "self" and action in allowed:
                assert operation in PERMISSIONS[role]


@pytest.mark.parametrize("actor", ["ada", "svc", "eve"])
async def test_admin_only_operations(world: World, actor: str) -> None:
    api = await world.api(actor)
    calls = [
        lambda: api.create_user("mallory", None, "admin"),
        lambda: api.list_users(),
        lambda: api.delete_user(world.users["bob"].id),
        lambda: api.register_model("X", "llm"),
        lambda: api.delete_model("X"),
        lambda: api.list_audit(),
        lambda: api.grant_viewer(world.users["eve"].id, world.users["ada"].id),
        lambda: api.purge_expired(),
    ]
    before = await _denied_rows(world.engine)
    for call in calls:
        with pytest.raises(PermissionDenied):
            await call()
    assert await _denied_rows(world.engine) == before + len(calls)
    assert [m.name for m in await api.list_models()] == []  # reading the registry is fine


async def test_admin_paths_and_cross_user_reads_are_audited(world: World) -> None:
    admin = await world.api("admin")
    created = await admin.create_user("carol", "carol@example.com", "user")
    model = await admin.register_model("Qwen2.5-14B-Instruct", "llm")
    assert model.name == "Qwen2.5-14B-Instruct"
    await admin.search(world.users["ada"].id, "secret")
    svc = await world.api("svc")
    await svc.store_memory(world.users["ada"].id, Fact(statement="ada's order shipped"))
    rows = await world.engine.list_audit(limit=20)
    by_op = {(r["operation"], r["acting_for"]): r for r in rows}
    read = by_op[("memory.search", world.users["ada"].id)]
    assert read["actor_id"] == world.users["admin"].id and read["outcome"] == "ok"
    stored = next(
        r
        for r in rows
        if r["operation"] == "memory.store" and r["acting_for"] == world.users["ada"].id
    )
    assert stored["actor_id"] == world.users["svc"].id and stored["request_id"] == "req-svc"
    assert by_op[("user.create", created.id)]["actor_id"] == world.users["admin"].id


async def test_disabled_users_and_changed_roles_take_effect_at_once(world: World) -> None:
    engine = world.engine
    ada_api = await world.api("ada")
    await engine.update_user(world.users["ada"].id, disabled=True)
    with pytest.raises(AuthenticationFailed):  # an already-authenticated principal, refused
        await ada_api.search(None, "secret")  # as its key's next request is
    with pytest.raises(AuthenticationFailed):
        await engine.authenticate(world.keys["ada"])
    svc = await world.api("svc")
    with pytest.raises(PermissionDenied):  # a service may not act for a disabled user
        await svc.search(world.users["ada"].id, "secret")
    # nor may a Viewer read one it was granted (it did, until the owner was enabled again)
    bob, eve_api = world.users["bob"], await world.api("eve")
    assert (await eve_api.get_memory(bob.id, world.memory_of["bob"].id)).id
    await engine.update_user(bob.id, disabled=True)
    with pytest.raises(PermissionDenied, match="disabled"):
        await eve_api.search(bob.id, "secret")
    await engine.update_user(bob.id, disabled=False)
    assert await eve_api.search(bob.id, "secret")
    await engine.update_user(world.users["bob"].id, role="viewer")
    bob_api = await world.api("bob")
    with pytest.raises(PermissionDenied):
        await bob_api.store_memory(None, Fact(statement="viewers cannot write"))
    assert await bob_api.search(None, "secret") is not None


async def test_a_principal_held_past_its_key_is_refused_at_once(world: World) -> None:
    """Revoking, rotating or the expiry of a key ends what an already-authenticated principal
    of it may do (an open change feed, the Python API, a principal passed to a deployment)
    at its next call, as a new request with that key is refused: AuthenticationFailed,
    audited with the key's id and no secret."""
    import asyncio

    engine = world.engine
    ada = world.users["ada"]
    key_id = (await engine.authenticate(world.keys["ada"])).key_id
    revoked_api = await world.api("ada")
    assert await revoked_api.search(None, "secret") is not None
    await engine.revoke_api_key(key_id)
    with pytest.raises(AuthenticationFailed):
        await revoked_api.search(None, "secret")
    with pytest.raises(AuthenticationFailed):  # a write, and a key operation, as well
        await revoked_api.store_memory(None, Fact(statement="written with a revoked key"))
    rows = await engine.list_audit(operation="auth", outcome="denied", limit=100)
    refused = [r for r in rows if r["actor_id"] == ada.id and str(key_id) in r["target_ids"]]
    assert refused[0]["details"]["reason"] == "revoked or expired key"
    assert refused and all(world.keys["ada"] not in str(r) for r in rows)

    rotated_from = await engine.create_api_key(ada.id, name="old")
    held = engine.authorized(await engine.authenticate(rotated_from.key))
    new = await engine.rotate_api_key(rotated_from.api_key.id)
    with pytest.raises(AuthenticationFailed):
        await held.get_user()
    assert await engine.authorized(await engine.authenticate(new.key)).get_user()

    expiring = await engine.create_api_key(
        ada.id, name="brief", expires_at=datetime.now(UTC) + timedelta(seconds=2)
    )
    held = engine.authorized(await engine.authenticate(expiring.key))
    assert await held.search(None, "secret") is not None
    await asyncio.sleep(2.2)
    with pytest.raises(AuthenticationFailed):
        await held.search(None, "secret")
    # The user is not disabled by any of it: a live key of theirs still acts.
    assert (await engine.get_user(ada.id)).disabled is False
    assert await engine.authorized(await engine.authenticate(new.key)).search(None, "secret")


async def test_a_refusal_names_the_role_it_was_decided_by(world: World) -> None:
    """An Admin made a User while its principal is held (an open change feed): the refusal's
    message and audit row name the role as stored now, which decided it, not the old one."""
    engine = world.engine
    root2 = world.users["root2"]
    root_api = await world.api("root2")
    assert await root_api.search(world.users["ada"].id, "secret") is not None
    await engine.update_user(root2.id, role="user")
    with pytest.raises(PermissionDenied) as denied:
        await root_api.search(world.users["ada"].id, "secret")
    assert str(denied.value).startswith("user 'root2' may not"), str(denied.value)
    row = (await engine.list_audit(user_id=root2.id, outcome="denied", limit=1))[0]
    assert row["details"]["role"] == "user", row


async def test_api_key_lifecycle(world: World) -> None:
    engine = world.engine
    ada = world.users["ada"]
    new = await engine.create_api_key(
        ada.id, name="laptop", expires_at=datetime.now(UTC) + timedelta(days=1)
    )
    assert new.key.startswith(new.api_key.prefix + "_") and len(new.key) == 63
    principal = await engine.authenticate(new.key)
    assert principal.proof  # the HMAC that engine deployments check (never serialised)
    assert (
        principal.model_dump()
        == Principal(
            user_id=ada.id, username="ada", role=Role.USER, key_id=new.api_key.id
        ).model_dump()
    )
    stored = await engine.db.fetchrow("SELECT hash FROM api_keys WHERE id = $1", new.api_key.id)
    assert new.key.encode() not in bytes(stored["hash"]) and len(stored["hash"]) == 32
    keys = await engine.list_api_keys(ada.id)
    assert next(k for k in keys if k.id == new.api_key.id).last_used_at is not None

    rotated = await engine.rotate_api_key(new.api_key.id)
    assert rotated.key != new.key
    with pytest.raises(AuthenticationFailed):
        await engine.authenticate(new.key)
    assert (await engine.authenticate(rotated.key)).user_id == ada.id

    await engine.revoke_api_key(rotated.api_key.id)
    for bad in (
        rotated.key,
        rotated.key[:-1] + ("A" if rotated.key[-1] != "A" else "B"),
        "hr_0000000000000000_" + "x" * 43,
        "Bearer nonsense",
        "",
    ):
        with pytest.raises(AuthenticationFailed):
            await engine.authenticate(bad)
    expired = await engine.create_api_key(
        ada.id, expires_at=datetime.now(UTC) + timedelta(seconds=1)
    )
    await engine.db.fetchval("SELECT pg_sleep(1.1)")
    with pytest.raises(AuthenticationFailed):
        await engine.authenticate(expired.key)
    denied = await engine.list_audit(operation="auth", outcome="denied", limit=50)
    reasons = [r["details"]["reason"] for r in denied]
    # Each reason is audited; repeats of one reason within a second are counted into that
    # reason's next row instead (components.audit.Throttle): two revoked-key refusals, one row.
    assert reasons.count("revoked key") == 1 and "wrong key" in reasons
    assert "expired key" in reasons and "malformed key" in reasons
    assert all(rotated.key not in str(r) for r in denied)  # the key is never logged
    with pytest.raises(InvalidInput):
        await engine.create_api_key(ada.id, expires_at=datetime.now(UTC) - timedelta(days=1))
    keys_before = len(await engine.list_api_keys(ada.id))
    for name in ("phone\nrevoked=true", "\u202eenohp", "pho\u200bne", "x" * 101):
        with pytest.raises(InvalidInput) as err:
            await engine.create_api_key(ada.id, name=name)
        assert err.value.field == "name"
    assert len(await engine.list_api_keys(ada.id)) == keys_before
    # Joiners that emoji and scripts need are part of a name.
    for name in (
        "\U0001f468\u200d\U0001f4bb laptop",
        "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    ):
        assert (await engine.create_api_key(ada.id, name=name)).api_key.name == name


async def test_rotation_keeps_the_key_s_expiry_and_refuses_an_expired_key(world: World) -> None:
    """Rotation replaces the secret, not the lifetime: a key given an expiry never becomes one
    without, by rotating it before or after it expired."""
    engine = world.engine
    ada = world.users["ada"]
    expires = datetime.now(UTC) + timedelta(days=90)
    key = await engine.create_api_key(ada.id, name="laptop", expires_at=expires)
    rotated = await engine.rotate_api_key(key.api_key.id)
    assert rotated.api_key.expires_at == key.api_key.expires_at
    assert rotated.api_key.name == "laptop"
    stored = next(k for k in await engine.list_api_keys(ada.id) if k.id == rotated.api_key.id)
    assert stored.expires_at == key.api_key.expires_at

    short = await engine.create_api_key(
        ada.id, name="short", expires_at=datetime.now(UTC) + timedelta(seconds=1)
    )
    await engine.db.fetchval("SELECT pg_sleep(1.1)")
    keys_before = await engine.list_api_keys(ada.id)
    with pytest.raises(Conflict, match="expired"):
        await engine.rotate_api_key(short.api_key.id)
    assert await engine.list_api_keys(ada.id) == keys_before  # nothing issued or revoked
    with pytest.raises(AuthenticationFailed):
        await engine.authenticate(short.key)


async def test_users_manage_only_their_own_keys(world: World) -> None:
    ada_api = await world.api("ada")
    mine = await ada_api.create_api_key(name="phone")
    rotated = await ada_api.rotate_api_key(mine.api_key.id)
    bobs = (await world.engine.list_api_keys(world.users["bob"].id))[0]
    # Another user's key is answered as an unknown one (a PermissionDenied named its owner
    # and told that the key exists); the refusal is audited as a denial all the same.
    for act in (ada_api.revoke_api_key, ada_api.rotate_api_key):
        with pytest.raises(NotFound) as theirs:
            await act(bobs.id)
        with pytest.raises(NotFound) as unknown:
            await act("00000000-0000-0000-0000-000000000000")
        assert str(world.users["bob"].id) not in theirs.value.message
        assert theirs.value.message.replace(str(bobs.id), "?") == unknown.value.message.replace(
            "00000000-0000-0000-0000-000000000000", "?"
        )
    denied = await world.engine.list_audit(outcome="denied", limit=10)
    assert {"key.revoke", "key.rotate"} <= {row["operation"] for row in denied}, denied
    assert (await world.engine.authenticate(world.keys["bob"])).username == "bob"
    await ada_api.revoke_api_key(rotated.api_key.id)
    assert (await world.engine.authenticate(world.keys["bob"])).username == "bob"


async def test_audit_retention(world: World) -> None:
    engine = world.engine
    assert await engine.purge_audit(older_than_days=1) == 0
    async with engine.db.scoped() as conn:
        await conn.execute(
            "INSERT INTO audit_log (at, operation, outcome) "
            "VALUES (now() - interval '400 days', 'ancient', 'ok')"
        )
        total = await conn.fetchval("SELECT count(*) FROM audit_log")
    assert await engine.purge_audit() == 1  # AUDIT_RETENTION_DAYS = 365
    async with engine.db.scoped() as conn:
        # Everything recent stays, plus the purge's own audit row.
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == total
        assert (
            await conn.fetchval("SELECT count(*) FROM audit_log WHERE operation = 'ancient'") == 0
        )
    with pytest.raises(InvalidInput):
        await engine.purge_audit(older_than_days=0)


def test_readme_shows_the_matrix_in_code() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert permission_table() in readme


async def test_a_viewer_s_grants_go_with_the_viewer_role(world: World) -> None:
    """A Viewer turned User kept its grants: turned Viewer again, it read the owner's memories
    with no new grant. A grant given twice wrote two audit rows for one change."""
    engine, eve, bob = world.engine, world.users["eve"], world.users["bob"]

    async def grant_rows() -> list[dict[str, Any]]:
        return [
            r
            for r in await engine.list_audit(user_id=eve.id, limit=100)
            if r["operation"].startswith("grant.")
        ]

    before = await grant_rows()
    await engine.grant_viewer(eve.id, bob.id)  # given again: nothing changes
    assert await grant_rows() == before
    assert await engine.viewer_grants(eve.id) == [bob.id]
    await engine.update_user(eve.id, role="user")
    assert await engine.viewer_grants(eve.id) == []
    revoked = (await grant_rows())[0]
    assert revoked["operation"] == "grant.revoke" and revoked["target_ids"] == [str(bob.id)]
    await engine.update_user(eve.id, role="viewer")
    assert await engine.viewer_grants(eve.id) == []
    with pytest.raises(PermissionDenied):
        await (await world.api("eve")).list_memories(bob.id)
    # A role change that keeps the Viewer role keeps its grants.
    await engine.grant_viewer(eve.id, bob.id)
    await engine.update_user(eve.id, role="viewer", disabled=False)
    assert await engine.viewer_grants(eve.id) == [bob.id]
    assert (await (await world.api("eve")).list_memories(bob.id)).items


async def test_a_long_import_or_export_ends_when_its_rights_do(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import or export in flight is checked again (every EVENTS_RECHECK_SECONDS), as an
    open change feed is: once its key is revoked or its caller's role lowered, the next part
    of it is refused, and nothing of the import after the change is stored. Both ran to
    their end on the rights they began with."""
    import asyncio

    engine = world.engine
    quick = engine.settings.model_copy(update={"events_recheck_seconds": 0.1})
    monkeypatch.setattr(engine, "settings", quick)
    ada = world.users["ada"]
    carl = await engine.create_user("carl", None, "user")
    for statement in ("Carl drinks green tea", "Carl plays chess on Sundays"):
        await engine.store_memory(carl.id, Fact(statement=statement))
    lines = b"".join([line async for line in engine.export_memories(carl.id)]).splitlines(True)
    assert len(lines) == 3

    key = await engine.create_api_key(ada.id, name="import")
    api = engine.authorized(await engine.authenticate(key.key))

    async def body() -> Any:
        yield lines[0]
        yield lines[1]
        await engine.revoke_api_key(key.api_key.id)  # while the upload is still arriving
        await asyncio.sleep(0.3)
        yield lines[2]

    with pytest.raises(AuthenticationFailed):
        await api.import_memories(None, body())
    stored = (await engine.list_memories(ada.id, limit=100)).items
    assert not [m for m in stored if m.text.startswith("Carl")], "imported after revocation"

    # Atomic, with a batch written before the revocation: the transaction stores nothing.
    monkeypatch.setattr("halldyll_ray.components.transfer.IMPORT_BATCH", 1)
    key = await engine.create_api_key(ada.id, name="atomic")
    api = engine.authorized(await engine.authenticate(key.key))
    with pytest.raises(AuthenticationFailed):
        await api.import_memories(None, body(), atomic=True)
    stored = (await engine.list_memories(ada.id, limit=100)).items
    assert not [m for m in stored if m.text.startswith("Carl")], "imported after revocation"

    # An Admin's export of another user, demoted to User while it streams.
    root2 = world.users["root2"]
    exporting = await world.api("root2")
    parts = await exporting.export_memories(ada.id)
    assert b'"halldyll-export"' in await anext(parts)
    await engine.update_user(root2.id, role="user")
    await asyncio.sleep(0.3)
    with pytest.raises(PermissionDenied) as denied:
        await anext(parts)
    assert str(denied.value).startswith("user 'root2' may not memory.export")


async def test_a_deleted_user_s_held_principal_is_refused_as_its_key_is(world: World) -> None:
    """A principal whose user was disabled, or erased (and its key with it), is refused as
    that key's next request is: AuthenticationFailed (HTTP 401), audited with the reason
    authenticate gives, not PermissionDenied (403)."""
    engine = world.engine
    ada = world.users["ada"]
    held_ada = await world.api("ada")
    await engine.update_user(ada.id, disabled=True)
    with pytest.raises(AuthenticationFailed):
        await held_ada.search(None, "secret")
    row = (await engine.list_audit(user_id=ada.id, operation="auth", limit=1))[0]
    assert row["details"]["reason"] == "disabled user" and row["outcome"] == "denied", row
    assert row["target_ids"] == [str(held_ada.principal.key_id)], row
    with pytest.raises(AuthenticationFailed):
        await engine.authenticate(world.keys["ada"])
    # A principal made without a key (trusted code) has no key to refuse: a permission.
    keyless = engine.authorized(Principal(user_id=ada.id, username="ada", role=Role.USER))
    with pytest.raises(PermissionDenied, match="disabled"):
        await keyless.search(None, "secret")
    await engine.update_user(ada.id, disabled=False)
    assert await held_ada.search(None, "secret") is not None

    dan = await engine.create_user("dan", None, "user")
    key = (await engine.create_api_key(dan.id, name="x")).key
    held = engine.authorized(await engine.authenticate(key))
    assert (await held.get_user()).id == dan.id
    await engine.delete_user(dan.id)
    with pytest.raises(AuthenticationFailed):
        await engine.authenticate(key)
    for call in (held.get_user(), held.search(None, "tea"), held.list_api_keys()):
        with pytest.raises(AuthenticationFailed):
            await call
    # The same name made again is another user: the old principal reaches nothing of it.
    again = await engine.create_user("dan", None, "user")
    with pytest.raises(AuthenticationFailed):
        await held.get_user(again.id)


async def test_another_user_s_key_id_reads_as_an_unknown_one_in_any_case(world: World) -> None:
    """The NotFound for another user's key id and for an unknown one say the same, whatever
    the case the id is written in (an unknown one quoted the id as given, another's in
    lower case: the message told which existed)."""
    import uuid

    ada_api = await world.api("ada")
    bob_key = (await world.engine.list_api_keys(world.users["bob"].id))[0].id
    unknown = uuid.uuid4()
    messages = []
    for key_id in (bob_key, unknown):
        with pytest.raises(NotFound) as missing:
            await ada_api.revoke_api_key(str(key_id).upper())
        messages.append(str(missing.value).replace(str(key_id), "<id>"))
    assert messages[0] == messages[1] == "API key <id> not found", messages


async def test_a_service_s_refusal_does_not_tell_which_ids_are_accounts(world: World) -> None:
    """A Service refused for an Admin, another Service, a disabled user or an id that names
    nobody is refused in the same words (they said "the named user does not exist" for the
    last only: a Service could tell the ids of accounts it may not reach from random ones)."""
    import uuid

    engine = world.engine
    svc = await world.api("svc")
    gone = await engine.create_user("gone", None, "user")
    await engine.delete_user(gone.id)
    quiet = await engine.create_user("quiet", None, "user")
    await engine.update_user(quiet.id, disabled=True)
    targets = [world.users["admin"].id, world.users["root2"].id, quiet.id, gone.id, uuid.uuid4()]
    for call in ("search", "get_user"):
        said = set()
        for target in targets:
            with pytest.raises(PermissionDenied) as denied:
                if call == "search":
                    await svc.search(target, "tea")
                else:
                    await svc.get_user(target)
            said.add(str(denied.value).replace(str(target), "<id>"))
        assert len(said) == 1, said
