"""The LLM-backed :class:`~halldyll_ray.llm.protocol.MemoryModel`: prompts, schemas, checks.

Each task is one chat-completions call through an :class:`~halldyll_ray.llm.transport.LLMClient`
(either door). Answers that must be structured (facts, decisions) are asked for with a JSON
schema in ``response_format`` where the server takes one (``json_schema``), else
``json_object``, else the prompt alone; a server that refuses a mode (400/422) gets the next
one, and the client keeps the mode that worked. Whatever the server claims, every answer is
parsed leniently (code fences, text around the JSON, a bare list) and validated strictly on
our side: the pydantic answer types of :mod:`halldyll_ray.llm.protocol` and
:func:`~halldyll_ray.llm.protocol.checked` for consolidation targets.

Prompts are short and carry one worked example: small instruction-tuned models (the tests'
SmolLM2-135M-Instruct) follow an example far better than a description.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from halldyll_ray.llm.protocol import (
    Action,
    DatedText,
    Decision,
    FactCandidate,
    LLMOutputInvalid,
    Neighbour,
    checked,
)
from halldyll_ray.llm.transport import ChatResponse, LLMClient, LLMRequestRefused
from halldyll_ray.models import MAX_FACT_CHARS, FactKind

log = logging.getLogger(__name__)

StructuredOutput = Literal["json_schema", "json_object", "none"]
_FALLBACK: dict[StructuredOutput, StructuredOutput | None] = {
    "json_schema": "json_object",
    "json_object": "none",
    "none": None,
}
#: Statuses that mean "this server does not take that response_format" (and are tried with
#: the next mode); any other refusal is raised as is.
_FORMAT_REFUSED = frozenset({400, 422})

#: The protocol's limit on facts per extraction.
MAX_FACTS = 20
#: Characters of a statement the schema lets the model write (the product takes up to
#: MAX_FACT_CHARS; a fact worth keeping is a sentence, and a small model that loops fills
#: whatever room the grammar leaves: with 300, SmolLM2-135M ran out of tokens on a LoCoMo
#: session's first nine turns).
STATEMENT_CHARS = min(160, MAX_FACT_CHARS)
REASON_CHARS = 160

T = TypeVar("T")

_EXTRACT_SYSTEM = (
    "You extract facts about one person from a conversation. Each fact is one short "
    "sentence about that person, naming them, stating something the conversation says. "
    "kind is permanent for lasting facts (who they are, what they have, like, do) and "
    "ephemeral for a passing state. Answer in JSON."
)
#: A worked example, sent as an earlier exchange of the chat (small models copy an example's
#: facts into their answer when it is part of the same message).
_EXTRACT_EXAMPLE = (
    "Conversation:\n"
    "Anna: I just adopted a cat named Milo.\n"
    "Ben: Nice! Where do you live now?\n"
    "Anna: In Lyon, I moved there for my job as a nurse. I have a cold today.\n"
    "Facts about Anna:",
    '{"facts": [{"statement": "Anna adopted a cat named Milo.", "kind": "permanent"}, '
    '{"statement": "Anna lives in Lyon.", "kind": "permanent"}, '
    '{"statement": "Anna works as a nurse.", "kind": "permanent"}, '
    '{"statement": "Anna has a cold.", "kind": "ephemeral"}]}',
)
_CONSOLIDATE_SYSTEM = (
    "You keep a memory of facts about a user. Compare a new fact with the stored facts and "
    "choose one action:\n"
    "- add: the new fact is new information (target null)\n"
    "- reinforce: a stored fact already says the same (target: its id)\n"
    "- update: the new fact replaces a stored fact that is out of date (target: its id)\n"
    "- contradict: the new fact says a stored fact is false (target: its id)\n"
    "- ignore: the new fact is not worth keeping (target null)\n"
    "Answer in JSON with action, target and a short reason."
)
_SUMMARY_SYSTEM = (
    "You summarize conversations for a memory. Write plain sentences in the third person: "
    "who did, said or plans what, with names, places and dates. No lists, no preamble."
)
_ROLLUP_SYSTEM = (
    "You merge summaries of several conversations into one summary of the whole period. "
    "Write plain sentences in the third person, oldest events first, keeping names, places "
    "and dates. No lists, no preamble."
)


def _stamp(item: DatedText) -> str:
    if item.start is None:
        return ""
    start = item.start.strftime("%Y-%m-%d %H:%M")
    if item.end is None or item.end == item.start:
        return f"[{start}] "
    return f"[{start} to {item.end.strftime('%Y-%m-%d %H:%M')}] "


def _lines(items: Sequence[DatedText]) -> str:
    return "\n".join(_stamp(item) + item.text.strip() for item in items)


_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.DOTALL)


def parse_json(text: str) -> Any:
    """The JSON value in a model's answer, found leniently: inside a code fence, else the
    longest ``{...}`` or ``[...]`` in the text that parses, with any text around it ignored.

    Raises:
        LLMOutputInvalid: no JSON object or array in the text.
    """
    fenced = [m.group(1) for m in _FENCE.finditer(text)]
    decoder = json.JSONDecoder()
    for candidate in [*fenced, text]:
        best: tuple[int, Any] | None = None
        for start, char in enumerate(candidate):
            if char in "{[":
                try:
                    value, end = decoder.raw_decode(candidate, start)
                except json.JSONDecodeError:
                    continue
                if best is None or end - start > best[0]:
                    best = (end - start, value)
        if best is not None:
            return best[1]
    raise LLMOutputInvalid("the model's answer holds no JSON value", answer=text[:200])


def facts_from_answer(value: Any) -> list[FactCandidate]:
    """Validated, de-duplicated facts (at most :data:`MAX_FACTS`) from a parsed answer.

    Accepts ``{"facts": [...]}`` or a bare list; an item is a statement string or an object
    with ``statement`` (and optionally ``kind``, ``confidence``), validated as a
    :class:`FactCandidate`. Repeats (case and space insensitive) are dropped.

    Raises:
        LLMOutputInvalid: any other shape, or an item that fails validation.
    """
    if isinstance(value, dict) and set(value) == {"facts"}:
        value = value["facts"]
    if not isinstance(value, list):
        raise LLMOutputInvalid('the facts answer is not {"facts": [...]}')
    facts: list[FactCandidate] = []
    seen: set[str] = set()
    for item in value:
        try:
            if isinstance(item, str):
                fact = FactCandidate(statement=item)
            elif isinstance(item, dict):
                fact = FactCandidate.model_validate(item)
            else:
                raise LLMOutputInvalid("a fact is neither a statement nor an object")
        except ValidationError as exc:
            raise LLMOutputInvalid(
                f"a fact fails validation: {exc.errors()[0]['msg']}", fact=str(item)[:200]
            ) from None
        key = _normalised(fact.statement)
        if key not in seen:
            seen.add(key)
            facts.append(fact)
    return facts[:MAX_FACTS]


def decision_from_answer(value: Any, neighbours: Sequence[Neighbour]) -> Decision:
    """A validated, :func:`checked` decision from a parsed answer.

    A ``target`` of ``null``, ``""`` or ``"null"``/``"none"`` reads as no target.

    Raises:
        LLMOutputInvalid: not an object, a field fails validation, or the target is not
        one of ``neighbours`` (or missing where the action needs one, or given where it
        takes none).
    """
    if not isinstance(value, dict):
        raise LLMOutputInvalid("the decision is not a JSON object")
    answer = dict(value)
    target = answer.get("target")
    if isinstance(target, str) and target.strip().casefold() in ("", "null", "none"):
        answer["target"] = None
    try:
        decision = Decision.model_validate(answer)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "decision"
        raise LLMOutputInvalid(f"the decision's {where} fails validation: {error['msg']}") from None
    return checked(decision, neighbours)


def text_within(text: str, max_words: int) -> str:
    """``text`` without fences or a leading label, cut to ``max_words`` words (at the last
    sentence end inside the limit when there is one).

    Raises:
        LLMOutputInvalid: nothing left.
    """
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    body = re.sub(r"^\s*(summary|period summary)\s*:\s*", "", body.strip(), flags=re.I)
    words = body.split()
    if not words:
        raise LLMOutputInvalid("the model answered with an empty summary")
    if len(words) <= max_words:
        return " ".join(words)
    cut = " ".join(words[:max_words])
    end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
    return cut[: end + 1] if end > len(cut) // 2 else cut


def _facts_schema(max_facts: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "facts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "statement": {"type": "string", "maxLength": STATEMENT_CHARS},
                        "kind": {"type": "string", "enum": [k.value for k in FactKind]},
                    },
                    "required": ["statement", "kind"],
                    "additionalProperties": False,
                },
                "maxItems": max_facts,
            }
        },
        "required": ["facts"],
        "additionalProperties": False,
    }


def _decision_schema(neighbours: Sequence[Neighbour]) -> dict[str, Any]:
    """One branch for actions without a target, one whose target is an enum of the ids shown
    (a server that enforces the schema cannot invent an id; we check it anyway)."""
    reason = {"type": "string", "maxLength": REASON_CHARS}
    free = {
        "type": "object",
        "properties": {
            "action": {"type": "string", "enum": [Action.ADD.value, Action.IGNORE.value]},
            "target": {"type": "null"},
            "reason": reason,
        },
        "required": ["action", "target", "reason"],
        "additionalProperties": False,
    }
    if not neighbours:
        return free
    targeted = {
        "type": "object",
        "properties": {
            "action": {
                "type": "string",
                "enum": [Action.REINFORCE.value, Action.UPDATE.value, Action.CONTRADICT.value],
            },
            "target": {"type": "string", "enum": [str(n.id) for n in neighbours]},
            "reason": reason,
        },
        "required": ["action", "target", "reason"],
        "additionalProperties": False,
    }
    return {"anyOf": [free, targeted]}


class LLMMemoryModel:
    """:class:`~halldyll_ray.llm.protocol.MemoryModel` over a chat-completions model.

    Args:
        client: The model behind either door; its model id is this model's ``name``.
        structured_output: The first ``response_format`` mode to try (see module doc).
        temperature: Sampling temperature (0: the most likely answer, reproducible).
        frequency_penalty: Discourages the repeated phrases small models loop on.
        seed: Sent for servers that sample reproducibly from a seed.
        max_facts: Most facts one extraction asks for (at most :data:`MAX_FACTS`).
        extract_tokens: Token budget of an extraction's answer.
        decision_tokens: Token budget of a consolidation decision.
    """

    def __init__(
        self,
        client: LLMClient,
        *,
        structured_output: StructuredOutput = "json_schema",
        temperature: float = 0.0,
        frequency_penalty: float = 0.3,
        seed: int | None = 0,
        max_facts: int = 10,
        extract_tokens: int = 800,
        decision_tokens: int = 200,
    ) -> None:
        if not 1 <= max_facts <= MAX_FACTS:
            raise ValueError(f"max_facts must be between 1 and {MAX_FACTS}")
        self.client = client
        self.name = client.model
        self.structured_output: StructuredOutput = structured_output
        self.temperature = temperature
        self.frequency_penalty = frequency_penalty
        self.seed = seed
        self.max_facts = max_facts
        self.extract_tokens = extract_tokens
        self.decision_tokens = decision_tokens

    def _body(
        self,
        system: str,
        user: str,
        *,
        max_tokens: int,
        example: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        shown = (
            [{"role": "user", "content": example[0]}, {"role": "assistant", "content": example[1]}]
            if example
            else []
        )
        body: dict[str, Any] = {
            "messages": [
                {"role": "system", "content": system},
                *shown,
                {"role": "user", "content": user},
            ],
            "temperature": self.temperature,
            "max_tokens": max_tokens,
        }
        if self.frequency_penalty:
            body["frequency_penalty"] = self.frequency_penalty
        if self.seed is not None:
            body["seed"] = self.seed
        return body

    async def _ask_json(
        self,
        task: str,
        *,
        system: str,
        user: str,
        schema: dict[str, Any],
        parse: Callable[[Any], T],
        max_tokens: int,
        example: tuple[str, str] | None = None,
    ) -> T:
        mode: StructuredOutput | None = self.structured_output
        while mode is not None:
            body = self._body(system, user, max_tokens=max_tokens, example=example)
            if mode == "json_schema":
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": task, "strict": True, "schema": schema},
                }
            else:
                # Without a grammar the schema travels in the prompt.
                body["messages"][-1]["content"] = (
                    f"{user}\n\nAnswer with one JSON value matching this JSON schema, and "
                    f"nothing else:\n{json.dumps(schema, separators=(',', ':'))}"
                )
                if mode == "json_object":
                    body["response_format"] = {"type": "json_object"}
            try:
                answer = await self.client.ask(
                    body, task=task, parse=lambda r: parse(parse_json(_complete(r)))
                )
            except LLMRequestRefused as exc:
                following = _FALLBACK[mode]
                if exc.status not in _FORMAT_REFUSED or following is None:
                    raise
                log.warning(
                    "the LLM server refused response_format %s (%s); trying %s",
                    mode,
                    exc.status,
                    following,
                )
                mode = following
                continue
            if mode != self.structured_output:
                self.structured_output = mode
            return answer
        raise AssertionError("unreachable: the last mode raises")

    async def extract_facts(
        self, messages: Sequence[DatedText], *, speaker: str | None = None
    ) -> list[FactCandidate]:
        """Facts about ``speaker`` (default: the user) stated in ``messages``, oldest first;
        at most 20, validated and without repeats.

        Raises:
            LLMUnavailable: the model could not be reached (retry later).
            LLMOutputInvalid: the answer is not a valid list of facts.
        """
        if not messages:
            return []
        who = speaker or "the user"
        user = f"Conversation:\n{_lines(messages)}\nFacts about {who}:"
        return await self._ask_json(
            "extract_facts",
            system=_EXTRACT_SYSTEM,
            user=user,
            schema=_facts_schema(self.max_facts),
            parse=facts_from_answer,
            max_tokens=self.extract_tokens,
            example=_EXTRACT_EXAMPLE,
        )

    async def consolidate(self, fact: FactCandidate, neighbours: Sequence[Neighbour]) -> Decision:
        """What ``fact`` does to the stored ``neighbours``: a :func:`checked` decision.

        A neighbour whose statement is the fact's own (case and spacing aside) is reinforced
        without asking the model: there is nothing to weigh, and a small model may not see it
        (SmolLM2-135M answered "add" to exactly that, tests/data/llm_recordings).

        Raises:
            LLMUnavailable: the model could not be reached (retry later).
            LLMOutputInvalid: the answer is not a valid decision, or names a fact it was not
                shown.
        """
        key = _normalised(fact.statement)
        for n in neighbours:
            if _normalised(n.statement) == key:
                return Decision(
                    action=Action.REINFORCE, target=n.id, reason="the same statement is stored"
                )
        stored = (
            "\n".join(
                f"- id {n.id}: {n.statement} (confidence {n.confidence:.2f}, "
                f"similarity {n.similarity:.2f})"
                for n in neighbours
            )
            or "(none)"
        )
        user = f"New fact: {fact.statement}\nStored facts:\n{stored}"
        return await self._ask_json(
            "consolidate",
            system=_CONSOLIDATE_SYSTEM,
            user=user,
            schema=_decision_schema(neighbours),
            parse=lambda value: decision_from_answer(value, neighbours),
            max_tokens=self.decision_tokens,
        )

    async def _ask_text(self, task: str, *, system: str, user: str, max_words: int) -> str:
        body = self._body(system, user, max_tokens=max_words * 2 + 32)
        return await self.client.ask(
            body, task=task, parse=lambda r: text_within(r.content, max_words)
        )

    async def summarize(self, messages: Sequence[DatedText], *, max_words: int) -> str:
        """A summary of one session's ``messages`` in at most ``max_words`` words.

        Raises:
            LLMUnavailable: the model could not be reached (retry later).
            LLMOutputInvalid: the model answered with nothing.
        """
        _check_words(max_words)
        user = (
            f"Conversation:\n{_lines(messages)}\n\n"
            f"Summarize this conversation in at most {max_words} words."
        )
        return await self._ask_text(
            "summarize", system=_SUMMARY_SYSTEM, user=user, max_words=max_words
        )

    async def roll_up(self, summaries: Sequence[DatedText], *, max_words: int) -> str:
        """One period summary covering ``summaries`` (oldest first) in at most ``max_words``.

        Raises:
            LLMUnavailable: the model could not be reached (retry later).
            LLMOutputInvalid: the model answered with nothing.
        """
        _check_words(max_words)
        user = (
            f"Summaries:\n{_lines(summaries)}\n\n"
            f"Merge them into one summary of at most {max_words} words."
        )
        return await self._ask_text(
            "roll_up", system=_ROLLUP_SYSTEM, user=user, max_words=max_words
        )


def _complete(response: ChatResponse) -> str:
    """The content of an answer that was not cut at its token budget (a cut JSON answer
    cannot be whole)."""
    if response.finish_reason == "length":
        raise LLMOutputInvalid(
            "the model's answer was cut at its token budget", answer=response.content[:200]
        )
    return response.content


def _normalised(statement: str) -> str:
    return " ".join(statement.casefold().split()).rstrip(".!")


def _check_words(max_words: int) -> None:
    if max_words < 1:
        raise ValueError("max_words must be at least 1")


__all__ = [
    "LLMMemoryModel",
    "decision_from_answer",
    "facts_from_answer",
    "parse_json",
    "text_within",
]
