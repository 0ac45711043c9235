-- 0017: Greek words match whatever their case, final sigma included.
--
-- Greek writes sigma at the end of a word as "ς" (U+03C2) and elsewhere as "σ"; both are
-- "Σ" in capitals. PostgreSQL's lower() turns "Σ" into "σ" wherever it stands, so a word
-- written in capitals (a title, a name: "ΣΊΣΥΦΟΣ", "ΝΊΚΟΣ") was indexed as "σισυφοσ" and
-- the same word in lower case ("σίσυφος") as "σισυφος": neither found the other, where
-- "ΑΘΗΝΑ" and "αθηνα" did. Unicode case folding (Python's str.casefold, which the hybrid
-- ranking's words use) makes "ς" a "σ"; halldyll_search_text() (0015), what both the index
-- and the query see, now does the same.
CREATE OR REPLACE FUNCTION halldyll_search_text(content text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN regexp_replace(
    halldyll_symbol_words(halldyll_unspaced_bigrams(unaccent('unaccent'::regdictionary,
        regexp_replace(
            translate(normalize(content, NFKC), 'ς', 'σ'),
            '[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff'
            '\ufff9-\ufffb\U000e0001\U000e0020-\U000e007f'
            '\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7'
            '\u0610-\u061a\u0640\u064b-\u065f\u0670\u06d6-\u06dc\u06df-\u06e4\u06e7\u06e8'
            '\u06ea-\u06ed]',
            '', 'g')))),
    '([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])', ' \1 ', 'g');

-- Chunks stored before: only those holding a final sigma index differently now (no other
-- character NFKC-normalises to one), so only their tsvector is computed again (an update of
-- a column recomputes the generated one), not the whole table's as 0014 and 0015 did.
UPDATE memory_chunks SET content = content
WHERE strpos(content, 'ς') > 0 OR strpos(label, 'ς') > 0;
