"""The prompt context (SPEC §4.5): the most relevant memories under a token budget.

Retrieval comes from :class:`~halldyll_ray.components.search.Search` (hybrid); ranking and
assembly are the pure functions of :mod:`halldyll_ray.context`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

from halldyll_ray import context as ctx
from halldyll_ray import validation
from halldyll_ray.components.ingestion import MESSAGES
from halldyll_ray.components.registry import Scope
from halldyll_ray.components.search import Search
from halldyll_ray.config import Settings
from halldyll_ray.embedding import TextEncoder
from halldyll_ray.errors import InvalidInput
from halldyll_ray.models import (
    MAX_MESSAGES_PER_CALL,
    MAX_QUERY_CHARS,
    MAX_SEARCH_LIMIT,
    Context,
    Conversation,
    Fact,
    Image,
    MatchedPart,
    MemoryType,
    Message,
    SearchMode,
    SearchResult,
    SearchView,
    StoredMemory,
    Summary,
    Transcription,
    visible,
)
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q


def describe(
    stored: StoredMemory, matched: MatchedPart, turns: Sequence[Any] | None = None
) -> tuple[str, str]:
    """One line for a non-fact memory in a context block, and a shorter one to show when
    that one does not fit ("" when there is none).

    ``turns``: for a matched message, the conversation's rows around it (the one before, the
    message, the one after; ``turns_around``), written as ``speaker: text`` in order, the
    date being the message's own. The shorter line is the matched part of the message alone:
    with long turns beside it (or a long message), the whole line passed any budget, and the
    turn that answered was left out of the context.
    """
    day = stored.created_at.date().isoformat()
    payload = stored.memory
    if isinstance(payload, Conversation):
        title = f" '{payload.title}'" if payload.title else ""
        if turns:
            said = next((t for t in turns if t["seq"] == matched.index), turns[0])
            day = said["created_at"].astimezone(UTC).date().isoformat()
            lines = " / ".join(
                f"{ctx.speaker(t['role'], t['name'])}: {t['content']}" for t in turns
            )
            alone = f"{ctx.speaker(said['role'], said['name'])}: {matched.text}"
            return (
                f"({day}, conversation{title}) {lines}",
                f"({day}, conversation{title}) {alone}",
            )
        return f"({day}, conversation{title}) {matched.text}", ""
    if isinstance(payload, Image):
        made = f" by {payload.generator}" if payload.generator else ""
        return f"({day}, image{made}) prompt: {payload.prompt}", ""
    if isinstance(payload, Transcription):
        lang = f", {payload.language}" if payload.language else ""
        return f"({day}, transcription{lang}) {matched.text}", ""
    if isinstance(payload, Summary):
        if stored.period is not None:
            label = f"({stored.period}, summary of {len(payload.covers)} sessions)"
        else:
            label = f"({day}, summary)"
        return f"{label} {payload.text}", f"{label} {matched.text}"
    return f"({day}) {matched.text}", ""


#: Summaries of each kind (session, period) the history section chooses from at most: the
#: newest. Fewer for a smaller section: a line costs at least HISTORY_LINE_TOKENS tokens.
HISTORY_ROWS = 200
HISTORY_LINE_TOKENS = 16


def history_line(row: Any, covers: Sequence[UUID] = ()) -> ctx.Candidate:
    """A session or period summary as a line of the earlier sessions section:
    ``(2025-03, 4 sessions) text`` or ``(2025-03-02, session 'chat-7') text``."""
    text = " / ".join(line.strip() for line in row["content"].splitlines() if line.strip())
    if row["period"] is not None:
        label = f"({row['period']}, {len(covers)} sessions)"
    else:
        label = f"({row['span_start'].astimezone(UTC).date().isoformat()}, session "
        label += f"'{row['session_id']}')"
    return ctx.Candidate(
        ctx.HISTORY,
        f"{label} {text}",
        memory_id=row["id"],
        type="summary",
        created_at=row["span_end"],
        covers=frozenset(covers),
    )


class ContextBuilder:
    """Builds the context block an agent puts in its prompt, never over budget."""

    def __init__(
        self, db: Database, search: Search, encoder: TextEncoder, settings: Settings
    ) -> None:
        self.db = db
        self.search = search
        self.encoder = encoder
        self.settings = settings

    async def build(
        self,
        user_id: UUID | str,
        query: str | None = None,
        *,
        messages: Sequence[Message | dict[str, Any]] | None = None,
        model: UUID | str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        max_tokens: int | None = None,
        limit: int = 30,
    ) -> Context:
        """See :meth:`halldyll_ray.engine.MemoryEngine.build_context`."""
        user_id = validation.parse_uuid(user_id, "user_id")
        given = [] if messages is None else validation.items(messages, "messages")
        if len(given) > MAX_MESSAGES_PER_CALL:
            raise InvalidInput(
                f"give at most {MAX_MESSAGES_PER_CALL} recent messages", field="messages"
            )
        recent = validation.validate(MESSAGES, given, "messages") if given else []
        if query is None:
            query = " ".join(m.content for m in recent[-3:]) if recent else ""
        if not visible(validation.text(query, "query")):
            raise InvalidInput("give a query or recent messages", field="query")
        scope = await self.search.registry.scope(model, include_shared)
        return await self.assemble(
            user_id,
            query[:MAX_QUERY_CHARS],
            recent=[
                ctx.Candidate(
                    ctx.RECENT, f"{ctx.speaker(m.role.value, m.name)}: {m.content}", type="message"
                )
                for m in recent
            ],
            current=None,
            scope=scope,
            session_id=session_id,
            max_tokens=max_tokens,
            limit=limit,
        )

    async def prepare(
        self,
        user_id: UUID | str,
        session_id: str,
        user_message: str,
        *,
        recent_turns: int = 6,
        model: UUID | str | None = None,
        include_shared: bool = True,
        max_tokens: int | None = None,
    ) -> Context:
        """See :meth:`halldyll_ray.engine.MemoryEngine.prepare_context`."""
        user_id = validation.parse_uuid(user_id, "user_id")
        session_id = validation.session_id(session_id) or ""
        if not visible(validation.text(user_message, "user_message")):
            raise InvalidInput("user_message must be a non-empty string", field="user_message")
        # An integer, as over HTTP (StrictInt): True was one turn, 2.5 a LIMIT of 5.0 rows.
        if (
            not isinstance(recent_turns, int)
            or isinstance(recent_turns, bool)
            or not 0 <= recent_turns <= 100
        ):
            raise InvalidInput(
                "recent_turns must be an integer from 0 to 100", field="recent_turns"
            )
        recent: list[ctx.Candidate] = []
        scope = await self.search.registry.scope(model, include_shared)
        log_row = await self._session_row(user_id, session_id, role="log", scope=scope)
        if log_row is not None and recent_turns:
            rows = await self.db.fetch(
                q("recent_messages"), log_row["id"], user_id, recent_turns * 2, user_id=user_id
            )
            recent = [
                ctx.Candidate(
                    ctx.RECENT,
                    f"{ctx.speaker(r['role'], r['name'])}: {r['content']}",
                    type="message",
                )
                for r in rows
            ]
        return await self.assemble(
            user_id,
            user_message[:MAX_QUERY_CHARS],
            recent=recent,
            current=ctx.Candidate(ctx.CURRENT, f"user: {user_message}", type="message"),
            scope=scope,
            session_id=session_id,
            max_tokens=max_tokens,
            limit=30,
            exclude_memory=None if log_row is None else log_row["id"],
        )

    async def _session_row(
        self, user_id: UUID, session_id: str, *, role: str, scope: Scope
    ) -> asyncpg.Record | None:
        """The session's log or summary row, or None; None too when the session is outside
        the context's model scope (a session is one AI model's, or shared: another model's
        context must not show its turns or its summary, as its searches do not)."""
        return await self.db.fetchrow(
            *bind(
                "session_memory_in_scope",
                user_id=user_id,
                session_id=session_id,
                session_role=role,
                model_id=scope.model_id,
                include_shared=scope.include_shared,
            ),
            user_id=user_id,
        )

    async def _turns_around(
        self, user_id: UUID, hits: Sequence[SearchResult]
    ) -> dict[tuple[UUID, int], list[Any]]:
        """For each matched message of a conversation: its row and its neighbours' rows, in
        order. A turn is shown once: a neighbour that is itself a hit is left to its own
        line, and one already shown beside a better-ranked hit is not repeated."""
        matched = [
            (hit.memory.id, hit.matched.index)
            for hit in hits
            if hit.memory.type is MemoryType.CONVERSATION and hit.matched.part == "message"
        ]
        if not matched:
            return {}
        rows = await self.db.fetch(
            *bind(
                "turns_around",
                memory_ids=[m for m, _ in matched],
                seqs=[i for _, i in matched],
                user_id=user_id,
            ),
            user_id=user_id,
        )
        by_seq = {(r["memory_id"], r["seq"]): r for r in rows}
        shown = set(matched)  # hits best first: each keeps its own line
        out: dict[tuple[UUID, int], list[Any]] = {}
        for memory_id, index in matched:
            rows = []
            for seq in (index - 1, index, index + 1):
                if (memory_id, seq) not in by_seq:
                    continue
                if seq != index:
                    if (memory_id, seq) in shown:
                        continue
                    shown.add((memory_id, seq))
                rows.append(by_seq[(memory_id, seq)])
            out[(memory_id, index)] = rows
        return out

    async def _history(
        self,
        user_id: UUID,
        *,
        session_id: str | None,
        scope: Scope,
        current_summary: UUID | None,
        budget: int,
    ) -> list[ctx.HistoryUnit]:
        """The user's earlier sessions in the model scope, oldest first: each period summary
        with the session summaries it covers, and the sessions no period covers; as many of
        the newest as a section of ``budget`` tokens could show."""
        share = self.settings.context_history_share
        rows_wanted = min(HISTORY_ROWS, int(budget * share) // HISTORY_LINE_TOKENS)
        if rows_wanted < 1:
            return []
        rows = await self.db.fetch(
            *bind(
                "history_summaries",
                user_id=user_id,
                session_id=session_id,
                model_id=scope.model_id,
                include_shared=scope.include_shared,
                per_kind=rows_wanted,
            ),
            user_id=user_id,
        )
        sessions = {row["id"]: row for row in rows if row["period"] is None}
        in_periods: set[UUID] = set()
        units: list[tuple[datetime, str, ctx.HistoryUnit]] = []
        for row in rows:
            if row["period"] is None:
                continue
            covers = [UUID(c) for c in row["covers"] or []]
            if current_summary is not None and current_summary in covers:
                continue  # its session is the current one again: the others stand alone
            members = sorted(
                (sessions[c] for c in covers if c in sessions),
                key=lambda m: (m["span_start"], str(m["id"])),
            )
            in_periods.update(m["id"] for m in members)
            unit = ctx.HistoryUnit(
                history_line(row, covers),
                tuple(history_line(m) for m in members),
                complete=len(members) == len(covers),
            )
            units.append((row["span_start"], str(row["id"]), unit))
        for row in sessions.values():
            if row["id"] not in in_periods:
                units.append(
                    (row["span_start"], str(row["id"]), ctx.HistoryUnit(history_line(row)))
                )
        units.sort(key=lambda unit: (unit[0], unit[1]))
        return [unit for _, _, unit in units]

    async def assemble(
        self,
        user_id: UUID,
        query: str,
        *,
        recent: list[ctx.Candidate],
        current: ctx.Candidate | None,
        scope: Scope,
        session_id: str | None,
        max_tokens: int | None,
        limit: int,
        exclude_memory: UUID | None = None,
    ) -> Context:
        """Search, rank and fit the sections of a context block into ``max_tokens``."""
        budget = self.settings.max_context_tokens if max_tokens is None else max_tokens
        if not isinstance(budget, int) or isinstance(budget, bool) or not 16 <= budget <= 1_000_000:
            raise InvalidInput("max_tokens must be between 16 and 1000000", field="max_tokens")
        limit = validation.limit(limit, MAX_SEARCH_LIMIT)  # as a search's: 10,000 was cut
        session_id = validation.session_id(session_id)
        summary_row = None
        if session_id is not None:
            summary_row = await self._session_row(user_id, session_id, role="summary", scope=scope)
        hits = await self.search.search(
            user_id,
            query,
            limit,
            mode=SearchMode.HYBRID,
            model=scope.model_id,
            include_shared=scope.include_shared,
            # A context line shows a transcription's matched segment, never its whole text:
            # a long recording's thousands of segments were read and checked for each hit.
            view=SearchView.BASIC,
        )
        turns = await self._turns_around(user_id, hits)
        now = datetime.now(UTC)
        candidates = []
        # A summary is not shown with a memory it covers (a fact, another summary), but the
        # matched turns of a conversation it summarises stay: the turn is what answers.
        conversations = {h.memory.id for h in hits if h.memory.type is MemoryType.CONVERSATION}
        for hit in hits:
            stored = hit.memory
            if stored.id == exclude_memory or (
                summary_row is not None and stored.id == summary_row["id"]
            ):
                continue  # already in the recent turns / the summary section
            payload = stored.memory
            covers: frozenset[UUID] = frozenset()
            shorter = ""
            if isinstance(payload, Fact):
                section, salience, text = ctx.FACTS, payload.confidence, payload.statement
            else:
                section, salience = ctx.MEMORIES, stored.importance
                text, shorter = describe(
                    stored, hit.matched, turns.get((stored.id, hit.matched.index))
                )
                if isinstance(payload, Summary):
                    covers = frozenset(payload.covers) - conversations
            candidates.append(
                ctx.Candidate(
                    section=section,
                    text=text,
                    memory_id=stored.id,
                    type=stored.type.value,
                    similarity=max(0.0, hit.similarity or 0.0),
                    created_at=stored.created_at,
                    salience=salience,
                    part=f"{hit.matched.part}:{hit.matched.index}",
                    covers=covers,
                    shorter=shorter,
                )
            )
        ranked = ctx.rank(
            candidates,
            now=now,
            weights=self.settings.context_weights,
            half_life_days=self.settings.context_recency_half_life_days,
        )
        summary = None
        if summary_row is not None and summary_row["content"]:
            summary = ctx.Candidate(
                ctx.SUMMARY, summary_row["content"], memory_id=summary_row["id"], type="summary"
            )
        history = await self._history(
            user_id,
            session_id=session_id,
            scope=scope,
            current_summary=None if summary_row is None else summary_row["id"],
            budget=budget,
        )
        return ctx.assemble(
            summary=summary,
            relevant=ranked,
            recent=recent,
            current=current,
            max_tokens=budget,
            count_tokens=self.encoder.count_tokens,
            truncate=self.encoder.truncate_to_tokens,
            history=history,
            history_share=self.settings.context_history_share,
        )
