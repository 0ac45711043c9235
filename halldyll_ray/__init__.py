"""halldyll-ray: a multi-user, multi-model memory system for AI agents.

The core (this package minus ``halldyll_ray.serve``) never imports Ray::

    from halldyll_ray import MemoryEngine, Settings

    async with MemoryEngine(Settings.from_env()) as engine:
        user = await engine.create_user("ada", "ada@example.com", "user")
        await engine.store_memory(user.id, Fact(statement="Ada prefers tea"))
        hits = await engine.search(user.id, "what does Ada drink?")
"""

from typing import TYPE_CHECKING, Any

from halldyll_ray.config import Settings
from halldyll_ray.errors import (
    AuthenticationFailed,
    ConfigurationError,
    Conflict,
    HalldyllError,
    InvalidInput,
    MigrationError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from halldyll_ray.models import (
    AIModel,
    Context,
    Conversation,
    ErasureReceipt,
    EventsResync,
    Fact,
    FactKind,
    Image,
    Job,
    JobStatus,
    Memory,
    MemoryEvent,
    MemoryEventKind,
    MemoryType,
    MemoryUpdate,
    Message,
    MessageRole,
    ModelKind,
    Page,
    Role,
    SearchGroup,
    SearchMode,
    SearchResult,
    SearchView,
    Segment,
    StoredMemory,
    Summary,
    Transcription,
    User,
)
from halldyll_ray.portability import ImportReport

if TYPE_CHECKING:
    from halldyll_ray.engine import MemoryEngine

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The engine pulls in asyncpg, numpy and onnxruntime; importing it lazily keeps
    # `halldyll_ray.client` light for agents that only talk HTTP.
    if name == "MemoryEngine":
        from halldyll_ray.engine import MemoryEngine

        return MemoryEngine
    raise AttributeError(f"module 'halldyll_ray' has no attribute {name!r}")


__all__ = [
    "AIModel",
    "AuthenticationFailed",
    "ConfigurationError",
    "Conflict",
    "Context",
    "Conversation",
    "ErasureReceipt",
    "EventsResync",
    "Fact",
    "FactKind",
    "HalldyllError",
    "Image",
    "ImportReport",
    "InvalidInput",
    "Job",
    "JobStatus",
    "Memory",
    "MemoryEngine",
    "MemoryEvent",
    "MemoryEventKind",
    "MemoryType",
    "MemoryUpdate",
    "Message",
    "MessageRole",
    "MigrationError",
    "ModelKind",
    "NotFound",
    "Page",
    "PermissionDenied",
    "Role",
    "SearchGroup",
    "SearchMode",
    "SearchResult",
    "SearchView",
    "Segment",
    "Settings",
    "StoredMemory",
    "Summary",
    "Transcription",
    "Unavailable",
    "User",
]
