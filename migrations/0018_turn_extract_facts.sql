-- 0018: whether a turn asked for its facts, kept with its idempotency key. A key names one
-- request, but record_turn's extract_facts was not part of what a retry was compared on: a
-- turn stored with extract_facts=False and sent again with the same key and extract_facts=True
-- (or the other way round) was answered replayed=True with the first request's record, as if
-- it were the same request, and its facts were never asked for again. Now the retry of another
-- request is refused (InvalidInput, field idempotency_key), as for other messages or another
-- session. Keys stored before (NULL) are not compared on it.
ALTER TABLE turn_requests ADD COLUMN extract_facts boolean;
