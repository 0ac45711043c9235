"""Row-level security: isolation holds even for a query with no user filter at all."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from halldyll_ray import Conversation, Fact, MemoryEngine, Message
from halldyll_ray.errors import InvalidInput, PermissionDenied


@pytest.fixture
async def two_users(engine: MemoryEngine):
    ada = await engine.create_user("ada", None, "user")
    bob = await engine.create_user("bob", None, "user")
    for user in (ada, bob):
        await engine.store_memory(user.id, Fact(statement=f"{user.username} likes tea"))
        await engine.store_memory(
            user.id,
            Conversation(title="chat", messages=[Message(role="user", content="hello there")]),
        )
    return ada, bob


async def test_unfiltered_queries_see_only_the_acting_user(engine: MemoryEngine, two_users):
    ada, _ = two_users
    async with engine.db.scoped(ada.id) as conn:
        assert await conn.fetchval("SELECT current_user") == "halldyll_app"
        owners = {r[0] for r in await conn.fetch("SELECT user_id FROM memories")}
        chunk_owners = {r[0] for r in await conn.fetch("SELECT user_id FROM memory_chunks")}
        message_owners = {
            r[0]
            for r in await conn.fetch(
                "SELECT m.user_id FROM conversation_messages cm "
                "JOIN memories m ON m.id = cm.memory_id"
            )
        }
        messages = await conn.fetchval("SELECT count(*) FROM conversation_messages")
    assert owners == chunk_owners == message_owners == {ada.id}
    assert messages == 1
    async with engine.db.scoped() as conn:  # no user named: no memory rows at all
        assert await conn.fetchval("SELECT count(*) FROM memories") == 0
        assert await conn.fetchval("SELECT count(*) FROM memory_chunks") == 0
    async with engine.db.scoped(admin=True) as conn:  # the explicit admin path sees all
        assert await conn.fetchval("SELECT count(DISTINCT user_id) FROM memories") == 2


async def test_writes_for_another_user_are_refused_by_the_database(engine: MemoryEngine, two_users):
    ada, bob = two_users
    # The policy's refusal reaches the caller as the product's PermissionDenied (not raw asyncpg).
    with pytest.raises(PermissionDenied) as refused:
        async with engine.db.scoped(ada.id) as conn:
            await conn.execute(
                "INSERT INTO memories (id, user_id, type, content) "
                "VALUES ($1, $2, 'summary', 'planted')",
                uuid.uuid4(),
                bob.id,
            )
    async with engine.db.scoped(ada.id) as conn:
        # Updates and deletes of rows the policy hides touch nothing.
        assert await conn.execute("UPDATE memories SET content = 'x'") == "UPDATE 2"
        assert await conn.execute("DELETE FROM memory_chunks WHERE user_id = $1", bob.id) == (
            "DELETE 0"
        )
    assert isinstance(refused.value.__cause__, asyncpg.InsufficientPrivilegeError)
    bobs = await engine.list_memories(bob.id)
    assert {m.text for m in bobs.items} == {"bob likes tea", "chat"}


async def test_application_role_cannot_bypass_or_rewrite_audit(engine: MemoryEngine, two_users):
    async with engine.db.scoped() as conn:
        role = await conn.fetchrow(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        )
        assert (role["rolsuper"], role["rolbypassrls"]) == (False, False)
        owns = await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
            "AND tableowner = current_user"
        )
        assert owns == 0
    for statement in (
        "UPDATE audit_log SET outcome = 'denied'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "ALTER TABLE memories DISABLE ROW LEVEL SECURITY",
    ):
        with pytest.raises(PermissionDenied) as refused:
            async with engine.db.scoped(admin=True) as conn:
                await conn.execute(statement)
        assert isinstance(refused.value.__cause__, asyncpg.InsufficientPrivilegeError)
    async with engine.db.scoped() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_log") >= 4


async def test_a_pooled_connection_carries_no_identity_to_the_next_checkout(
    engine: MemoryEngine, two_users, database_url: str
):
    """The pool skips RESET ALL on release: the identity must end with its transaction."""
    from halldyll_ray.storage.database import Database

    ada, _ = two_users
    async with Database(database_url, pool_size=1) as db:  # one connection, reused
        async with db.scoped(ada.id) as conn:
            pid = conn.get_server_pid()
            assert await conn.fetchval("SELECT count(*) FROM memories") == 2
        async with db.pool.acquire() as conn:
            assert conn.get_server_pid() == pid  # the very same session
            assert await conn.fetchval("SELECT current_user") == "halldyll_app"
            assert await conn.fetchval("SELECT current_setting('halldyll.user_id', true)") in (
                "",
                None,
            )
            assert await conn.fetchval("SELECT count(*) FROM memories") == 0
        # An error inside a transaction: rolled back, identity gone all the same.
        with pytest.raises(InvalidInput):  # a DataError, translated
            async with db.scoped(ada.id) as conn:
                await conn.fetchval("SELECT 1 / 0")
        assert await db.fetchval("SELECT count(*) FROM memories") == 0
