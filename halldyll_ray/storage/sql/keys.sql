-- API keys (halldyll_ray.components.keys).

-- name: meta_value
SELECT value FROM halldyll_meta WHERE key = $1;

-- name: insert_api_key
INSERT INTO api_keys (id, user_id, prefix, hash, name, expires_at, replaces)
VALUES (:id, :user_id, :prefix, :hash, :name, :expires_at, :replaces)
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
-- A key revoked before keeps its time, and revoked_now is false: no change, no audit row.
-- The old value is read under the row's lock, so of concurrent revocations one is the change.
WITH old AS (SELECT id, revoked_at FROM api_keys WHERE id = $1 FOR UPDATE)
UPDATE api_keys k SET revoked_at = coalesce(k.revoked_at, now()) FROM old WHERE k.id = old.id
RETURNING k.id, k.user_id, k.prefix, k.name, k.created_at, k.expires_at, k.revoked_at,
          k.last_used_at, old.revoked_at IS NULL AS revoked_now;

-- name: lock_key_owner
-- Rotation locks the key's user first (the lock order of users.sql): the new key's foreign
-- key takes that row too, and taken after the old key's row it deadlocked with an erasure of
-- the user, which locks the user's row, then deletes their keys. KEY SHARE is enough: it
-- waits for an erasure (and makes one wait), and lets the user's other writes go on.
SELECT u.id FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.id = $1
FOR KEY SHARE OF u;

-- name: lock_api_key
-- Rotation locks the old key's row, so two concurrent rotations cannot both replace it.
SELECT id, user_id, name, expires_at, revoked_at FROM api_keys WHERE id = $1 FOR UPDATE;
