-- 0009: what an import stored, per user and exported memory id, so that importing the same
-- file again changes nothing (halldyll_ray.components.transfer). A row goes with its memory:
-- a memory deleted after its import comes back when the file is imported again.
CREATE TABLE memory_imports (
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    source_id   uuid NOT NULL,
    memory_id   uuid NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
    imported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, source_id)
);
CREATE INDEX memory_imports_memory ON memory_imports (memory_id);

ALTER TABLE memory_imports ENABLE ROW LEVEL SECURITY;
CREATE POLICY memory_imports_isolation ON memory_imports
    USING (user_id = halldyll_acting_user() OR halldyll_admin_mode())
    WITH CHECK (user_id = halldyll_acting_user() OR halldyll_admin_mode());
GRANT SELECT, INSERT, DELETE ON memory_imports TO halldyll_app;
