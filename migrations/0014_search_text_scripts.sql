-- 0014: full-text search sees through invisible characters and optional vowel points, and
-- finds words of Thai, Lao, Burmese and Khmer.
--
-- halldyll_search_text() (0006) is what both the index and a query see. It kept the
-- invisible format characters (Unicode Cf) a text carries when copied from a web page, a
-- right-to-left document or a word processor: a zero-width space ("Lon" U+200B "don"), a
-- soft hyphen, a word joiner, a BOM, a direction mark or embedding (U+200E, U+202A-U+202E,
-- U+2066-U+2069). The parser took each for a letter, so the word around it was another word:
-- "London" did not find "Lon<ZWSP>don", nor "evil" a RLO-wrapped "evil". Hebrew points and
-- cantillation and Arabic harakat (short vowels, shadda, sukun, tatweel) are written or not
-- at will: "שָׁלוֹם" and "שלום", "المَدْرَسَةِ" and "المدرسة" are one word, as unaccent
-- makes "café" and "cafe" one word for Latin letters. Both are now removed, as the fact key
-- removes invisible characters (halldyll_ray.textproc._drop_invisible), before unaccent (which
-- turns a soft hyphen into "-") and before the Han and kana characters are set apart.
--
-- Thai, Lao, Burmese and Khmer are written without spaces between words, like Chinese, but
-- their words are spelled with several letters and marks, so a character alone is no word:
-- a run of them was one lexeme, and no word inside it could be found ("ข้าวผัด", fried rice,
-- in "ฉันชอบกินข้าวผัดกุ้ง"). Such a run is now indexed as its overlapping pairs of
-- characters (bigrams, the usual word-less indexing of these scripts), the query's words
-- too, so a word is found wherever it stands and a text holding all of its pairs ranks first.
CREATE FUNCTION halldyll_unspaced_bigrams(content text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN content !~ '[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]' THEN content ELSE (
    SELECT string_agg(
        CASE WHEN length(m.run[1]) > 1 AND m.run[1] ~ '^[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]'
             THEN ' ' || (SELECT string_agg(substr(m.run[1], i, 2), ' ' ORDER BY i)
                          FROM generate_series(1, length(m.run[1]) - 1) AS i) || ' '
             ELSE m.run[1] END,
        '' ORDER BY m.n)
    FROM regexp_matches(content,
        '[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]+|[^\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]+',
        'g') WITH ORDINALITY AS m(run, n)
) END;

-- The characters removed, line by line below: format characters (soft hyphen, Arabic letter
-- mark, Mongolian vowel separator, zero-width space, non-joiner and joiner, direction marks,
-- embeddings and overrides, word joiner and invisible operators, isolates and deprecated
-- format controls, BOM); interlinear annotation and language tags; Hebrew points and
-- cantillation (not the maqaf, paseq, sof pasuq or nun hafukha, which are punctuation);
-- Arabic harakat, Quranic marks, tatweel and the superscript alef.
CREATE OR REPLACE FUNCTION halldyll_search_text(content text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN regexp_replace(
    halldyll_unspaced_bigrams(unaccent('unaccent'::regdictionary, regexp_replace(
        normalize(content, NFKC),
        '[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff'
        '\ufff9-\ufffb\U000e0001\U000e0020-\U000e007f'
        '\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7'
        '\u0610-\u061a\u0640\u064b-\u065f\u0670\u06d6-\u06dc\u06df-\u06e4\u06e7\u06e8'
        '\u06ea-\u06ed]',
        '', 'g'))),
    '([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])', ' \1 ', 'g');

-- Chunks stored before: their tsvector computed again with the function above (the column
-- expression is 0007's).
DROP INDEX memory_chunks_tsv;
ALTER TABLE memory_chunks DROP COLUMN tsv;
ALTER TABLE memory_chunks
    ADD COLUMN tsv tsvector GENERATED ALWAYS AS (
        halldyll_tsvector(CASE WHEN label IS NULL THEN content ELSE label || ' ' || content END)
    ) STORED;
CREATE INDEX memory_chunks_tsv ON memory_chunks USING gin (tsv);
