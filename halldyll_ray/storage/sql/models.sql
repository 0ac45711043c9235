-- The AI model registry (halldyll_ray.components.registry).

-- name: insert_model
INSERT INTO ai_models (id, name, kind, version, metadata)
VALUES (:id, :name, :kind, :version, :metadata::jsonb)
RETURNING id, name, kind, version, metadata, created_at;

-- name: get_model_by_id
SELECT id, name, kind, version, metadata, created_at FROM ai_models WHERE id = $1;

-- name: lock_model_names
-- Registrations one at a time (a transaction-level advisory lock, released at its end): two
-- forms of one name registered at the same instant ("Qwen", "ＱＷＥＮ") each looked for the
-- other before either had inserted, and the unique index, on lower(name), cannot tell them
-- apart. Registering is rare; nothing else takes this lock.
SELECT pg_advisory_xact_lock(hashtext('halldyll_ray.ai_models.name'));

-- name: get_model_by_name
-- In any letter case and Unicode form, compatibility forms included (NFKC: "ＱＷＥＮ" with
-- full-width letters, or a ligature, names the model "Qwen"; registry.register refuses such
-- a second name). Names are stored NFC, but one registered before may be in another form;
-- of two such names registered before they were refused, the one written as asked wins.
SELECT id, name, kind, version, metadata, created_at FROM ai_models
WHERE lower(normalize(name, NFKC)) = lower(normalize($1, NFKC))
ORDER BY name = $1 DESC, lower(normalize(name, NFC)) = lower(normalize($1, NFC)) DESC,
         created_at, id
LIMIT 1;

-- name: list_models
SELECT id, name, kind, version, metadata, created_at FROM ai_models
WHERE ($1::text IS NULL OR kind = $1)
ORDER BY lower(name);

-- name: delete_model
DELETE FROM ai_models WHERE id = $1 RETURNING id;
