-- The memory change feed (halldyll_ray.components.events): rows written by the trigger of
-- migration 0008, read as the user (row-level security shows only theirs).

-- name: events_after
-- The user's events after $2, at most $3, each row with the horizon's purged_through (one
-- row of NULL events when there are none), in one statement and so one snapshot: a purge that
-- deleted events after $2 not yet read is seen here, with the rows it left (the reader's
-- resync), never as events silently missing. The purge deletes and raises the horizon in
-- one statement (purge_events).
SELECT h.purged_through, e.id, e.user_id, e.memory_id, e.memory_type, e.kind, e.at
FROM memory_event_horizon h
LEFT JOIN LATERAL (
    SELECT id, user_id, memory_id, memory_type, kind, at
    FROM memory_events
    WHERE user_id = $1 AND id > $2
    ORDER BY id
    LIMIT $3
) e ON true
ORDER BY e.id;

-- name: events_head
-- The user's latest event (0 without one): a subscriber without Last-Event-ID starts here.
SELECT coalesce(max(id), 0) FROM memory_events WHERE user_id = $1;

-- name: events_horizon
-- purged_through: the highest event id the retention purge deleted; issued: the highest id
-- ever handed out (0 before the first), so a resume position past it is not this database's.
SELECT purged_through,
       coalesce((SELECT last_value FROM memory_events_id_seq WHERE is_called), 0) AS issued
FROM memory_event_horizon;

-- name: lock_event_owners
-- The users with events older than $1, their rows taken first (the lock order of users.sql),
-- in the order of their ids, FOR KEY SHARE: an erasure (which takes its user's row FOR
-- UPDATE) ends before purge_events or begins after it. The erasure's cascade deletes the
-- user's events in id order while purge_events walks them by time, and a user's ids and times
-- disagree (a transaction that began first may commit last): each took one of two events
-- first and waited for the other, a deadlock. Writers (FOR NO KEY UPDATE) are not held up.
-- A row an erasure (or a role change) holds is skipped, not waited for: waiting on it, the
-- purge held the rows of the users before it, and their erasures and role changes waited in
-- turn. An erased user's events go with the user; a skipped user's, at the next purge.
SELECT id FROM users
WHERE id IN (SELECT DISTINCT user_id FROM memory_events WHERE at < $1)
ORDER BY id
FOR KEY SHARE SKIP LOCKED;

-- name: purge_events
-- Delete the events older than $1 of users $2 (lock_event_owners) and raise the horizon past
-- every id deleted, in one statement.
WITH gone AS (
    DELETE FROM memory_events WHERE at < $1 AND user_id = ANY($2::uuid[]) RETURNING id
)
UPDATE memory_event_horizon
SET purged_through = greatest(purged_through, (SELECT max(id) FROM gone))
RETURNING (SELECT count(*) FROM gone) AS purged, purged_through;
