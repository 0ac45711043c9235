"""The LLM memory model's parsing, validation and id checks on a real model's recorded answers.

Recorded once from SmolLM2-135M-Instruct served by dasllama (scripts/record_llm_responses.py,
tests/data/llm_recordings); each replay checks the request is the one recorded. No recorded
answer names an id the model was not shown (with a grammar the server cannot, and without
one the 135M model never got to a whole answer), so the id check runs on a recorded answer
whose action and target are altered here; the alteration is said in each test.
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest
from llm_replay import ReplayTransport, recording, recording_names, replay_model, run_task

from halldyll_ray.llm.client import LLMClient
from halldyll_ray.llm.openai_model import LLMMemoryModel
from halldyll_ray.llm.protocol import (
    Action,
    Decision,
    FactCandidate,
    LLMOutputInvalid,
    Neighbour,
)


def test_there_are_recordings_of_every_task() -> None:
    tasks = {recording(name)["task"] for name in recording_names()}
    assert tasks == {"extract_facts", "consolidate", "summarize", "roll_up"}
    for name in recording_names():
        assert recording(name)["model"]["licence"] == "Apache-2.0"


@pytest.mark.parametrize("name", recording_names())
async def test_a_recording_replays_to_the_outcome_recorded(name: str) -> None:
    record = recording(name)
    model, transport = replay_model(record)
    try:
        outcome: dict[str, Any] = {
            "answer": await run_task(model, record["task"], record["inputs"])
        }
    except LLMOutputInvalid as exc:
        outcome = {"error": type(exc).__name__, "message": exc.message}
    assert outcome == record["outcome"]
    assert transport.exchanges == [], "a recorded exchange was not asked for"


async def test_extracted_facts_are_validated_and_without_repeats() -> None:
    record = recording("extract_conv30_speaker_a")
    model, _ = replay_model(record)
    facts = await run_task(model, "extract_facts", record["inputs"])
    statements = [f["statement"] for f in facts]
    assert facts and all(FactCandidate.model_validate(f) for f in facts)
    assert len({s.casefold() for s in statements}) == len(statements)
    # The raw answer had the same statement more than once: the repeats were dropped.
    raw = json.loads(record["exchanges"][0]["response"]["choices"][0]["message"]["content"])
    assert len(raw["facts"]) >= len(facts)


async def test_a_looping_extraction_still_gives_validated_facts() -> None:
    """The model repeated a phrase until the schema's maxLength: each item is still a valid
    statement (within the schema's length), and repeats are dropped."""
    record = recording("extract_conv26_caroline")
    request = record["exchanges"][0]["request"]
    schema = request["response_format"]["json_schema"]["schema"]
    limit = schema["properties"]["facts"]["items"]["properties"]["statement"]["maxLength"]
    model, _ = replay_model(record)
    facts = await run_task(model, "extract_facts", record["inputs"])
    assert facts and all(len(f["statement"]) <= limit for f in facts)


async def test_an_answer_echoing_the_schema_is_refused() -> None:
    """Without a grammar (json_object) the model answered with the schema itself."""
    record = recording("extract_conv26_melanie_json_object")
    content = record["exchanges"][0]["response"]["choices"][0]["message"]["content"]
    assert '"properties"' in content
    model, _ = replay_model(record)
    with pytest.raises(LLMOutputInvalid, match="facts"):
        await run_task(model, "extract_facts", record["inputs"])


@pytest.mark.parametrize(
    "name",
    ["consolidate_prompt_only", "consolidate_json_object", "consolidate_paraphrase_prompt_only"],
)
async def test_an_answer_cut_at_its_token_budget_is_refused(name: str) -> None:
    record = recording(name)
    assert record["exchanges"][-1]["response"]["choices"][0]["finish_reason"] == "length"
    model, _ = replay_model(record)
    with pytest.raises(LLMOutputInvalid, match="token budget"):
        await run_task(model, "consolidate", record["inputs"])


async def test_a_schema_constrained_decision_is_checked_against_the_facts_shown() -> None:
    for name in ("consolidate_related", "consolidate_paraphrase", "consolidate_unrelated"):
        record = recording(name)
        model, _ = replay_model(record)
        decision = Decision.model_validate(await run_task(model, "consolidate", record["inputs"]))
        shown = {n["id"] for n in record["inputs"]["neighbours"]}
        assert decision.target is None or str(decision.target) in shown
        # The schema offered exactly the ids shown as targets.
        schema = record["exchanges"][0]["request"]["response_format"]["json_schema"]["schema"]
        assert set(schema["anyOf"][1]["properties"]["target"]["enum"]) == shown


async def test_the_same_statement_is_reinforced_without_a_call() -> None:
    record = recording("consolidate_same_statement")
    assert record["exchanges"] == []
    model, transport = replay_model(record)
    decision = await run_task(model, "consolidate", record["inputs"])
    stored = record["inputs"]["neighbours"]
    same = next(n for n in stored if n["statement"] == record["inputs"]["fact"]["statement"])
    assert decision["action"] == "reinforce" and decision["target"] == same["id"]
    assert transport.requests == []


def _altered(record: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its response's content replaced by ``answer`` (the request stays)."""
    altered = copy.deepcopy(record)
    altered["exchanges"][0]["response"]["choices"][0]["message"]["content"] = json.dumps(answer)
    return altered


async def _decide(record: dict[str, Any]) -> Decision:
    model, _ = replay_model(record)
    return Decision.model_validate(await run_task(model, "consolidate", record["inputs"]))


async def test_an_invented_target_is_refused() -> None:
    """consolidate_related's recorded answer ("add", no target), altered to reinforce an id
    that was not shown."""
    record = recording("consolidate_related")
    invented = str(uuid.uuid4())
    answer = {"action": "reinforce", "target": invented, "reason": "support"}
    with pytest.raises(LLMOutputInvalid, match="not one of the facts shown") as caught:
        await _decide(_altered(record, answer))
    assert caught.value.fields["target"] == invented


@pytest.mark.parametrize("action", ["reinforce", "update", "contradict"])
async def test_a_target_among_the_facts_shown_is_kept(action: str) -> None:
    """consolidate_related's recorded answer, altered to each targeted action on the second
    fact shown; update and contradict keep no statement of their own (the candidate's is
    stored, the target closed or weakened by consolidation)."""
    record = recording("consolidate_related")
    target = record["inputs"]["neighbours"][1]["id"]
    decision = await _decide(
        _altered(record, {"action": action, "target": target, "reason": "support"})
    )
    assert decision.action == Action(action) and str(decision.target) == target
    assert decision.statement is None


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ({"action": "update", "target": None, "reason": "x"}, "must name its target"),
        ({"action": "add", "target": "FIRST", "reason": "x"}, "takes no target"),
        ({"action": "merge", "target": None, "reason": "x"}, "action"),
        ({"action": "add", "target": None, "reason": "x", "note": 1}, "note"),
        ({"action": "reinforce", "target": "not-a-uuid", "reason": "x"}, "target"),
    ],
)
async def test_a_malformed_decision_is_refused(answer: dict[str, Any], error: str) -> None:
    """consolidate_related's recorded answer, altered to each malformed decision."""
    record = recording("consolidate_related")
    if answer["target"] == "FIRST":
        answer = {**answer, "target": record["inputs"]["neighbours"][0]["id"]}
    with pytest.raises(LLMOutputInvalid, match=error):
        await _decide(_altered(record, answer))


async def test_a_null_target_written_as_text_reads_as_none() -> None:
    """consolidate_related's recorded answer with its null target written "null"."""
    record = recording("consolidate_related")
    decision = await _decide(_altered(record, {"action": "add", "target": "null", "reason": ""}))
    assert decision.action is Action.ADD and decision.target is None


@pytest.mark.parametrize(
    ("name", "task", "key"),
    [
        ("summarize_conv26_session1", "summarize", "messages"),
        ("roll_up_conv26_sessions_1_3", "roll_up", "summaries"),
    ],
)
async def test_summaries_keep_to_their_word_budget(name: str, task: str, key: str) -> None:
    record = recording(name)
    model, _ = replay_model(record)
    text = await run_task(model, task, record["inputs"])
    assert text and len(text.split()) <= record["inputs"]["max_words"]
    assert record["inputs"][key]


async def test_a_shorter_budget_cuts_the_recorded_summary_at_a_sentence() -> None:
    """summarize_conv26_session1's recorded answer, read with a budget of 20 words."""
    from halldyll_ray.llm.openai_model import text_within

    record = recording("summarize_conv26_session1")
    content = record["exchanges"][0]["response"]["choices"][0]["message"]["content"]
    cut = text_within(content, 20)
    assert len(cut.split()) <= 20 and cut.endswith((".", "!", "?"))


async def test_token_usage_of_recorded_calls_is_accounted() -> None:
    record = recording("consolidate_related")
    transport = ReplayTransport(record["exchanges"])
    client = LLMClient(transport, model=record["exchanges"][0]["request"]["model"])
    model = LLMMemoryModel(client)
    fact = FactCandidate.model_validate(record["inputs"]["fact"])
    await model.consolidate(
        fact, [Neighbour.model_validate(n) for n in record["inputs"]["neighbours"]]
    )
    usage = record["exchanges"][0]["response"]["usage"]
    (row,) = client.metrics.snapshot()["models"]
    assert row["calls"] == 1 and row["invalid"] == 0
    assert row["prompt_tokens"] == usage["prompt_tokens"] > 0
    assert row["completion_tokens"] == usage["completion_tokens"] > 0


async def test_a_refused_answer_is_counted_as_invalid() -> None:
    record = recording("extract_conv26_melanie_json_object")
    model, _ = replay_model(record)
    with pytest.raises(LLMOutputInvalid):
        await run_task(model, "extract_facts", record["inputs"])
    (row,) = model.client.metrics.snapshot()["models"]
    assert row["calls"] == 1 and row["invalid"] == 1 and row["prompt_tokens"] > 0
