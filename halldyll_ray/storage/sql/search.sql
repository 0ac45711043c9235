-- Retrieval (halldyll_ray.components.search). Both queries take the same filters by name:
-- types, model_id + include_shared (the model scope), session_id, tags, since, until.

-- name: search_semantic
-- The inner query lets pgvector's iterative index scan (relaxed order) collect enough rows
-- that pass the user's filters; the outer query restores exact distance order.
WITH hits AS MATERIALIZED (
    SELECT c.memory_id, c.part, c.part_index, c.chunk_index, c.content, c.label,
           c.embedding <=> :vector AS distance
    FROM memory_chunks c
    WHERE c.user_id = :user_id
      -- the query was embedded by the model these vectors are of (migration 0010)
      AND halldyll_embedding_model_is(:embedding_model)
      AND (:types::text[] IS NULL OR c.type = ANY(:types))
      AND (:model_id::uuid IS NULL OR c.model_id = :model_id
           OR (:include_shared AND c.model_id IS NULL))
      AND (:session_id::text IS NULL OR c.session_id = :session_id)
      AND (:tags::text[] IS NULL OR c.tags @> :tags)
      AND (:since::timestamptz IS NULL OR c.created_at >= :since)
      AND (:until::timestamptz IS NULL OR c.created_at < :until)
      AND c.valid_to IS NULL  -- closed facts (migration 0012) are not searched
    ORDER BY c.embedding <=> :vector
    LIMIT :fetch
)
SELECT * FROM hits ORDER BY distance, memory_id, part, part_index, chunk_index;

-- name: search_fulltext
-- Okapi BM25 over the user's chunks (Robertson and Zaragoza, "The Probabilistic Relevance
-- Framework: BM25 and Beyond", 2009; k1 = 1.2, b = 0.75, their usual values): a rare word of
-- the query (a name, a place) outweighs a common one, which ts_rank_cd, with no document
-- frequency, could not do. A chunk holds a word or not (tf 1): chunks are short. Document
-- frequencies are exact and per user: every chunk of the user holding a query word is a
-- match. The query's words go through the same halldyll_tsvector() as the index (0006) and
-- are quoted one by one, so nothing typed by the caller is parsed as tsquery syntax.
WITH terms AS MATERIALIZED (
    SELECT lexeme, quote_literal(lexeme)::tsquery AS tq
    FROM unnest(tsvector_to_array(halldyll_tsvector(:query))) AS lexeme
    -- the unstemmed ('simple') copies of English stop words ("what", "did", "the") match
    -- nearly every chunk and weigh next to nothing: left out of the query
    WHERE to_tsvector('english'::regconfig, lexeme) <> ''::tsvector
),
q AS (
    SELECT string_agg(quote_literal(lexeme), ' | ')::tsquery AS query FROM terms
),
matches AS MATERIALIZED (
    SELECT c.id, c.tsv, length(c.tsv)::float8 AS len
    FROM memory_chunks c, q
    WHERE c.user_id = :user_id
      AND q.query IS NOT NULL
      AND c.tsv @@ q.query
      AND (:types::text[] IS NULL OR c.type = ANY(:types))
      AND (:model_id::uuid IS NULL OR c.model_id = :model_id
           OR (:include_shared AND c.model_id IS NULL))
      AND (:session_id::text IS NULL OR c.session_id = :session_id)
      AND (:tags::text[] IS NULL OR c.tags @> :tags)
      AND (:since::timestamptz IS NULL OR c.created_at >= :since)
      AND (:until::timestamptz IS NULL OR c.created_at < :until)
      AND c.valid_to IS NULL  -- closed facts (migration 0012) are not searched
),
-- The query's words as the keys of one jsonb object: a lookup there is a binary search, a
-- filter the planner cannot turn into a join of its own choosing.
wordset AS MATERIALIZED (
    SELECT jsonb_object_agg(lexeme, true) AS words, count(*) AS n FROM terms
),
-- Which query words each matching chunk holds, found once for df and rank. A few words: each
-- word's tsquery against each chunk. Many (a long query: a pasted page; prepare_context
-- searches with up to 4,000 characters of the user's message, 300-700 English words or
-- 1,000-2,000 Han characters): each chunk's own lexemes looked up among the query's, so the
-- cost no longer grows as words x chunks (benchmarks/fulltext_scale.py --long). The counts
-- are one-time filters: one branch runs.
pairs AS MATERIALIZED (
    SELECT m.id, m.len, t.lexeme
    FROM terms t JOIN matches m ON m.tsv @@ t.tq
    WHERE (SELECT n FROM wordset) <= 64
    UNION ALL
    SELECT m.id, m.len, u.lexeme
    FROM matches m CROSS JOIN LATERAL unnest(m.tsv) AS u CROSS JOIN wordset w
    WHERE w.n > 64 AND w.words ? u.lexeme
),
df AS MATERIALIZED (
    SELECT lexeme, count(*)::float8 AS df FROM pairs GROUP BY lexeme
),
corpus AS MATERIALIZED (
    SELECT (SELECT count(*) FROM memory_chunks c WHERE c.user_id = :user_id)::float8 AS n,
           (SELECT avg(len) FROM matches) AS avg_len
),
-- Each found word's idf, again as a jsonb object read by key (never a join of pairs and df).
idf AS MATERIALIZED (
    SELECT jsonb_object_agg(df.lexeme, ln(1 + (corpus.n - df.df + 0.5) / (df.df + 0.5)))
           AS of, count(*) AS found, sum(ln(1 + (corpus.n - df.df + 0.5) / (df.df + 0.5)))
           AS found_sum
    FROM df CROSS JOIN corpus
),
-- The weight of every word of the query, found or not: the score of a chunk holding them all
-- (a word no chunk holds has df 0).
query_weight AS (
    SELECT coalesce(idf.found_sum, 0)
           + (wordset.n - idf.found) * ln(1 + (corpus.n + 0.5) / 0.5) AS idf_sum
    FROM idf CROSS JOIN wordset CROSS JOIN corpus
),
ranked AS (
    SELECT p.id,
           sum((idf.of -> p.lexeme)::float8
               * (1.2 + 1) / (1 + 1.2 * (1 - 0.75 + 0.75 * p.len / corpus.avg_len))) AS rank
    FROM pairs p CROSS JOIN idf CROSS JOIN corpus
    GROUP BY p.id
    ORDER BY rank DESC, p.id
    LIMIT :fetch
)
SELECT c.memory_id, c.part, c.part_index, c.chunk_index, c.content, c.label, r.rank,
       w.idf_sum,
       CASE WHEN :vector::vector IS NULL THEN NULL ELSE 1 - (c.embedding <=> :vector) END
           AS similarity
FROM ranked r JOIN memory_chunks c ON c.id = r.id CROSS JOIN query_weight w
WHERE :vector::vector IS NULL OR halldyll_embedding_model_is(:embedding_model)
ORDER BY r.rank DESC, c.memory_id, c.part, c.part_index, c.chunk_index;
