-- Maintenance (halldyll_ray.components.operations): expiry and per-user indexes.

-- name: expired_owners
-- Users with expired memories, read without locking: purge_expired locks their rows first
-- (the lock order of users.sql, lock_expired_owners), then deletes.
SELECT DISTINCT user_id FROM memories
WHERE expires_at IS NOT NULL AND expires_at <= now()
ORDER BY user_id;

-- name: lock_expired_owners
-- Users $1 whose rows no other transaction holds, locked and their memory version bumped
-- (their cached searches go, as users.sql: lock_writer). A row held by a writer is skipped
-- (SKIP LOCKED), not waited for: the purge waited on one user's long transaction while
-- holding the rows of the users before it, and every write of those waited for it in turn.
UPDATE users SET memory_version = memory_version + 1
WHERE id IN (SELECT id FROM users WHERE id = ANY($1::uuid[])
             ORDER BY id FOR NO KEY UPDATE SKIP LOCKED)
RETURNING id;

-- name: expired_texts
-- The texts the chunks of the expired memories of users $1 were embedded from, read (after
-- their rows are locked) before purge_expired deletes them: their cached embeddings go too.
SELECT CASE WHEN c.label IS NULL THEN c.content ELSE c.label || ': ' || c.content END AS indexed
FROM memory_chunks c JOIN memories m ON m.id = c.memory_id
WHERE m.user_id = ANY($1::uuid[]) AND m.expires_at IS NOT NULL AND m.expires_at <= now();

-- name: purge_expired
DELETE FROM memories
WHERE user_id = ANY($1::uuid[]) AND expires_at IS NOT NULL AND expires_at <= now()
RETURNING id, user_id;

-- name: chunk_counts
SELECT user_id, count(*) AS n FROM memory_chunks GROUP BY user_id HAVING count(*) >= $1;

-- name: user_indexes
SELECT indexname FROM pg_indexes
WHERE schemaname = current_schema() AND tablename = 'memory_chunks' AND indexname LIKE $1;
