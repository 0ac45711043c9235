"""The LLM memory model end to end against a real OpenAI-compatible server (tests/llm/conftest).

Built from settings as the product builds it (LLM_PROVIDER=openai), each task must come back
as a validated answer: the model is small (SmolLM2-135M-Instruct), so these tests check the
shape and the checks, not the model's judgement.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
import pytest_asyncio

from examples.local_llm import free_port
from halldyll_ray.config import Settings
from halldyll_ray.llm.client import LLMRequestRefused, memory_model_from_settings
from halldyll_ray.llm.openai_model import LLMMemoryModel
from halldyll_ray.llm.protocol import (
    DatedText,
    Decision,
    FactCandidate,
    LLMUnavailable,
    Neighbour,
)

WHEN = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
MESSAGES = [
    DatedText(text="Ada: I moved to Lisbon last month for a job as a nurse.", start=WHEN),
    DatedText(text="Bo: Nice! Do you still have your dog?", start=WHEN),
    DatedText(text="Ada: Yes, Rex came with me. He loves the beach.", start=WHEN),
]


MakeModel = Callable[..., LLMMemoryModel]


@pytest_asyncio.fixture
async def make_model() -> AsyncIterator[MakeModel]:
    """Memory models built from settings (LLM_PROVIDER=openai), closed after the test."""
    made: list[LLMMemoryModel] = []

    def make(endpoint: tuple[str, str], **settings: object) -> LLMMemoryModel:
        base_url, model_id = endpoint
        model = memory_model_from_settings(
            Settings.from_env(
                llm_provider="openai",
                llm_base_url=base_url,
                llm_model=model_id,
                llm_timeout_s=120,
                **settings,
            )
        )
        assert isinstance(model, LLMMemoryModel)
        made.append(model)
        return model

    yield make
    for model in made:
        await model.client.aclose()


@pytest.fixture
def model(llm_endpoint: tuple[str, str], make_model: MakeModel) -> LLMMemoryModel:
    return make_model(llm_endpoint)


async def test_extract_facts_returns_validated_facts(model: LLMMemoryModel) -> None:
    facts = await model.extract_facts(MESSAGES, speaker="Ada")
    assert facts and len(facts) <= 20
    assert all(isinstance(f, FactCandidate) for f in facts)
    keys = [" ".join(f.statement.casefold().split()) for f in facts]
    assert len(set(keys)) == len(keys)
    (row,) = model.client.metrics.snapshot()["models"]
    assert row["calls"] == 1 and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0


async def test_consolidate_returns_a_checked_decision(model: LLMMemoryModel) -> None:
    shown = [
        Neighbour(id=uuid.uuid4(), statement="Ada lives in Porto.", confidence=0.8, similarity=0.7),
        Neighbour(
            id=uuid.uuid4(), statement="Ada has a dog named Rex.", confidence=0.7, similarity=0.2
        ),
    ]
    decision = await model.consolidate(FactCandidate(statement="Ada lives in Lisbon."), shown)
    assert isinstance(decision, Decision)
    assert decision.target is None or decision.target in {n.id for n in shown}
    alone = await model.consolidate(FactCandidate(statement="Ada likes jazz."), [])
    assert alone.target is None and alone.action.value in ("add", "ignore")


async def test_summarize_and_roll_up_keep_to_their_budget(model: LLMMemoryModel) -> None:
    summary = await model.summarize(MESSAGES, max_words=40)
    assert summary.strip() and len(summary.split()) <= 40
    period = await model.roll_up(
        [
            DatedText(text=summary, start=WHEN),
            DatedText(text="Ada and Bo planned a trip to Sintra.", start=WHEN.replace(month=6)),
        ],
        max_words=50,
    )
    assert period.strip() and len(period.split()) <= 50


async def test_an_unknown_model_is_refused_at_once(
    llm_endpoint: tuple[str, str], make_model: MakeModel
) -> None:
    base_url, _ = llm_endpoint
    model = make_model((base_url, "no-such-model"))
    with pytest.raises(LLMRequestRefused) as caught:
        await model.summarize(MESSAGES, max_words=10)
    assert caught.value.status in (400, 404)
    assert model.client.metrics.snapshot()["models"][0]["unavailable"] == 1


async def test_an_unreachable_server_is_unavailable(make_model: MakeModel) -> None:
    model = make_model((f"http://127.0.0.1:{free_port()}/v1", "m"), llm_max_retries=1)
    with pytest.raises(LLMUnavailable, match="cannot be reached") as caught:
        await model.extract_facts(MESSAGES)
    assert not isinstance(caught.value, LLMRequestRefused)


async def test_the_api_key_is_never_logged(
    llm_endpoint: tuple[str, str], make_model: MakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-never-in-a-log-5f2e9c"
    model = make_model(llm_endpoint, llm_api_key=secret)
    with caplog.at_level(logging.DEBUG):
        await model.summarize(MESSAGES, max_words=10)
        with pytest.raises(LLMRequestRefused):
            await make_model((llm_endpoint[0], "no-such-model"), llm_api_key=secret).summarize(
                MESSAGES, max_words=10
            )
    assert caplog.records and secret not in caplog.text
