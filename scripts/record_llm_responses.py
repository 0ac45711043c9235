"""Record, once, a real model's answers to the memory model's fixed inputs (issue #14).

Each case runs :class:`~halldyll_ray.llm.openai_model.LLMMemoryModel` (extract_facts,
consolidate, summarize, roll_up) against a real OpenAI-compatible server through a transport
that keeps every request body and response body, and writes
``tests/data/llm_recordings/<case>.json``: the inputs, the exchanges, the outcome our side
made of them (the validated answer, or the error) and the model that answered. The unit
tests (``tests/unit/test_llm_recordings.py``) replay them: the request must be the one
recorded (a changed prompt or schema needs a new recording) and the response goes through
the parsing and validation again.

Inputs are LoCoMo development-split snippets (``../shared/bench/locomo/locomo-dev.json``):
the first turns of a session to extract from, the dataset's own observations about a speaker
as stored facts (ids derived from the text, similarities from the packaged MiniLM encoder),
and its session summaries to roll up. Some consolidation cases run without a grammar
(``json_object``, prompt only) to catch what a model does unconstrained (an invented id).

Usage (the default starts the installed test model, scripts/install_test_llm.py)::

    .venv/bin/python scripts/record_llm_responses.py [--base-url URL --model ID] [--only CASE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # llm_replay: the task calls the tests replay

from llm_replay import run_task  # noqa: E402

from examples.local_llm import LocalLLMServer, read_manifest  # noqa: E402
from halldyll_ray.embedding import OnnxEncoder  # noqa: E402
from halldyll_ray.errors import HalldyllError  # noqa: E402
from halldyll_ray.llm.client import LLMClient, OpenAITransport  # noqa: E402
from halldyll_ray.llm.openai_model import LLMMemoryModel, StructuredOutput  # noqa: E402
from halldyll_ray.llm.protocol import DatedText, FactCandidate, Neighbour  # noqa: E402

DATA = ROOT.parent / "shared" / "bench" / "locomo" / "locomo-dev.json"
OUT = ROOT / "tests" / "data" / "llm_recordings"
#: Fixed namespace of the stored facts' ids (so a re-recording keeps them).
ID_NAMESPACE = uuid.UUID("6f1f6b4e-3c1e-4d0a-9a57-1c2f0e6b9d10")


class RecordingTransport:
    """Passes each call to ``inner`` and keeps the request and response bodies."""

    def __init__(self, inner: OpenAITransport) -> None:
        self.inner = inner
        self.exchanges: list[dict[str, Any]] = []

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.inner.complete(body)
        self.exchanges.append({"request": body, "response": response})
        return response


def _when(written: str) -> datetime:
    return datetime.strptime(written, "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def load_locomo() -> dict[str, dict[str, Any]]:
    return {sample["sample_id"]: sample for sample in json.loads(DATA.read_text())}


def snippet(sample: dict[str, Any], session: int, turns: int) -> list[DatedText]:
    conv = sample["conversation"]
    when = _when(conv[f"session_{session}_date_time"])
    return [
        DatedText(text=f"{t['speaker']}: {t['text']}", start=when, end=when)
        for t in conv[f"session_{session}"][:turns]
    ]


def observations(sample: dict[str, Any], session: int, speaker: str) -> list[str]:
    return [text for text, _ in sample["observation"][f"session_{session}_observation"][speaker]]


def neighbours_for(encoder: OnnxEncoder, fact: str, stored: list[str]) -> list[Neighbour]:
    vectors = encoder.encode([fact, *stored])
    out = [
        Neighbour(
            id=uuid.uuid5(ID_NAMESPACE, text),
            statement=text,
            confidence=0.7,
            similarity=round(float(vectors[0] @ vectors[i + 1]), 4),
        )
        for i, text in enumerate(stored)
    ]
    return sorted(out, key=lambda n: -n.similarity)


Case = Callable[[LLMMemoryModel], Awaitable[Any]]


def cases(encoder: OnnxEncoder) -> dict[str, tuple[str, StructuredOutput, dict[str, Any]]]:
    """name -> (task, structured output mode, inputs as JSON)."""
    locomo = load_locomo()
    c26, c30, c41 = locomo["conv-26"], locomo["conv-30"], locomo["conv-41"]
    out: dict[str, tuple[str, StructuredOutput, dict[str, Any]]] = {}

    def extract(sample: dict[str, Any], session: int, turns: int, speaker: str) -> dict[str, Any]:
        messages = snippet(sample, session, turns)
        return {"messages": [m.model_dump(mode="json") for m in messages], "speaker": speaker}

    schema: StructuredOutput = "json_schema"
    out["extract_conv26_caroline"] = ("extract_facts", schema, extract(c26, 1, 9, "Caroline"))
    speaker_a = c30["conversation"]["speaker_a"]
    out["extract_conv30_speaker_a"] = ("extract_facts", schema, extract(c30, 1, 8, speaker_a))
    speaker_b = c41["conversation"]["speaker_b"]
    out["extract_conv41_speaker_b"] = ("extract_facts", schema, extract(c41, 1, 8, speaker_b))
    out["extract_conv26_melanie_json_object"] = (
        "extract_facts",
        "json_object",
        extract(c26, 1, 9, "Melanie"),
    )

    stored = observations(c26, 1, "Caroline")

    def consolidate(fact: str, shown: list[str]) -> dict[str, Any]:
        return {
            "fact": FactCandidate(statement=fact).model_dump(mode="json"),
            "neighbours": [n.model_dump(mode="json") for n in neighbours_for(encoder, fact, shown)],
        }

    later = observations(c26, 2, "Caroline")[0]
    out["consolidate_related"] = ("consolidate", "json_schema", consolidate(later, stored))
    out["consolidate_same_statement"] = (
        "consolidate",
        "json_schema",
        consolidate(stored[0], stored),
    )
    # The dataset's session summary tells stored[0] in other words.
    paraphrase = c26["session_summary"]["session_1_summary"].split(". ")[1] + "."
    out["consolidate_paraphrase"] = ("consolidate", "json_schema", consolidate(paraphrase, stored))
    out["consolidate_no_neighbours"] = ("consolidate", "json_schema", consolidate(later, []))
    melanie = observations(c26, 1, "Melanie")
    out["consolidate_unrelated"] = ("consolidate", "json_schema", consolidate(melanie[1], stored))
    out["consolidate_prompt_only"] = ("consolidate", "none", consolidate(later, stored))
    out["consolidate_json_object"] = ("consolidate", "json_object", consolidate(later, stored))
    out["consolidate_paraphrase_prompt_only"] = (
        "consolidate",
        "none",
        consolidate(paraphrase, stored),
    )

    session = snippet(c26, 1, 18)
    out["summarize_conv26_session1"] = (
        "summarize",
        "json_schema",
        {"messages": [m.model_dump(mode="json") for m in session], "max_words": 60},
    )
    summaries = [
        DatedText(
            text=c26["session_summary"][f"session_{i}_summary"],
            start=_when(c26["conversation"][f"session_{i}_date_time"]),
        )
        for i in (1, 2, 3)
    ]
    out["roll_up_conv26_sessions_1_3"] = (
        "roll_up",
        "json_schema",
        {"summaries": [s.model_dump(mode="json") for s in summaries], "max_words": 80},
    )
    return out


async def record(base_url: str, model_id: str, only: set[str], about: dict[str, Any]) -> None:
    encoder = OnnxEncoder.load(None)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (task, mode, inputs) in cases(encoder).items():
        if only and name not in only:
            continue
        transport = RecordingTransport(OpenAITransport(base_url, timeout_s=300, max_retries=0))
        model = LLMMemoryModel(LLMClient(transport, model=model_id), structured_output=mode)
        try:
            outcome: dict[str, Any] = {"answer": await run_task(model, task, inputs)}
        except HalldyllError as exc:
            outcome = {"error": type(exc).__name__, "message": exc.message}
        await transport.inner.aclose()
        record = {
            "case": name,
            "task": task,
            "structured_output": mode,
            "inputs": inputs,
            "exchanges": transport.exchanges,
            "outcome": outcome,
            "model": about,
            "recorded_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (OUT / f"{name}.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        print(f"{name}: {json.dumps(outcome, ensure_ascii=False)[:160]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API root (default: start one)")
    parser.add_argument("--model", help="the model id to ask for (with --base-url)")
    parser.add_argument("--only", nargs="*", default=[], help="record only these cases")
    args = parser.parse_args()
    if args.base_url:
        if not args.model:
            parser.error("--base-url needs --model")
        about = {"id": args.model, "base_url": args.base_url}
        asyncio.run(record(args.base_url, args.model, set(args.only), about))
        return 0
    info = read_manifest()
    with LocalLLMServer.from_manifest() as server:
        about = {
            "id": server.model_id,
            "name": info["model"]["name"],
            "sha256": info["model"]["sha256"],
            "source": info["source"]["package"],
            "licence": info["source"]["licence"],
            "server": info["server"]["package"],
        }
        asyncio.run(record(server.base_url, server.model_id, set(args.only), about))
    return 0


if __name__ == "__main__":
    sys.exit(main())
