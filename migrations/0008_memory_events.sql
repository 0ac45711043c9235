-- 0008: the memory change feed (GET /v1/users/{id}/events, MemoryEngine.subscribe_events).
--
-- One row per change of a memory, written by a trigger on `memories` in the transaction of
-- the change, so every write path (store, update, delete, fact reinforcement, append to a
-- conversation, the expiry purge, the agent loop) is covered in one place and an event exists
-- exactly when its change committed. The row's id is the Server-Sent Events id: a client that
-- reconnects with Last-Event-ID gets every row of its user after it (an outbox, kept for
-- EVENTS_RETENTION_HOURS). The row holds ids, the memory's type, the kind and the time,
-- never content.
--
-- Order: every write of a user's memories locks the user's row first (the lock order of
-- storage/sql/users.sql), and the trigger takes that lock too, so one user's events are
-- numbered in the order their transactions commit: a reader that has seen event n of a user
-- will never later find an event of that user numbered below n.

CREATE TABLE memory_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- No foreign key: the events of a deleted or expired memory outlive it.
    memory_id   uuid NOT NULL,
    memory_type text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('created', 'updated', 'reinforced', 'deleted',
                                              'expired')),
    at          timestamptz NOT NULL DEFAULT now(),
    -- The transaction that wrote it: a memory created and then changed by one transaction
    -- (a conversation stored with its messages) gets one event, `created`.
    xact        xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX memory_events_user ON memory_events (user_id, id);
CREATE INDEX memory_events_memory ON memory_events (memory_id);
CREATE INDEX memory_events_at ON memory_events (at);

-- The highest id the retention purge ever deleted: a client resuming after an event at or
-- below it may have missed events and is told to resync.
CREATE TABLE memory_event_horizon (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    purged_through bigint NOT NULL DEFAULT 0
);
INSERT INTO memory_event_horizon DEFAULT VALUES;

ALTER TABLE memory_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY memory_events_isolation ON memory_events
    USING (user_id = halldyll_acting_user() OR halldyll_admin_mode())
    WITH CHECK (user_id = halldyll_acting_user() OR halldyll_admin_mode());
GRANT SELECT, INSERT, DELETE ON memory_events TO halldyll_app;
GRANT SELECT, UPDATE ON memory_event_horizon TO halldyll_app;
-- Read for the highest id issued (a resume position past it is not this database's).
GRANT SELECT ON SEQUENCE memory_events_id_seq TO halldyll_app;

CREATE FUNCTION halldyll_memory_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed memories;
    change  text;
    event   bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        changed := NEW;
        change := 'created';
    ELSIF TG_OP = 'UPDATE' THEN
        changed := NEW;
        IF NEW.reinforcement_count > OLD.reinforcement_count THEN
            change := 'reinforced';
        ELSIF EXISTS (SELECT 1 FROM memory_events e
                      WHERE e.memory_id = NEW.id AND e.xact = pg_current_xact_id()) THEN
            RETURN NULL;  -- this transaction already told of this memory
        ELSE
            change := 'updated';
        END IF;
    ELSE
        changed := OLD;
        change := CASE WHEN OLD.expires_at IS NOT NULL AND OLD.expires_at <= now()
                       THEN 'expired' ELSE 'deleted' END;
    END IF;
    -- The user's row, which the writer already holds (the lock order of users.sql), so
    -- this costs nothing; it makes the numbering follow the commit order even for a writer
    -- that forgot. Absent while the user is being erased (the DELETE cascades to memories):
    -- then no event, and the user's events go with the user.
    PERFORM 1 FROM users WHERE id = changed.user_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO memory_events (user_id, memory_id, memory_type, kind)
    VALUES (changed.user_id, changed.id, changed.type, change)
    RETURNING id INTO event;
    -- Delivered at commit, to every listening replica: who and which event, never content.
    PERFORM pg_notify('halldyll_memory_events', changed.user_id::text || ' ' || event::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER memories_change_feed AFTER INSERT OR UPDATE OR DELETE ON memories
    FOR EACH ROW EXECUTE FUNCTION halldyll_memory_event();
