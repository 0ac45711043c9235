-- Memories, facts and their chunks (halldyll_ray.components.ingestion, .memories).
-- Every memory query carries the user id in its WHERE clause. The lock order is in users.sql.
-- A write sets a memory's updated_at to greatest(now(), created_at), here and in every file:
-- an import keeps a memory's exported times, which can be ahead of this clock (year 9999 is a
-- time), and an updated_at before its created_at made the user's next export a file that no
-- import takes ("updated_at is before created_at").

-- name: insert_memory
INSERT INTO memories (id, user_id, model_id, session_id, type, content, payload, tags, metadata,
                      importance, session_role)
VALUES (:id, :user_id, :model_id, :session_id, :type, :content, :payload::jsonb, :tags,
        :metadata::jsonb, :importance, :session_role)
RETURNING *;

-- name: set_message_count
UPDATE memories SET message_count = $3 WHERE id = $1 AND user_id = $2 RETURNING *;

-- name: insert_memories
-- The non-fact memories of a bulk store in one statement (insert_memory, row by row):
-- parallel arrays; tags, payload and metadata as JSON text, one per memory (unnest cannot
-- take ragged arrays, and a list of lists would be read as a two-dimensional array).
INSERT INTO memories (id, user_id, model_id, session_id, type, content, payload, tags, metadata,
                      importance, message_count)
SELECT r.id, :user_id, r.model_id, r.session_id, r.type, r.content, r.payload::jsonb,
       ARRAY(SELECT jsonb_array_elements_text(r.tags::jsonb)), r.metadata::jsonb, r.importance,
       r.message_count
FROM unnest(:ids::uuid[], :model_ids::uuid[], :session_ids::text[], :types::text[],
            :contents::text[], :payloads::text[], :tags::text[], :metadata::text[],
            :importances::double precision[], :message_counts::integer[]) WITH ORDINALITY
         AS r (id, model_id, session_id, type, content, payload, tags, metadata, importance,
               message_count, n)
ORDER BY r.n
RETURNING *;

-- name: upsert_fact
-- Storing a fact that exists (same user, same model scope, same normalised statement)
-- reinforces it: confidence rises by halldyll_reinforced_confidence (migration 0004), expiry
-- moves back, and an ephemeral fact that reaches the promotion confidence becomes permanent.
-- Only open facts conflict (migration 0012): a closed statement said again is a new fact.
-- valid_from NULL: valid since stored (created_at).
INSERT INTO memories AS m (id, user_id, model_id, session_id, type, content, payload, tags,
                           metadata, importance, fact_key, confidence, fact_kind, expires_at,
                           valid_from)
VALUES (:id, :user_id, :model_id, :session_id, 'fact', :content, :payload::jsonb, :tags,
        :metadata::jsonb, :importance, :fact_key, :confidence, :fact_kind, :expires_at,
        :valid_from)
ON CONFLICT (user_id, model_id, fact_key) WHERE type = 'fact' AND valid_to IS NULL
DO UPDATE SET
    confidence = least(1.0, halldyll_reinforced_confidence(m.confidence, excluded.confidence)),
    fact_kind = CASE
        WHEN m.fact_kind = 'permanent' OR excluded.fact_kind = 'permanent'
          OR halldyll_reinforced_confidence(m.confidence, excluded.confidence) >= :promote_at
        THEN 'permanent' ELSE 'ephemeral' END,
    expires_at = CASE
        WHEN m.fact_kind = 'permanent' OR excluded.fact_kind = 'permanent'
          OR halldyll_reinforced_confidence(m.confidence, excluded.confidence) >= :promote_at
        THEN NULL ELSE now() + :ttl::interval END,
    reinforcement_count = m.reinforcement_count + 1,
    importance = greatest(m.importance, excluded.importance),
    -- The fact keeps its tags and gains the new ones while it has room (:max_tags, MAX_TAGS):
    -- an unbounded union stored 64 tags, and the fact could no longer be read.
    tags = (SELECT coalesce(array_agg(t ORDER BY t), '{}') FROM (
                SELECT unnest(m.tags) AS t
                UNION
                (SELECT DISTINCT t FROM unnest(excluded.tags) AS t
                 WHERE t <> ALL(m.tags) ORDER BY t
                 LIMIT greatest(0, :max_tags - cardinality(m.tags)))) AS kept),
    -- The newest :max_sources (MAX_FACT_SOURCES) sources, oldest first: appended without
    -- bound, a fact said 10,001 times exported a line that no import would read.
    payload = jsonb_set(m.payload, '{sources}', (
        SELECT coalesce(jsonb_agg(s ORDER BY n), '[]'::jsonb) FROM (
            SELECT s, n FROM jsonb_array_elements(
                coalesce(m.payload -> 'sources', '[]'::jsonb)
                || coalesce(excluded.payload -> 'sources', '[]'::jsonb)) WITH ORDINALITY AS e (s, n)
            ORDER BY n DESC LIMIT :max_sources) AS kept)),
    updated_at = greatest(now(), m.created_at)
RETURNING *, (xmax <> 0) AS reinforced;

-- name: reinforce_fact
-- Merge a near-duplicate into an existing fact (same rule as upsert_fact).
UPDATE memories AS m SET
    confidence = least(1.0, halldyll_reinforced_confidence(m.confidence, :confidence)),
    fact_kind = CASE
        WHEN m.fact_kind = 'permanent' OR :fact_kind = 'permanent'
          OR halldyll_reinforced_confidence(m.confidence, :confidence) >= :promote_at
        THEN 'permanent' ELSE 'ephemeral' END,
    expires_at = CASE
        WHEN m.fact_kind = 'permanent' OR :fact_kind = 'permanent'
          OR halldyll_reinforced_confidence(m.confidence, :confidence) >= :promote_at
        THEN NULL ELSE now() + :ttl::interval END,
    reinforcement_count = m.reinforcement_count + 1,
    tags = (SELECT coalesce(array_agg(t ORDER BY t), '{}') FROM (
                SELECT unnest(m.tags) AS t
                UNION
                (SELECT DISTINCT t FROM unnest(:tags::text[]) AS t
                 WHERE t <> ALL(m.tags) ORDER BY t
                 LIMIT greatest(0, :max_tags - cardinality(m.tags)))) AS kept),
    payload = jsonb_set(m.payload, '{sources}', (
        SELECT coalesce(jsonb_agg(s ORDER BY n), '[]'::jsonb) FROM (
            SELECT s, n FROM jsonb_array_elements(
                coalesce(m.payload -> 'sources', '[]'::jsonb) || :sources::jsonb)
                WITH ORDINALITY AS e (s, n)
            ORDER BY n DESC LIMIT :max_sources) AS kept)),
    updated_at = greatest(now(), m.created_at)
WHERE m.id = :id AND m.user_id = :user_id AND m.type = 'fact' AND m.valid_to IS NULL
RETURNING *, true AS reinforced;

-- name: nearest_fact
-- The closest open fact of the same user and the same model scope.
SELECT c.memory_id, c.content, 1 - (c.embedding <=> :vector) AS similarity
FROM memory_chunks c
JOIN memories m ON m.id = c.memory_id
WHERE c.user_id = :user_id AND c.type = 'fact' AND c.valid_to IS NULL
  AND c.model_id IS NOT DISTINCT FROM :model_id
  AND halldyll_embedding_model_is(:embedding_model)
  AND (m.expires_at IS NULL OR m.expires_at > now())
ORDER BY c.embedding <=> :vector
LIMIT 1;

-- name: get_memory
SELECT * FROM memories WHERE id = $1 AND user_id = $2;

-- name: get_memories
SELECT * FROM memories WHERE user_id = $1 AND id = ANY($2::uuid[]);

-- name: get_memories_basic
-- get_memories for search hits in the basic view (SearchView): a transcription's text and
-- segments are not read (its content is not detoasted; its payload loses the segments here,
-- before it is sent).
SELECT id, user_id, model_id, session_id, type, tags, metadata, importance, confidence,
       fact_kind, reinforcement_count, expires_at, message_count, created_at, updated_at,
       valid_from, valid_to, superseded_by, period,
       CASE WHEN type = 'transcription' THEN '' ELSE content END AS content,
       CASE WHEN type = 'transcription' THEN payload - 'segments' ELSE payload END AS payload
FROM memories WHERE user_id = $1 AND id = ANY($2::uuid[]);

-- name: count_owned
SELECT count(*) FROM memories WHERE user_id = $1 AND id = ANY($2::uuid[]);

-- name: list_memories
-- A page of the user's memories, newest first, with each row's record_bytes: its text and
-- payload as stored (a payload TOAST compressed counts compressed). The rows past
-- :max_bytes (the ones that start after the page's rows add up to more) come without their
-- content and payload: read to know there are more, never detoasted nor sent
-- (MemoryReader.page ends the page before them).
SELECT id, user_id, model_id, session_id, type, tags, metadata, importance, confidence,
       fact_kind, reinforcement_count, expires_at, message_count, created_at, updated_at,
       valid_from, valid_to, superseded_by, period, record_bytes,
       CASE WHEN before_bytes <= :max_bytes THEN content END AS content,
       CASE WHEN before_bytes <= :max_bytes THEN payload END AS payload
FROM (
    SELECT m.*,
           octet_length(m.content) + pg_column_size(m.payload) AS record_bytes,
           coalesce(sum(octet_length(m.content) + pg_column_size(m.payload)) OVER (
               ORDER BY m.created_at DESC, m.id DESC
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before_bytes
    FROM memories m
    WHERE m.user_id = :user_id
      AND (:types::text[] IS NULL OR m.type = ANY(:types))
      AND (:model_id::uuid IS NULL OR m.model_id = :model_id
           OR (:include_shared AND m.model_id IS NULL))
      AND (:session_id::text IS NULL OR m.session_id = :session_id)
      AND (:tags::text[] IS NULL OR m.tags @> :tags)
      AND (:since::timestamptz IS NULL OR m.created_at >= :since)
      AND (:until::timestamptz IS NULL OR m.created_at < :until)
      AND (m.expires_at IS NULL OR m.expires_at > now())
      -- closed facts are read by id or through their history (migration 0012)
      AND m.valid_to IS NULL
      AND (:after_at::timestamptz IS NULL
           OR (m.created_at, m.id) < (:after_at, :after_id::uuid))
    ORDER BY m.created_at DESC, m.id DESC
    LIMIT :limit
) page
ORDER BY created_at DESC, id DESC;

-- name: update_memory
UPDATE memories SET
    tags = coalesce(:tags, tags),
    metadata = coalesce(:metadata::jsonb, metadata),
    importance = coalesce(:importance, importance),
    content = coalesce(:content, content),
    payload = coalesce(:payload::jsonb, payload),
    confidence = coalesce(:confidence, confidence),
    fact_kind = coalesce(:fact_kind, fact_kind),
    expires_at = CASE WHEN :set_expiry THEN :expires_at ELSE expires_at END,
    fact_key = coalesce(:fact_key, fact_key),
    updated_at = greatest(now(), created_at)
WHERE id = :id AND user_id = :user_id
RETURNING *;

-- name: update_chunk_filters
UPDATE memory_chunks SET tags = $3 WHERE memory_id = $1 AND user_id = $2;

-- name: delete_chunks_of_part
DELETE FROM memory_chunks WHERE memory_id = $1 AND user_id = $2 AND part = $3;

-- name: delete_memory
DELETE FROM memories WHERE id = $1 AND user_id = $2 RETURNING id, type;

-- name: unsource_memory
-- Deleted conversations leave the provenance of the facts learned from them: $1 are their
-- sources as the service writes them ("conversation:<id>"), $2 the user. Each goes from the
-- fact's "sources" (and from its "source", which becomes null).
UPDATE memories SET
    payload = jsonb_set(payload, '{sources}', (
        SELECT coalesce(jsonb_agg(s ORDER BY n), '[]'::jsonb)
        FROM jsonb_array_elements(coalesce(payload -> 'sources', '[]'::jsonb))
             WITH ORDINALITY AS e(s, n)
        WHERE NOT (s #>> '{}' = ANY($1::text[]))
    )) || CASE WHEN payload ->> 'source' = ANY($1::text[]) THEN '{"source": null}'::jsonb
               ELSE '{}'::jsonb END,
    updated_at = greatest(now(), created_at)
WHERE user_id = $2 AND type = 'fact'
  AND (payload -> 'sources' ?| $1::text[] OR payload ->> 'source' = ANY($1::text[]));

-- name: delete_derived_summaries
-- The service's own summaries that repeat the words of memories $1 (ids as text) of user
-- $2: a session's summary (session_role 'summary') or a month's (period) that covers one of
-- them, and the period summaries that cover one of those. Deleted; their ids returned, each
-- with the texts its chunks were embedded from (as chunk_texts: their cached embeddings go).
WITH RECURSIVE doomed(id) AS (
    SELECT id FROM memories
    WHERE user_id = $2 AND type = 'summary' AND (session_role = 'summary' OR period IS NOT NULL)
      AND payload -> 'covers' ?| $1::text[]
    UNION
    SELECT m.id FROM memories m JOIN doomed d ON m.payload -> 'covers' ? d.id::text
    WHERE m.user_id = $2 AND m.type = 'summary' AND m.period IS NOT NULL
), texts AS (
    SELECT c.memory_id,
           CASE WHEN c.label IS NULL THEN c.content ELSE c.label || ': ' || c.content END
               AS indexed
    FROM memory_chunks c
    WHERE c.user_id = $2 AND c.memory_id IN (SELECT id FROM doomed)
), gone AS (
    DELETE FROM memories WHERE user_id = $2 AND id IN (SELECT id FROM doomed) RETURNING id
)
SELECT g.id, ARRAY(SELECT t.indexed FROM texts t WHERE t.memory_id = g.id) AS texts
FROM gone g;

-- name: chunk_texts
-- The texts the chunks of memories $1 of user $2 were embedded from (Chunk.indexed), read
-- before they are deleted: their cached embeddings go with them (base.drop_cached).
SELECT CASE WHEN label IS NULL THEN content ELSE label || ': ' || content END AS indexed
FROM memory_chunks WHERE user_id = $2 AND memory_id = ANY($1::uuid[]);

-- name: uncover_memory
-- Deleted memories leave the covers of the user's summaries (their payload's "covers": ids as
-- text), so no summary names a memory that is gone. $1: the ids gone, as text; $2: the user.
UPDATE memories SET
    payload = jsonb_set(payload, '{covers}', (
        SELECT coalesce(jsonb_agg(c ORDER BY n), '[]'::jsonb)
        FROM jsonb_array_elements(payload -> 'covers') WITH ORDINALITY AS e(c, n)
        WHERE NOT (c #>> '{}' = ANY($1::text[]))
    )),
    updated_at = greatest(now(), created_at)
WHERE user_id = $2 AND type = 'summary' AND payload -> 'covers' ?| $1::text[];

-- name: insert_chunks
-- Any number of chunks of any of the user's memories in one statement: parallel arrays
-- unnested row by row (a bulk store writes its whole batch so). COPY would be faster still
-- but cannot be used: PostgreSQL refuses COPY FROM into a table under row-level security
-- (migration 0002) for the application role, and COPY calls no function per row, so the
-- embedding model guard below could not run. The filter columns (model, session, type,
-- tags, created_at) and valid_to (a closed fact's chunks are closed with it, migration
-- 0012) are copied from each chunk's memory row, written earlier in the same transaction.
INSERT INTO memory_chunks (memory_id, user_id, model_id, session_id, type, tags, created_at,
                           part, part_index, chunk_index, content, label, valid_to, embedding)
SELECT m.id, m.user_id, m.model_id, m.session_id, m.type, m.tags, m.created_at,
       c.part, c.part_index, c.chunk_index, c.content, c.label, m.valid_to,
       -- refused (SQLSTATE HL001) unless embedding_model made the vectors searched now
       halldyll_embedding_for_write(:embedding_model, c.embedding)
FROM unnest(:memory_ids::uuid[], :parts::text[], :part_indexes::integer[],
            :chunk_indexes::integer[], :contents::text[], :labels::text[],
            :embeddings::vector[]) WITH ORDINALITY
         AS c (memory_id, part, part_index, chunk_index, content, label, embedding, n)
JOIN memories m ON m.id = c.memory_id AND m.user_id = :user_id
ORDER BY c.n;
