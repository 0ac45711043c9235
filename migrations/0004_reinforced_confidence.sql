-- 0004: one definition of how a fact's confidence grows when it is stated again (noisy-OR
-- with the new evidence damped by half): 1 - (1 - held) * (1 - evidence / 2). The fact
-- queries (upsert_fact, reinforce_fact) clamp it to 1 and compare it with the promotion
-- confidence; they wrote the formula out six times before.
CREATE FUNCTION halldyll_reinforced_confidence(held double precision, evidence double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 1 - (1 - held) * (1 - evidence * 0.5);
