-- 0003: confidence and importance as double precision. As real (float4) they came back with
-- float noise (0.9 stored, 0.8999999761581421 read), which clients saw over HTTP.
ALTER TABLE memories
    ALTER COLUMN importance TYPE double precision,
    ALTER COLUMN confidence TYPE double precision;
