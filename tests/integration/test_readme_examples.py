"""The README's in-process example runs as written, and runs again: a reader who tries it
twice on one database (the embedded default keeps its data) must not meet a Conflict."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from halldyll_ray.config import Settings
from halldyll_ray.demo import run_demo

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


async def test_the_demo_shows_scores_a_reader_can_read(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """`scripts/demo.sh` (the README's quick start) printed each paraphrased search's right
    answer as `score=0.00` or `score=0.01`: the hybrid score of a small store is a few
    thousandths. Now each line shows the score to three significant digits and the cosine."""
    await run_demo(settings)
    out = capsys.readouterr().out
    searches = out[out.index("=== search") : out.index("=== agent loop")].splitlines()[1:]
    hits = [line for line in searches if " -> " in line]
    assert len(hits) == 4 and not [line for line in hits if "-> nothing" in line]
    for line in hits:
        shown = re.search(r"score=(\S+)", line).group(1)  # type: ignore[union-attr]
        similarity = float(re.search(r"similarity=(\S+)", line).group(1))  # type: ignore[union-attr]
        # At least two significant digits ("0.00" and "0.01" had none and one).
        assert float(shown) > 0 and len(shown.replace(".", "").lstrip("0")) >= 2, line
        assert 0.2 < similarity <= 1, line
