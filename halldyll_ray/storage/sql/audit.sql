-- The append-only audit log (halldyll_ray.components.audit).

-- name: insert_audit
INSERT INTO audit_log (actor_id, acting_for, operation, target_type, target_ids, outcome,
                       request_id, details)
VALUES (:actor_id, :acting_for, :operation, :target_type, :target_ids, :outcome,
        :request_id, :details::jsonb);

-- name: list_audit
SELECT id, at, actor_id, acting_for, operation, target_type, target_ids, outcome, request_id,
       details
FROM audit_log
WHERE (:user_id::uuid IS NULL OR acting_for = :user_id OR actor_id = :user_id)
  AND (:operation::text IS NULL OR operation = :operation)
  AND (:outcome::text IS NULL OR outcome = :outcome)
  AND (:before_id::bigint IS NULL OR id < :before_id)
ORDER BY id DESC
LIMIT :limit;

-- name: allow_audit_purge
-- The append-only trigger lets this transaction delete rows older than $1 (migration 0002).
SELECT set_config('halldyll.audit_purge_before', $1, true);

-- name: purge_audit
DELETE FROM audit_log WHERE at < $1;
