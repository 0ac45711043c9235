"""Export and import over HTTP (streamed NDJSON), with the clients and the command line,
against the running Serve app: permissions, limits, the refused atomic import, the audit."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from halldyll_ray.client import AsyncHalldyllClient, HalldyllClient
from halldyll_ray.errors import AuthenticationFailed, InvalidInput, NotFound, PermissionDenied
from halldyll_ray.models import Conversation, Fact, Message, Role


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def _user_with_key(admin: AsyncHalldyllClient, role: Role = Role.USER) -> tuple[Any, str]:
    user = await admin.create_user(_name("port"), role=role)
    return user, (await admin.create_api_key(user.id)).key


async def _export(client: AsyncHalldyllClient, user_id: Any = "me") -> bytes:
    return b"".join([piece async for piece in client.export_memories(user_id=user_id)])


async def test_export_and_import_round_trip_over_http(
    ray_serve: dict[str, Any], admin_key: str
) -> None:
    url = ray_serve["url"]
    async with AsyncHalldyllClient(url, admin_key, timeout=60) as admin:
        (owner, owner_key), (other, other_key) = (
            await _user_with_key(admin),
            await _user_with_key(admin),
        )
    async with (
        AsyncHalldyllClient(url, owner_key, timeout=60) as me,
        AsyncHalldyllClient(url, other_key, timeout=60) as them,
    ):
        await me.store_memory(
            Conversation(
                title="Garden",
                messages=[
                    Message(role="user", content="The tomatoes need staking", name="Gus"),
                    Message(role="assistant", content="Use bamboo canes"),
                ],
            )
        )
        await me.store_memory(Fact(statement="Gus grows tomatoes", confidence=0.8))
        file = await _export(me)
        header, *lines = [json.loads(x) for x in file.splitlines()]
        assert header["user"]["id"] == str(owner.id)
        assert header["memories"] == {"conversation": 1, "fact": 1}
        assert len(lines) == 2

        # Streamed in pieces of a few bytes: the server splits lines, not the client.
        pieces = [file[i : i + 7] for i in range(0, len(file), 7)]
        report = await them.import_memories(pieces)
        assert report.created == {"conversation": 1, "fact": 1} and report.error_count == 0
        again = await them.import_memories(file)
        assert again.unchanged == 2 and again.created == {}
        copied = [json.loads(x) for x in (await _export(them)).splitlines()]
        assert copied[0]["memories"] == header["memories"]
        assert {line["memory"]["type"]: line["messages"] for line in copied[1:]} == {
            line["memory"]["type"]: line["messages"] for line in lines
        }
        hits = await them.search("who stakes tomatoes", limit=3)
        assert hits and hits[0].memory.user_id == other.id

        # Another user's export or import: 403, audited; nothing written.
        with pytest.raises(PermissionDenied):
            await _export(me, other.id)
        with pytest.raises(PermissionDenied):
            await me.import_memories(file, user_id=other.id)
    async with AsyncHalldyllClient(url, admin_key, timeout=60) as admin:
        with pytest.raises(NotFound):
            await _export(admin, uuid.uuid4())
        audit = await admin.list_audit(user_id=other.id, limit=50)
        operations = {(row["operation"], row["outcome"]) for row in audit}
        assert ("memory.import", "ok") in operations
        assert ("memory.import", "denied") in operations
        assert ("memory.export", "denied") in operations


async def test_atomic_import_over_http_is_422_with_the_report_and_stores_nothing(
    ray_serve: dict[str, Any], admin_key: str
) -> None:
    url = ray_serve["url"]
    async with AsyncHalldyllClient(url, admin_key, timeout=60) as admin:
        user, key = await _user_with_key(admin)
    now = datetime.now(UTC).isoformat()
    header = {
        "format": "halldyll-export",
        "version": 1,
        "user": {"id": str(uuid.uuid4()), "username": "x"},
        "exported_at": now,
    }

    def line(statement: str, confidence: float = 0.5, **metadata: str) -> dict[str, Any]:
        memory = {
            "type": "fact",
            "statement": statement,
            "confidence": confidence,
            "metadata": metadata,
        }
        return {"id": str(uuid.uuid4()), "memory": memory, "created_at": now, "updated_at": now}

    body = "".join(
        json.dumps(x) + "\n" for x in (header, line("Ivy reads at night"), line("Ivy", 3))
    ).encode()
    async with AsyncHalldyllClient(url, key, timeout=60) as client:
        with pytest.raises(InvalidInput) as caught:
            await client.import_memories(body, atomic=True)
        assert caught.value.fields["status_code"] == 422
        assert caught.value.fields["report"]["errors"][0]["line"] == 3
        assert caught.value.fields["field"] == "memory.fact.confidence"
        assert (await client.list_memories()).items == []
        report = await client.import_memories(body)  # not atomic: the good line goes in
        assert report.created == {"fact": 1} and [e.line for e in report.errors] == [3]

    async with httpx.AsyncClient(base_url=url, timeout=60) as raw:
        # A file that is no export: 422 naming the header, before anything is read further.
        response = await raw.post(
            f"/v1/users/{user.id}/import",
            content=b'{"hello": 1}\n',
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "format"
        # No key: 401 for both doors.
        assert (await raw.get(f"/v1/users/{user.id}/export")).status_code == 401
        assert (await raw.post(f"/v1/users/{user.id}/import", content=body)).status_code == 401
        # The import takes bodies over the ordinary limit (200 kB in this app): it streams.
        # The bulk is metadata, which is not embedded: 600 long statements took 20-40 s of
        # encoding on two cores, near the client's timeout when the machine is busy.
        big = "".join(
            json.dumps(line(f"Ivy note {n}", note="lorem ipsum " * 300)) + "\n" for n in range(60)
        )
        assert len(big) > 200_000
        response = await raw.post(
            f"/v1/users/{user.id}/import",
            content=(json.dumps(header) + "\n" + big).encode(),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200, response.text
        assert response.json()["lines"] == 60
        # ... while other routes keep theirs.
        response = await raw.post(
            f"/v1/users/{user.id}/search",
            content=json.dumps({"query": "x" * 300_000}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert response.status_code == 413


async def test_sync_client_and_command_line_round_trip(
    ray_serve: dict[str, Any], admin_key: str, tmp_path: Path
) -> None:
    url = ray_serve["url"]
    async with AsyncHalldyllClient(url, admin_key, timeout=60) as admin:
        (_, source_key), (_, target_key) = (
            await _user_with_key(admin),
            await _user_with_key(admin),
        )

    def scenario() -> None:
        with HalldyllClient(url, source_key, timeout=60) as source:
            source.store_memory(Fact(statement="Jo collects stamps"))
            exported = b"".join(source.export_memories())
        assert exported.count(b"\n") == 2
        with (
            pytest.raises(AuthenticationFailed),
            HalldyllClient(url, "hk_not-a-key", timeout=60) as nobody,
        ):
            b"".join(nobody.export_memories())
        key_file = tmp_path / "source.key"
        key_file.write_text(source_key)
        out = tmp_path / "export.ndjson"
        env = {**os.environ, "HALLDYLL_URL": url}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "halldyll_ray.cli",
                "export",
                "--key-file",
                str(key_file),
                "-o",
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert out.read_bytes().splitlines()[1:] == exported.splitlines()[1:]
        env["HALLDYLL_API_KEY"] = target_key
        for expected in ({"fact": 1}, {}):
            done = subprocess.run(
                [sys.executable, "-m", "halldyll_ray.cli", "import", str(out)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["created"] == expected
            assert source_key not in done.stdout + done.stderr
        with HalldyllClient(url, target_key, timeout=60) as client:
            assert [m.text for m in client.list_memories().items] == ["Jo collects stamps"]
            assert client.import_memories(out).unchanged == 1  # a path works too

    await asyncio.to_thread(scenario)
