-- 0001: the whole first schema.
-- {{EMBEDDING_DIMENSION}} is replaced by the migration runner with the validated integer
-- EMBEDDING_DIMENSION (DDL cannot take bind parameters); nothing else is substituted.

CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- Facts about the installed schema that the application checks at start.
CREATE TABLE halldyll_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO halldyll_meta (key, value) VALUES ('embedding_dimension', '{{EMBEDDING_DIMENSION}}');

CREATE TABLE users (
    id             uuid PRIMARY KEY,
    username       text NOT NULL CHECK (username ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    email          text CHECK (email IS NULL OR length(email) <= 254),
    role           text NOT NULL CHECK (role IN ('admin', 'user', 'service', 'viewer')),
    disabled       boolean NOT NULL DEFAULT false,
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Bumped in the same transaction as every change to the user's memories: cache keys
    -- carry it, so a cached search result can never outlive the data it was computed from.
    memory_version bigint NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_username_key ON users (lower(username));
CREATE UNIQUE INDEX users_email_key ON users (lower(email)) WHERE email IS NOT NULL;

CREATE TABLE ai_models (
    id         uuid PRIMARY KEY,
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    kind       text NOT NULL CHECK (kind IN ('llm', 'vision-language', 'image-generation',
                                             'control', 'face-recognition', 'embedding',
                                             'speech', 'other')),
    version    text,
    metadata   jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX ai_models_name_key ON ai_models (lower(name));

CREATE TABLE memories (
    id                  uuid PRIMARY KEY,
    user_id             uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- NULL: shared by all of the user's models.
    model_id            uuid REFERENCES ai_models (id) ON DELETE RESTRICT,
    session_id          text,
    type                text NOT NULL CHECK (type IN ('conversation', 'fact', 'image',
                                                      'transcription', 'summary')),
    -- The main text: fact statement, image prompt, transcript, summary, conversation title.
    content             text NOT NULL DEFAULT '',
    -- The typed payload (everything of the pydantic model not held in a column).
    payload             jsonb NOT NULL DEFAULT '{}'::jsonb,
    tags                text[] NOT NULL DEFAULT '{}',
    metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
    importance          real NOT NULL DEFAULT 0.5 CHECK (importance BETWEEN 0 AND 1),
    -- Facts: normalised statement hash (exact duplicates), confidence and expiry.
    fact_key            text,
    confidence          real CHECK (confidence IS NULL OR confidence BETWEEN 0 AND 1),
    fact_kind           text CHECK (fact_kind IS NULL OR fact_kind IN ('permanent', 'ephemeral')),
    reinforcement_count integer NOT NULL DEFAULT 0,
    expires_at          timestamptz,
    -- A session's own conversation log / rolling summary (one of each per user and session).
    session_role        text CHECK (session_role IS NULL OR session_role IN ('log', 'summary')),
    message_count       integer NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((type = 'fact') = (fact_key IS NOT NULL))
);
CREATE INDEX memories_user_created ON memories (user_id, created_at DESC, id DESC);
CREATE INDEX memories_user_type_created ON memories (user_id, type, created_at DESC, id DESC);
CREATE INDEX memories_user_session ON memories (user_id, session_id) WHERE session_id IS NOT NULL;
CREATE INDEX memories_expiry ON memories (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX memories_model ON memories (model_id) WHERE model_id IS NOT NULL;
CREATE INDEX memories_tags ON memories USING gin (tags);
-- The same fact stored twice by one user in one scope is one row (upsert target).
CREATE UNIQUE INDEX memories_fact_key ON memories (user_id, model_id, fact_key)
    NULLS NOT DISTINCT WHERE type = 'fact';
CREATE UNIQUE INDEX memories_session_role ON memories (user_id, session_id, session_role)
    WHERE session_role IS NOT NULL;

CREATE TABLE conversation_messages (
    memory_id  uuid NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
    seq        integer NOT NULL,
    role       text NOT NULL CHECK (role IN ('user', 'assistant', 'system', 'tool')),
    name       text,
    content    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (memory_id, seq)
);

-- The searchable parts of memories: one row per message, segment, prompt, statement or text
-- chunk, each with its embedding and text-search vector. Filter columns are copied from the
-- memory so that a filtered vector search reads one table.
CREATE TABLE memory_chunks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    memory_id   uuid NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
    user_id     uuid NOT NULL,
    model_id    uuid,
    session_id  text,
    type        text NOT NULL,
    tags        text[] NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    part        text NOT NULL CHECK (part IN ('message', 'segment', 'prompt', 'statement',
                                              'text', 'title')),
    part_index  integer NOT NULL DEFAULT 0,
    chunk_index integer NOT NULL DEFAULT 0,
    content     text NOT NULL,
    embedding   vector({{EMBEDDING_DIMENSION}}) NOT NULL,
    tsv         tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED,
    UNIQUE (memory_id, part, part_index, chunk_index)
);
CREATE INDEX memory_chunks_user ON memory_chunks (user_id, type);
CREATE INDEX memory_chunks_embedding ON memory_chunks
    USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64);
CREATE INDEX memory_chunks_tsv ON memory_chunks USING gin (tsv);

-- Append-only record of mutations and denied accesses (SPEC §4.1).
CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor_id    uuid,
    acting_for  uuid,
    operation   text NOT NULL,
    target_type text,
    target_ids  text[] NOT NULL DEFAULT '{}',
    outcome     text NOT NULL CHECK (outcome IN ('ok', 'denied', 'error')),
    request_id  text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at ON audit_log (at DESC);
CREATE INDEX audit_log_acting_for ON audit_log (acting_for, at DESC);

CREATE FUNCTION halldyll_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION halldyll_audit_append_only();
