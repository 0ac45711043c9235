"""The README's in-process example runs as written, and runs again: a reader who tries it
twice on one database (the embedded default keeps its data) must not meet a Conflict."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _readme_block(heading: str) -> str:
    """The first ```python block under ``heading``."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(f"\n{heading}\n") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```\n", start)]


async def test_the_python_api_example_runs_twice(database_url: str) -> None:
    code = _readme_block("## Python API")
    assert "Settings.from_env()" in code  # so DATABASE_URL below is the database it uses
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REDIS_URL", "DATA_DIR", "EMBEDDING_MODEL", "EMBEDDING_MODEL_PATH")
    }
    env.update(DATABASE_URL=database_url, PYTHONPATH=str(ROOT))
    for run in range(2):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, (run, done.stderr[-2000:])
        assert done.stdout.startswith("Ada drinks green tea every morning "), done.stdout
