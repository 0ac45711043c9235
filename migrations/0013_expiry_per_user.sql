-- 0013: every write of a user's memories first deletes that user's facts past their expiry
-- (base.lock_user, users.sql: lock_writer asks whether there are any). The index answers
-- that question for one user without reading the user's other rows, or other users'
-- expired facts (which memories_expiry, on expires_at alone, would walk).
CREATE INDEX memories_user_expiry ON memories (user_id, expires_at) WHERE expires_at IS NOT NULL;
