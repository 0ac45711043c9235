"""`halldyll export` / `halldyll import` on user mistakes: one-line errors, and a failed
export never touches the file it would have replaced (no server needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from halldyll_ray.serve_local import free_port


def _halldyll(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "halldyll_ray.cli", *args],
        env={**os.environ, "DATA_DIR": str(tmp_path / "data"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_failed_export_leaves_the_existing_file_as_it_was(tmp_path: Path) -> None:
    backup = tmp_path / "backup.ndjson"
    backup.write_bytes(b'{"format": "halldyll-export"}\n')
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = _halldyll(
        "export", "--url", nobody, "-o", str(backup), tmp_path=tmp_path, HALLDYLL_API_KEY="hk_x"
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert backup.read_bytes() == b'{"format": "halldyll-export"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.ndjson"]  # no partial left


def test_missing_files_are_one_line_errors(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("hk_x")
    for args in (
        ("export", "--key-file", str(tmp_path / "no-such-key")),
        ("import", "--key-file", str(key), str(tmp_path / "no-such-file.ndjson")),
        ("export", "--key-file", str(key), "-o", str(tmp_path / "no-such-dir" / "x.ndjson")),
    ):
        done = _halldyll(*args, "--url", f"http://127.0.0.1:{free_port()}", tmp_path=tmp_path)
        assert done.returncode == 1, args
        assert done.stderr.startswith("error: "), done.stderr
        assert "Traceback" not in done.stderr and "no-such" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
