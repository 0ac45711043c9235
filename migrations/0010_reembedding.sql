-- 0010: moving an installation from one embedding model to another (halldyll_ray.components
-- .reembedding). The vectors searches read stay in memory_chunks.embedding, one typed column
-- with its HNSW index, so an installation that never changes its model searches exactly as
-- before. A re-embedding adds a second column, memory_chunks.embedding_next
-- vector(<new dimension>), fills it in batches while searches keep reading embedding, builds
-- its HNSW index, and swaps the two columns in one short transaction. Being columns of
-- memory_chunks, the new vectors have its row-level security and go with their chunk when a
-- memory or a user is deleted.

-- The dimension the migrations were rendered with, kept apart from embedding_dimension (the
-- size of the vectors searched now) so that later migrations render the same after a switch.
INSERT INTO halldyll_meta (key, value)
VALUES ('migration_embedding_dimension', '{{EMBEDDING_DIMENSION}}')
ON CONFLICT (key) DO NOTHING;

-- The one re-embedding there can be at a time, and its progress (rows embedded / to embed).
CREATE TABLE embedding_jobs (
    id               integer PRIMARY KEY CHECK (id = 1),
    source_model     text NOT NULL,
    target_model     text NOT NULL,
    target_dimension integer NOT NULL CHECK (target_dimension BETWEEN 1 AND 16000),
    target_path      text,
    target_max_seq   integer NOT NULL,
    state            text NOT NULL CHECK (state IN ('embedding', 'indexing', 'complete')),
    total            bigint NOT NULL DEFAULT 0,
    done             bigint NOT NULL DEFAULT 0,
    started_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
GRANT SELECT ON embedding_jobs TO halldyll_app;

-- A search or a chunk write names the model its query or chunk vectors were made with; one
-- made with another model than the one memory_chunks.embedding holds (a process that has not
-- yet seen a switch) is refused with SQLSTATE HL001, which the application turns into a
-- retryable 503. NULL (a database from before this migration that no process has started on
-- yet) accepts every model. The STABLE form is a one-time filter of a search; the VOLATILE
-- one reads the value committed when a chunk insert runs, after it waited for a switch.
CREATE FUNCTION halldyll_embedding_model_is(expected text) RETURNS boolean
    LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    active text := (SELECT value FROM halldyll_meta WHERE key = 'embedding_model_id');
BEGIN
    IF active IS NOT NULL AND expected IS DISTINCT FROM active THEN
        RAISE EXCEPTION 'vectors of embedding model % but the database searches %',
            expected, active USING ERRCODE = 'HL001';
    END IF;
    RETURN true;
END;
$$;

CREATE FUNCTION halldyll_embedding_for_write(expected text, vec vector) RETURNS vector
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    active text := (SELECT value FROM halldyll_meta WHERE key = 'embedding_model_id');
BEGIN
    IF active IS NOT NULL AND expected IS DISTINCT FROM active THEN
        RAISE EXCEPTION 'vectors of embedding model % but the database searches %',
            expected, active USING ERRCODE = 'HL001';
    END IF;
    RETURN vec;
END;
$$;
