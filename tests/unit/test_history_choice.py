"""The earlier sessions section of a context (pure logic of ``halldyll_ray.context``): how far
back it reaches and how detailed it is in a budget, and that a summary never appears with
one it covers."""

from __future__ import annotations

import uuid

from halldyll_ray import context as ctx


def _count(text: str) -> int:
    return len(text.split())


def _truncate(text: str, limit: int) -> str:
    return " ".join(text.split()[:limit])


def _summary(words: int, covers: frozenset[uuid.UUID] = frozenset()) -> ctx.Candidate:
    memory_id = uuid.uuid4()
    return ctx.Candidate(
        ctx.HISTORY,
        " ".join([str(memory_id)[:8]] + ["w"] * (words - 1)),
        memory_id=memory_id,
        type="summary",
        covers=covers,
    )


def _period(sessions: int, words: int, period_words: int) -> ctx.HistoryUnit:
    members = tuple(_summary(words) for _ in range(sessions))
    collapsed = _summary(period_words, frozenset(m.memory_id for m in members if m.memory_id))
    return ctx.HistoryUnit(collapsed, members)


def _ids(chosen: list[ctx.Candidate]) -> list[uuid.UUID | None]:
    return [c.memory_id for c in chosen]


def test_a_tight_budget_reaches_back_with_periods_and_a_loose_one_shows_sessions() -> None:
    # Three months of three 20-word sessions, each rolled into a 10-word period.
    units = [_period(3, 20, 10) for _ in range(3)]
    header = _count(f"## {ctx.HISTORY}")
    line = _count("[00] x") - 1  # what citing a line adds
    period_cost, session_cost = 10 + line, 20 + line
    # All three periods fit, no expansion does: every month, collapsed.
    tight = header + 3 * period_cost
    assert _ids(ctx.choose_history(units, tight, _count)) == [u.collapsed.memory_id for u in units]
    # Room to expand the newest month only: it is shown as its sessions.
    one = tight + 3 * session_cost - period_cost
    chosen = ctx.choose_history(units, one, _count)
    assert _ids(chosen) == [
        units[0].collapsed.memory_id,
        units[1].collapsed.memory_id,
        *[m.memory_id for m in units[2].expanded],
    ]
    # Everything fits: every session, no period.
    loose = header + 9 * session_cost
    assert _ids(ctx.choose_history(units, loose, _count)) == [
        m.memory_id for u in units for m in u.expanded
    ]
    # Less than every period: the newest ones, the oldest dropped first.
    assert _ids(ctx.choose_history(units, header + 2 * period_cost, _count)) == [
        units[1].collapsed.memory_id,
        units[2].collapsed.memory_id,
    ]
    assert ctx.choose_history(units, header, _count) == []


def test_a_period_too_long_for_the_budget_gives_way_to_its_newest_sessions() -> None:
    units = [_period(2, 10, 10), _period(3, 10, 40)]  # the newest period is long
    header = _count(f"## {ctx.HISTORY}")
    session = 10 + _count("[00] x") - 1
    chosen = ctx.choose_history(units, header + 2 * session, _count)
    assert _ids(chosen) == [m.memory_id for m in units[1].expanded[1:]]  # and nothing older


def test_sessions_no_period_covers_stand_alone() -> None:
    alone = ctx.HistoryUnit(_summary(15))
    units = [_period(2, 20, 10), alone]
    chosen = ctx.choose_history(units, 1000, _count)
    assert _ids(chosen) == [*(m.memory_id for m in units[0].expanded), alone.collapsed.memory_id]


def test_a_period_whose_sessions_are_not_all_known_is_not_expanded() -> None:
    newest = _summary(10)
    assert newest.memory_id is not None
    covers = frozenset({uuid.uuid4(), newest.memory_id})  # one of its two sessions is known
    unit = ctx.HistoryUnit(_summary(20, covers), (newest,), complete=False)
    assert _ids(ctx.choose_history([unit], 1000, _count)) == [unit.collapsed.memory_id]
    # Too long for the budget, it still gives way to the newest sessions it has.
    assert _ids(ctx.choose_history([unit], _count(f"## {ctx.HISTORY}") + 12, _count)) == [
        newest.memory_id
    ]


def test_assemble_never_shows_a_summary_with_one_it_covers() -> None:
    period = _period(3, 20, 10)
    sessions = period.expanded
    # Relevant hits: a covered session ranked first, then the period, then another session.
    relevant = [
        ctx.Candidate(
            ctx.MEMORIES, sessions[0].text, memory_id=sessions[0].memory_id, type="summary"
        ),
        ctx.Candidate(
            ctx.MEMORIES,
            period.collapsed.text,
            memory_id=period.collapsed.memory_id,
            type="summary",
            covers=period.collapsed.covers,
        ),
        ctx.Candidate(
            ctx.MEMORIES, sessions[1].text, memory_id=sessions[1].memory_id, type="summary"
        ),
    ]
    for budget, share in ((60, 0.5), (400, 0.5), (400, 0.0), (40, 0.0)):
        context = ctx.assemble(
            summary=None,
            relevant=relevant,
            recent=[],
            current=None,
            max_tokens=budget,
            count_tokens=_count,
            truncate=_truncate,
            history=[period],
            history_share=share,
        )
        cited = set(context.sources)
        assert not (period.collapsed.memory_id in cited and cited & period.collapsed.covers)
        assert len(context.sources) == len(cited)  # nothing shown twice
        assert context.token_count <= budget
    # With history off, the first hit (a session) keeps its place and the period is left out.
    context = ctx.assemble(
        summary=None,
        relevant=relevant,
        recent=[],
        current=None,
        max_tokens=400,
        count_tokens=_count,
        truncate=_truncate,
    )
    assert context.sources == [sessions[0].memory_id, sessions[1].memory_id]
