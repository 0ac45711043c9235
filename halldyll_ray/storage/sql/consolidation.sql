-- Facts learned from conversations and their history (halldyll_ray.components.consolidation,
-- .memories; migration 0012). The lock order is in users.sql: the user's row, then the fact
-- rows (lock_open_facts), then their chunks.
-- updated_at is never before created_at (memories.sql says why).

-- name: similar_open_facts
-- The user's open facts of exactly this model scope closest to a candidate's vector, best
-- first, at least :min_similarity (a long statement's chunks count once, by the best one).
WITH hits AS MATERIALIZED (
    SELECT c.memory_id, c.embedding <=> :vector AS distance
    FROM memory_chunks c
    WHERE c.user_id = :user_id AND c.type = 'fact' AND c.valid_to IS NULL
      AND c.model_id IS NOT DISTINCT FROM :model_id
      AND halldyll_embedding_model_is(:embedding_model)
    ORDER BY c.embedding <=> :vector
    LIMIT :fetch
)
SELECT m.id, m.content, m.confidence, 1 - min(h.distance) AS similarity
FROM hits h
JOIN memories m ON m.id = h.memory_id
WHERE m.user_id = :user_id AND m.type = 'fact' AND m.valid_to IS NULL
  AND (m.expires_at IS NULL OR m.expires_at > now())
GROUP BY m.id, m.content, m.confidence
HAVING 1 - min(h.distance) >= :min_similarity
ORDER BY similarity DESC, m.id
LIMIT :neighbours;

-- name: share_learner
-- The user's row, FOR KEY SHARE, for a decision that writes no fact ("ignore"): first in the
-- lock order of users.sql, before the conversation (lock_learning_source) and the learning
-- record, whose foreign key takes this row. Taken after the conversation, it deadlocked with
-- an erasure (the user's row, then its cascade to the conversation). KEY SHARE waits for an
-- erasure and lets the user's writes (FOR NO KEY UPDATE, base.lock_user) go on.
SELECT 1 FROM users WHERE id = $1 FOR KEY SHARE;

-- name: lock_open_fact
-- The fact a decision acts on, still open, unexpired and in the scope it was found in;
-- locked until the change commits (after the user's row).
SELECT * FROM memories
WHERE id = $1 AND user_id = $2 AND type = 'fact' AND valid_to IS NULL
  AND model_id IS NOT DISTINCT FROM $3 AND (expires_at IS NULL OR expires_at > now())
FOR UPDATE;

-- name: close_fact
-- Close an open fact at :at (never before it began), naming what replaced it, if anything.
UPDATE memories SET
    valid_to = greatest(:at::timestamptz, coalesce(valid_from, created_at)),
    superseded_by = :superseded_by,
    updated_at = greatest(now(), created_at)
WHERE id = :id AND user_id = :user_id AND type = 'fact' AND valid_to IS NULL
RETURNING *;

-- name: fact_predecessors
-- The versions a fact replaced, back from it by their superseded_by links (each with when it
-- began and what replaced it), to place a statement learned late between two of them.
WITH RECURSIVE backward AS (
    SELECT m.id, 0 AS step
    FROM memories m
    WHERE m.id = $1 AND m.user_id = $2 AND m.type = 'fact'
    UNION ALL
    SELECT m.id, b.step + 1
    FROM memories m JOIN backward b ON m.superseded_by = b.id
    WHERE m.user_id = $2 AND m.type = 'fact' AND b.step < 1000
)
SELECT m.id, m.superseded_by, m.fact_key, coalesce(m.valid_from, m.created_at) AS began
FROM memories m
JOIN (SELECT id, min(step) AS step FROM backward GROUP BY id) b ON b.id = m.id
WHERE m.user_id = $2
ORDER BY b.step, began DESC, m.id;

-- name: insert_past_fact
-- A statement that held before a newer version began: stored closed at :valid_to (when that
-- version began), replaced by it. Closed facts never conflict (migration 0012).
INSERT INTO memories (id, user_id, model_id, session_id, type, content, payload, tags,
                      metadata, importance, fact_key, confidence, fact_kind, expires_at,
                      valid_from, valid_to, superseded_by)
VALUES (:id, :user_id, :model_id, :session_id, 'fact', :content, :payload::jsonb, :tags,
        :metadata::jsonb, :importance, :fact_key, :confidence, :fact_kind, :expires_at,
        :valid_from, greatest(:valid_to::timestamptz, :valid_from::timestamptz), :superseded_by)
RETURNING *, false AS reinforced;

-- name: relink_past_fact
-- A closed version now replaced by a statement learned late: it ends when that one began.
UPDATE memories SET
    valid_to = greatest(:at::timestamptz, coalesce(valid_from, created_at)),
    superseded_by = :superseded_by,
    updated_at = greatest(now(), created_at)
WHERE id = :id AND user_id = :user_id AND type = 'fact' AND valid_to IS NOT NULL
RETURNING *;

-- name: close_chunks
UPDATE memory_chunks SET valid_to = $3 WHERE memory_id = $1 AND user_id = $2;

-- name: contradict_fact
-- Lower an open fact's confidence by halldyll_contradicted_confidence (migration 0012).
UPDATE memories SET
    confidence = halldyll_contradicted_confidence(confidence, :evidence),
    updated_at = greatest(now(), created_at)
WHERE id = :id AND user_id = :user_id AND type = 'fact' AND valid_to IS NULL
RETURNING *;

-- name: learned_change
SELECT change FROM fact_learnings
WHERE user_id = :user_id AND conversation_id = :conversation_id AND seqs = :seqs
  AND model_id IS NOT DISTINCT FROM :model_id AND statement_key = :statement_key;

-- name: record_learning
INSERT INTO fact_learnings (user_id, conversation_id, seqs, model_id, statement_key, change)
VALUES (:user_id, :conversation_id, :seqs, :model_id, :statement_key, :change::jsonb)
ON CONFLICT DO NOTHING;

-- name: fact_history
-- Every version of a fact: from it forward to the statement that holds now (or the last one
-- closed), then back from there to everything that statement replaced, in the order of the
-- links (each version before the one that replaced it; versions the same number of links
-- back, by when they began). Not by time alone: a turn learned late can replace a fact that
-- began after it. Steps are bounded, so even links written by hand into a cycle end.
WITH RECURSIVE forward AS (
    SELECT m.id, m.superseded_by, 0 AS step
    FROM memories m
    WHERE m.id = $1 AND m.user_id = $2 AND m.type = 'fact'
    UNION ALL
    SELECT m.id, m.superseded_by, f.step + 1
    FROM memories m JOIN forward f ON m.id = f.superseded_by
    WHERE m.user_id = $2 AND f.step < 1000
),
head AS (SELECT id FROM forward ORDER BY step DESC LIMIT 1),
backward AS (
    SELECT id, 0 AS step FROM head
    UNION ALL
    SELECT m.id, b.step + 1
    FROM memories m JOIN backward b ON m.superseded_by = b.id
    WHERE m.user_id = $2 AND b.step < 1000
)
SELECT m.* FROM memories m
JOIN (SELECT id, max(step) AS step FROM backward GROUP BY id) b ON b.id = m.id
WHERE m.user_id = $2 AND (m.expires_at IS NULL OR m.expires_at > now())
ORDER BY b.step DESC, coalesce(m.valid_from, m.created_at), m.created_at, m.id
LIMIT 1000;
