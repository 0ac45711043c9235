-- 0005: idempotency keys of record_turn. A client that retries a turn after a 503 (which may
-- or may not have been applied) sends the same key, and the turn is stored once: the retry
-- gets the first attempt's conversation and message numbers back.
CREATE TABLE turn_requests (
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 128),
    conversation_id uuid NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
    message_seqs    integer[] NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idempotency_key)
);
CREATE INDEX turn_requests_conversation ON turn_requests (conversation_id);

ALTER TABLE turn_requests ENABLE ROW LEVEL SECURITY;
CREATE POLICY turn_requests_isolation ON turn_requests
    USING (user_id = halldyll_acting_user() OR halldyll_admin_mode())
    WITH CHECK (user_id = halldyll_acting_user() OR halldyll_admin_mode());
GRANT SELECT, INSERT, DELETE ON turn_requests TO halldyll_app;
