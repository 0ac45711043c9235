-- 0011: durable background jobs (halldyll_ray.components.jobs): fact extraction and session
-- summaries off the write path (issue #14).
--
-- A job is queued by INSERT in the transaction of the write that causes it (a turn, a stored
-- conversation), so it exists exactly when that write committed; the insert's pg_notify on
-- channel halldyll_jobs is delivered at commit and wakes idle workers at once. Workers take
-- due jobs with FOR UPDATE SKIP LOCKED (no job is taken by two workers) and hold each under a
-- lease (locked_by, lease_expires_at) that they extend while the job runs; a job whose lease
-- ran out (its worker died) is queued again, or failed once it used max_attempts tries. A
-- finish or a retry names the worker and the attempt it holds, so a worker that lost its
-- lease cannot overwrite the job's next attempt. A row holds ids and counts, never memory
-- content, and last_error never a secret (see jobs.py).
CREATE TABLE memory_jobs (
    id               uuid PRIMARY KEY,
    user_id          uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind             text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_.]{0,63}$'),
    payload          jsonb NOT NULL DEFAULT '{}'::jsonb,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'done', 'failed')),
    -- Tries started so far (a try whose worker died counts).
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    -- Not taken before this time (the retry backoff).
    run_after        timestamptz NOT NULL DEFAULT now(),
    locked_by        text,
    locked_at        timestamptz,
    lease_expires_at timestamptz,
    last_error       text CHECK (length(last_error) <= 2000),
    result           jsonb,
    -- Who caused it (the principal of the write; no foreign key: audit rows keep ids too).
    actor_id         uuid,
    request_id       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CHECK ((status = 'running') = (locked_by IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK ((status IN ('done', 'failed')) = (finished_at IS NOT NULL))
)
-- A queue table: every row is updated twice or three times, then deleted by the retention
-- purge; vacuum it sooner than the default 20 % of dead rows, so the due-job index stays small.
WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000);

-- The dequeue (take_jobs): due jobs in run_after order, queued ones only.
CREATE INDEX memory_jobs_due ON memory_jobs (run_after) WHERE status = 'queued';
-- Leases that ran out (reap_jobs).
CREATE INDEX memory_jobs_lease ON memory_jobs (lease_expires_at) WHERE status = 'running';
-- A user's jobs, newest first (the status API).
CREATE INDEX memory_jobs_user ON memory_jobs (user_id, created_at DESC, id DESC);
-- The retention purge of finished jobs.
CREATE INDEX memory_jobs_finished ON memory_jobs (finished_at) WHERE finished_at IS NOT NULL;

ALTER TABLE memory_jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY memory_jobs_isolation ON memory_jobs
    USING (user_id = halldyll_acting_user() OR halldyll_admin_mode())
    WITH CHECK (user_id = halldyll_acting_user() OR halldyll_admin_mode());
GRANT SELECT, INSERT, UPDATE, DELETE ON memory_jobs TO halldyll_app;
