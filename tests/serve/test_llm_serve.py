"""The co-located LLM app (examples/llm_server_app.py) through both doors of the LLM client.

One Serve application serves the real test model (SmolLM2-135M-Instruct under
dasllama-server, a child of its replica); the memory model reaches it by Serve handle
(LLM_PROVIDER=serve) and over HTTP through Serve's proxy (LLM_PROVIDER=openai).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from support import skip_unless_installed

from examples.local_llm import ModelNotInstalled, read_manifest
from halldyll_ray.config import Settings
from halldyll_ray.llm.client import LLMRequestRefused, memory_model_from_settings
from halldyll_ray.llm.openai_model import LLMMemoryModel
from halldyll_ray.llm.protocol import DatedText, Decision, FactCandidate, Neighbour

MESSAGES = [
    DatedText(text="Ada: I moved to Lisbon last month for a job as a nurse."),
    DatedText(text="Bo: Nice! Do you still have your dog?"),
    DatedText(text="Ada: Yes, Rex came with me."),
]


async def test_the_colocated_llm_app_answers_by_handle_and_over_http(
    ray_serve: dict[str, Any],
) -> None:
    from ray import serve

    from examples.llm_server_app import build_app
    from halldyll_ray.serve.llm_handle import serve_memory_model

    try:
        model_id = read_manifest()["model_id"]
    except ModelNotInstalled as exc:
        skip_unless_installed(exc)
    # Half a logical CPU: the serve session's other deployments keep theirs.
    serve.run(build_app({"num_cpus": 0.5, "threads": 2}), name="llm", route_prefix="/llm")
    by_http = None
    try:
        settings = Settings.from_env(
            llm_provider="serve", llm_serve_app="llm", llm_model=model_id, llm_timeout_s=120
        )
        by_handle = serve_memory_model(settings)
        assert isinstance(by_handle, LLMMemoryModel)
        shown = [
            Neighbour(
                id=uuid.uuid4(), statement="Ada lives in Porto.", confidence=0.8, similarity=0.7
            )
        ]
        decision = await by_handle.consolidate(
            FactCandidate(statement="Ada lives in Lisbon."), shown
        )
        assert isinstance(decision, Decision)
        assert decision.target is None or decision.target == shown[0].id
        facts = await by_handle.extract_facts(MESSAGES, speaker="Ada")
        assert all(isinstance(f, FactCandidate) for f in facts)
        (row,) = by_handle.client.metrics.snapshot()["models"]
        assert row["calls"] == 2 and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
        # The token counters reach Prometheus through Ray's metrics (the node's endpoint).
        wanted = {"halldyll_llm_prompt_tokens", "halldyll_llm_completion_tokens"}
        found: set[str] = set()
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=10) as scraper:
            while time.monotonic() < deadline and found != wanted:
                text = (await scraper.get(ray_serve["metrics_url"])).text
                found = {
                    name for name in wanted if f"{name}_total{{" in text or f"{name}{{" in text
                }
                await asyncio.sleep(1)
        assert found == wanted

        # The app's error body comes back as the typed refusal, not retried.
        wrong = serve_memory_model(settings.model_copy(update={"llm_model": "no-such-model"}))
        assert wrong is not None
        with pytest.raises(LLMRequestRefused) as caught:
            await wrong.summarize(MESSAGES, max_words=10)
        assert caught.value.status in (400, 404)

        by_http = memory_model_from_settings(
            Settings.from_env(
                llm_provider="openai",
                llm_base_url=f"{ray_serve['url']}/llm/v1",
                llm_model=model_id,
                llm_timeout_s=120,
            )
        )
        assert by_http is not None
        summary = await by_http.summarize(MESSAGES, max_words=30)
        assert summary.strip() and len(summary.split()) <= 30
    finally:
        if by_http is not None:
            await by_http.client.aclose()
        serve.delete("llm")
