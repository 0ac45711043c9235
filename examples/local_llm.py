"""A local OpenAI-compatible LLM server as a child process: dasllama-server over a GGUF file.

Used by the co-located Serve app (``examples/llm_server_app.py``), the tests, the recording
script and the benchmarks. The model they use is the one ``scripts/install_test_llm.py``
installs (SmolLM2-135M-Instruct, from PyPI; see its ``build/test-llm/model.json``); any GGUF
file dasllama loads works the same.

    with LocalLLMServer.from_manifest() as server:
        print(server.base_url, server.model_id)   # http://127.0.0.1:PORT/v1, the served id
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
#: Where scripts/install_test_llm.py leaves the model and its manifest.
DEFAULT_MANIFEST = ROOT / "build" / "test-llm" / "model.json"


class ModelNotInstalled(RuntimeError):
    """The test model is not installed; the message says why and how to install it."""


def read_manifest(path: Path | None = None) -> dict[str, Any]:
    """``build/test-llm/model.json`` (or ``path``, or ``$HALLDYLL_TEST_LLM_MANIFEST``).

    Raises:
        ModelNotInstalled: no manifest, or its files are gone; the message quotes the
            installer's last error when there is one.
    """
    path = path or Path(os.environ.get("HALLDYLL_TEST_LLM_MANIFEST", DEFAULT_MANIFEST))
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        error = path.parent / "install-error.txt"
        why = error.read_text().strip() if error.is_file() else "it was never run here"
        raise ModelNotInstalled(
            f"the test LLM is not installed ({why}); run "
            "`.venv/bin/python scripts/install_test_llm.py` (scripts/test.sh does)"
        ) from None
    for key in ("model", "server"):
        if not Path(info[key]["path"]).is_file():
            raise ModelNotInstalled(
                f"{info[key]['path']} is gone; run scripts/install_test_llm.py again"
            )
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalLLMServer:
    """``dasllama-server`` serving one GGUF model on 127.0.0.1, started and stopped here.

    Args:
        server: Path of the dasllama-server executable.
        model: Path of the GGUF file.
        threads: Worker threads for the matrix products.
        streams: Requests generated at once (more queue in the server).
        ctx: Context length in tokens.
        port: Port to listen on (a free one when None).
    """

    def __init__(
        self,
        server: Path | str,
        model: Path | str,
        *,
        threads: int = 2,
        streams: int = 2,
        ctx: int = 4096,
        port: int | None = None,
    ) -> None:
        self.server = Path(server)
        self.model = Path(model)
        self.threads = threads
        self.streams = streams
        self.ctx = ctx
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model_id = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="dasllama-", suffix=".log", delete=False)  # noqa: SIM115

    @classmethod
    def from_manifest(cls, path: Path | None = None, **options: Any) -> LocalLLMServer:
        """The installed test model (see :func:`read_manifest`)."""
        info = read_manifest(path)
        return cls(info["server"]["path"], info["model"]["path"], **options)

    def start(self, timeout_s: float = 120.0) -> LocalLLMServer:
        """Start the server and wait until it lists its model.

        Raises:
            RuntimeError: it exited, or did not answer within ``timeout_s``; the message
                ends with its log's last lines.
        """
        command = [
            str(self.server),
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--threads",
            str(self.threads),
            "--streams",
            str(self.streams),
            "--ctx",
            str(self.ctx),
        ]
        self._process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                raise RuntimeError(f"dasllama-server exited ({code})" + self.tail())
            try:
                models = httpx.get(f"{self.base_url}/models", timeout=2).json()
                self.model_id = models["data"][0]["id"]
                return self
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dasllama-server did not start within {timeout_s} s" + self.tail())

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = Path(self._log.name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> LocalLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
