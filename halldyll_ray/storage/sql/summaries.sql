-- Session and period summaries (halldyll_ray.components.summaries, .agent_loop, .context;
-- migration 0012). Writers lock the user's row first (users.sql).
-- updated_at is never before created_at (memories.sql says why).

-- name: upsert_session_summary
-- A session's one rolling summary (session_role 'summary'), written or rewritten; no row
-- when the summary there covers the same conversation through a later message (through_seq:
-- the last message's seq), so a slow writer that read fewer messages does not overwrite it.
INSERT INTO memories AS m (id, user_id, model_id, session_id, type, content, payload, importance,
                           session_role, span_start, span_end)
VALUES (:id, :user_id, :model_id, :session_id, 'summary', :content, :payload::jsonb, :importance,
        'summary', :span_start, :span_end)
ON CONFLICT (user_id, session_id, session_role) WHERE session_role IS NOT NULL
DO UPDATE SET
    content = excluded.content,
    payload = excluded.payload,
    span_start = excluded.span_start,
    span_end = excluded.span_end,
    updated_at = greatest(now(), m.created_at)
WHERE m.payload -> 'covers' IS DISTINCT FROM excluded.payload -> 'covers'
   OR COALESCE((m.payload ->> 'through_seq')::bigint, -1)
      <= COALESCE((excluded.payload ->> 'through_seq')::bigint, -1)
RETURNING *;

-- name: upsert_period_summary
-- A model scope's one summary of a calendar month (period), written or rewritten.
INSERT INTO memories AS m (id, user_id, model_id, type, content, payload, metadata, importance,
                           period, span_start, span_end)
VALUES (:id, :user_id, :model_id, 'summary', :content, :payload::jsonb, :metadata::jsonb,
        :importance, :period, :span_start, :span_end)
ON CONFLICT (user_id, model_id, period) WHERE period IS NOT NULL
DO UPDATE SET
    content = excluded.content,
    payload = excluded.payload,
    metadata = excluded.metadata,
    span_start = excluded.span_start,
    span_end = excluded.span_end,
    updated_at = greatest(now(), m.created_at)
RETURNING *;

-- name: message_span
-- The earliest and latest times of a conversation's messages through seq $3: a session
-- summary's span (messages keep the times their caller gave, in any order).
SELECT min(cm.created_at) AS first_at, max(cm.created_at) AS last_at
FROM conversation_messages cm
WHERE cm.memory_id = $1 AND cm.seq <= $3
  AND EXISTS (SELECT 1 FROM memories m WHERE m.id = $1 AND m.user_id = $2);

-- name: first_message_at
SELECT cm.created_at FROM conversation_messages cm
WHERE cm.memory_id = $1
  AND EXISTS (SELECT 1 FROM memories m WHERE m.id = $1 AND m.user_id = $2)
ORDER BY cm.seq LIMIT 1;

-- name: unsummarised_quiet_logs
-- The agent loop's session logs of exactly this model scope whose last message is older than
-- :cutoff and whose summary is missing or does not cover their last message (its
-- through_seq; -1 for a summary written before through_seq was kept). Not the log's
-- updated_at against the summary's: a log imported with times ahead of the clock kept a
-- newer one for ever, and every roll-up summarised it again.
SELECT l.id, l.session_id
FROM memories l
CROSS JOIN LATERAL (
    SELECT cm.created_at AS last_at FROM conversation_messages cm
    WHERE cm.memory_id = l.id ORDER BY cm.seq DESC LIMIT 1
) last
LEFT JOIN memories s
  ON s.user_id = l.user_id AND s.session_id = l.session_id AND s.session_role = 'summary'
WHERE l.user_id = :user_id AND l.session_role = 'log'
  AND l.model_id IS NOT DISTINCT FROM :model_id
  AND last.last_at < :cutoff
  AND (s.id IS NULL
       OR coalesce((s.payload ->> 'through_seq')::bigint, -1) < l.message_count - 1)
ORDER BY last.last_at, l.id;

-- name: quiet_session_summaries
-- Session summaries of exactly this model scope whose span ended before :cutoff.
SELECT id, content, updated_at,
       coalesce(span_start, created_at) AS span_start,
       coalesce(span_end, updated_at) AS span_end
FROM memories
WHERE user_id = :user_id AND type = 'summary' AND session_role = 'summary'
  AND model_id IS NOT DISTINCT FROM :model_id
  AND coalesce(span_end, updated_at) < :cutoff
ORDER BY coalesce(span_start, created_at), id;

-- name: period_summaries
SELECT id, period, payload -> 'covers' AS covers, payload ->> 'reading' AS reading, updated_at
FROM memories
WHERE user_id = $1 AND period IS NOT NULL AND model_id IS NOT DISTINCT FROM $2
ORDER BY period;

-- name: history_summaries
-- The user's session and period summaries in a context's model scope, but the current
-- session's: the newest :per_kind of each kind.
SELECT id, content, period, session_id, payload -> 'covers' AS covers, span_start, span_end
FROM (
    SELECT id, content, period, session_id, payload,
           coalesce(span_start, created_at) AS span_start,
           coalesce(span_end, updated_at) AS span_end,
           row_number() OVER (PARTITION BY period IS NULL
                              ORDER BY coalesce(span_end, updated_at) DESC, id) AS n
    FROM memories
    WHERE user_id = :user_id AND type = 'summary'
      AND (session_role = 'summary' OR period IS NOT NULL)
      AND (:session_id::text IS NULL OR session_id IS DISTINCT FROM :session_id)
      AND (:model_id::uuid IS NULL OR model_id = :model_id
           OR (:include_shared AND model_id IS NULL))
) summaries
WHERE n <= :per_kind
ORDER BY span_start, id;
