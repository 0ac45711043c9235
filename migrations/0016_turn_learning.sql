-- 0016: what a turn learned, kept with its idempotency key. A retry of record_turn (after a
-- 503 that may or may not have been applied) got the first attempt's conversation and
-- messages back, but with inline learning (MEMORY_EXTRACTION=inline) the turn's facts and
-- session summary are written after its messages, in transactions of their own: a first
-- attempt that failed there (the embedder unavailable, the replica gone) left a turn whose
-- facts no retry would ever extract, and a retry after a first attempt that succeeded
-- reported no facts. Now the key's row says whether the turn's learning is done, and what it
-- made (fact ids, summary id, background job ids), so a retry reports the same record, or
-- does the learning the first attempt did not finish.
ALTER TABLE turn_requests
    ADD COLUMN fact_ids uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN summary_id uuid,
    ADD COLUMN job_ids uuid[] NOT NULL DEFAULT '{}',
    -- When the turn's learning was done (NULL: not yet, or it failed).
    ADD COLUMN learned_at timestamptz,
    -- When a call last started the learning (the first attempt, or a retry that took it
    -- over): a retry while it is recent gets a 409, the request being still in progress.
    ADD COLUMN learning_since timestamptz;
-- Keys stored before: their turns' learning ran (or failed) long ago; what it made is not
-- known, and their retries report nothing, as before.
UPDATE turn_requests SET learned_at = created_at;
GRANT UPDATE (fact_ids, summary_id, learned_at, learning_since) ON turn_requests TO halldyll_app;
