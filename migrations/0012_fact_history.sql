-- 0012: facts that change keep their history, and summaries that cover periods (issue #14).
-- (Written as 0012 in the issue's plan: the job queue's migration goes before it at merge.)
--
-- A fact is valid from `valid_from` (NULL: since it was stored, created_at) until `valid_to`
-- (NULL: still holds). Consolidation closes a fact instead of overwriting it: an update
-- closes the old statement and points it at the one that replaced it (`superseded_by`); a
-- contradiction lowers its confidence and closes it below a floor. A closed fact stays
-- readable (by id, in its history, in an export) but leaves searches, lists and contexts,
-- and no longer takes part in deduplication: the unique fact key covers open facts only, so
-- "lives in Paris" -> "lives in Berlin" -> "lives in Paris" is three rows, one open.

ALTER TABLE memories
    ADD COLUMN valid_from    timestamptz,
    ADD COLUMN valid_to      timestamptz,
    ADD COLUMN superseded_by uuid REFERENCES memories (id) ON DELETE SET NULL,
    -- A period summary's calendar month (YYYY-MM, UTC): one per user, model scope and month.
    ADD COLUMN period        text,
    -- A summary's span: the times of the first and last message (or summary) it covers.
    ADD COLUMN span_start    timestamptz,
    ADD COLUMN span_end      timestamptz,
    ADD CONSTRAINT memories_valid_to_check CHECK (valid_to IS NULL OR type = 'fact'),
    ADD CONSTRAINT memories_superseded_by_check CHECK (superseded_by IS NULL OR valid_to IS NOT NULL),
    ADD CONSTRAINT memories_period_check
        CHECK (period IS NULL OR (type = 'summary' AND period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'));

DROP INDEX memories_fact_key;
CREATE UNIQUE INDEX memories_fact_key ON memories (user_id, model_id, fact_key)
    NULLS NOT DISTINCT WHERE type = 'fact' AND valid_to IS NULL;
CREATE INDEX memories_superseded_by ON memories (superseded_by) WHERE superseded_by IS NOT NULL;
CREATE UNIQUE INDEX memories_period ON memories (user_id, model_id, period)
    NULLS NOT DISTINCT WHERE period IS NOT NULL;

-- The chunks' copy of valid_to (filter columns are copied so that a search reads one table):
-- a closed fact's statement leaves every search at once.
ALTER TABLE memory_chunks ADD COLUMN valid_to timestamptz;

-- How a contradiction lowers a fact's confidence: the mirror of reinforcement (0004), the
-- contrary evidence damped by half: held * (1 - evidence / 2).
CREATE FUNCTION halldyll_contradicted_confidence(held double precision, evidence double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN held * (1 - evidence * 0.5);

-- What consolidation did with each fact it learned from a turn, so that a job retried after
-- a crash (or queued twice) does not apply a candidate twice: the second time gets the
-- first time's change back. Goes with the conversation and with the user.
CREATE TABLE fact_learnings (
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    conversation_id uuid NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
    seqs            integer[] NOT NULL,
    model_id        uuid,
    statement_key   text NOT NULL,
    change          jsonb NOT NULL,
    learned_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX fact_learnings_key
    ON fact_learnings (user_id, conversation_id, seqs, model_id, statement_key) NULLS NOT DISTINCT;
CREATE INDEX fact_learnings_conversation ON fact_learnings (conversation_id);

ALTER TABLE fact_learnings ENABLE ROW LEVEL SECURITY;
CREATE POLICY fact_learnings_isolation ON fact_learnings
    USING (user_id = halldyll_acting_user() OR halldyll_admin_mode())
    WITH CHECK (user_id = halldyll_acting_user() OR halldyll_admin_mode());
GRANT SELECT, INSERT, DELETE ON fact_learnings TO halldyll_app;
