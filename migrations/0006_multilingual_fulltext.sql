-- 0006: full-text search for text in every script and form.
--
-- Before, chunks were indexed with to_tsvector('english', content): a sentence in a script
-- written without spaces ("今天我们玩了成语接龙游戏") was one lexeme, so no query for a word
-- in it matched; other Unicode forms of a word (full-width letters, ligatures, accents) were
-- other lexemes; and non-English words were mangled by the English stemmer only.
--
-- halldyll_search_text() is what both the index and the query see: NFKC-normalised, accents
-- removed (the unaccent extension, trusted since PostgreSQL 13, in the embedded server), and
-- each Han, Hiragana or Katakana character set apart as its own word. The tsvector holds the
-- English stems plus the 'simple' (unstemmed, lower-cased) words, so English still matches
-- across inflections and every other language matches on its words as written.
CREATE EXTENSION IF NOT EXISTS unaccent;

CREATE FUNCTION halldyll_search_text(content text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN regexp_replace(
    unaccent('unaccent'::regdictionary, normalize(content, NFKC)),
    '([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])', ' \1 ', 'g');

CREATE FUNCTION halldyll_tsvector(content text) RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_tsvector('english'::regconfig, halldyll_search_text(content))
    || to_tsvector('simple'::regconfig, halldyll_search_text(content));

DROP INDEX memory_chunks_tsv;
ALTER TABLE memory_chunks DROP COLUMN tsv;
ALTER TABLE memory_chunks
    ADD COLUMN tsv tsvector GENERATED ALWAYS AS (halldyll_tsvector(content)) STORED;
CREATE INDEX memory_chunks_tsv ON memory_chunks USING gin (tsv);
