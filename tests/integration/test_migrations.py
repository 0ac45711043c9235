"""Migrations: from empty, re-run, ten processes at once, edited files, missing pgvector."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import asyncpg
import pytest

from halldyll_ray import MigrationError, Settings
from halldyll_ray.components.base import message_label
from halldyll_ray.storage.migrate import Migration, apply_migrations, check_schema, load_migrations

EXPECTED_TABLES = {
    "users",
    "ai_models",
    "memories",
    "conversation_messages",
    "memory_chunks",
    "audit_log",
    "halldyll_meta",
    "schema_migrations",
    "memory_events",
    "memory_event_horizon",
    "embedding_jobs",
    "memory_jobs",
}


async def test_from_empty_then_rerun(fresh_db: str) -> None:
    applied = await apply_migrations(fresh_db, embedding_dimension=384)
    assert applied == [m.version for m in load_migrations()]
    assert await apply_migrations(fresh_db, embedding_dimension=384) == []
    conn = await asyncpg.connect(fresh_db)
    try:
        tables = {
            r[0]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert tables >= EXPECTED_TABLES
        indexes = {
            r["indexname"]: r["indexdef"]
            for r in await conn.fetch(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
            )
        }
        assert "USING hnsw (embedding vector_cosine_ops)" in indexes["memory_chunks_embedding"]
        assert "USING gin (tsv)" in indexes["memory_chunks_tsv"]
        assert "NULLS NOT DISTINCT" in indexes["memories_fact_key"]
        assert indexes["memory_jobs_due"].endswith("(run_after) WHERE (status = 'queued'::text)")
        dim = await conn.fetchval(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'memory_chunks'::regclass AND attname = 'embedding'"
        )
        assert dim == "vector(384)"
        await check_schema(conn, embedding_dimension=384)
        with pytest.raises(MigrationError, match="EMBEDDING_DIMENSION=384"):
            await check_schema(conn, embedding_dimension=768)
        # The audit table is append-only.
        await conn.execute("INSERT INTO audit_log (operation, outcome) VALUES ('x', 'ok')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM audit_log")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE audit_log SET outcome = 'denied'")
    finally:
        await conn.close()


async def test_ten_processes_apply_each_migration_once(fresh_db: str, tmp_path: Path) -> None:
    """Ten `halldyll migrate` processes at once: each migration is applied exactly once."""
    env = {**os.environ, "DATABASE_URL": fresh_db, "LOG_LEVEL": "warning"}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "halldyll_ray.cli",
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(10)
    ]
    outputs = [await p.communicate() for p in processes]
    assert [p.returncode for p in processes] == [0] * 10, outputs
    said = [out.decode() for out, _ in outputs]
    assert sum("applied migrations" in s for s in said) == 1
    assert sum("up to date" in s for s in said) == 9
    conn = await asyncpg.connect(fresh_db)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [m.version for m in load_migrations()]
    finally:
        await conn.close()


async def test_edited_migration_is_refused(fresh_db: str) -> None:
    migrations = load_migrations()
    await apply_migrations(fresh_db, embedding_dimension=384, migrations=migrations)
    edited = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in migrations]
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await apply_migrations(fresh_db, embedding_dimension=384, migrations=edited)


async def test_failed_migration_rolls_back(fresh_db: str) -> None:
    migrations = [*load_migrations()]
    broken = Migration(
        len(migrations) + 1, "broken", "CREATE TABLE half_done (id int); SELECT no_such_function();"
    )
    with pytest.raises(MigrationError, match="broken failed"):
        await apply_migrations(fresh_db, embedding_dimension=384, migrations=[*migrations, broken])
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == len(migrations)
    finally:
        await conn.close()


def test_migration_files_are_numbered() -> None:
    from halldyll_ray.storage.migrate import migrations_dir

    names = sorted(p.name for p in migrations_dir().glob("*.sql"))
    assert names and names[0] == "0001_init.sql"
    assert [m.version for m in load_migrations()] == list(range(1, len(names) + 1))


async def test_server_without_pgvector_gets_a_clear_error() -> None:
    """The machine's PostgreSQL 15 has no pgvector: the error says so and how to fix it."""
    url = os.environ.get(
        "NO_PGVECTOR_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"no PostgreSQL without pgvector reachable at {url}: {exc}")
    try:
        available = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"
        )
    finally:
        await conn.close()
    if available:
        pytest.skip("that server has pgvector")
    with pytest.raises(MigrationError) as err:
        await apply_migrations(url, embedding_dimension=384)
    assert "pgvector" in err.value.message and "install" in err.value.message
    from halldyll_ray import MemoryEngine

    engine = MemoryEngine(Settings.from_env(database_url=url))
    with pytest.raises(MigrationError):
        await engine.initialize()


async def _old_conversation(conn: asyncpg.Connection) -> tuple[UUID, UUID]:
    """A user and a conversation memory written straight into a database migrated only part
    of the way (what an installation of that time held)."""
    user = await conn.fetchval(
        "INSERT INTO users (id, username, role) VALUES (gen_random_uuid(), 'old', 'user')"
        " RETURNING id"
    )
    memory = await conn.fetchval(
        "INSERT INTO memories (id, user_id, type)"
        " VALUES (gen_random_uuid(), $1, 'conversation') RETURNING id",
        user,
    )
    return user, memory


async def test_messages_stored_before_0007_get_their_speaker_and_date_label(fresh_db: str) -> None:
    before = [m for m in load_migrations() if m.version < 7]
    await apply_migrations(fresh_db, embedding_dimension=384, migrations=before)
    conn = await asyncpg.connect(fresh_db)
    try:
        user, memory = await _old_conversation(conn)
        await conn.execute(
            "INSERT INTO conversation_messages (memory_id, seq, role, name, content, created_at)"
            " VALUES ($1, 0, 'user', 'Caroline', 'I went to a support group', $2),"
            "        ($1, 1, 'assistant', NULL, 'How was it?', $2)",
            memory,
            datetime(2023, 5, 8, 23, 56, tzinfo=UTC),
        )
        zero = "[" + ",".join(["0"] * 384) + "]"
        for seq, text in enumerate(["I went to a support group", "How was it?"]):
            await conn.execute(
                "INSERT INTO memory_chunks (memory_id, user_id, type, part, part_index, content,"
                " embedding) VALUES ($1, $2, 'conversation', 'message', $3, $4, $5::vector)",
                memory,
                user,
                seq,
                text,
                zero,
            )
        await apply_migrations(fresh_db, embedding_dimension=384)
        rows = await conn.fetch(
            "SELECT part_index, label, content, tsv @@ 'caroline'::tsquery AS named,"
            " tsv @@ 'may'::tsquery AS dated FROM memory_chunks ORDER BY part_index"
        )
        # the label is what message_label() writes for new messages
        assert (
            [r["label"] for r in rows]
            == [
                message_label("Caroline", datetime(2023, 5, 8, 23, 56, tzinfo=UTC)),
                message_label(None, datetime(2023, 5, 8, 23, 56, tzinfo=UTC)),
            ]
            == ["Caroline 8 May 2023", "8 May 2023"]
        )
        assert [r["content"] for r in rows] == ["I went to a support group", "How was it?"]
        assert [(r["named"], r["dated"]) for r in rows] == [(True, True), (False, True)]
    finally:
        await conn.close()


_MATCHES = "SELECT tsv @@ plainto_tsquery('simple', halldyll_search_text($1)) FROM memory_chunks"


@pytest.mark.parametrize(
    ("version", "content", "words"),
    [
        # 0014: invisible characters and Hebrew points
        (
            14,
            "I moved to Lon\u200bdon, \u05e9\u05b8\u05c1\u05dc\u05d5\u05b9\u05dd",
            ("london", "\u05e9\u05dc\u05d5\u05dd"),
        ),
        # 0015: emoji
        (15, "We celebrated \U0001f389 with \U0001f355", ("\U0001f389", "\U0001f355")),
        # 0017: a Greek final sigma stored in lower case, the word asked in capitals
        (17, "Ο νίκος ήρθε", ("ΝΊΚΟΣ",)),
    ],
)
async def test_chunks_stored_before_a_search_text_migration_are_found_after_it(
    fresh_db: str, version: int, content: str, words: tuple[str, ...]
) -> None:
    """A migration that changes halldyll_search_text() recomputes the tsvector of the chunks
    already stored: words their old tsvector missed are found once it has run."""
    before = [m for m in load_migrations() if m.version < version]
    await apply_migrations(fresh_db, embedding_dimension=384, migrations=before)
    conn = await asyncpg.connect(fresh_db)
    try:
        user, memory = await _old_conversation(conn)
        zero = "[" + ",".join(["0"] * 384) + "]"
        await conn.execute(
            "INSERT INTO memory_chunks (memory_id, user_id, type, part, part_index, content,"
            " embedding) VALUES ($1, $2, 'conversation', 'message', 0, $3, $4::vector)",
            memory,
            user,
            content,
            zero,
        )
        assert not any([await conn.fetchval(_MATCHES, word) for word in words])
        await apply_migrations(fresh_db, embedding_dimension=384)
        assert [await conn.fetchval(_MATCHES, word) for word in words] == [True] * len(words)
        assert await conn.fetchval(_MATCHES, "\U0001f363") is False  # another emoji: no match
    finally:
        await conn.close()
