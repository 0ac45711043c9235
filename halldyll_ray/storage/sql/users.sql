-- Users, roles and viewer grants (halldyll_ray.components.users).
--
-- Lock order of every write path (STYLE 18): the user's row first (lock_writer, which also
-- invalidates the user's cached searches), then the memory row, then its messages and
-- chunks. A transaction that takes a memory row before its user's row can deadlock with one
-- that follows this order. So can any other row taken before the user's: an API key's
-- (rotation, keys.sql: lock_key_owner) comes after it. Two users' rows (a grant's Viewer and
-- owner) are taken in the order of their ids (lock_grant_users). Grant rows, the only rows
-- that two users share, come after the user's row, several of them in the order of their key
-- (viewer, owner): lock_erased_grants, drop_viewer_grants. Maintenance that deletes rows of
-- many users (the expiry and retention purges) takes their user rows first as well, skipping
-- those another transaction holds (operations.sql: lock_expired_owners, events.sql:
-- lock_event_owners), or skips the rows themselves (jobs.sql: purge_jobs): it never waits on
-- one user while holding the rows of others, whose writes would wait for that user in turn.
-- A transaction that writes no memory but inserts a row naming the user (a learning record
-- of an "ignore", consolidation.sql: share_learner) shares the user's row first too.

-- name: insert_user
INSERT INTO users (id, username, email, role, metadata)
VALUES (:id, :username, :email, :role, :metadata::jsonb)
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

-- name: lock_user_for_update
-- The values an update will replace (for its audit row), the row locked until it commits.
SELECT role, disabled, email, metadata FROM users WHERE id = $1 FOR UPDATE;

-- name: update_user
UPDATE users SET
    role = coalesce(:role, role),
    disabled = coalesce(:disabled, disabled),
    email = CASE WHEN :set_email THEN :email ELSE email END,
    metadata = coalesce(:metadata::jsonb, metadata),
    updated_at = now()
WHERE id = :id
RETURNING id, username, email, role, disabled, metadata, created_at, updated_at;

-- name: lock_erased_grants
-- The grants an erasure of user $1 (locked by the caller) deletes or changes: theirs as the
-- Viewer or the owner, and those they gave (granted_by). Locked in the order of their key
-- before the DELETE: its cascade takes them in the order of the foreign keys (the user's
-- grants as the Viewer, then as the owner), so erasures of Viewers who read each other's
-- memories each took one of their two grants first and deadlocked.
SELECT 1 FROM viewer_grants
WHERE viewer_id = $1 OR owner_id = $1 OR granted_by = $1
ORDER BY viewer_id, owner_id
FOR UPDATE;

-- name: delete_user
DELETE FROM users WHERE id = $1 RETURNING id;

-- name: erasure_counts
-- What deleting the user (locked by the caller) takes with it, before the DELETE cascades.
SELECT u.username,
       (SELECT coalesce(jsonb_object_agg(type, n), '{}'::jsonb)
        FROM (SELECT type, count(*) AS n FROM memories WHERE user_id = u.id GROUP BY type) t)
           AS memories,
       (SELECT count(*) FROM conversation_messages cm JOIN memories m ON m.id = cm.memory_id
        WHERE m.user_id = u.id) AS messages,
       (SELECT count(*) FROM memory_chunks WHERE user_id = u.id) AS chunks,
       (SELECT count(*) FROM api_keys WHERE user_id = u.id) AS api_keys,
       (SELECT count(*) FROM viewer_grants WHERE viewer_id = u.id OR owner_id = u.id)
           AS viewer_grants,
       (SELECT count(*) FROM turn_requests WHERE user_id = u.id) AS turn_requests,
       (SELECT count(*) FROM memory_events WHERE user_id = u.id) AS events,
       (SELECT count(*) FROM memory_jobs WHERE user_id = u.id) AS jobs
FROM users u WHERE u.id = $1;

-- name: erasure_texts
-- The texts the user's chunks were embedded from (Chunk.indexed): their cached embeddings
-- go with the user.
SELECT CASE WHEN label IS NULL THEN content ELSE label || ': ' || content END AS indexed
FROM memory_chunks WHERE user_id = $1;

-- name: user_state
SELECT memory_version, disabled FROM users WHERE id = $1;

-- name: lock_writer
-- Locks the user's row (first in the lock order) and bumps their memory version, which
-- invalidates their cached searches, for a write of their memories (base.lock_user). Also
-- says whether the user has facts past their expiry that the purge has not deleted yet: the
-- writer deletes them first (operations.sql: purge_expired), so that no write finds a dead fact
-- (reinforces it, brings it back with a PATCH, or is refused as its duplicate).
UPDATE users SET memory_version = memory_version + 1 WHERE id = $1
RETURNING memory_version,
          EXISTS (SELECT 1 FROM memories
                  WHERE user_id = $1 AND expires_at IS NOT NULL AND expires_at <= now())
              AS expired;

-- name: users_state
SELECT id, role, disabled FROM users WHERE id = ANY($1::uuid[]);

-- name: users_state_with_key
-- users_state, and whether the caller's API key ($2, of user $3) still authenticates: not
-- revoked, not expired. One round trip for every check of AuthorizedEngine.
SELECT id, role, disabled,
       id = $3 AND EXISTS (SELECT 1 FROM api_keys k
                           WHERE k.id = $2 AND k.user_id = $3 AND k.revoked_at IS NULL
                             AND (k.expires_at IS NULL OR k.expires_at > now())) AS key_live
FROM users WHERE id = ANY($1::uuid[]);

-- name: lock_grant_users
-- A grant's Viewer and owner, both rows locked in the order of their ids: grants given both
-- ways at once (V1 reads V2, V2 reads V1) each locked its Viewer's row, then the owner's
-- (the grant's foreign key) and deadlocked. ORDER BY sorts before the rows are locked.
SELECT id, role FROM users WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE;

-- name: grant_viewer
-- The viewer_id when the grant is new (a grant given again adds nothing, and no audit row).
INSERT INTO viewer_grants (viewer_id, owner_id, granted_by) VALUES ($1, $2, $3)
ON CONFLICT (viewer_id, owner_id) DO NOTHING
RETURNING viewer_id;

-- name: drop_viewer_grants
-- A user who is no longer a Viewer keeps no read grant (becoming one again grants nothing).
-- The rows are locked in the order of their key first (as lock_erased_grants), not in the
-- order a scan meets them.
WITH doomed AS (
    SELECT viewer_id, owner_id FROM viewer_grants WHERE viewer_id = $1
    ORDER BY viewer_id, owner_id
    FOR UPDATE
)
DELETE FROM viewer_grants g USING doomed d
WHERE g.viewer_id = d.viewer_id AND g.owner_id = d.owner_id
RETURNING g.owner_id;

-- name: revoke_viewer_grant
DELETE FROM viewer_grants WHERE viewer_id = $1 AND owner_id = $2 RETURNING viewer_id;

-- name: viewer_grants
SELECT owner_id FROM viewer_grants WHERE viewer_id = $1 ORDER BY owner_id;
