-- 0007: who said a message and when, findable by both search signals.
--
-- A question names a person and a time far more often than the words of the message that
-- answers it ("When did Caroline go to the support group?" / "I went to a support group
-- yesterday", said by Caroline on 8 May 2023). A chunk now carries a label, the speaker's
-- name and the message's date ("Caroline 8 May 2023"), that its embedding reads before the
-- text (the ingestion code) and its tsvector indexes with the text (here). The chunk's
-- content stays the message as written: it is what a search reports as matched.
ALTER TABLE memory_chunks ADD COLUMN label text;

-- Chunks stored before this migration: their messages' labels, in the format of
-- halldyll_ray.components.base.message_label (their embeddings keep the text alone until
-- they are embedded again).
UPDATE memory_chunks c
SET label = concat_ws(' ', nullif(btrim(m.name), ''),
                      to_char(m.created_at AT TIME ZONE 'UTC', 'FMDD FMMonth YYYY'))
FROM conversation_messages m
WHERE c.part = 'message' AND m.memory_id = c.memory_id AND m.seq = c.part_index;

DROP INDEX memory_chunks_tsv;
ALTER TABLE memory_chunks DROP COLUMN tsv;
ALTER TABLE memory_chunks
    ADD COLUMN tsv tsvector GENERATED ALWAYS AS (
        halldyll_tsvector(CASE WHEN label IS NULL THEN content ELSE label || ' ' || content END)
    ) STORED;
CREATE INDEX memory_chunks_tsv ON memory_chunks USING gin (tsv);
