-- Conversations, their messages and session state (halldyll_ray.components.ingestion,
-- .agent_loop). The lock order is in users.sql.
-- updated_at is never before created_at (memories.sql says why).

-- name: reserve_messages
-- Locks the conversation row and reserves $3 sequence numbers; returns the new count.
UPDATE memories SET message_count = message_count + $3, updated_at = greatest(now(), created_at)
WHERE id = $1 AND user_id = $2 AND type = 'conversation'
RETURNING message_count, model_id, session_id, tags, created_at;

-- name: lock_learning_source
-- The conversation that facts about to be stored were learned from, if it still exists:
-- taken after the user's row (base.lock_user), as every deletion of it takes that row first,
-- so it is not deleted before the facts that name it (ingestion.Ingestion.learn) commit.
SELECT id FROM memories WHERE id = $1 AND user_id = $2 AND type = 'conversation' FOR KEY SHARE;

-- name: retire_full_log
-- A session log that cannot take the $3 messages just reserved in it: the reservation is
-- given back and the row stops being the session's log (it stays a conversation of the
-- session, with its session_id), so that create_session_log can open the next one.
UPDATE memories SET message_count = message_count - $3, session_role = NULL
WHERE id = $1 AND user_id = $2 AND session_role = 'log';

-- name: insert_messages
-- Messages of one or more conversations in one statement (parallel arrays, one per column).
INSERT INTO conversation_messages (memory_id, seq, role, name, content, created_at)
SELECT * FROM unnest(:memory_ids::uuid[], :seqs::integer[], :roles::text[], :names::text[],
                     :contents::text[], :created_ats::timestamptz[]);

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

-- name: session_memory_in_scope
-- The same row for a context, only when the session is in its model scope (the filter of
-- search.sql): a session is one AI model's or shared, and another model's context must not
-- show its recent turns or its summary.
SELECT * FROM memories
WHERE user_id = :user_id AND session_id = :session_id AND session_role = :session_role
  AND (:model_id::uuid IS NULL OR model_id = :model_id
       OR (:include_shared AND model_id IS NULL));

-- name: create_session_log
INSERT INTO memories (id, user_id, model_id, session_id, type, content, payload, session_role)
VALUES (:id, :user_id, :model_id, :session_id, 'conversation', :title, '{}'::jsonb, 'log')
ON CONFLICT (user_id, session_id, session_role) WHERE session_role IS NOT NULL DO NOTHING
RETURNING *;

-- name: delete_empty_log
-- A session log with no message (a turn refused after creating it); one with messages stays.
DELETE FROM memories m
WHERE m.id = $1 AND m.user_id = $2 AND m.session_role = 'log'
  AND NOT EXISTS (SELECT 1 FROM conversation_messages c WHERE c.memory_id = m.id)
RETURNING m.id;

-- name: turn_request
-- The request an idempotency key of the user named: its conversation, the session that
-- conversation logs (NULL once deleted, or for a conversation of no session), that
-- conversation's AI model and its messages.
SELECT t.conversation_id, t.message_seqs, m.session_id, m.model_id, t.fact_ids, t.summary_id,
       t.job_ids, t.learned_at IS NOT NULL AS learned, t.extract_facts
FROM turn_requests t
LEFT JOIN memories m ON m.id = t.conversation_id AND m.user_id = t.user_id
WHERE t.user_id = $1 AND t.idempotency_key = $2;

-- name: insert_turn_request
-- With background learning the turn's jobs are queued in the same transaction: its learning
-- is then done as far as the request goes (learned), and its job ids are what a retry reports.
INSERT INTO turn_requests (user_id, idempotency_key, conversation_id, message_seqs, job_ids,
                           learned_at, learning_since, extract_facts)
VALUES (:user_id, :idempotency_key, :conversation_id, :message_seqs, :job_ids,
        CASE WHEN :learned THEN now() END, now(), :extract_facts);

-- name: turn_learning
-- What the learning of a key's turn made, and whether it is done (no row: the turn's
-- conversation was deleted, and its keys with it).
SELECT fact_ids, summary_id, learned_at IS NOT NULL AS learned
FROM turn_requests
WHERE user_id = $1 AND idempotency_key = $2;

-- name: claim_turn_learning
-- A retry takes over the learning of a turn whose first attempt did not finish it: when no
-- call started it within the last $3 seconds (the first attempt failed, or its replica died).
UPDATE turn_requests SET learning_since = now()
WHERE user_id = $1 AND idempotency_key = $2 AND learned_at IS NULL
  AND (learning_since IS NULL OR learning_since < now() - make_interval(secs => $3))
RETURNING idempotency_key;

-- name: release_turn_learning
-- The learning failed (an error the caller sees): a retry may take it over at once.
UPDATE turn_requests SET learning_since = NULL
WHERE user_id = $1 AND idempotency_key = $2 AND learned_at IS NULL;

-- name: finish_turn_learning
UPDATE turn_requests SET learned_at = now(), fact_ids = :fact_ids, summary_id = :summary_id
WHERE user_id = :user_id AND idempotency_key = :idempotency_key;

-- name: messages_at
SELECT seq, role, name, content, created_at
FROM conversation_messages cm
WHERE cm.memory_id = $1 AND cm.seq = ANY($3::integer[])
  AND EXISTS (SELECT 1 FROM memories m WHERE m.id = $1 AND m.user_id = $2)
ORDER BY seq;

-- name: turns_around
-- The matched messages of conversations and the ones just before and after them, for the
-- context builder (an answer often spans two adjacent turns).
SELECT cm.memory_id, cm.seq, cm.role, cm.name, cm.content, cm.created_at
FROM unnest(:memory_ids::uuid[], :seqs::integer[]) AS hit (memory_id, seq)
JOIN conversation_messages cm
  ON cm.memory_id = hit.memory_id AND cm.seq BETWEEN hit.seq - 1 AND hit.seq + 1
JOIN memories m ON m.id = cm.memory_id AND m.user_id = :user_id
ORDER BY cm.memory_id, cm.seq;
