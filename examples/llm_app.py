"""A co-located inference app that uses halldyll-ray through a Ray Serve handle, not HTTP.

It stands in for an LLM deployment (Qwen2.5-14B-Instruct, say): before answering it asks the
memory app for a prompt context for the user, and after answering it records what it
learned. It acts as a Service identity: its API key belongs to a user with the service role,
so it may read and write the memories of the users it names, and nothing else.

Run it beside the memory app in the same cluster: add a second application to your Serve
config (``serve deploy`` it, or ``serve run`` the file) with the Service key in its env:

    applications:
      - name: halldyll            # serve_config.yaml's application
        ...
      - name: assistant
        route_prefix: null        # handle-only
        import_path: examples.llm_app:app
        runtime_env: {env_vars: {HALLDYLL_SERVICE_KEY: "hr_..."}}

``tests/serve/test_http.py::test_colocated_app_uses_the_handle_api`` runs exactly this.

The "model" here is a template so the example runs anywhere; swap ``_generate`` for vLLM,
transformers or an OpenAI-compatible call.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Assistant:
    def __init__(self, service_key: str | None = None, memory_app: str = "halldyll") -> None:
        self.key = service_key or os.environ["HALLDYLL_SERVICE_KEY"]
        self.memory = serve.get_app_handle(memory_app)

    def _generate(self, prompt: str) -> str:
        facts = [line for line in prompt.splitlines() if line.startswith("[")]
        return "Based on what I remember: " + (" ".join(facts[:2]) or "nothing yet.")

    async def chat(self, user_id: str, message: str) -> dict[str, Any]:
        context = await self.memory.handle_build_context.remote(
            self.key, user_id, message, max_tokens=512
        )
        answer = self._generate(context.text + "\n\nuser: " + message)
        await self.memory.handle_store_memory.remote(
            self.key,
            user_id,
            {
                "type": "conversation",
                "title": "assistant chat",
                "messages": [
                    {"role": "user", "content": message},
                    {"role": "assistant", "content": answer},
                ],
            },
        )
        return {"answer": answer, "sources": [str(s) for s in context.sources]}


app = Assistant.bind()
