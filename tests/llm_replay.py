"""Replay of recorded LLM exchanges (tests/data/llm_recordings, scripts/record_llm_responses.py).

A recording holds the request bodies a real server got and the response bodies it sent.
:class:`ReplayTransport` answers each request with the recorded response, after checking
that the request is the one recorded: a changed prompt or schema needs a new recording,
never a hand-edited answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from halldyll_ray.llm.client import LLMClient
from halldyll_ray.llm.openai_model import LLMMemoryModel
from halldyll_ray.llm.protocol import DatedText, FactCandidate, Neighbour

RECORDINGS = Path(__file__).resolve().parent / "data" / "llm_recordings"


def recording(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RECORDINGS / f"{name}.json").read_text())
    return data


def recording_names() -> list[str]:
    return sorted(p.stem for p in RECORDINGS.glob("*.json"))


class ReplayTransport:
    """A ChatTransport answering from recorded exchanges, in order."""

    def __init__(self, exchanges: list[dict[str, Any]]) -> None:
        self.exchanges = list(exchanges)
        self.requests: list[dict[str, Any]] = []

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(body)
        if not self.exchanges:
            raise AssertionError("a request the recording does not have")
        exchange = self.exchanges.pop(0)
        assert body == exchange["request"], "the request differs from the recorded one"
        response: dict[str, Any] = exchange["response"]
        return response


def replay_model(record: dict[str, Any]) -> tuple[LLMMemoryModel, ReplayTransport]:
    transport = ReplayTransport(record["exchanges"])
    model_id = record["exchanges"][0]["request"]["model"] if record["exchanges"] else "replay"
    client = LLMClient(transport, model=model_id)
    return LLMMemoryModel(client, structured_output=record["structured_output"]), transport


async def run_task(model: LLMMemoryModel, task: str, inputs: dict[str, Any]) -> Any:
    """The task's validated answer as JSON (as scripts/record_llm_responses.py records it)."""
    if task == "extract_facts":
        messages = [DatedText.model_validate(m) for m in inputs["messages"]]
        facts = await model.extract_facts(messages, speaker=inputs["speaker"])
        return [f.model_dump(mode="json") for f in facts]
    if task == "consolidate":
        fact = FactCandidate.model_validate(inputs["fact"])
        shown = [Neighbour.model_validate(n) for n in inputs["neighbours"]]
        return (await model.consolidate(fact, shown)).model_dump(mode="json")
    if task == "summarize":
        messages = [DatedText.model_validate(m) for m in inputs["messages"]]
        return await model.summarize(messages, max_words=inputs["max_words"])
    if task == "roll_up":
        summaries = [DatedText.model_validate(m) for m in inputs["summaries"]]
        return await model.roll_up(summaries, max_words=inputs["max_words"])
    raise ValueError(task)
