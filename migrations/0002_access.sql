-- 0002: API keys, viewer grants, and isolation enforced by PostgreSQL itself.
--
-- The application works as the role halldyll_app, which owns nothing and cannot bypass
-- row-level security: every connection of the pool runs SET ROLE halldyll_app (or logs in as a
-- member of it). Each transaction names its user with
--     SELECT set_config('halldyll.user_id', '<uuid>', true)
-- and the policies below hide every memory row of any other user, so a query that forgets its
-- user filter still cannot leak. Admin work across users (purging expired facts, deleting a
-- user) takes the explicit path set_config('halldyll.admin', 'on', true), which the engine only
-- does in audited operations.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'halldyll_app') THEN
        BEGIN
            CREATE ROLE halldyll_app NOLOGIN NOSUPERUSER NOBYPASSRLS;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'role halldyll_app does not exist and this user may not create it'
                USING HINT = 'Ask an administrator to run: CREATE ROLE halldyll_app NOLOGIN; '
                             'GRANT halldyll_app TO <the migration user>; then migrate again.';
        END;
    END IF;
    IF NOT pg_has_role(current_user, 'halldyll_app', 'MEMBER') THEN
        EXECUTE format('GRANT halldyll_app TO %I', current_user);
    END IF;
END
$$;

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- The public part of the key ("hr_" + 16 characters), shown in listings and logs.
    prefix       text NOT NULL UNIQUE,
    -- HMAC-SHA256 of the whole key under the server's key secret; the key itself is never stored.
    hash         bytea NOT NULL,
    name         text NOT NULL DEFAULT '' CHECK (length(name) <= 100),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    replaces     uuid REFERENCES api_keys (id) ON DELETE SET NULL
);
CREATE INDEX api_keys_user ON api_keys (user_id);

-- Admin-granted read access: a Viewer may read the memories of the owners listed here.
CREATE TABLE viewer_grants (
    viewer_id  uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    owner_id   uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    granted_by uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (viewer_id, owner_id),
    CHECK (viewer_id <> owner_id)
);

CREATE FUNCTION halldyll_acting_user() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT nullif(current_setting('halldyll.user_id', true), '')::uuid $$;

CREATE FUNCTION halldyll_admin_mode() RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT coalesce(current_setting('halldyll.admin', true), '') = 'on' $$;

ALTER TABLE memories ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory_chunks ENABLE ROW LEVEL SECURITY;
ALTER TABLE conversation_messages ENABLE ROW LEVEL SECURITY;

CREATE POLICY memories_isolation ON memories
    USING (user_id = halldyll_acting_user() OR halldyll_admin_mode())
    WITH CHECK (user_id = halldyll_acting_user() OR halldyll_admin_mode());
CREATE POLICY memory_chunks_isolation ON memory_chunks
    USING (user_id = halldyll_acting_user() OR halldyll_admin_mode())
    WITH CHECK (user_id = halldyll_acting_user() OR halldyll_admin_mode());
-- Messages belong to a conversation: visible when their memory is (the subquery is itself
-- filtered by the memories policy).
CREATE POLICY conversation_messages_isolation ON conversation_messages
    USING (EXISTS (SELECT 1 FROM memories m WHERE m.id = memory_id))
    WITH CHECK (EXISTS (SELECT 1 FROM memories m WHERE m.id = memory_id));

GRANT USAGE ON SCHEMA public TO halldyll_app;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON users, ai_models, memories, memory_chunks, conversation_messages, api_keys, viewer_grants
    TO halldyll_app;
GRANT SELECT ON halldyll_meta, schema_migrations TO halldyll_app;
-- The audit log is append-only for the application: no UPDATE or DELETE privilege at all
-- (and the trigger of 0001 refuses them for everyone but the retention purge below).
GRANT SELECT, INSERT ON audit_log TO halldyll_app;

-- Retention: the owner (never the application role) may delete rows older than the cutoff it
-- names in halldyll.audit_purge_before, inside one transaction.
CREATE OR REPLACE FUNCTION halldyll_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := nullif(current_setting('halldyll.audit_purge_before', true), '');
BEGIN
    IF TG_OP = 'DELETE' AND cutoff IS NOT NULL AND OLD.at < cutoff THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE INDEX audit_log_operation ON audit_log (operation, at DESC);

-- The HMAC key for API key hashes when API_KEY_SECRET is not set: 256 strong random bits
-- (gen_random_uuid draws from the server's strong random source). Setting API_KEY_SECRET
-- keeps the key outside the database; either way keys themselves are never stored.
INSERT INTO halldyll_meta (key, value)
VALUES ('api_key_secret',
        encode(sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')),
               'hex'))
ON CONFLICT (key) DO NOTHING;
