"""A co-located LLM application: the OpenAI chat-completions API as a Ray Serve deployment.

The memory app's background jobs reach it by handle (``LLM_PROVIDER=serve``,
``LLM_SERVE_APP=llm``): ``chat_completions(body) -> dict`` takes an OpenAI chat-completions
request body and returns the response body, or an OpenAI error body
(``{"error": {"message", "type", "code"}}``, ``code`` the HTTP status) instead of raising
across Ray. Over HTTP, the same API answers ``POST <route_prefix>/v1/chat/completions`` and
``GET <route_prefix>/v1/models``, so ``LLM_PROVIDER=openai`` can use it too.

Each replica runs a ``dasllama-server`` child process over a GGUF model (by default the one
``scripts/install_test_llm.py`` installs: SmolLM2-135M-Instruct) and forwards to it; a
production app would put vLLM or Ray Serve LLM here behind the same method.

    applications:
      - name: llm
        route_prefix: /llm            # or null: handle only
        import_path: examples.llm_server_app:build_app
        args: {threads: 2}
      - name: halldyll
        ...
        args: {settings: {LLM_PROVIDER: serve, LLM_SERVE_APP: llm,
                          LLM_MODEL: SmolLM2-135M-Instruct.Q8_0.gguf}}

``tests/serve/test_llm_serve.py`` runs it and calls it through both doors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from examples.local_llm import LocalLLMServer, read_manifest


class LLMAppArgs(BaseModel):
    """Shape of the LLM application (its ``args:``)."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = Field(
        default=None, description="GGUF file to serve. None: the installed test model."
    )
    server_path: str | None = Field(
        default=None, description="dasllama-server executable. None: the installed one."
    )
    threads: int = Field(default=2, ge=1, le=256, description="Matrix-product threads.")
    streams: int = Field(default=2, ge=1, le=64, description="Requests generated at once.")
    ctx: int = Field(default=4096, ge=256, le=131072, description="Context length in tokens.")
    num_cpus: float = Field(default=1.0, gt=0, le=256, description="Ray CPUs per replica.")
    timeout_s: float = Field(default=300, gt=0, description="Seconds one request may take.")


class ChatCompletionsServer:
    """One replica: a dasllama-server child and the OpenAI API in front of it."""

    def __init__(self, args: LLMAppArgs | dict[str, Any] | None = None) -> None:
        args = args if isinstance(args, LLMAppArgs) else LLMAppArgs.model_validate(args or {})
        if args.model_path is None or args.server_path is None:
            info = read_manifest()
            model = args.model_path or info["model"]["path"]
            server = args.server_path or info["server"]["path"]
        else:
            model, server = args.model_path, args.server_path
        self.server = LocalLLMServer(
            Path(server), Path(model), threads=args.threads, streams=args.streams, ctx=args.ctx
        ).start()
        self.model_id = self.server.model_id
        self.http = httpx.AsyncClient(base_url=self.server.base_url, timeout=args.timeout_s)

    async def chat_completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """OpenAI chat completions: the response body, or an error body (never raises)."""
        try:
            response = await self.http.post("/chat/completions", json=body)
        except httpx.HTTPError as exc:
            return _error(503, "server_unavailable", f"the model server failed: {exc}")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code != 200 or not isinstance(answer, dict):
            message = response.text[:500]
            if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
                message = str(answer["error"].get("message", message))
            return _error(response.status_code, "upstream_error", message)
        return answer

    async def models(self) -> dict[str, Any]:
        """OpenAI ``GET /v1/models``: the one model this replica serves."""
        return {"object": "list", "data": [{"id": self.model_id, "object": "model"}]}

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/")
        if request.method == "POST" and path.endswith("/v1/chat/completions"):
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse(_error(400, "invalid_json", "the body is not JSON"), 400)
            if not isinstance(body, dict):
                return JSONResponse(_error(400, "invalid_json", "the body is not an object"), 400)
            answer = await self.chat_completions(body)
            status = answer["error"]["code"] if "error" in answer else 200
            return JSONResponse(answer, status_code=status)
        if request.method == "GET" and path.endswith("/v1/models"):
            return JSONResponse(await self.models())
        return JSONResponse(_error(404, "not_found", f"no route {request.method} {path}"), 404)

    def check_health(self) -> None:
        """Serve restarts the replica when its model server has died."""
        if not self.server.alive():
            raise RuntimeError("the dasllama-server child exited" + self.server.tail())

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


def _error(status: int, kind: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


def build_app(args: LLMAppArgs | dict[str, Any] | None = None) -> Application:
    """The LLM application: one ChatCompletionsServer deployment (replicas from the YAML)."""
    args = args if isinstance(args, LLMAppArgs) else LLMAppArgs.model_validate(args or {})
    deployment = serve.deployment(
        ChatCompletionsServer,
        name="ChatCompletions",
        ray_actor_options={"num_cpus": args.num_cpus},
        # Requests past the server's streams queue in dasllama, not in Serve.
        max_ongoing_requests=max(8, args.streams * 4),
    )
    return deployment.bind(args)
