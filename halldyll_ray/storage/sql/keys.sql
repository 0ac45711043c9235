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
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
RETURNING id, user_id, prefix, name, created_at, expires_at, revoked_at, last_used_at;

-- name: lock_api_key
-- Rotation locks the old key's row, so two concurrent rotations cannot both replace it.
SELECT id, user_id, name, expires_at, revoked_at FROM api_keys WHERE id = $1 FOR UPDATE;
