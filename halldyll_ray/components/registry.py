"""The AI model registry (SPEC §4.3) and the model scopes that memories and searches take."""

from __future__ import annotations

import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from halldyll_ray import validation
from halldyll_ray.components.audit import write_audit
from halldyll_ray.errors import Conflict, InvalidInput, NotFound, quoted
from halldyll_ray.models import AIModel, ModelKind
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q

#: The longest model name (:meth:`ModelRegistry.register`) or reference a caller may give.
MAX_MODEL_REF_CHARS = 200


@dataclass(frozen=True)
class Scope:
    """A resolved model scope: (model id or None, include the user's shared memories)."""

    model_id: UUID | None
    include_shared: bool


class ModelRegistry:
    """Register, find, list and remove AI models; resolve a model reference to its id."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def register(
        self,
        name: str,
        kind: ModelKind | str,
        *,
        version: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> AIModel:
        """Add an AI model to the registry. Raises Conflict if the name exists, in any
        letter case or Unicode form (the name is stored NFC-normalised: "Café" typed with a
        combining accent is the same name; and compared NFKC-normalised: "ＱＷＥＮ" in
        full-width letters is "Qwen", a name that could not be told apart when read)."""
        if not 1 <= len(validation.text(name, "name").strip()) <= 200:
            raise InvalidInput("model name must be 1-200 characters", field="name")
        name = unicodedata.normalize("NFC", name.strip())
        validation.label(name, "name", max_chars=200)
        if name in (".", ".."):  # a URL path segment normalisation removes
            raise InvalidInput("a model name must not be '.' or '..'", field="name")
        try:
            uuid.UUID(name)
        except ValueError:
            pass
        else:  # a reference that parses as an id is read as one: the name could never be used
            raise InvalidInput(
                "a model name must not be a UUID (models are found by id)", field="name"
            )
        try:
            kind = ModelKind(kind)
        except ValueError:
            allowed = ", ".join(k.value for k in ModelKind)
            raise InvalidInput(f"kind must be one of: {allowed}", field="kind") from None
        if version is not None:
            validation.label(version, "version", max_chars=100)
        try:
            async with self.db.scoped() as conn:
                await conn.execute(q("lock_model_names"))
                if await conn.fetchrow(q("get_model_by_name"), name) is not None:
                    raise Conflict("exists")  # in another case or Unicode form
                row = await conn.fetchrow(
                    *bind(
                        "insert_model",
                        id=uuid.uuid4(),
                        name=name,
                        kind=kind.value,
                        version=version,
                        metadata=validation.metadata(metadata),
                    )
                )
                await write_audit(conn, "model.register", "ai_model", [row["id"]], None)
        except Conflict:
            raise Conflict(f"an AI model named {quoted(name)} is already registered") from None
        return AIModel(**dict(row))

    async def get(self, ref: UUID | str, *, conn: asyncpg.Connection | None = None) -> AIModel:
        """A registered model by id or name; read on ``conn`` when given (a caller inside a
        transaction must not wait for a second pooled connection)."""
        fetchrow = self.db.fetchrow if conn is None else conn.fetchrow
        if not isinstance(ref, UUID):
            ref = validation.text(ref, "model")  # a name with NUL never reaches SQL as one
            if not ref.strip() or len(ref) > MAX_MODEL_REF_CHARS:
                # what the HTTP API refuses with 422 (schemas.ModelName): no name is blank
                # or longer than a registered one can be
                raise InvalidInput(
                    f"model must be 1-{MAX_MODEL_REF_CHARS} characters, not blank", field="model"
                )
        row = None
        if isinstance(ref, UUID) or validation.looks_like_uuid(ref):
            row = await fetchrow(q("get_model_by_id"), validation.parse_uuid(ref, "model"))
        if row is None and isinstance(ref, str):
            row = await fetchrow(q("get_model_by_name"), ref.strip())
        if row is None:
            named = ref if isinstance(ref, UUID) else quoted(ref)
            raise NotFound(f"AI model {named} is not registered", field="model")
        return AIModel(**dict(row))

    async def find(
        self, *, kind: ModelKind | str | None = None, conn: asyncpg.Connection | None = None
    ) -> list[AIModel]:
        """The registered models (of ``kind``), read on ``conn`` when given (an export reads
        them in its snapshot)."""
        fetch = self.db.fetch if conn is None else conn.fetch
        if kind is not None:
            try:
                kind = ModelKind(kind)
            except ValueError:
                raise InvalidInput(f"unknown model kind {quoted(kind)}", field="kind") from None
        rows = await fetch(q("list_models"), None if kind is None else kind.value)
        return [AIModel(**dict(row)) for row in rows]

    async def delete(self, ref: UUID | str) -> None:
        """Remove a model from the registry; Conflict while memories are scoped to it,
        NotFound when it is not registered, a deletion at the same time's included (it was
        looked up, then deleted: each of several deletions at once answered success and
        wrote a ``model.delete`` audit row)."""
        model = await self.get(ref)
        async with self.db.scoped() as conn:
            if await conn.fetchval(q("delete_model"), model.id) is None:
                raise NotFound(f"AI model {quoted(model.name)} is not registered", field="model")
            await write_audit(conn, "model.delete", "ai_model", [model.id], None)

    async def resolve(
        self, ref: UUID | str | None, *, conn: asyncpg.Connection | None = None
    ) -> UUID | None:
        """The id of a model named or identified by ``ref`` (None for "no model").

        Looked up every time (one indexed read): a process-local cache of ids outlived a
        model deleted and registered again through another replica, which then failed
        writes with a misleading Conflict and emptied scoped searches.
        """
        if ref is None:
            return None
        return (await self.get(ref, conn=conn)).id

    async def scope(self, model: UUID | str | None, include_shared: bool) -> Scope:
        include_shared = validation.flag(include_shared, "include_shared")
        return Scope(await self.resolve(model), include_shared)
