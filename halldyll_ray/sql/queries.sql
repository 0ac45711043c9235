-- Named queries of the engine. Every memory query carries the user id in its WHERE clause;
-- parameters are $n only. Loaded once by halldyll_ray.sql.queries().

-- ---------------------------------------------------------------- users
-- name: insert_user
INSERT INTO users (id, username, email, role, metadata)
VALUES ($1, $2, $3, $4, $5::jsonb)
RETURNING id, username, email, role, disabled, metadata, created_at, updated_at;

-- name: get_user
SELECT id, username, email, role, disabled, metadata, created_at, updated_at
FROM users WHERE id = $1;

-- name: get_user_by_name
SELECT id, username, email, role, disabled, metadata, created_at, updated_at
FROM users WHERE lower(username) = lower($1);

-- name: list_users
SELECT id, username, email, role, disabled, metadata, created_at, updated_at
FROM users
WHERE ($1::text IS NULL OR (created_at, id::text) > ($2::timestamptz, $1::text))
ORDER BY created_at, id::text
LIMIT $3;

-- name: update_user
UPDATE users SET
    role = coalesce($2, role),
    disabled = coalesce($3, disabled),
    email = CASE WHEN $4 THEN $5 ELSE email END,
    metadata = coalesce($6::jsonb, metadata),
    updated_at = now()
WHERE id = $1
RETURNING id, username, email, role, disabled, metadata, created_at, updated_at;

-- name: delete_user
DELETE FROM users WHERE id = $1 RETURNING id;

-- name: user_state
SELECT memory_version, disabled FROM users WHERE id = $1;

-- name: bump_version
UPDATE users SET memory_version = memory_version + 1 WHERE id = $1 RETURNING memory_version;

-- ---------------------------------------------------------------- AI models
-- name: insert_model
INSERT INTO ai_models (id, name, kind, version, metadata)
VALUES ($1, $2, $3, $4, $5::jsonb)
RETURNING id, name, kind, version, metadata, created_at;

-- name: get_model_by_id
SELECT id, name, kind, version, metadata, created_at FROM ai_models WHERE id = $1;

-- name: get_model_by_name
SELECT id, name, kind, version, metadata, created_at FROM ai_models
WHERE lower(name) = lower($1);

-- name: list_models
SELECT id, name, kind, version, metadata, created_at FROM ai_models
WHERE ($1::text IS NULL OR kind = $1)
ORDER BY lower(name);

-- name: delete_model
DELETE FROM ai_models WHERE id = $1 RETURNING id;

-- ---------------------------------------------------------------- memories
-- name: insert_memory
INSERT INTO memories (id, user_id, model_id, session_id, type, content, payload, tags, metadata,
                      importance, fact_key, confidence, fact_kind, expires_at, session_role)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9::jsonb, $10, $11, $12, $13, $14, $15)
RETURNING *;

-- name: upsert_fact
-- Storing a fact that exists (same user, same model scope, same normalised statement)
-- reinforces it: confidence rises by noisy-OR with the new evidence damped by half, expiry
-- moves back, and an ephemeral fact that reaches the promotion confidence becomes permanent.
-- $16 = TTL interval of ephemeral facts, $17 = promotion confidence.
INSERT INTO memories AS m (id, user_id, model_id, session_id, type, content, payload, tags,
                           metadata, importance, fact_key, confidence, fact_kind, expires_at,
                           session_role)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9::jsonb, $10, $11, $12, $13, $14, $15)
ON CONFLICT (user_id, model_id, fact_key) WHERE type = 'fact'
DO UPDATE SET
    confidence = least(1.0, 1 - (1 - m.confidence) * (1 - excluded.confidence * 0.5)),
    fact_kind = CASE
        WHEN m.fact_kind = 'permanent' OR excluded.fact_kind = 'permanent'
          OR 1 - (1 - m.confidence) * (1 - excluded.confidence * 0.5) >= $17
        THEN 'permanent' ELSE 'ephemeral' END,
    expires_at = CASE
        WHEN m.fact_kind = 'permanent' OR excluded.fact_kind = 'permanent'
          OR 1 - (1 - m.confidence) * (1 - excluded.confidence * 0.5) >= $17
        THEN NULL ELSE now() + $16::interval END,
    reinforcement_count = m.reinforcement_count + 1,
    importance = greatest(m.importance, excluded.importance),
    tags = (SELECT coalesce(array_agg(DISTINCT t ORDER BY t), '{}')
            FROM unnest(m.tags || excluded.tags) AS t),
    payload = jsonb_set(m.payload, '{sources}',
                        coalesce(m.payload -> 'sources', '[]'::jsonb)
                        || coalesce(excluded.payload -> 'sources', '[]'::jsonb)),
    updated_at = now()
RETURNING *, (xmax <> 0) AS reinforced;

-- name: reinforce_fact
-- Merge a near-duplicate into an existing fact (same rule as upsert_fact).
-- $1 id, $2 user, $3 new confidence, $4 kind of the new fact, $5 TTL, $6 promotion, $7 tags,
-- $8 new sources (jsonb array)
UPDATE memories AS m SET
    confidence = least(1.0, 1 - (1 - m.confidence) * (1 - $3 * 0.5)),
    fact_kind = CASE
        WHEN m.fact_kind = 'permanent' OR $4 = 'permanent'
          OR 1 - (1 - m.confidence) * (1 - $3 * 0.5) >= $6
        THEN 'permanent' ELSE 'ephemeral' END,
    expires_at = CASE
        WHEN m.fact_kind = 'permanent' OR $4 = 'permanent'
          OR 1 - (1 - m.confidence) * (1 - $3 * 0.5) >= $6
        THEN NULL ELSE now() + $5::interval END,
    reinforcement_count = m.reinforcement_count + 1,
    tags = (SELECT coalesce(array_agg(DISTINCT t ORDER BY t), '{}')
            FROM unnest(m.tags || $7::text[]) AS t),
    payload = jsonb_set(m.payload, '{sources}',
                        coalesce(m.payload -> 'sources', '[]'::jsonb) || $8::jsonb),
    updated_at = now()
WHERE m.id = $1 AND m.user_id = $2 AND m.type = 'fact'
RETURNING *, true AS reinforced;

-- name: nearest_fact
-- The closest existing fact of the same user and the same model scope.
SELECT c.memory_id, 1 - (c.embedding <=> $3) AS similarity
FROM memory_chunks c
JOIN memories m ON m.id = c.memory_id
WHERE c.user_id = $1 AND c.type = 'fact'
  AND c.model_id IS NOT DISTINCT FROM $2
  AND (m.expires_at IS NULL OR m.expires_at > now())
ORDER BY c.embedding <=> $3
LIMIT 1;

-- name: fact_lock
SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7));

-- name: get_memory
SELECT * FROM memories WHERE id = $1 AND user_id = $2;

-- name: get_memories
SELECT * FROM memories WHERE user_id = $1 AND id = ANY($2::uuid[]);

-- name: count_owned
SELECT count(*) FROM memories WHERE user_id = $1 AND id = ANY($2::uuid[]);

-- name: list_memories
SELECT * FROM memories
WHERE user_id = $1
  AND ($2::text[] IS NULL OR type = ANY($2))
  AND ($3::uuid IS NULL OR model_id = $3 OR ($4 AND model_id IS NULL))
  AND ($5::text IS NULL OR session_id = $5)
  AND ($6::text[] IS NULL OR tags @> $6)
  AND ($7::timestamptz IS NULL OR created_at >= $7)
  AND ($8::timestamptz IS NULL OR created_at < $8)
  AND (expires_at IS NULL OR expires_at > now())
  AND ($9::timestamptz IS NULL OR (created_at, id) < ($9, $10::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $11;

-- name: update_memory
UPDATE memories SET
    tags = coalesce($3, tags),
    metadata = coalesce($4::jsonb, metadata),
    importance = coalesce($5, importance),
    content = coalesce($6, content),
    payload = coalesce($7::jsonb, payload),
    confidence = coalesce($8, confidence),
    fact_kind = coalesce($9, fact_kind),
    expires_at = CASE WHEN $10 THEN $11 ELSE expires_at END,
    fact_key = coalesce($12, fact_key),
    updated_at = now()
WHERE id = $1 AND user_id = $2
RETURNING *;

-- name: update_chunk_filters
UPDATE memory_chunks SET tags = $3 WHERE memory_id = $1 AND user_id = $2;

-- name: delete_chunks_of_part
DELETE FROM memory_chunks WHERE memory_id = $1 AND user_id = $2 AND part = $3;

-- name: delete_memory
DELETE FROM memories WHERE id = $1 AND user_id = $2 RETURNING id, type;

-- name: insert_chunk
INSERT INTO memory_chunks (memory_id, user_id, model_id, session_id, type, tags, created_at,
                           part, part_index, chunk_index, content, embedding)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12);

-- name: purge_expired
DELETE FROM memories WHERE expires_at IS NOT NULL AND expires_at <= now()
RETURNING id, user_id;

-- ---------------------------------------------------------------- conversations
-- name: reserve_messages
-- Locks the conversation row and reserves $3 sequence numbers; returns the new count.
UPDATE memories SET message_count = message_count + $3, updated_at = now()
WHERE id = $1 AND user_id = $2 AND type = 'conversation'
RETURNING message_count, model_id, session_id, tags, created_at;

-- name: insert_message
INSERT INTO conversation_messages (memory_id, seq, role, name, content, created_at)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: get_messages
SELECT seq, role, name, content, created_at
FROM conversation_messages cm
WHERE cm.memory_id = $1
  AND EXISTS (SELECT 1 FROM memories m WHERE m.id = $1 AND m.user_id = $2)
ORDER BY seq;

-- name: recent_messages
SELECT * FROM (
    SELECT seq, role, name, content, created_at
    FROM conversation_messages cm
    WHERE cm.memory_id = $1
      AND EXISTS (SELECT 1 FROM memories m WHERE m.id = $1 AND m.user_id = $2)
    ORDER BY seq DESC
    LIMIT $3
) recent ORDER BY seq;

-- name: session_memory
SELECT * FROM memories WHERE user_id = $1 AND session_id = $2 AND session_role = $3;

-- name: create_session_log
INSERT INTO memories (id, user_id, model_id, session_id, type, content, payload, session_role)
VALUES ($1, $2, $3, $4, 'conversation', $5, '{}'::jsonb, 'log')
ON CONFLICT (user_id, session_id, session_role) WHERE session_role IS NOT NULL DO NOTHING
RETURNING *;

-- ---------------------------------------------------------------- search
-- name: search_semantic
-- The inner query lets pgvector's iterative index scan (relaxed order) collect enough rows
-- that pass the user's filters; the outer query restores exact distance order.
WITH hits AS MATERIALIZED (
    SELECT c.memory_id, c.part, c.part_index, c.chunk_index, c.content,
           c.embedding <=> $2 AS distance
    FROM memory_chunks c
    WHERE c.user_id = $1
      AND ($3::text[] IS NULL OR c.type = ANY($3))
      AND ($4::uuid IS NULL OR c.model_id = $4 OR ($5 AND c.model_id IS NULL))
      AND ($6::text IS NULL OR c.session_id = $6)
      AND ($7::text[] IS NULL OR c.tags @> $7)
      AND ($8::timestamptz IS NULL OR c.created_at >= $8)
      AND ($9::timestamptz IS NULL OR c.created_at < $9)
    ORDER BY c.embedding <=> $2
    LIMIT $10
)
SELECT * FROM hits ORDER BY distance, memory_id, part, part_index, chunk_index;

-- name: search_fulltext
-- Any of the query's lexemes may match (OR), ranked by cover density; the text cast to
-- tsquery takes the lexemes as they are, so nothing typed by the caller is parsed as syntax.
WITH q AS (
    SELECT (SELECT string_agg(quote_literal(lexeme), ' | ')
            FROM unnest(tsvector_to_array(to_tsvector('english', $2))) AS lexeme)::tsquery
           AS query
)
SELECT c.memory_id, c.part, c.part_index, c.chunk_index, c.content,
       ts_rank_cd(c.tsv, q.query, 32) AS rank,
       CASE WHEN $11::vector IS NULL THEN NULL ELSE 1 - (c.embedding <=> $11) END AS similarity
FROM memory_chunks c, q
WHERE c.user_id = $1
  AND q.query IS NOT NULL
  AND c.tsv @@ q.query
  AND ($3::text[] IS NULL OR c.type = ANY($3))
  AND ($4::uuid IS NULL OR c.model_id = $4 OR ($5 AND c.model_id IS NULL))
  AND ($6::text IS NULL OR c.session_id = $6)
  AND ($7::text[] IS NULL OR c.tags @> $7)
  AND ($8::timestamptz IS NULL OR c.created_at >= $8)
  AND ($9::timestamptz IS NULL OR c.created_at < $9)
ORDER BY rank DESC, c.memory_id, c.part, c.part_index, c.chunk_index
LIMIT $10;

-- ---------------------------------------------------------------- audit
-- name: insert_audit
INSERT INTO audit_log (actor_id, acting_for, operation, target_type, target_ids, outcome,
                       request_id, details)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb);

-- name: list_audit
SELECT id, at, actor_id, acting_for, operation, target_type, target_ids, outcome, request_id,
       details
FROM audit_log
WHERE ($1::uuid IS NULL OR acting_for = $1 OR actor_id = $1)
  AND ($2::text IS NULL OR operation = $2)
  AND ($3::text IS NULL OR outcome = $3)
  AND ($4::bigint IS NULL OR id < $4)
ORDER BY id DESC
LIMIT $5;

-- ---------------------------------------------------------------- API keys and grants
-- name: meta_value
SELECT value FROM halldyll_meta WHERE key = $1;

-- name: insert_api_key
INSERT INTO api_keys (id, user_id, prefix, hash, name, expires_at, replaces)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING id, user_id, prefix, name, created_at, expires_at, revoked_at, last_used_at;

-- name: api_key_for_auth
SELECT k.id, k.user_id, k.hash, k.expires_at, k.revoked_at, u.username, u.role, u.disabled,
       k.last_used_at IS NULL OR k.last_used_at < now() - interval '60 seconds' AS stale
FROM api_keys k JOIN users u ON u.id = k.user_id
WHERE k.prefix = $1;

-- name: touch_api_key
-- last_used_at is kept to the minute: no write per request under load.
UPDATE api_keys SET last_used_at = now()
WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '60 seconds');

-- name: get_api_key
SELECT id, user_id, prefix, name, created_at, expires_at, revoked_at, last_used_at
FROM api_keys WHERE id = $1;

-- name: list_api_keys
SELECT id, user_id, prefix, name, created_at, expires_at, revoked_at, last_used_at
FROM api_keys WHERE user_id = $1 ORDER BY created_at, id;

-- name: revoke_api_key
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
RETURNING id, user_id, prefix, name, created_at, expires_at, revoked_at, last_used_at;

-- name: grant_viewer
INSERT INTO viewer_grants (viewer_id, owner_id, granted_by) VALUES ($1, $2, $3)
ON CONFLICT (viewer_id, owner_id) DO NOTHING;

-- name: revoke_viewer_grant
DELETE FROM viewer_grants WHERE viewer_id = $1 AND owner_id = $2 RETURNING viewer_id;

-- name: viewer_grants
SELECT owner_id FROM viewer_grants WHERE viewer_id = $1 ORDER BY owner_id;

-- name: users_state
SELECT id, role, disabled FROM users WHERE id = ANY($1::uuid[]);

-- name: purge_audit
DELETE FROM audit_log WHERE at < $1;

-- ---------------------------------------------------------------- index maintenance
-- name: chunk_counts
SELECT user_id, count(*) AS n FROM memory_chunks GROUP BY user_id HAVING count(*) >= $1;

-- name: user_indexes
SELECT indexname FROM pg_indexes
WHERE schemaname = current_schema() AND tablename = 'memory_chunks' AND indexname LIKE $1;
