-- Re-embedding (halldyll_ray.components.reembedding): the job's state and its batches. The
-- DDL (adding, indexing and swapping memory_chunks.embedding_next) is in the component: it
-- needs the new dimension as a type modifier, which cannot be a bind parameter.

-- name: embedding_model_meta
SELECT key, value FROM halldyll_meta
WHERE key IN ('embedding_model_id', 'embedding_dimension', 'embedding_model_path',
              'embedding_max_seq_length', 'embedding_model_name');

-- name: set_embedding_meta
INSERT INTO halldyll_meta (key, value)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: embedding_job
SELECT * FROM embedding_jobs WHERE id = 1;

-- name: start_embedding_job
INSERT INTO embedding_jobs AS j (id, source_model, target_model, target_dimension, target_path,
                                 target_max_seq, state, total)
VALUES (1, :source_model, :target_model, :target_dimension, :target_path, :target_max_seq,
        'embedding', (SELECT count(*) FROM memory_chunks))
ON CONFLICT (id) DO UPDATE SET
    source_model = excluded.source_model, target_model = excluded.target_model,
    target_dimension = excluded.target_dimension, target_path = excluded.target_path,
    target_max_seq = excluded.target_max_seq, state = 'embedding', total = excluded.total,
    done = 0, started_at = now(), updated_at = now(), finished_at = NULL
RETURNING *;

-- name: next_column_type
SELECT format_type(atttypid, atttypmod) FROM pg_attribute
WHERE attrelid = 'memory_chunks'::regclass AND attname = 'embedding_next' AND NOT attisdropped;

-- name: index_validity
SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1);

-- name: reembed_pending
-- Chunks without a vector of the new model, oldest first (the partial index
-- memory_chunks_pending holds exactly these).
SELECT id, content, label FROM memory_chunks WHERE embedding_next IS NULL ORDER BY id LIMIT $1;

-- name: reembed_lock
-- The chunks of a batch still pending, locked for their new vectors. A row another
-- transaction holds (a delete or rewrite of its memory) is skipped, not waited for: it is
-- gone or still pending afterwards, and the job never waits while holding rows a writer may
-- want next (no lock cycle with a writer, whatever order that writer locks chunks in).
SELECT id FROM memory_chunks WHERE id = ANY($1::bigint[]) AND embedding_next IS NULL
ORDER BY id FOR UPDATE SKIP LOCKED;

-- name: reembed_store
UPDATE memory_chunks SET embedding_next = $2 WHERE id = $1 AND embedding_next IS NULL;

-- name: reembed_progress
UPDATE embedding_jobs SET done = done + $1, total = greatest(total, done + $1), state = $2,
                          updated_at = now()
WHERE id = 1;

-- name: reembed_remaining
SELECT count(*) FROM memory_chunks WHERE embedding_next IS NULL;

-- name: finish_embedding_job
UPDATE embedding_jobs SET state = 'complete', finished_at = now(), updated_at = now()
WHERE id = 1;

-- name: adopt_embedding_meta
-- The first process to start on a database from before 0010 names the model of its vectors
-- (the model configured then); a concurrent one that lost the race reads the winner's.
INSERT INTO halldyll_meta (key, value)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT (key) DO NOTHING;
