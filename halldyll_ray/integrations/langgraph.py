"""LangGraph long-term memory on halldyll-ray: :class:`HalldyllStore`, a LangGraph ``BaseStore``.

A LangGraph agent gets the service as its memory by changing the line that makes its store::

    graph = builder.compile(store=InMemoryStore())
    graph = builder.compile(store=HalldyllStore("http://127.0.0.1:8000", api_key))

Needs the ``langgraph`` extra (``pip install 'halldyll-ray[langgraph]'``); importing this module
without LangGraph raises an ImportError that says so.

How an item is stored
---------------------
One LangGraph item ``(namespace, key) -> value`` is one **summary** memory of the service:

- ``text``: the value as JSON (``json.dumps(value, ensure_ascii=False)``). The service embeds
  and full-text indexes it, as LangGraph's own stores do with ``fields=["$"]``, and it reads
  back exactly: key order, integers and floats, Unicode. At most ``MAX_TEXT_CHARS`` characters.
- ``metadata["langgraph"]``: ``{"namespace": [...labels], "key": key}``, what the item is.
- ``tags``: ``langgraph``; ``langgraph:ns:<digest>`` for every prefix of the namespace;
  ``langgraph:key:<digest>`` for the namespace and key. Digests are the first 32 hex digits of
  SHA-256 over the labels as JSON. The server filters on these tags, so a get or a prefix
  search reads only the memories it needs; the metadata is then checked too. Tags are bounded
  (``MAX_TAGS``), hence namespaces of at most ``MAX_NAMESPACE_DEPTH`` labels.

``put`` of a key that exists updates that memory's text (re-embedded; ``created_at`` stays,
``updated_at`` moves); ``delete`` deletes it. The service has no unique key for an item, so
``put`` of a new key stores the memory and then looks again: when another client put the same
key at the same moment, each put keeps the latest memory (by ``updated_at``, then id) and
deletes the others, and reads meanwhile return the latest.

Namespace mapping
-----------------
Every memory belongs to a user and may be scoped to a registered AI model and to a session.
The store says which, for each item, from its namespace:

- ``user_id`` (default ``"me"``: the API key's user), or ``user_label=i``: the label at
  position ``i`` of the namespace is the user's id (a Service or Admin key acting for many
  users, e.g. ``("users", "<uuid>", "memories")`` with ``user_label=1``);
- ``model`` (a registered model's name or id; default None: shared by all the user's models),
  or ``model_label=i``: the label at position ``i`` names the model (by name, or by id when
  the name has a period, which labels cannot hold);
- ``session_id`` (default None), or ``session_label=i``: the label at position ``i`` is the
  session id.

A namespace shorter than ``model_label`` or ``session_label`` has no model or session. The
scope is part of an item's identity: a store reads only the memories of its scope (for a fixed
None, the memories without a model or session). A search or namespace listing whose prefix
does not reach a label position looks at every model or session; it must reach
``user_label``. The service's other calls see these memories in that scope:
``search(..., session_id=...)``, ``build_context(..., model=...)``.

What differs from LangGraph's in-memory store
---------------------------------------------
- Items are always indexed; ``index`` (of ``put``) is accepted and ignored.
- TTLs are not supported (``supports_ttl`` is False): ``put(..., ttl=...)`` raises
  NotImplementedError, as LangGraph's base class does for such stores.
- A search without ``query`` returns the most recently created items first. A search with
  ``query`` ranks the prefix's items by the service's search (hybrid unless ``search_mode``
  says otherwise, no similarity threshold), and ``SearchItem.score`` is its score; it sees at
  most the ``MAX_SEARCH_LIMIT`` best items, before ``filter`` and ``offset`` apply.
- ``filter`` is applied to the values after they are read, with the semantics of LangGraph's
  stores: equality (JSON types: ``True`` is not ``1``), nested objects, lists, and ``$eq``,
  ``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte`` (numbers numerically, strings
  lexicographically; other types never compare).
- ``list_namespaces`` reads every item under its prefix (one page of ``page_size`` memories
  per request).
- The operations of a ``batch`` run one after another, in order.

Errors are the product's own (:class:`~halldyll_ray.errors.InvalidInput` for a bad value,
namespace depth or filter, before anything is written; the HTTP client's errors otherwise), and
LangGraph's ``InvalidNamespaceError`` for a bad namespace label.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

try:
    from langgraph.store.base import (
        BaseStore,
        GetOp,
        InvalidNamespaceError,
        Item,
        ListNamespacesOp,
        MatchCondition,
        Op,
        PutOp,
        Result,
        SearchItem,
        SearchOp,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "halldyll_ray.integrations.langgraph needs LangGraph: pip install 'halldyll-ray[langgraph]'"
    ) from exc

from halldyll_ray import validation
from halldyll_ray.client import AsyncHalldyllClient, HalldyllClient
from halldyll_ray.errors import HalldyllError, InvalidInput, NotFound, Unavailable, quoted
from halldyll_ray.models import (
    MAX_METADATA_BYTES,
    MAX_SEARCH_LIMIT,
    MAX_TAGS,
    MAX_TEXT_CHARS,
    MemoryType,
    SearchMode,
    StoredMemory,
    check_text,
    json_size,
)

__all__ = [
    "ITEM_TAG",
    "MAX_NAMESPACE_DEPTH",
    "HalldyllStore",
    "check_filter",
    "encode_value",
    "item_tags",
    "key_tag",
    "matches_filter",
    "namespace_tag",
]

#: The tag every LangGraph item carries.
ITEM_TAG = "langgraph"
#: Tags per item: ITEM_TAG, one per namespace prefix, and the key's.
MAX_NAMESPACE_DEPTH = MAX_TAGS - 2
_METADATA_KEY = "langgraph"
_TYPES = [MemoryType.SUMMARY.value]
_OPERATORS = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})
_MAX_PAGE = 500  # the list route's largest page

#: Tries of a put whose item concurrent puts keep deleting before it gives up.
_PUT_TRIES = 5


# --------------------------------------------------------------------------- pure helpers
def _digest(value: Any) -> str:
    encoded = json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


def namespace_tag(prefix: Sequence[str]) -> str:
    """The tag every item under ``prefix`` carries (ITEM_TAG for the empty prefix)."""
    return f"{ITEM_TAG}:ns:{_digest(list(prefix))}" if prefix else ITEM_TAG


def key_tag(namespace: Sequence[str], key: str) -> str:
    """The tag of one item: its namespace and key."""
    return f"{ITEM_TAG}:key:{_digest([list(namespace), key])}"


def item_tags(namespace: Sequence[str], key: str) -> list[str]:
    """All the tags of an item (``2 + len(namespace)``)."""
    prefixes = [namespace_tag(namespace[: depth + 1]) for depth in range(len(namespace))]
    return [ITEM_TAG, *prefixes, key_tag(namespace, key)]


def _check_labels(labels: Sequence[Any]) -> None:
    """LangGraph's rule for namespace labels, for operations given straight to ``batch``."""
    for label in labels:
        if not isinstance(label, str):
            raise InvalidNamespaceError(
                f"namespace labels must be strings, got {type(label).__name__} in {quoted(labels)}"
            )
        if not label or "." in label or "\x00" in label:
            raise InvalidNamespaceError(
                f"namespace label {quoted(label)} in {quoted(labels)} is empty or holds a "
                "period or NUL"
            )


def _check_item_path(namespace: tuple[str, ...], key: str) -> None:
    _check_labels(namespace)
    if not namespace:
        raise InvalidNamespaceError("namespace cannot be empty")
    if len(namespace) > MAX_NAMESPACE_DEPTH:
        raise InvalidInput(
            f"a namespace has at most {MAX_NAMESPACE_DEPTH} labels here, not {len(namespace)}",
            field="namespace",
        )
    if not isinstance(key, str):
        raise InvalidInput(f"key must be a string, not {type(key).__name__}", field="key")
    for text, field in [(key, "key"), *((label, "namespace") for label in namespace)]:
        try:
            check_text(text)
        except ValueError as exc:
            raise InvalidInput(f"{field}: {exc}", field=field) from None


def _metadata(namespace: tuple[str, ...], key: str) -> dict[str, Any]:
    metadata = {_METADATA_KEY: {"namespace": list(namespace), "key": key}}
    size = json_size(metadata)
    if size > MAX_METADATA_BYTES:
        raise InvalidInput(
            f"namespace and key take {size} bytes of JSON; at most {MAX_METADATA_BYTES}",
            field="key",
        )
    return metadata


def encode_value(value: Any) -> str:
    """The stored text of a value: JSON that reads back equal to it.

    Raises:
        InvalidInput: Not a mapping; not JSON (NaN, infinities, objects JSON cannot hold);
            not the same after a JSON round trip (non-string keys, tuples); a lone UTF-16
            surrogate; longer than MAX_TEXT_CHARS characters.
    """
    if not isinstance(value, Mapping):
        raise InvalidInput(
            f"a LangGraph value is a mapping, not {type(value).__name__}", field="value"
        )
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"the value is not JSON: {exc}", field="value") from None
    if json.loads(text) != dict(value):
        raise InvalidInput(
            "the value would not read back the same: use string keys and lists (not tuples)",
            field="value",
        )
    try:
        check_text(text)
    except ValueError as exc:
        raise InvalidInput(f"value: {exc}", field="value") from None
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidInput(
            f"the value is {len(text)} characters of JSON; at most {MAX_TEXT_CHARS}",
            field="value",
        )
    return text


def _identity(memory: StoredMemory) -> tuple[tuple[str, ...], str] | None:
    """The (namespace, key) a memory stores, or None if it is not a LangGraph item."""
    if memory.type is not MemoryType.SUMMARY:
        return None
    meta = memory.metadata.get(_METADATA_KEY)
    if not isinstance(meta, dict):
        return None
    namespace, key = meta.get("namespace"), meta.get("key")
    if not isinstance(key, str) or not isinstance(namespace, list):
        return None
    if not all(isinstance(label, str) for label in namespace):
        return None
    return tuple(namespace), key


def _value(memory: StoredMemory) -> dict[str, Any]:
    try:
        value = json.loads(memory.text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise HalldyllError(
            f"memory {memory.id} is a LangGraph item whose text is not a JSON object "
            "(was it edited through the memories API?)"
        )
    return value


def check_filter(filter: Mapping[str, Any] | None) -> None:
    """Refuse an operator that :func:`matches_filter` does not know (InvalidInput)."""
    stack: list[Any] = [filter or {}]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            for name, child in node.items():
                if isinstance(name, str) and name.startswith("$") and name not in _OPERATORS:
                    raise InvalidInput(
                        f"unsupported filter operator {quoted(name)}: use "
                        + ", ".join(sorted(_OPERATORS)),
                        field="filter",
                    )
                stack.append(child)
        elif isinstance(node, list | tuple):
            stack.extend(node)


def _same(actual: Any, expected: Any) -> bool:
    # JSON types: true is not 1 (Python says it is).
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    return bool(actual == expected)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _order(actual: Any, operator: str, operand: Any) -> bool:
    if not (
        (_is_number(actual) and _is_number(operand))
        or (isinstance(actual, str) and isinstance(operand, str))
    ):
        return False
    if operator == "$gt":
        return bool(actual > operand)
    if operator == "$gte":
        return bool(actual >= operand)
    if operator == "$lt":
        return bool(actual < operand)
    return bool(actual <= operand)


def _compare(actual: Any, expected: Any) -> bool:
    if isinstance(expected, Mapping):
        if any(isinstance(name, str) and name.startswith("$") for name in expected):
            for operator, operand in expected.items():
                if operator == "$eq":
                    ok = _same(actual, operand)
                elif operator == "$ne":
                    ok = not _same(actual, operand)
                else:
                    ok = _order(actual, operator, operand)
                if not ok:
                    return False
            return True
        if not isinstance(actual, Mapping):
            return False
        return all(_compare(actual.get(name), want) for name, want in expected.items())
    if isinstance(expected, list | tuple):
        return (
            isinstance(actual, list | tuple)
            and len(actual) == len(expected)
            and all(_compare(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return _same(actual, expected)


def matches_filter(value: Mapping[str, Any], filter: Mapping[str, Any] | None) -> bool:
    """Whether an item's value passes a LangGraph search filter.

    Each top-level name of ``filter`` must match the value's field of that name: equal JSON
    (objects field by field, lists element by element), or every operator of an operator
    object (``{"$gte": 3, "$lt": 5}``). ``$gt``, ``$gte``, ``$lt``, ``$lte`` compare numbers
    numerically and strings lexicographically; anything else does not match.
    """
    return all(_compare(value.get(name), want) for name, want in (filter or {}).items())


def _does_match(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = tuple(condition.path)
    if len(namespace) < len(path):
        return False
    if condition.match_type == "prefix":
        pairs = zip(namespace, path, strict=False)
    elif condition.match_type == "suffix":
        pairs = zip(reversed(namespace), reversed(path), strict=False)
    else:
        raise InvalidInput(
            f"match_type must be 'prefix' or 'suffix', not {quoted(condition.match_type)}",
            field="match_conditions",
        )
    return all(want == "*" or label == want for label, want in pairs)


# --------------------------------------------------------------------------- scope
@dataclass(frozen=True, slots=True)
class _Scope:
    """Where the memories of a namespace (or of every namespace under a prefix) live.

    ``model``/``session`` None with ``any_*`` False: only memories without one.
    """

    user: str
    model: str | None
    session: str | None
    any_model: bool = False
    any_session: bool = False

    def filters(self) -> dict[str, Any]:
        return {
            "user_id": self.user,
            "model": self.model,
            "include_shared": self.model is None,
            "session_id": self.session,
        }

    def admits(self, memory: StoredMemory) -> bool:
        if self.model is None and not self.any_model and memory.model_id is not None:
            return False
        return not (self.session is None and not self.any_session and memory.session_id)


@dataclass(frozen=True, slots=True)
class _Call:
    """One client method to call, by name: the same on the sync and the async client."""

    method: str
    kwargs: dict[str, Any]


_Steps = Generator[_Call, Any, Any]


def _latest_first(memories: list[StoredMemory]) -> list[StoredMemory]:
    return sorted(memories, key=lambda m: (m.updated_at, m.created_at, str(m.id)), reverse=True)


# --------------------------------------------------------------------------- the store
class HalldyllStore(BaseStore):
    """A LangGraph ``BaseStore`` whose items are memories of a halldyll-ray service.

    Sync (``get``, ``put``, ``search``, ``delete``, ``list_namespaces``, ``batch``) and async
    (``aget``... ``abatch``) calls go through the HTTP clients (``HalldyllClient``,
    ``AsyncHalldyllClient``); the module docstring says how items and namespaces map onto
    memories.

    Args:
        base_url: Root URL of the service, e.g. ``http://127.0.0.1:8000``.
        api_key: The API key the store acts with.
        user_id: Whose memories (``"me"``: the key's user; another user's id for a Service or
            Admin key). Ignored when ``user_label`` is set.
        model: Registered model (name or id) the items are scoped to; None: shared.
        session_id: Session the items belong to; None: none.
        user_label: Position of the namespace label that is the user's id.
        model_label: Position of the namespace label that names the model.
        session_label: Position of the namespace label that is the session id.
        search_mode: ``hybrid``, ``semantic`` or ``fulltext`` for queries; None: the server's.
        page_size: Memories per list request (1-500).
        timeout: Seconds per HTTP request.

    The async client's connections belong to the event loop that first uses them: in async
    code, make the store inside the loop that runs the graph and close it there (``async
    with``), as with any httpx client.

    Raises:
        InvalidInput: A label position is negative or used twice, ``page_size`` is out of
            range, or ``search_mode`` is not one.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        user_id: str = "me",
        model: str | None = None,
        session_id: str | None = None,
        user_label: int | None = None,
        model_label: int | None = None,
        session_label: int | None = None,
        search_mode: SearchMode | str | None = None,
        page_size: int = 200,
        timeout: float = 30,
    ) -> None:
        positions = [p for p in (user_label, model_label, session_label) if p is not None]
        if any(not isinstance(p, int) or isinstance(p, bool) or p < 0 for p in positions):
            raise InvalidInput("label positions are integers >= 0", field="user_label")
        if len(set(positions)) != len(positions):
            raise InvalidInput("user, model and session labels need distinct positions")
        if (
            not isinstance(page_size, int)
            or isinstance(page_size, bool)
            or not (1 <= page_size <= _MAX_PAGE)
        ):
            raise InvalidInput(f"page_size must be 1-{_MAX_PAGE}", field="page_size")
        self._user_id = user_id
        self._model = model
        self._session_id = session_id
        self._user_label = user_label
        self._model_label = model_label
        self._session_label = session_label
        try:
            self._search_mode = None if search_mode is None else SearchMode(search_mode)
        except ValueError:
            raise InvalidInput(
                "search_mode must be hybrid, semantic or fulltext", field="search_mode"
            ) from None
        self._page_size = page_size
        self._client = HalldyllClient(base_url, api_key, timeout=timeout)
        self._aclient = AsyncHalldyllClient(base_url, api_key, timeout=timeout)

    # ----------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close the sync client's connections (use :meth:`aclose` in async code)."""
        self._client.close()

    async def aclose(self) -> None:
        """Close both clients' connections."""
        await self._aclient.aclose()
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ----------------------------------------------------------------------- batches
    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run the operations in order over the sync client; one result per operation."""
        return [self._run(self._steps(op)) for op in ops]

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Run the operations in order over the async client; one result per operation."""
        return [await self._arun(self._steps(op)) for op in ops]

    def _run(self, steps: _Steps) -> Any:
        reply: Any = None
        error: HalldyllError | None = None
        while True:
            try:
                call = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            try:
                reply = getattr(self._client, call.method)(**call.kwargs)
            except HalldyllError as exc:
                error = exc

    async def _arun(self, steps: _Steps) -> Any:
        reply: Any = None
        error: HalldyllError | None = None
        while True:
            try:
                call = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            try:
                reply = await getattr(self._aclient, call.method)(**call.kwargs)
            except HalldyllError as exc:
                error = exc

    # ----------------------------------------------------------------------- operations
    # Each operation is a generator of client calls (sent the replies), shared by both runs.
    def _steps(self, op: Op) -> _Steps:
        if isinstance(op, GetOp):
            return self._get(op)
        if isinstance(op, PutOp):
            return self._put(op)
        if isinstance(op, SearchOp):
            return self._search(op)
        if isinstance(op, ListNamespacesOp):
            return self._list_namespaces(op)
        raise InvalidInput(f"unknown store operation {type(op).__name__}", field="op")

    def _scope(self, labels: Sequence[str | None], *, exact: bool, field: str) -> _Scope:
        """The scope of a namespace (``exact``) or of the namespaces under a prefix whose
        labels are ``labels`` (None: a wildcard)."""

        def at(position: int) -> tuple[str | None, bool]:
            # The label there, and whether it is unknown (past a prefix's end, a wildcard).
            if position < len(labels):
                return labels[position], labels[position] is None
            return None, not exact

        user = self._user_id
        if self._user_label is not None:
            label, _ = at(self._user_label)
            if label is None:
                raise InvalidInput(
                    f"{field} must name the user: label {self._user_label} is the user's id",
                    field=field,
                )
            user = label
        model, any_model = self._model, False
        if self._model_label is not None:
            model, any_model = at(self._model_label)
        session, any_session = self._session_id, False
        if self._session_label is not None:
            session, any_session = at(self._session_label)
        return _Scope(user, model, session, any_model, any_session)

    def _memories(
        self, scope: _Scope, tag: str, *, keep: Any, want: int | None
    ) -> Generator[_Call, Any, list[Any]]:
        """Page through the scope's LangGraph memories with ``tag``, newest first; returns
        ``keep(memory)`` of each that is not None, stopping once ``want`` are kept."""
        kept: list[Any] = []
        cursor: str | None = None
        while True:
            page = yield _Call(
                "list_memories",
                {
                    **scope.filters(),
                    "types": _TYPES,
                    "tags": [tag],
                    "limit": self._page_size,
                    "cursor": cursor,
                },
            )
            for memory in page.items:
                if scope.admits(memory) and (found := keep(memory)) is not None:
                    kept.append(found)
                    if want is not None and len(kept) >= want:
                        return kept
            cursor = page.next_cursor
            if cursor is None:
                return kept

    def _find(self, namespace: tuple[str, ...], key: str) -> Generator[_Call, Any, _Found]:
        _check_item_path(namespace, key)
        scope = self._scope(namespace, exact=True, field="namespace")
        found = yield from self._memories(
            scope,
            key_tag(namespace, key),
            keep=lambda m: m if _identity(m) == (namespace, key) else None,
            want=None,
        )
        return _Found(scope, _latest_first(found))

    def _get(self, op: GetOp) -> _Steps:
        namespace, key = tuple(op.namespace), op.key
        if not namespace:  # LangGraph reads it (nothing is there) but refuses to write it
            _check_labels(namespace)
            return None
        found = yield from self._find(namespace, key)
        if not found.memories:
            return None
        memory = found.memories[0]
        return Item(
            value=_value(memory),
            key=key,
            namespace=namespace,
            created_at=memory.created_at,
            updated_at=memory.updated_at,
        )

    def _put(self, op: PutOp) -> _Steps:
        namespace, key = tuple(op.namespace), op.key
        if op.ttl is not None:
            raise NotImplementedError(
                "TTL is not supported by HalldyllStore: put items with ttl=None"
            )
        if not namespace and op.value is None:  # deleting where nothing can be
            return None
        # Everything is checked before the first request.
        _check_item_path(namespace, key)
        text = None if op.value is None else encode_value(op.value)
        metadata = _metadata(namespace, key)
        found = yield from self._find(namespace, key)
        user = found.scope.user
        stale = found.memories
        if text is not None:
            updated = False
            for _ in range(_PUT_TRIES):
                if not stale:
                    break
                try:
                    yield _Call(
                        "update_memory",
                        {"memory_id": stale[0].id, "update": {"text": text}, "user_id": user},
                    )
                except NotFound:
                    # A concurrent put of this key deleted it, keeping another: find again.
                    stale = (yield from self._find(namespace, key)).memories
                    continue
                stale, updated = stale[1:], True
                break
            else:
                raise Unavailable(f"item {quoted(key)} kept changing under concurrent puts; retry")
            if not updated:
                memory: dict[str, Any] = {
                    "type": MemoryType.SUMMARY.value,
                    "text": text,
                    "tags": item_tags(namespace, key),
                    "metadata": metadata,
                }
                if found.scope.model is not None:
                    memory["model"] = found.scope.model
                if found.scope.session is not None:
                    memory["session_id"] = found.scope.session
                yield _Call("store_memory", {"memory": memory, "user_id": user})
                # Another client may have put the same new key meanwhile: every such put
                # keeps the latest memory only (the same one, whatever the interleaving).
                stale = (yield from self._find(namespace, key)).memories[1:]
        for extra in stale:
            with contextlib.suppress(NotFound):  # deleted meanwhile: the goal holds
                yield _Call("delete_memory", {"memory_id": extra.id, "user_id": user})
        return None

    def _search(self, op: SearchOp) -> _Steps:
        prefix = tuple(op.namespace_prefix)
        _check_labels(prefix)
        check_filter(op.filter)
        # Whole numbers >= 0 (a bool was taken as 0 or 1, "5" was a TypeError).
        validation.count(op.limit, "limit", minimum=0)
        validation.count(op.offset, "offset", minimum=0)
        scope = self._scope(prefix, exact=False, field="namespace_prefix")
        tag = namespace_tag(prefix)
        needed = op.offset + op.limit
        if needed == 0:
            return []

        def read(memory: StoredMemory, score: float | None) -> SearchItem | None:
            identity = _identity(memory)
            if identity is None or identity[0][: len(prefix)] != prefix:
                return None
            value = _value(memory)
            if not matches_filter(value, op.filter):
                return None
            return SearchItem(
                namespace=identity[0],
                key=identity[1],
                value=value,
                created_at=memory.created_at,
                updated_at=memory.updated_at,
                score=score,
            )

        items: list[SearchItem] = []
        if op.query:
            fetch = MAX_SEARCH_LIMIT if op.filter else min(MAX_SEARCH_LIMIT, needed)
            results = yield _Call(
                "search",
                {
                    "query": op.query,
                    **scope.filters(),
                    "limit": fetch,
                    "mode": self._search_mode,
                    "types": _TYPES,
                    "tags": [tag],
                    "threshold": -1.0,  # rank every item of the prefix, as LangGraph does
                    "group": "memory",
                },
            )
            for result in results:
                if scope.admits(result.memory) and (item := read(result.memory, result.score)):
                    items.append(item)
        else:
            items = yield from self._memories(scope, tag, keep=lambda m: read(m, None), want=needed)
        return items[op.offset : needed]

    def _list_namespaces(self, op: ListNamespacesOp) -> _Steps:
        conditions = tuple(op.match_conditions or ())
        for condition in conditions:
            _check_labels(condition.path)
        validation.count(op.limit, "limit", minimum=0)
        validation.count(op.offset, "offset", minimum=0)
        if op.max_depth is not None:
            validation.count(op.max_depth, "max_depth")
        path: tuple[str, ...] = next(
            (tuple(c.path) for c in conditions if c.match_type == "prefix"), ()
        )
        labels = [None if label == "*" else label for label in path]
        scope = self._scope(labels, exact=False, field="prefix")
        concrete: list[str] = []
        for label in labels:
            if label is None:
                break
            concrete.append(label)
        identities = yield from self._memories(
            scope, namespace_tag(concrete), keep=_identity, want=None
        )
        namespaces = {
            namespace
            for namespace, _ in identities
            if all(_does_match(condition, namespace) for condition in conditions)
        }
        if op.max_depth is not None:
            namespaces = {namespace[: op.max_depth] for namespace in namespaces}
        return sorted(namespaces)[op.offset : op.offset + op.limit]


@dataclass(frozen=True, slots=True)
class _Found:
    """The memories that hold one (namespace, key), most recently updated first."""

    scope: _Scope
    memories: list[StoredMemory]
