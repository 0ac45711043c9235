-- 0015: emoji and other pictographic symbols are words of full-text search.
--
-- PostgreSQL's text search parser reads a symbol as a blank: "We celebrated 🎉" was indexed
-- as "celebrated", and a query of "🎉" had no word at all, so full-text search found nothing
-- and hybrid search was left with the embedding, which reads every emoji as the same [UNK]
-- (the same vector for 🎉 and 🍕). Each such character now stands in the text as a word of
-- its own, "sym" and its code point in hex ("🎉" is "sym1f389"), on both sides, the index and
-- the query (halldyll_search_text() is what both see). A skin tone (U+1F3FB-U+1F3FF) is a
-- word beside the one it colours, and a ZWJ sequence (a family, a profession) is its
-- members, the joiner being removed before (0014): "👍" finds "👍🏽", "👧" finds "👨‍👩‍👧".
-- The characters: arrows, technical symbols, enclosed alphanumerics, geometric shapes,
-- miscellaneous symbols and dingbats, supplemental arrows, miscellaneous symbols and arrows
-- (the blocks of U+2190-U+2BFF that hold the emoji of the Basic Multilingual Plane; not the
-- mathematical operators, control pictures, box drawing or braille), the CJK wavy dash, part
-- alternation mark and circled ideographs that are emoji, and every emoji and pictograph
-- block of the Supplementary Multilingual Plane (U+1F000-U+1FAFF).
CREATE FUNCTION halldyll_symbol_words(content text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN content !~ ('[\u2190-\u21ff\u2300-\u23ff\u2460-\u24ff\u25a0-\u27bf\u2900-\u297f'
                     '\u2b00-\u2bff\u3030\u303d\u3297\u3299\U0001f000-\U0001faff]')
    THEN content
    ELSE (
        SELECT string_agg(
            CASE WHEN m.part[1] ~ ('^[\u2190-\u21ff\u2300-\u23ff\u2460-\u24ff\u25a0-\u27bf'
                                   '\u2900-\u297f\u2b00-\u2bff\u3030\u303d\u3297\u3299'
                                   '\U0001f000-\U0001faff]$')
                 THEN ' sym' || to_hex(ascii(m.part[1])) || ' '
                 ELSE m.part[1] END,
            '' ORDER BY m.n)
        FROM regexp_matches(content,
            '[\u2190-\u21ff\u2300-\u23ff\u2460-\u24ff\u25a0-\u27bf\u2900-\u297f\u2b00-\u2bff'
            '\u3030\u303d\u3297\u3299\U0001f000-\U0001faff]'
            '|[^\u2190-\u21ff\u2300-\u23ff\u2460-\u24ff\u25a0-\u27bf\u2900-\u297f\u2b00-\u2bff'
            '\u3030\u303d\u3297\u3299\U0001f000-\U0001faff]+',
            'g') WITH ORDINALITY AS m(part, n)
    )
END;

-- 0014's function, with the symbols made words after the invisible characters go.
CREATE OR REPLACE FUNCTION halldyll_search_text(content text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN regexp_replace(
    halldyll_symbol_words(halldyll_unspaced_bigrams(unaccent('unaccent'::regdictionary,
        regexp_replace(
            normalize(content, NFKC),
            '[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff'
            '\ufff9-\ufffb\U000e0001\U000e0020-\U000e007f'
            '\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7'
            '\u0610-\u061a\u0640\u064b-\u065f\u0670\u06d6-\u06dc\u06df-\u06e4\u06e7\u06e8'
            '\u06ea-\u06ed]',
            '', 'g')))),
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
