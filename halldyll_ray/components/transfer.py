"""Export and import of a user's memories (the format: :mod:`halldyll_ray.portability`).

Export streams from a server-side cursor in one REPEATABLE READ, read-only transaction: the
header's counts and the lines agree, and memory stays flat however many memories the user has
(:data:`EXPORT_BATCH` rows and their messages at a time, fewer once they hold
:data:`EXPORT_BATCH_BYTES`).

Import reads lines as they arrive and works in batches of :data:`IMPORT_BATCH` lines (at
most :data:`IMPORT_BATCH_BYTES` of them, so a file of long lines is not held whole): each
batch is validated, embedded in one call (the encoder's full batches), then written under the
user's lock, each line in its own savepoint so a line the database refuses costs that line
only. Re-importing a file changes nothing: what each exported id became is kept in
``memory_imports`` (migration 0009), so a line imported before is skipped before it is
embedded. Facts merge by the same rules as a store (an equal or near-equal fact is
reinforced). With ``atomic`` the whole file is one transaction, refused whole on any bad line.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import numpy as np

from halldyll_ray import validation
from halldyll_ray.components.audit import write_audit
from halldyll_ray.components.base import (
    CONVERSATION_SOURCE,
    Chunk,
    insert_chunks,
    insert_messages,
    lock_user,
    require_user,
)
from halldyll_ray.components.embeddings import Embeddings, model_of
from halldyll_ray.components.ingestion import Chunker
from halldyll_ray.components.memories import near_duplicate, split, to_record
from halldyll_ray.components.registry import ModelRegistry
from halldyll_ray.config import Settings
from halldyll_ray.errors import HalldyllError, InvalidInput, NotFound, Unavailable, quoted
from halldyll_ray.language import detect_language
from halldyll_ray.models import (
    MAX_FACT_SOURCES,
    MAX_TAGS,
    Conversation,
    Fact,
    FactKind,
    Message,
    MessageRole,
    Summary,
    Transcription,
)
from halldyll_ray.portability import (
    ExportedMemory,
    ExportedUser,
    ExportHeader,
    ImportReport,
    numbered_lines,
    parse_header,
    parse_memory_line,
)
from halldyll_ray.storage.database import Database, translate_errors
from halldyll_ray.storage.sql import bind, q
from halldyll_ray.textproc import article
from halldyll_ray.textproc import fact_key as make_fact_key

#: Memories read from the export cursor at a time (with their conversations' messages).
EXPORT_BATCH = 200
#: Bytes of text (and messages) an export batch stops at: 200 conversations of 1,000 long
#: messages were held, with their lines, in one batch of gigabytes.
EXPORT_BATCH_BYTES = 8 * 1024 * 1024
#: Lines an import validates, embeds and writes together.
IMPORT_BATCH = 128
#: Bytes of lines a batch holds at most (a single longer line is a batch of its own): 128
#: lines of up to MAX_LINE_BYTES each held a whole 1 GiB body, then its parsed models.
IMPORT_BATCH_BYTES = 8 * 1024 * 1024


class _IdTaken(Exception):
    """The id a line asked to keep belongs to a memory that is not the user's."""


@dataclass
class _Line:
    """A valid memory line, ready to write."""

    number: int
    record: ExportedMemory
    model_id: UUID | None
    chunks: list[Chunk]
    vectors: np.ndarray | None = None


def _missing(header: ExportHeader, report: ImportReport) -> int:
    """Memory lines the header announced that the file did not hold (0 for a header without
    counts: a file written by hand)."""
    return max(0, sum(header.memories.values()) - report.lines)


class Transfer:
    """Export a user's memories as NDJSON lines; import such lines."""

    def __init__(
        self, db: Database, embeddings: Embeddings, registry: ModelRegistry, settings: Settings
    ) -> None:
        self.db = db
        self.embeddings = embeddings
        self.registry = registry
        self.settings = settings
        self.chunker = Chunker(embeddings.encoder)

    # ------------------------------------------------------------------ export
    async def export(
        self,
        user_id: UUID | str,
        *,
        request_id: str | None = None,
        actor_id: UUID | None = None,
    ) -> AsyncIterator[bytes]:
        """The user's export, line by line (each ``bytes`` ends with ``\\n``).

        A missing user raises NotFound at the first ``__anext__``, before which the export is
        audited (``memory.export``). The lines come from one snapshot (REPEATABLE READ) read
        through a server-side cursor; the export holds one pooled connection while it streams.
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        request_id = validation.request_id(request_id)
        # Audited before anything leaves, in its own transaction: holding the snapshot's
        # connection while waiting for a second one would deadlock a pool that every
        # connection of is held by an export.
        async with self.db.scoped(user_id) as conn:
            if await conn.fetchrow(q("get_user"), user_id) is None:
                raise NotFound(f"user {user_id} not found")
            await write_audit(
                conn,
                "memory.export",
                "user",
                [user_id],
                user_id,
                actor_id=actor_id,
                request_id=request_id,
            )
        async with self.db.scoped(user_id, readonly=True, snapshot=True) as conn:
            user = await conn.fetchrow(q("get_user"), user_id)
            if user is None:  # erased in between
                raise NotFound(f"user {user_id} not found")
            counts = await conn.fetch(q("export_counts"), user_id)
            # The models' names from the same snapshot as the memories: read before it, a
            # model registered and used in between was exported as no model (shared).
            models = {m.id: m.name for m in await self.registry.find(conn=conn)}
            header = ExportHeader(
                user=ExportedUser(id=user_id, username=user["username"]),
                exported_at=datetime.now(UTC),
                memories={r["type"]: r["memories"] for r in counts},
                messages=sum(r["messages"] for r in counts),
            )
            yield header.model_dump_json().encode() + b"\n"
            batch: list[asyncpg.Record] = []
            held = 0
            async for row in conn.cursor(q("export_memories"), user_id, prefetch=EXPORT_BATCH):
                batch.append(row)
                held += row["text_bytes"]
                if len(batch) == EXPORT_BATCH or held >= EXPORT_BATCH_BYTES:
                    yield await self._export_lines(conn, user_id, batch, models)
                    batch, held = [], 0
            if batch:
                yield await self._export_lines(conn, user_id, batch, models)

    async def _export_lines(
        self,
        conn: asyncpg.Connection,
        user_id: UUID,
        rows: Sequence[asyncpg.Record],
        models: dict[UUID, str],
    ) -> bytes:
        conversations = [r["id"] for r in rows if r["type"] == "conversation"]
        messages: dict[UUID, list[Message]] = {}
        if conversations:
            for m in await conn.fetch(q("export_messages"), user_id, conversations):
                messages.setdefault(m["memory_id"], []).append(
                    Message.model_construct(
                        role=MessageRole(m["role"]),
                        content=m["content"],
                        created_at=m["created_at"],
                        name=m["name"],
                    )
                )
        out = bytearray()
        for row in rows:
            memory = to_record(row).memory
            sources: list[str] = []
            if isinstance(memory, Fact):
                sources = list(row["payload"].get("sources") or [])
            model = None if row["model_id"] is None else models.get(row["model_id"])
            line = ExportedMemory.model_construct(
                id=row["id"],
                memory=memory.model_copy(update={"model": model}),
                messages=messages.get(row["id"], []),
                sources=sources,
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                expires_at=row["expires_at"],
                reinforcement_count=row["reinforcement_count"],
                session_role=row["session_role"],
                valid_from=row["valid_from"],
                valid_to=row["valid_to"],
                superseded_by=row["superseded_by"],
                period=row["period"],
                span_start=row["span_start"],
                span_end=row["span_end"],
            )
            out += line.model_dump_json(exclude_defaults=False).encode() + b"\n"
        return bytes(out)

    # ------------------------------------------------------------------ import
    async def import_lines(
        self,
        user_id: UUID | str,
        chunks: AsyncIterable[bytes | str],
        *,
        atomic: bool = False,
        request_id: str | None = None,
    ) -> ImportReport:
        """Import an export (a stream of byte or text chunks, split into lines here).

        Args:
            user_id: Whose memories the lines become. Ids are kept when the file was exported
                from this same user (a restore); other users' files get new ids.
            chunks: The file, in pieces of any size.
            atomic: All or nothing: one transaction, refused whole if any line is bad.
            request_id: Carried into the audit rows (``memory.import``, one per batch).

        Returns:
            What was created, merged, skipped and refused (by line number).

        Raises:
            InvalidInput: The first line is not an export header of a version this service
                reads; or, with ``atomic``, any line is bad (``fields["report"]`` has the
                report; nothing was stored).
            NotFound: The user does not exist.
        """
        user_id = validation.parse_uuid(user_id, "user_id")
        request_id = validation.request_id(request_id)
        atomic = validation.flag(atomic, "atomic")
        lines = numbered_lines(chunks)
        header: ExportHeader | None = None
        async for number, line in lines:
            header = parse_header(number, line)
            break
        if header is None:
            raise InvalidInput(
                "the import is empty: it needs an export header line", field="format"
            )
        keep_ids = header.user.id == user_id
        # A missing user is a NotFound before any line is read: a file of bad lines only
        # (nothing to write, so no transaction locked the user) was a 200 "committed".
        await require_user(self.db, user_id)
        report = ImportReport(atomic=atomic)
        # Closed facts whose successor may come later in the file: (id here, exported id).
        links: list[tuple[UUID, UUID]] = []
        # Facts written that name a conversation as a source, to re-point once all are in.
        sourced: list[UUID] = []
        # Summaries written with covers, to re-point once all are in: (id here, exported covers).
        covering: list[tuple[UUID, list[UUID]]] = []
        seen: set[UUID] = set()  # the file's memory ids so far: each may appear once
        if atomic:
            async with self.db.scoped(user_id) as conn:
                await lock_user(conn, user_id)
                async for batch in _batches(lines):
                    ready = await self._prepare(user_id, batch, report, seen, keep_ids, conn)
                    if not report.error_count:
                        await self._write(
                            conn,
                            user_id,
                            ready,
                            report,
                            keep_ids,
                            request_id,
                            links,
                            sourced,
                            covering,
                        )
                if not report.error_count:
                    await _link_successors(conn, user_id, links)
                    await _repoint_sources(conn, user_id, sourced)
                    await _repoint_covers(conn, user_id, covering)
                report.missing = _missing(header, report)
                if report.missing and not report.error_count:
                    report.problem(
                        report.lines + 1,
                        f"the file ends {report.missing} memory line(s) short of what its header "
                        "announces: it was cut short",
                        "memories",
                    )
                if report.error_count:
                    report.committed = False
                    report.created, report.merged, report.unchanged = {}, 0, 0
                    raise InvalidInput(
                        f"{report.error_count} line(s) of the import are invalid; nothing was "
                        f"imported (first: line {report.errors[0].line}: "
                        f"{report.errors[0].message})",
                        field=report.errors[0].field,
                        report=report.model_dump(mode="json"),
                    )
            return report
        async for batch in _batches(lines):
            ready = await self._prepare(user_id, batch, report, seen, keep_ids)
            if ready:
                async with self.db.scoped(user_id) as conn:
                    await lock_user(conn, user_id)
                    await self._write(
                        conn, user_id, ready, report, keep_ids, request_id, links, sourced, covering
                    )
        if links or sourced or covering:
            async with self.db.scoped(user_id) as conn:
                await lock_user(conn, user_id)
                await _link_successors(conn, user_id, links)
                await _repoint_sources(conn, user_id, sourced)
                await _repoint_covers(conn, user_id, covering)
        report.missing = _missing(header, report)
        return report

    async def _prepare(
        self,
        user_id: UUID,
        batch: Sequence[tuple[int, bytes]],
        report: ImportReport,
        seen: set[UUID],
        keep_ids: bool,
        conn: asyncpg.Connection | None = None,
    ) -> list[_Line]:
        """Validate, resolve models, skip lines imported before, chunk and embed a batch.
        With ``keep_ids`` (the user's own file) a line whose memory the user still has under
        its id is skipped here too, before it is embedded: restoring a file into the user it
        came from embedded every memory of it, then found each one present and unchanged.

        ``seen``: the file's memory ids so far. A memory id the file already had is a problem
        of its line, here, before a line imported before is told apart: checked at the write,
        it was reported only when both lines fell in one batch of the first import (in two
        batches, or in a second import of the file, the second line passed as "unchanged",
        and an atomic import committed the file). ``conn``: the atomic import's transaction,
        read on instead of the pool (waiting for a second connection while holding one
        deadlocks a pool held by such imports)."""
        report.lines += len(batch)
        parsed: list[_Line] = []
        now = datetime.now(UTC)
        for number, raw in batch:
            try:
                record = parse_memory_line(number, raw)
                if record.id in seen:
                    report.problem(number, f"memory id {record.id} is in the file twice", "id")
                    continue
                seen.add(record.id)
                memory = record.memory
                expires = _expiry(record)
                if expires is not None and expires <= now:
                    report.expired += 1
                    continue
                model_id = await self.registry.resolve(memory.model, conn=conn)
                if isinstance(memory, Transcription) and memory.language is None:
                    language = await asyncio.to_thread(detect_language, memory.text)
                    record.memory = memory.model_copy(update={"language": language})
                parsed.append(_Line(number, record, model_id, []))
            except HalldyllError as exc:
                field = exc.fields.get("field")
                if isinstance(exc, NotFound):
                    field = "memory.model"
                report.problem(number, exc.message, field)
        if not parsed:
            return []
        sources = [p.record.id for p in parsed]
        queries = ["imported_sources", *(["owned_ids"] if keep_ids else [])]
        known: set[UUID] = set()
        for query in queries:
            if conn is None:
                rows = await self.db.fetch(q(query), user_id, sources, user_id=user_id)
            else:
                rows = await conn.fetch(q(query), user_id, sources)
            known.update(r["source_id"] if query == "imported_sources" else r["id"] for r in rows)
        fresh = [p for p in parsed if p.record.id not in known]
        report.unchanged += len(parsed) - len(fresh)
        for item in fresh:
            item.chunks = self._chunks(item.record)
        texts = [c.indexed for item in fresh for c in item.chunks]
        vectors = await self.embeddings.embed(texts) if texts else None
        start = 0
        for item in fresh:
            if vectors is not None:
                item.vectors = vectors[start : start + len(item.chunks)]
            start += len(item.chunks)
        return fresh

    def _chunks(self, record: ExportedMemory) -> list[Chunk]:
        memory = record.memory
        if isinstance(memory, Conversation):
            chunks = self.chunker.of(memory.model_copy(update={"messages": []}))
            for seq, message in enumerate(record.messages):
                chunks += self.chunker.message(seq, message, record.created_at)
            return chunks
        return self.chunker.of(memory)

    async def _write(
        self,
        conn: asyncpg.Connection,
        user_id: UUID,
        lines: Sequence[_Line],
        report: ImportReport,
        keep_ids: bool,
        request_id: str | None,
        links: list[tuple[UUID, UUID]],
        sourced: list[UUID],
        covering: list[tuple[UUID, list[UUID]]],
    ) -> None:
        """Write prepared lines under the user's lock (taken by the caller); the closed facts
        whose successor is to be linked once every line is in go to ``links``, the facts that
        name a conversation as a source (written or merged into) to ``sourced``, the summaries
        written with covers to ``covering``. An id that is taken by a memory not the user's
        gets a new one, as for another user's file (saying "taken" would tell the caller that
        someone has it)."""
        sources = [line.record.id for line in lines]
        mapped = {
            r["source_id"]: r["memory_id"]
            for r in await conn.fetch(q("imported_sources"), user_id, sources)
        }
        present = (
            {r["id"] for r in await conn.fetch(q("owned_ids"), user_id, sources)}
            if keep_ids
            else set()
        )
        created: Counter[str] = Counter()
        written: list[UUID] = []
        new_sources: list[UUID] = []
        new_targets: list[UUID] = []
        for line in lines:
            source = line.record.id
            if source in mapped:
                report.unchanged += 1
                continue
            if source in present:
                report.unchanged += 1
                new_sources.append(source)
                new_targets.append(source)
                continue
            try:
                # The database's refusal of the line (its model deleted since it was resolved,
                # before this lock) is the line's problem too, as the same line's with a model
                # unknown from the start: untranslated, it failed the whole import.
                with translate_errors():
                    async with conn.transaction():  # a savepoint: a refused line costs itself
                        try:
                            target, merged = await self._write_line(
                                conn, user_id, line, source if keep_ids else uuid.uuid4(), mapped
                            )
                        except _IdTaken:  # nothing was written: the insert did nothing
                            target, merged = await self._write_line(
                                conn, user_id, line, uuid.uuid4(), mapped
                            )
            except Unavailable:  # the transaction's, not the line's: nothing is written
                raise
            except HalldyllError as exc:
                field = exc.fields.get("field")
                if isinstance(exc, NotFound) and field == "model":
                    field = "memory.model"  # as _prepare names an unknown model
                report.problem(line.number, exc.message, field)
                continue
            mapped[source] = target
            if line.record.superseded_by is not None and not merged:
                links.append((target, line.record.superseded_by))
            if _conversation_sources(line.record):
                sourced.append(target)
            memory = line.record.memory
            if isinstance(memory, Summary) and memory.covers:
                covering.append((target, list(memory.covers)))
            written.append(target)
            new_sources.append(source)
            new_targets.append(target)
            if merged:
                report.merged += 1
            else:
                created[line.record.memory.type.value] += 1
        if new_sources:
            await conn.execute(q("record_imports"), user_id, new_sources, new_targets)
        for kind, count in created.items():
            report.created[kind] = report.created.get(kind, 0) + count
        if written:
            await write_audit(
                conn,
                "memory.import",
                "memory",
                written,
                user_id,
                request_id=request_id,
                details={"created": dict(created), "lines": len(lines)},
            )

    async def _write_line(
        self,
        conn: asyncpg.Connection,
        user_id: UUID,
        line: _Line,
        memory_id: UUID,
        mapped: dict[UUID, UUID],
    ) -> tuple[UUID, bool]:
        """Write one memory; return (its id here, whether it merged into a stored fact)."""
        record = line.record
        memory = record.memory
        vectors = line.vectors if line.vectors is not None else np.empty((0, 0), np.float32)
        if isinstance(memory, Fact) and record.valid_to is None:  # a closed one is history
            merged = await self._merge_fact(conn, user_id, line, vectors)
            if merged is not None:
                return merged, True
        if isinstance(memory, Summary) and memory.covers:
            # What each covered memory became here (in this batch or an earlier one).
            earlier = {
                r["source_id"]: r["memory_id"]
                for r in await conn.fetch(q("imported_sources"), user_id, list(memory.covers))
            }
            wanted = [mapped.get(c, earlier.get(c, c)) for c in memory.covers]
            owned = {r["id"] for r in await conn.fetch(q("owned_ids"), user_id, wanted)}
            memory = memory.model_copy(update={"covers": [c for c in wanted if c in owned]})
        await _check_unique_roles(conn, user_id, line)
        content, payload = split(memory)
        fact = memory if isinstance(memory, Fact) else None
        if fact is not None:
            payload["sources"] = record.sources or ([fact.source] if fact.source else [])
        row = await conn.fetchrow(
            *bind(
                "import_memory",
                id=memory_id,
                user_id=user_id,
                model_id=line.model_id,
                session_id=memory.session_id,
                type=memory.type.value,
                content=content,
                payload=payload,
                tags=memory.tags,
                metadata=memory.metadata,
                importance=memory.importance,
                fact_key=None if fact is None else make_fact_key(fact.statement),
                confidence=None if fact is None else fact.confidence,
                fact_kind=None if fact is None else fact.kind.value,
                reinforcement_count=record.reinforcement_count,
                expires_at=_expiry(record, self.settings.ephemeral_fact_ttl_days),
                session_role=record.session_role,
                message_count=len(record.messages),
                created_at=record.created_at,
                updated_at=record.updated_at,
                valid_from=record.valid_from if fact is not None else None,
                valid_to=record.valid_to if fact is not None else None,
                period=record.period,
                span_start=record.span_start,
                span_end=record.span_end,
            )
        )
        if row is None:
            if fact is not None and record.valid_to is None:
                # an equal statement was stored in between: reinforce it
                existing = await conn.fetchval(
                    q("fact_by_key"), user_id, line.model_id, make_fact_key(fact.statement)
                )
                if existing is not None:
                    return await self._reinforce(conn, user_id, existing, fact, record), True
            raise _IdTaken
        if isinstance(memory, Conversation) and record.messages:
            await insert_messages(conn, memory_id, 0, record.messages)
        await insert_chunks(conn, row, line.chunks, vectors)
        return memory_id, False

    async def _merge_fact(
        self, conn: asyncpg.Connection, user_id: UUID, line: _Line, vectors: np.ndarray
    ) -> UUID | None:
        """The stored fact this one reinforces (equal or near-equal statement), if any."""
        fact = line.record.memory
        assert isinstance(fact, Fact)
        existing = await conn.fetchval(
            q("fact_by_key"), user_id, line.model_id, make_fact_key(fact.statement)
        )
        if existing is None and len(vectors):
            near = await conn.fetchrow(
                *bind(
                    "nearest_fact",
                    user_id=user_id,
                    model_id=line.model_id,
                    vector=vectors[0],
                    embedding_model=model_of(vectors),
                )
            )
            if near is not None and near_duplicate(
                near, fact.statement, self.settings, self.chunker.encoder
            ):
                existing = near["memory_id"]
        if existing is None:
            return None
        return await self._reinforce(conn, user_id, existing, fact, line.record)

    async def _reinforce(
        self,
        conn: asyncpg.Connection,
        user_id: UUID,
        fact_id: UUID,
        fact: Fact,
        record: ExportedMemory,
    ) -> UUID:
        sources = record.sources or ([fact.source] if fact.source else [])
        row = await conn.fetchrow(
            *bind(
                "reinforce_fact",
                id=fact_id,
                user_id=user_id,
                confidence=fact.confidence,
                fact_kind=fact.kind.value,
                ttl=timedelta(days=self.settings.ephemeral_fact_ttl_days),
                promote_at=self.settings.fact_promotion_confidence,
                tags=fact.tags,
                max_tags=MAX_TAGS,
                max_sources=MAX_FACT_SOURCES,
                sources=sources,
            )
        )
        await conn.execute(q("update_chunk_filters"), fact_id, user_id, row["tags"])
        return fact_id


async def _check_unique_roles(conn: asyncpg.Connection, user_id: UUID, line: _Line) -> None:
    """Refuse a line whose session role or period is held here already (InvalidInput on
    ``session_role`` or ``period``), as the live paths keep them: one log and one rolling
    summary per user and session (``record_turn`` appends to the log, a refresh rewrites the
    summary), one period summary per user, model scope and month (a roll-up rewrites it).

    Held by a memory stored before or by an earlier line of the file: a file that holds two
    logs of one session (two exports put together) contradicts itself. Such a line was
    imported stripped of its role or period, without a word: a session's second log became
    a conversation of its own, and a session's or month's second summary a summary the user
    wrote, which deleting what it covers no longer deletes (only the service's own
    summaries are: their words are the covered memories'). Refused, it is reported, nothing
    is written, and the user decides (without ``session_role`` or ``period`` the line imports
    as a memory of its own)."""
    record, memory = line.record, line.record.memory
    role = record.session_role
    if role is not None and await conn.fetchval(
        q("session_role_taken"), user_id, memory.session_id, role
    ):
        held = "log" if role == "log" else "rolling summary"
        raise InvalidInput(
            f"session {quoted(memory.session_id)} already has its {held} here (stored before, "
            f"or an earlier line of the file): a session has one; without session_role the "
            f"line imports as {article(memory.type.value)} of its own",
            field="session_role",
        )
    if record.period is not None and await conn.fetchval(
        q("period_taken"), user_id, line.model_id, record.period
    ):
        raise InvalidInput(
            f"the summary of {record.period} in this AI model scope is here already (stored "
            "before, or an earlier line of the file): a scope has one a month; without "
            "period the line imports as a summary of its own",
            field="period",
        )


async def _link_successors(
    conn: asyncpg.Connection, user_id: UUID, links: Sequence[tuple[UUID, UUID]]
) -> None:
    """Point imported closed facts at what replaced them, by the exported ids: whatever each
    successor became here (imported, merged, or kept under its id). A successor that was
    not imported leaves its fact closed without a link."""
    sources = list({source for _, source in links})
    here = {
        r["source_id"]: r["memory_id"]
        for r in await conn.fetch(q("imported_sources"), user_id, sources)
    }
    owned = {r["id"] for r in await conn.fetch(q("owned_ids"), user_id, sources)}
    for fact_id, source in links:
        successor = here.get(source, source if source in owned else None)
        if successor is not None and successor != fact_id:
            await conn.execute(q("link_successor"), fact_id, user_id, successor)


async def _repoint_covers(
    conn: asyncpg.Connection, user_id: UUID, summaries: Sequence[tuple[UUID, list[UUID]]]
) -> None:
    """Point imported summaries' covers at what each covered memory became here, once every
    line is in, as successors and conversation sources are: a summary is written with the
    covers already imported, and one that came before what it covers (a file whose lines
    were reordered) lost them. Each exported id names what it became (imported, merged, or
    kept under its id); one the user has no memory of is dropped."""
    if not summaries:
        return
    named = list({c for _, covers in summaries for c in covers})
    here = {
        r["source_id"]: r["memory_id"]
        for r in await conn.fetch(q("imported_sources"), user_id, named)
    }
    wanted = list({here.get(c, c) for c in named})
    owned = {r["id"] for r in await conn.fetch(q("owned_ids"), user_id, wanted)}
    stored = {
        r["id"]: r["covers"]
        for r in await conn.fetch(q("summary_covers"), user_id, [s for s, _ in summaries])
    }
    for summary_id, covers in summaries:
        kept = [str(c) for c in dict.fromkeys(here.get(c, c) for c in covers) if c in owned]
        if summary_id in stored and kept != (stored[summary_id] or []):
            await conn.execute(
                *bind("set_summary_covers", id=summary_id, user_id=user_id, covers=kept)
            )


def _conversation_sources(record: ExportedMemory) -> list[UUID]:
    """The memories a fact line names as its sources (``conversation:<id>``, as the service
    writes the source of a fact learned from a conversation)."""
    memory = record.memory
    if not isinstance(memory, Fact):
        return []
    named = [*record.sources, *([memory.source] if memory.source else [])]
    return [i for i in map(_source_id, named) if i is not None]


def _source_id(source: str | None) -> UUID | None:
    """The memory id in a source ``conversation:<id>``; None for any other source."""
    if not source or not source.startswith(CONVERSATION_SOURCE):
        return None
    try:
        return UUID(source.removeprefix(CONVERSATION_SOURCE))
    except ValueError:
        return None


async def _repoint_sources(conn: asyncpg.Connection, user_id: UUID, facts: Sequence[UUID]) -> None:
    """Re-point the conversation sources of imported facts, as a summary's covers are: each
    ``conversation:<exported id>`` names what that memory became here (imported, or kept
    under its id); one the user has no memory of is dropped (a file that does not hold
    it), so that no fact names another user's memory or one that is gone."""
    if not facts:
        return
    rows = await conn.fetch(q("fact_sources"), user_id, list(dict.fromkeys(facts)))
    named = {
        i
        for row in rows
        for i in map(_source_id, [*(row["sources"] or []), row["source"]])
        if i is not None
    }
    here = {
        r["source_id"]: r["memory_id"]
        for r in await conn.fetch(q("imported_sources"), user_id, list(named))
    }
    owned = {r["id"] for r in await conn.fetch(q("owned_ids"), user_id, list(named))}

    def moved(source: str | None) -> str | None:
        memory_id = _source_id(source)
        if memory_id is None:
            return source
        now = here.get(memory_id, memory_id if memory_id in owned else None)
        return None if now is None else f"{CONVERSATION_SOURCE}{now}"

    for row in rows:
        before = list(row["sources"] or [])
        after = [m for m in map(moved, before) if m is not None]
        source = moved(row["source"])
        if after != before or source != row["source"]:
            await conn.execute(
                *bind(
                    "set_fact_sources", id=row["id"], user_id=user_id, sources=after, source=source
                )
            )


def _expiry(record: ExportedMemory, ttl_days: float | None = None) -> datetime | None:
    """When an imported memory expires: an ephemeral fact at its exported expiry (or, with
    none, ``ttl_days`` from now, as a store sets it); nothing else expires."""
    memory = record.memory
    if not isinstance(memory, Fact) or memory.kind is not FactKind.EPHEMERAL:
        return None
    if record.expires_at is None and ttl_days is not None:
        return datetime.now(UTC) + timedelta(days=ttl_days)
    return record.expires_at


async def _batches(
    lines: AsyncIterator[tuple[int, bytes]],
) -> AsyncIterator[list[tuple[int, bytes]]]:
    """The lines in batches of at most :data:`IMPORT_BATCH` lines and, but for a batch of
    one line, :data:`IMPORT_BATCH_BYTES` bytes."""
    batch: list[tuple[int, bytes]] = []
    size = 0
    async for item in lines:
        if batch and size + len(item[1]) > IMPORT_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += len(item[1])
        if len(batch) == IMPORT_BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
