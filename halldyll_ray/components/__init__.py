"""The engine's components, one per concern, each a small class over the storage it needs.

=================  ==========================================================================
``users``          users, roles and viewer grants (RBAC's data)
``keys``           API keys: create, rotate, revoke, authenticate
``audit``          the append-only audit log: write, record denials and reads, list
``registry``       the AI model registry and model scopes
``embeddings``     embedding generation through the cache (local model or a remote embedder)
``memories``       reading memories, and the row <-> model mapping every component shares
``ingestion``      storing memories, facts and conversations; chunking; updates and deletes
``search``         semantic, full-text and hybrid retrieval, ranking
``context``        the prompt context under a token budget
``agent_loop``     record_turn: session logs, rolling summaries, candidate facts
``operations``     maintenance: expiry, per-user indexes, audit retention
``reembedding``    moving every stored vector to another embedding model, in the background
``events``         the change feed of each user's memories
``jobs``           durable background jobs: queue, workers, retries, status
``learning``       the extract and summarize jobs of turns and conversations, and their handlers
=================  ==========================================================================

None of them imports Ray. :class:`halldyll_ray.engine.MemoryEngine` builds them once the
storage is open and delegates to them; ``docs/architecture.md`` draws the picture.
"""
