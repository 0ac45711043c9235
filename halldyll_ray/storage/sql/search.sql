-- Retrieval (halldyll_ray.components.search). Both queries take the same filters by name:
-- types, model_id + include_shared (the model scope), session_id, tags, since, until.

-- name: search_semantic
-- The inner query lets pgvector's iterative index scan (relaxed order) collect enough rows
-- that pass the user's filters; the outer query restores exact distance order.
WITH hits AS MATERIALIZED (
    SELECT c.memory_id, c.part, c.part_index, c.chunk_index, c.content,
           c.embedding <=> :vector AS distance
    FROM memory_chunks c
    WHERE c.user_id = :user_id
      AND (:types::text[] IS NULL OR c.type = ANY(:types))
      AND (:model_id::uuid IS NULL OR c.model_id = :model_id
           OR (:include_shared AND c.model_id IS NULL))
      AND (:session_id::text IS NULL OR c.session_id = :session_id)
      AND (:tags::text[] IS NULL OR c.tags @> :tags)
      AND (:since::timestamptz IS NULL OR c.created_at >= :since)
      AND (:until::timestamptz IS NULL OR c.created_at < :until)
    ORDER BY c.embedding <=> :vector
    LIMIT :fetch
)
SELECT * FROM hits ORDER BY distance, memory_id, part, part_index, chunk_index;

-- name: search_fulltext
-- Any of the query's lexemes may match (OR), ranked by cover density; the text cast to
-- tsquery takes the lexemes as they are, so nothing typed by the caller is parsed as syntax.
-- The query goes through the same halldyll_tsvector() as the index (migration 0006).
WITH q AS (
    SELECT (SELECT string_agg(quote_literal(lexeme), ' | ')
            FROM unnest(tsvector_to_array(halldyll_tsvector(:query))) AS lexeme)::tsquery
           AS query
)
SELECT c.memory_id, c.part, c.part_index, c.chunk_index, c.content,
       ts_rank_cd(c.tsv, q.query, 32) AS rank,
       CASE WHEN :vector::vector IS NULL THEN NULL ELSE 1 - (c.embedding <=> :vector) END
           AS similarity
FROM memory_chunks c, q
WHERE c.user_id = :user_id
  AND q.query IS NOT NULL
  AND c.tsv @@ q.query
  AND (:types::text[] IS NULL OR c.type = ANY(:types))
  AND (:model_id::uuid IS NULL OR c.model_id = :model_id OR (:include_shared AND c.model_id IS NULL))
  AND (:session_id::text IS NULL OR c.session_id = :session_id)
  AND (:tags::text[] IS NULL OR c.tags @> :tags)
  AND (:since::timestamptz IS NULL OR c.created_at >= :since)
  AND (:until::timestamptz IS NULL OR c.created_at < :until)
ORDER BY rank DESC, c.memory_id, c.part, c.part_index, c.chunk_index
LIMIT :fetch;
