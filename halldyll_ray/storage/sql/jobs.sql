-- Durable background jobs (halldyll_ray.components.jobs, migration 0011).
--
-- enqueue_job runs in the caller's transaction, as the job's user; the worker statements
-- (take, extend, finish, fail, release, reap) run in admin mode, since a worker serves every
-- user's jobs. A job row is locked only by these short statements, never while its handler
-- runs: the handler's own writes follow the lock order of users.sql.

-- name: enqueue_job
-- pg_notify is delivered when (and if) the transaction commits.
WITH job AS (
    INSERT INTO memory_jobs (id, user_id, kind, payload, max_attempts, run_after, actor_id,
                             request_id)
    VALUES (:id, :user_id, :kind, :payload::jsonb, :max_attempts,
            now() + make_interval(secs => :delay_s), :actor_id, :request_id)
    RETURNING id, kind
)
SELECT id, pg_notify('halldyll_jobs', kind) FROM job;

-- name: take_jobs
-- Up to :limit due jobs of the kinds this worker runs, oldest due first; a job another
-- worker is taking right now is skipped, not waited for.
WITH next AS (
    SELECT id FROM memory_jobs
    WHERE status = 'queued' AND run_after <= now() AND kind = ANY(:kinds::text[])
    ORDER BY run_after
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE memory_jobs j
SET status = 'running',
    attempts = j.attempts + 1,
    locked_by = :worker,
    locked_at = now(),
    lease_expires_at = now() + make_interval(secs => :lease_s),
    started_at = coalesce(j.started_at, now())
FROM next
WHERE j.id = next.id
RETURNING j.id, j.user_id, j.kind, j.payload, j.status, j.attempts, j.max_attempts,
          j.run_after, j.last_error, j.result, j.actor_id, j.request_id, j.created_at,
          j.started_at, j.finished_at;

-- name: extend_lease
UPDATE memory_jobs SET lease_expires_at = now() + make_interval(secs => :lease_s)
WHERE id = :id AND status = 'running' AND locked_by = :worker AND attempts = :attempt
RETURNING id;

-- name: finish_job
UPDATE memory_jobs
SET status = 'done', result = :result::jsonb, finished_at = now(),
    locked_by = NULL, locked_at = NULL, lease_expires_at = NULL
WHERE id = :id AND status = 'running' AND locked_by = :worker AND attempts = :attempt
RETURNING id;

-- name: share_job_owner
-- A job's end takes its user's row first (the lock order of users.sql), FOR SHARE: a
-- deletion of the user's memories (which takes it FOR NO KEY UPDATE, base.lock_user) ends
-- before, and forget_gone_in_job then sees the memory gone, or begins after, and then
-- finds the result written (forget_in_jobs). Jobs of one user still end side by side.
SELECT 1 FROM users WHERE id = $1 FOR SHARE;

-- name: forget_gone_in_job
-- forget_in_jobs for a result just written (job $1): each change that came of a
-- conversation, or names a fact (fact_id, target), that the user no longer has keeps its
-- action, ids and numbers, and its statement and reason become null.
UPDATE memory_jobs j SET result = jsonb_set(j.result, '{changes}', (
    SELECT coalesce(jsonb_agg(
        CASE WHEN (j.payload ? 'conversation_id' AND NOT EXISTS (
                       SELECT 1 FROM memories m WHERE m.user_id = j.user_id
                         AND m.id = (j.payload ->> 'conversation_id')::uuid))
                  OR (c ->> 'fact_id' IS NOT NULL AND NOT EXISTS (
                       SELECT 1 FROM memories m WHERE m.user_id = j.user_id
                         AND m.id = (c ->> 'fact_id')::uuid))
                  OR (c ->> 'target' IS NOT NULL AND NOT EXISTS (
                       SELECT 1 FROM memories m WHERE m.user_id = j.user_id
                         AND m.id = (c ->> 'target')::uuid))
             THEN c || '{"statement": null, "reason": null}'::jsonb
             ELSE c END
        ORDER BY n), '[]'::jsonb)
    FROM jsonb_array_elements(j.result -> 'changes') WITH ORDINALITY AS e(c, n)
))
WHERE j.id = $1 AND jsonb_typeof(j.result -> 'changes') = 'array';

-- name: fail_job
-- :retry_in_s NULL: the job is failed for good (poisoned); else queued again after it.
UPDATE memory_jobs
SET status = CASE WHEN :retry_in_s::float8 IS NULL THEN 'failed' ELSE 'queued' END,
    run_after = CASE WHEN :retry_in_s::float8 IS NULL THEN run_after
                     ELSE now() + make_interval(secs => :retry_in_s::float8) END,
    finished_at = CASE WHEN :retry_in_s::float8 IS NULL THEN now() END,
    last_error = :error,
    locked_by = NULL, locked_at = NULL, lease_expires_at = NULL
WHERE id = :id AND status = 'running' AND locked_by = :worker AND attempts = :attempt
RETURNING id, status, actor_id, request_id;

-- name: release_job
-- A worker stopping before the job finished gives it back: the try is not counted.
UPDATE memory_jobs
SET status = 'queued', attempts = attempts - 1, run_after = now(),
    locked_by = NULL, locked_at = NULL, lease_expires_at = NULL
WHERE id = :id AND status = 'running' AND locked_by = :worker AND attempts = :attempt
RETURNING id;

-- name: reap_jobs
-- Jobs whose worker stopped renewing the lease (it died): queued again after the backoff of
-- their last try, or failed once they used every try.
WITH lost AS (
    SELECT id FROM memory_jobs
    WHERE status = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT 100
    FOR UPDATE SKIP LOCKED
)
UPDATE memory_jobs j
SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'queued' END,
    run_after = now() + make_interval(
        secs => least(:cap_s::float8, :base_s::float8 * power(2, j.attempts - 1))),
    finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
    last_error = 'lease expired: the worker running try ' || j.attempts
                 || ' stopped without finishing it',
    locked_by = NULL, locked_at = NULL, lease_expires_at = NULL
FROM lost
WHERE j.id = lost.id
RETURNING j.id, j.user_id, j.kind, j.status, j.attempts, j.actor_id, j.request_id;

-- name: jobs_pending
SELECT EXISTS (SELECT 1 FROM memory_jobs WHERE status IN ('queued', 'running'));

-- name: list_jobs
SELECT id, user_id, kind, payload, status, attempts, max_attempts, run_after, last_error,
       result, actor_id, request_id, created_at, started_at, finished_at
FROM memory_jobs
WHERE user_id = :user_id
  AND (:status::text IS NULL OR status = :status)
  AND (:kind::text IS NULL OR kind = :kind)
  AND (:after_at::timestamptz IS NULL OR (created_at, id) < (:after_at, :after_id::uuid))
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: get_job
SELECT id, user_id, kind, payload, status, attempts, max_attempts, run_after, last_error,
       result, actor_id, request_id, created_at, started_at, finished_at
FROM memory_jobs
WHERE id = $1 AND user_id = $2;

-- name: purge_jobs
-- Finished (done or failed) jobs older than $1, but those another transaction holds (SKIP
-- LOCKED): an erasure's cascade deletes its user's jobs newest first and forget_in_jobs
-- changes several of them, while this walks them by end time, so each took one of two jobs
-- first and waited for the other (a deadlock). The rows skipped go at the next purge.
WITH gone AS (
    DELETE FROM memory_jobs WHERE id IN (
        SELECT id FROM memory_jobs WHERE finished_at < $1 FOR UPDATE SKIP LOCKED
    )
    RETURNING id
)
SELECT count(*) FROM gone;

-- name: forget_in_jobs
-- A deleted memory's words leave the results of the user's jobs: each change of a fact
-- extraction that came of a deleted conversation (the job's payload conversation_id), or that
-- wrote, reinforced or closed a deleted fact (fact_id, target), keeps its action, ids and
-- numbers, and its statement and reason become null. $1: the ids gone, as text; $2: the user.
UPDATE memory_jobs SET result = jsonb_set(result, '{changes}', (
    SELECT coalesce(jsonb_agg(
        CASE WHEN payload ->> 'conversation_id' = ANY($1::text[])
                  OR c ->> 'fact_id' = ANY($1::text[])
                  OR c ->> 'target' = ANY($1::text[])
             THEN c || '{"statement": null, "reason": null}'::jsonb
             ELSE c END
        ORDER BY n), '[]'::jsonb)
    FROM jsonb_array_elements(result -> 'changes') WITH ORDINALITY AS e(c, n)
))
WHERE user_id = $2
  AND jsonb_typeof(result -> 'changes') = 'array'
  AND (payload ->> 'conversation_id' = ANY($1::text[])
       OR EXISTS (SELECT 1 FROM jsonb_array_elements(result -> 'changes') AS c
                  WHERE c ->> 'fact_id' = ANY($1::text[]) OR c ->> 'target' = ANY($1::text[])));

-- name: forget_in_learnings
-- The same for what consolidation keeps of each statement it learned (fact_learnings, which
-- a retried job replays): a change that wrote, reinforced or closed a deleted fact (fact_id,
-- target) keeps its action, ids and numbers, and its statement and reason become null. The
-- application role may not UPDATE the table: the rows are deleted and written again, in
-- this statement. (A deleted conversation's rows go with it: foreign key.) $1: the ids gone,
-- as text; $2: the user.
WITH gone AS (
    DELETE FROM fact_learnings
    WHERE user_id = $2 AND (change ->> 'fact_id' = ANY($1::text[])
                            OR change ->> 'target' = ANY($1::text[]))
    RETURNING *
)
INSERT INTO fact_learnings (user_id, conversation_id, seqs, model_id, statement_key, change,
                            learned_at)
SELECT user_id, conversation_id, seqs, model_id, statement_key,
       change || '{"statement": null, "reason": null}'::jsonb, learned_at
FROM gone;
