"""Context assembly under a token budget: ranking, deduplication, budgeting, rendering.

Pure logic over :class:`Candidate` objects; the engine gathers candidates from storage and
hands them here with a token counter. The output is deterministic for the same inputs: ties
are broken by memory id, sections render in a fixed order, and the text is counted with the
same tokenizer that enforces the budget, so ``token_count <= max_tokens`` always holds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from uuid import UUID

from halldyll_ray.models import Context, ContextItem, ContextSection
from halldyll_ray.textproc import normalize_statement

SUMMARY = "Session summary"
HISTORY = "Earlier sessions"
FACTS = "Relevant facts"
MEMORIES = "Relevant memories"
RECENT = "Recent turns"
CURRENT = "Current message"
SECTION_ORDER = (SUMMARY, HISTORY, FACTS, MEMORIES, RECENT, CURRENT)
_REFERENCED = frozenset({SUMMARY, HISTORY, FACTS, MEMORIES})

#: What every line of an item after its first starts with: only the renderer's own lines
#: (a ``## `` section header, an item's ``[n] `` number or ``role: ``) start at the line's
#: beginning, so a memory's text cannot open a section or cite a source of its own.
CONTINUATION = "    "

#: Largest share of the budget each bounded section may take; relevant facts and memories
#: share what is left after the sections before them in priority order.
SUMMARY_SHARE = 0.25
RECENT_SHARE = 0.35
CURRENT_SHARE = 0.40


@dataclass(frozen=True)
class Candidate:
    """A piece of text that may enter the context."""

    section: str
    text: str
    memory_id: UUID | None = None
    type: str = "text"
    similarity: float = 0.0
    created_at: datetime | None = None
    salience: float = 0.5
    score: float = 0.0
    dedupe_key: str = field(default="")
    #: Which part of the memory the text is ("message:3"): two turns of one conversation
    #: are two candidates, the same turn found twice is one.
    part: str = ""
    #: A period summary's session summaries: a context never shows a summary together with
    #: one it covers (whichever comes first keeps its place).
    covers: frozenset[UUID] = frozenset()
    #: What to show when ``text`` does not fit (a matched turn without the long turns beside
    #: it, or only its matched part): "" for none.
    shorter: str = ""


@dataclass(frozen=True)
class HistoryUnit:
    """One stretch of the user's earlier sessions: a period summary (``collapsed``) with the
    session summaries it covers (``expanded``, oldest first; ``complete`` when they are all
    there, else only its newest ones are), or one session summary on its own (``collapsed``,
    nothing to expand)."""

    collapsed: Candidate
    expanded: tuple[Candidate, ...] = ()
    complete: bool = True


def recency(created_at: datetime | None, now: datetime, half_life_days: float) -> float:
    """1.0 for now, 0.5 after one half-life, and so on; 0.5 when the time is unknown."""
    if created_at is None:
        return 0.5
    age_days = max(0.0, (now - created_at).total_seconds() / 86_400)
    return math.pow(0.5, age_days / half_life_days)


def blend(
    similarity: float,
    recency_value: float,
    salience: float,
    weights: tuple[float, float, float],
) -> float:
    """Weighted mean of similarity, recency and salience (weights need not sum to 1)."""
    total = sum(weights) or 1.0
    w_sim, w_rec, w_sal = weights
    return (w_sim * similarity + w_rec * recency_value + w_sal * salience) / total


def rank(
    candidates: Sequence[Candidate],
    *,
    now: datetime,
    weights: tuple[float, float, float],
    half_life_days: float,
) -> list[Candidate]:
    """Score each candidate, drop duplicates (same memory or same text), best first."""
    scored = []
    for candidate in candidates:
        score = blend(
            candidate.similarity,
            recency(candidate.created_at, now, half_life_days),
            candidate.salience,
            weights,
        )
        scored.append(
            replace(
                candidate,
                score=score,
                dedupe_key=candidate.dedupe_key or normalize_statement(candidate.text),
            )
        )
    scored.sort(key=lambda c: (-c.score, str(c.memory_id), c.text))
    return dedupe(scored)


def dedupe(candidates: Sequence[Candidate], seen: set[str] | None = None) -> list[Candidate]:
    """Keep the first candidate per part of a memory (memory id and part) and per normalised
    text."""
    seen = set() if seen is None else seen
    kept = []
    for candidate in candidates:
        keys = {candidate.dedupe_key or normalize_statement(candidate.text)}
        if candidate.memory_id is not None and candidate.section in (FACTS, MEMORIES, SUMMARY):
            keys.add(f"id:{candidate.memory_id}:{candidate.part}")
        if keys & seen:
            continue
        seen |= keys
        kept.append(candidate)
    return kept


def choose_history(
    units: Sequence[HistoryUnit], limit: int, count_tokens: Callable[[str], int]
) -> list[Candidate]:
    """The earlier sessions to show in ``limit`` tokens (section header included), oldest
    first: as far back as the budget reaches, then as detailed as it allows.

    ``units`` are oldest first. First the newest units are taken collapsed (a period's one
    summary), as many as fit, so the history reaches as far back as it can; a period too
    long for what is left gives way to as many of its newest sessions as fit, and the
    history stops there. Then, newest first, each taken period is expanded into the session
    summaries it covers when they are all known (``complete``) and the whole still fits. A
    period and a session it covers are never both chosen.
    """

    def cost(candidate: Candidate) -> int:
        return count_tokens(f"[00] {candidate.text}")  # as cited: "[n] text"

    used = count_tokens(f"## {HISTORY}")
    taken: list[int] = []  # newest first
    shown: dict[int, list[Candidate]] = {}
    for index in reversed(range(len(units))):
        price = cost(units[index].collapsed)
        if used + price <= limit:
            used += price
            taken.append(index)
            shown[index] = [units[index].collapsed]
            continue
        newest: list[Candidate] = []
        for session in reversed(units[index].expanded):
            if used + cost(session) > limit:
                break
            used += cost(session)
            newest.insert(0, session)
        if newest:
            shown[index] = newest
        break
    for index in taken:
        unit = units[index]
        if not unit.expanded or not unit.complete:
            continue
        extra = sum(cost(c) for c in unit.expanded) - cost(unit.collapsed)
        if used + extra <= limit:
            shown[index] = list(unit.expanded)
            used += extra
    return [candidate for index in sorted(shown) for candidate in shown[index]]


class Budget:
    """Tokens left, with per-section ceilings."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.left = total

    def cap(self, share: float) -> int:
        return min(self.left, int(self.total * share))


def assemble(
    *,
    summary: Candidate | None,
    relevant: Sequence[Candidate],
    recent: Sequence[Candidate],
    current: Candidate | None,
    max_tokens: int,
    count_tokens: Callable[[str], int],
    truncate: Callable[[str, int], str],
    history: Sequence[HistoryUnit] = (),
    history_share: float = 0.0,
) -> Context:
    """Fill the budget in priority order and render the labelled sections.

    Priority: the current message (up to 40 % of the budget, truncated if longer), the session
    summary (25 %, truncated), the recent turns newest first (35 %, whole turns only), the
    earlier sessions (``history_share``, whole summaries only, :func:`choose_history`), then
    the ranked facts and memories (whole items only) in what is left. A summary is never shown
    with one it covers or that covers it (:attr:`Candidate.covers`). Rendering order is fixed:
    summary, earlier sessions, facts, memories, recent turns, current message.
    """
    budget = Budget(max_tokens)
    chosen: dict[str, list[tuple[Candidate, str, int]]] = {name: [] for name in SECTION_ORDER}
    header_cost = {name: count_tokens(f"## {name}") for name in SECTION_ORDER}
    references: list[UUID] = []
    shown: set[UUID] = set()
    covered: set[UUID] = set()

    def render_line(candidate: Candidate, said: str | None = None) -> str:
        text = fence(candidate.text if said is None else said)
        if candidate.section in _REFERENCED and candidate.memory_id is not None:
            if candidate.memory_id in references:
                number = references.index(candidate.memory_id) + 1
            else:
                number = len(references) + 1
            return f"[{number}] {text}"
        return text

    def take(candidate: Candidate, limit: int, *, truncatable: bool) -> bool:
        section = candidate.section
        if candidate.memory_id is not None and (
            candidate.memory_id in covered
            or candidate.covers & shown
            or (candidate.type == "summary" and candidate.memory_id in shown)
        ):
            return False  # in already, or a summary covering it or covered by it is
        header = 0 if chosen[section] else header_cost[section]
        line = render_line(candidate)
        cost = count_tokens(line)
        if header + cost > limit and candidate.shorter:
            line = render_line(candidate, candidate.shorter)
            cost = count_tokens(line)
        if header + cost > limit:
            if not truncatable or limit - header < 4:
                return False
            line = truncate(line, limit - header)
            cost = count_tokens(line)
            if not line.strip() or header + cost > limit:
                return False
        if (
            section in _REFERENCED
            and candidate.memory_id is not None
            and candidate.memory_id not in references
        ):
            references.append(candidate.memory_id)
        chosen[section].append((candidate, line, cost))
        budget.left -= header + cost
        if candidate.memory_id is not None:
            shown.add(candidate.memory_id)
            covered.update(candidate.covers)
        return True

    if current is not None:
        # The message being answered matters most: it may always take 64 tokens (or the
        # whole of a smaller budget), and 40 % of a large one.
        take(current, max(budget.cap(CURRENT_SHARE), min(budget.left, 64)), truncatable=True)
    if summary is not None:
        take(summary, budget.cap(SUMMARY_SHARE), truncatable=True)
    recent_limit = budget.cap(RECENT_SHARE)
    recent_used = 0
    for candidate in reversed(recent):  # newest first
        left_before = budget.left
        if not take(candidate, recent_limit - recent_used, truncatable=False):
            break
        recent_used += left_before - budget.left
    chosen[RECENT].reverse()  # back to chronological order
    if history and history_share > 0:
        history_limit = budget.cap(history_share)
        history_used = 0
        for candidate in choose_history(history, history_limit, count_tokens):
            left_before = budget.left
            if take(candidate, history_limit - history_used, truncatable=False):
                history_used += left_before - budget.left
    for candidate in relevant:
        if budget.left <= 0:
            break
        take(candidate, budget.left, truncatable=False)

    _renumber(chosen, references, count_tokens)
    text, sections = _render(chosen)
    token_count = count_tokens(text) if text else 0
    # Word-piece counts add up across whitespace, so this loop does not run for the default
    # model; it keeps the promise for a tokenizer whose counts are not additive. What it
    # drops leaves the sources, and the citations are numbered again without the gap.
    while token_count > max_tokens:
        for name in (MEMORIES, FACTS, HISTORY, RECENT, SUMMARY, CURRENT):
            if chosen[name]:
                chosen[name].pop(-1 if name != RECENT else 0)
                break
        _renumber(chosen, references, count_tokens)
        text, sections = _render(chosen)
        token_count = count_tokens(text) if text else 0
    return Context(
        text=text,
        token_count=token_count,
        max_tokens=max_tokens,
        sources=list(references),
        sections=sections,
    )


def speaker(role: str, name: str | None) -> str:
    """Who said a turn, as every context writes it: the role, then the speaker's name in
    parentheses (``user (Ada)``), or the role alone.

    The role comes first and is always there: a name is the caller's text, and written in
    place of the role (``name or role``), a user named ``assistant`` or ``system`` read as
    that speaker (``assistant: transfer the money``), and an assistant named ``user`` put its
    words in the user's mouth.
    """
    return f"{role} ({name})" if name else role


def fence(text: str) -> str:
    """``text`` as the lines of one context item: every line after the first indented by
    :data:`CONTINUATION` (blank lines stay empty), every line break (``\\r\\n``, ``\\r``,
    U+2028 ... as :meth:`str.splitlines` reads them) written as ``\\n``.

    A message, fact or summary is the user's text and may hold ``## Relevant facts`` or
    ``[1] ...`` on a line of its own; unfenced, it would read as a section or a cited source
    of the context. Fenced, it stays inside its item: at the start of a line of the block
    there is only what :func:`assemble` writes.
    """
    lines = text.splitlines()
    if len(lines) <= 1 and (not lines or lines[0] == text):
        return text
    return "\n".join([lines[0], *(CONTINUATION + line if line else "" for line in lines[1:])])


def _render(
    chosen: dict[str, list[tuple[Candidate, str, int]]],
) -> tuple[str, list[ContextSection]]:
    sections = []
    lines: list[str] = []
    for name in SECTION_ORDER:
        entries = chosen[name]
        if not entries:
            continue
        if lines:
            lines.append("")
        lines.append(f"## {name}")
        lines.extend(line for _, line, _ in entries)
        sections.append(
            ContextSection(
                name=name,
                items=[
                    ContextItem(
                        memory_id=c.memory_id,
                        type=c.type,
                        text=line,
                        score=round(c.score, 6),
                        tokens=cost,
                    )
                    for c, line, cost in entries
                ],
            )
        )
    return "\n".join(lines), sections


_REF = re.compile(r"^\[(\d+)\] ")


def _renumber(
    chosen: dict[str, list[tuple[Candidate, str, int]]],
    references: list[UUID],
    count_tokens: Callable[[str], int],
) -> None:
    """Number the cited memories in reading order ([1] first) and reorder ``references``."""
    order: list[UUID] = []
    for name in SECTION_ORDER:
        for candidate, _, _ in chosen[name]:
            if (
                name in _REFERENCED
                and candidate.memory_id is not None
                and candidate.memory_id not in order
            ):
                order.append(candidate.memory_id)
    for name in SECTION_ORDER:
        entries = chosen[name]
        for i, (candidate, line, _cost) in enumerate(entries):
            if name not in _REFERENCED or candidate.memory_id is None:
                continue
            new_line = _REF.sub(f"[{order.index(candidate.memory_id) + 1}] ", line, count=1)
            if new_line != line:
                entries[i] = (candidate, new_line, count_tokens(new_line))
    references[:] = order
