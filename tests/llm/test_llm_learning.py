"""Background learning end to end with the real test LLM: the turn is stored at once, then an
``extract`` job asks the model for facts and consolidates them, and a ``summarize`` job has it
write the session summary, each change audited with its job (issue #14).

The model is small (SmolLM2-135M-Instruct), so this checks the path and its records, not
the model's judgement: every fact written came from a validated answer of that model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from halldyll_ray.config import Settings
from halldyll_ray.embedding.encoder import OnnxEncoder
from halldyll_ray.engine import MemoryEngine
from halldyll_ray.models import JobStatus


@pytest_asyncio.fixture(loop_scope="session")
async def learner(
    settings: Settings, encoder: OnnxEncoder, llm_endpoint: tuple[str, str]
) -> AsyncIterator[MemoryEngine]:
    """An engine whose LLM is the test server (MEMORY_EXTRACTION=auto: background), with no
    workers of its own so the test runs the jobs when it chooses."""
    base_url, model_id = llm_endpoint
    configured = Settings.from_env(
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        llm_provider="openai",
        llm_base_url=base_url,
        llm_model=model_id,
        llm_timeout_s=120,
        session_summary_every_n_turns=1,
    )
    engine = MemoryEngine(configured, encoder=encoder, run_jobs=False)
    await engine.initialize()
    yield engine
    await engine.close()


async def test_a_turn_is_learned_by_the_real_model_off_the_write_path(
    learner: MemoryEngine, llm_endpoint: tuple[str, str]
) -> None:
    assert learner.extraction_mode == "background"
    user = await learner.create_user("ada", None, "user")
    record = await learner.record_turn(
        user.id,
        "s1",
        "I moved to Lisbon last month for a job as a nurse. My dog Rex came with me.",
        "That sounds like a big change! How is Rex settling in?",
        user_name="Ada",
    )
    # Returned before any model call: two jobs queued, nothing learned yet.
    assert len(record.job_ids) == 2 and record.fact_ids == [] and record.summary_id is None
    assert (await learner.list_memories(user.id, types=["fact"])).items == []

    assert await learner.run_pending_jobs() == 2
    jobs = {j.kind: j for j in (await learner.list_jobs(user.id)).items}
    assert {k: j.status for k, j in jobs.items()} == {
        "extract": JobStatus.DONE,
        "summarize": JobStatus.DONE,
    }, {k: j.last_error for k, j in jobs.items()}
    _, model_id = llm_endpoint
    extract, summarize = jobs["extract"], jobs["summarize"]
    assert extract.result is not None and extract.result["model"] == model_id
    assert summarize.result is not None and summarize.result["model"] == model_id

    # Every fact the job wrote is listed, audited as learned by that job from that turn.
    facts = {f.id: f.memory for f in (await learner.list_memories(user.id, types=["fact"])).items}
    written = {c["fact_id"] for c in extract.result["changes"] if c["fact_id"] is not None}
    assert {str(i) for i in facts} == written
    audit = await learner.list_audit(user_id=user.id, operation="fact.learn", limit=50)
    assert len(audit) == len([c for c in extract.result["changes"] if c["fact_id"]])
    assert all(r["details"]["job_id"] == str(extract.id) for r in audit)
    assert all(r["details"]["seqs"] == record.message_seqs for r in audit)

    # The session summary is the model's text, written by the summarize job.
    [summary] = (await learner.list_memories(user.id, types=["summary"])).items
    assert str(summary.id) == summarize.result["summary_id"]
    assert summary.memory.text.strip()
