-- Export and import of a user's memories (halldyll_ray.components.transfer).

-- name: export_counts
SELECT type, count(*) AS memories, coalesce(sum(message_count), 0)::bigint AS messages
FROM memories
WHERE user_id = $1 AND (expires_at IS NULL OR expires_at > now())
GROUP BY type;

-- name: export_memories
-- Summaries last, period summaries after the session summaries they cover: an import meets
-- the memories a summary covers before the summary (a period summary is rewritten in place,
-- so it can be older than a session summary it covers).
-- text_bytes: about what the row's line holds (its text, payload and messages), so that an
-- export batch is bounded in bytes as well as in rows.
SELECT m.*,
       coalesce(octet_length(m.content), 0) + octet_length(m.payload::text)
       + CASE WHEN m.type = 'conversation' THEN
             (SELECT coalesce(sum(octet_length(cm.content)), 0)
              FROM conversation_messages cm WHERE cm.memory_id = m.id)
         ELSE 0 END AS text_bytes
FROM memories m
WHERE m.user_id = $1 AND (m.expires_at IS NULL OR m.expires_at > now())
ORDER BY type = 'summary', period IS NOT NULL, created_at, id;

-- name: export_messages
SELECT cm.memory_id, cm.role, cm.name, cm.content, cm.created_at
FROM conversation_messages cm
JOIN memories m ON m.id = cm.memory_id
WHERE m.user_id = $1 AND cm.memory_id = ANY($2::uuid[])
ORDER BY cm.memory_id, cm.seq;

-- name: imported_sources
SELECT source_id, memory_id FROM memory_imports WHERE user_id = $1 AND source_id = ANY($2::uuid[]);

-- name: record_imports
INSERT INTO memory_imports (user_id, source_id, memory_id)
SELECT $1, source_id, memory_id
FROM unnest($2::uuid[], $3::uuid[]) AS s (source_id, memory_id)
ON CONFLICT (user_id, source_id) DO NOTHING;

-- name: owned_ids
SELECT id FROM memories WHERE user_id = $1 AND id = ANY($2::uuid[]);

-- name: session_role_taken
SELECT EXISTS (SELECT 1 FROM memories
               WHERE user_id = $1 AND session_id = $2 AND session_role = $3);

-- name: fact_by_key
SELECT id FROM memories
WHERE user_id = $1 AND type = 'fact' AND model_id IS NOT DISTINCT FROM $2 AND fact_key = $3
  AND valid_to IS NULL;

-- name: import_memory
-- A memory as exported, with its times, expiry and reinforcement; nothing when its id, its
-- fact key or its session role is taken (the caller checks which).
INSERT INTO memories (id, user_id, model_id, session_id, type, content, payload, tags, metadata,
                      importance, fact_key, confidence, fact_kind, reinforcement_count,
                      expires_at, session_role, message_count, created_at, updated_at,
                      valid_from, valid_to, period, span_start, span_end)
VALUES (:id, :user_id, :model_id, :session_id, :type, :content, :payload::jsonb, :tags,
        :metadata::jsonb, :importance, :fact_key, :confidence, :fact_kind, :reinforcement_count,
        :expires_at, :session_role, :message_count, :created_at, :updated_at,
        :valid_from, :valid_to, :period, :span_start, :span_end)
ON CONFLICT DO NOTHING
RETURNING *;

-- name: period_taken
SELECT EXISTS (SELECT 1 FROM memories
               WHERE user_id = $1 AND model_id IS NOT DISTINCT FROM $2 AND period = $3);

-- name: link_successor
-- An imported closed fact's link to the fact that replaced it (migration 0012).
UPDATE memories SET superseded_by = $3
WHERE id = $1 AND user_id = $2 AND type = 'fact' AND valid_to IS NOT NULL
  AND superseded_by IS NULL;

-- name: fact_sources
SELECT id, payload -> 'sources' AS sources, payload ->> 'source' AS source
FROM memories WHERE user_id = $1 AND type = 'fact' AND id = ANY($2::uuid[]);

-- name: set_fact_sources
-- An imported fact's sources re-pointed at the user's memories (both as the payload holds
-- them: the list, and the latest, which may be null).
UPDATE memories
SET payload = payload || jsonb_build_object('sources', :sources::jsonb, 'source', :source::text)
WHERE id = :id AND user_id = :user_id AND type = 'fact';

-- name: summary_covers
SELECT id, payload -> 'covers' AS covers
FROM memories WHERE user_id = $1 AND type = 'summary' AND id = ANY($2::uuid[]);

-- name: set_summary_covers
-- An imported summary's covers re-pointed at the user's memories, once every line is in.
UPDATE memories SET payload = jsonb_set(payload, '{covers}', :covers::jsonb)
WHERE id = :id AND user_id = :user_id AND type = 'summary';
