-- The AI model registry (halldyll_ray.components.registry).

-- name: insert_model
INSERT INTO ai_models (id, name, kind, version, metadata)
VALUES (:id, :name, :kind, :version, :metadata::jsonb)
RETURNING id, name, kind, version, metadata, created_at;

-- name: get_model_by_id
SELECT id, name, kind, version, metadata, created_at FROM ai_models WHERE id = $1;

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
