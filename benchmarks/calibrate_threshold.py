"""Calibrate ``SIMILARITY_THRESHOLD`` (minimum cosine of a semantic hit) for the default encoder.

A hand-written labelled set of (query, memory) pairs, where the memory answers the query in
other words, covers what an agent's memory holds: facts about people, preferences, messages
from past conversations, image prompts, transcription snippets, summaries, non-English text
and 2-3 word queries. Negatives are every query against the memories of all *other* pairs,
plus a set of off-topic distractor memories.

For thresholds 0.10 to 0.70 (step 0.05) the script reports the recall of positive pairs, the
fraction of negative pairs kept, precision/F1 over all pairs, and recall@1 after the threshold
(the query's own memory ranks first among all memories *and* clears the threshold). The
recommended threshold is the highest one that keeps at least 95 % of positives; the F1-optimal
one is reported beside it. Prints a table and writes
``benchmarks/results/calibrate_threshold.json``. Run from the repository root::

    python benchmarks/calibrate_threshold.py [--model PATH] [--min-recall 0.95]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from halldyll_ray.embedding import OnnxEncoder

RESULTS = Path(__file__).resolve().parent / "results" / "calibrate_threshold.json"

# (category, query, memory that answers it in other words). Topics are kept distinct across
# pairs so that a cross pair (query i, memory j) is a genuine non-answer; some cross pairs are
# deliberately close (same person, same kind of fact) and act as hard negatives.
PAIRS: list[tuple[str, str, str]] = [
    # --- facts about a person ---
    (
        "person",
        "what does Ada drink in the morning?",
        "Ada starts every day with a cup of green tea.",
    ),
    ("person", "where does my sister live?", "The user's sister Maya moved to Lisbon last spring."),
    ("person", "when is Tom's birthday?", "Tom was born on the 3rd of November 1988."),
    ("person", "what's my dog called?", "The user has a beagle named Biscuit."),
    (
        "person",
        "is the user allergic to anything?",
        "User mentioned a severe peanut allergy and always carries an EpiPen.",
    ),
    (
        "person",
        "what does Ravi do for a living?",
        "Ravi works as a nurse on the cardiology ward at St Mary's.",
    ),
    (
        "person",
        "how many kids does the user have?",
        "User is a father of two: a 7-year-old daughter and a 4-year-old son.",
    ),
    (
        "person",
        "which languages does Lena speak?",
        "Lena is fluent in German and Portuguese and is learning Japanese.",
    ),
    (
        "person",
        "what car does the user drive?",
        "User commutes in a blue 2019 Toyota Corolla hybrid.",
    ),
    (
        "person",
        "where did Sam go to university?",
        "Sam studied mechanical engineering at the University of Edinburgh.",
    ),
    (
        "person",
        "what time does the user usually get up?",
        "User's alarm goes off at 5:45 on weekdays.",
    ),
    (
        "person",
        "who is the user's boss?",
        "User reports to Priya Natarajan, head of data engineering.",
    ),
    ("person", "does Jonas play any instruments?", "Jonas has played the cello since he was nine."),
    ("person", "which city is the user from?", "User grew up in Lyon and still lives there."),
    ("person", "how tall is Marco?", "Marco measures 1.92 m."),
    # --- preferences ---
    (
        "preference",
        "how does the user take their coffee?",
        "Espresso, black, no sugar, never with milk.",
    ),
    (
        "preference",
        "what kind of music should I put on for the user?",
        "User loves 70s jazz fusion, especially Herbie Hancock and Weather Report.",
    ),
    (
        "preference",
        "should my answers be long or short?",
        "User prefers brief replies with bullet points, no long paragraphs.",
    ),
    (
        "preference",
        "which programming language does the user prefer?",
        "User's favourite language is Rust; dislikes writing JavaScript.",
    ),
    ("preference", "is the user vegetarian?", "User hasn't eaten meat or fish for ten years."),
    (
        "preference",
        "what sort of holidays does the user enjoy?",
        "User likes hiking trips in the mountains rather than beach resorts.",
    ),
    (
        "preference",
        "dark mode or light mode?",
        "User asked for every generated UI mockup to use a black background theme.",
    ),
    (
        "preference",
        "what films does the user like?",
        "Big fan of Studio Ghibli; rewatches Spirited Away every year.",
    ),
    (
        "preference",
        "how should I address the user?",
        "User wants to be called Dr. Okafor in formal emails and Chidi otherwise.",
    ),
    (
        "preference",
        "which units should I use with the user?",
        "Always give temperatures in Celsius and distances in kilometres.",
    ),
    (
        "preference",
        "what's the user's favourite sport to watch?",
        "User follows Formula 1 closely and never misses a race weekend.",
    ),
    (
        "preference",
        "does the user like spicy food?",
        "User can't handle chili and always asks for mild dishes.",
    ),
    # --- messages from past conversations ---
    (
        "conversation",
        "what did we decide about the launch date?",
        "assistant: Agreed, we'll push the release to 14 March so QA gets two more weeks.",
    ),
    (
        "conversation",
        "the bug the user complained about yesterday",
        "user: the export button crashes the app every time I tap it on Android",
    ),
    (
        "conversation",
        "did I ask you to remind me about something?",
        "user: ping me tomorrow at 9 so I don't forget to call the dentist",
    ),
    (
        "conversation",
        "what budget did the user mention for the laptop?",
        "user: I don't want to spend more than 1200 euros on a new notebook",
    ),
    (
        "conversation",
        "what was the recipe I asked for last week?",
        "assistant: Here's a simple shakshuka: saute onions and peppers, add crushed tomatoes, "
        "then crack the eggs in and cover.",
    ),
    (
        "conversation",
        "what gift ideas did we discuss for my wife?",
        "user: she's been wanting a pottery class or new running shoes for her birthday",
    ),
    (
        "conversation",
        "which hotel did you recommend in Rome?",
        "assistant: Near the Colosseum, Hotel Capo d'Africa is quiet and has a rooftop terrace.",
    ),
    (
        "conversation",
        "the SQL query you wrote for monthly revenue",
        "assistant: SELECT date_trunc('month', created_at) AS m, SUM(amount) FROM orders "
        "GROUP BY m ORDER BY m;",
    ),
    (
        "conversation",
        "when did the user say they were moving?",
        "user: we're relocating to the new flat at the end of August",
    ),
    (
        "conversation",
        "what did the user say about their job interview?",
        "user: the interview at Spotify went great, they want me back for a second round",
    ),
    (
        "conversation",
        "did the user complain about my tone?",
        "user: please stop being so formal with me, just talk normally",
    ),
    (
        "conversation",
        "which password manager did I set up?",
        "user: I finally installed Bitwarden on my phone and laptop",
    ),
    # --- image prompts ---
    (
        "image_prompt",
        "that picture of the fox I made",
        "a red fox in a snowy forest, photorealistic, 35mm",
    ),
    (
        "image_prompt",
        "the logo I generated for my bakery",
        "minimalist logo, wheat stalk and rolling pin, warm brown and cream, flat vector, "
        "'Maison Brioche'",
    ),
    (
        "image_prompt",
        "the cyberpunk city image",
        "neon-lit Tokyo street at night, rain reflections, flying cars, blade runner style, "
        "ultra detailed",
    ),
    (
        "image_prompt",
        "the painting of my grandmother",
        "oil portrait of an elderly woman with silver hair and a knitted shawl, Rembrandt lighting",
    ),
    (
        "image_prompt",
        "the cat astronaut one",
        "a ginger tabby wearing a space helmet floating above the moon, digital art",
    ),
    (
        "image_prompt",
        "my watercolor of the lighthouse",
        "soft watercolour, white lighthouse on rocky cliffs, stormy sea, pastel palette",
    ),
    (
        "image_prompt",
        "the fantasy map I asked for",
        "hand-drawn parchment map of an imaginary kingdom, mountains, rivers, castles, "
        "old cartography style",
    ),
    (
        "image_prompt",
        "the image of the cabin in the woods",
        "cozy log cabin among pine trees, smoke from the chimney, golden hour, 4k",
    ),
    (
        "image_prompt",
        "product shot of my sneakers",
        "white running shoe on a pastel pink backdrop, studio lighting, commercial photography",
    ),
    (
        "image_prompt",
        "the dragon illustration",
        "emerald wyvern perched on a ruined tower, wings spread, epic fantasy concept art",
    ),
    # --- transcription snippets ---
    (
        "transcript",
        "what did the doctor say about my blood pressure?",
        "[00:04:12] Dr. Klein: your readings are a bit high, around 145 over 95, so let's cut "
        "down on salt and check again in a month.",
    ),
    (
        "transcript",
        "in the podcast, what was said about sleep?",
        "[00:21:40] Host: most adults need seven to nine hours a night, and keeping a regular "
        "bedtime matters more than the exact amount.",
    ),
    (
        "transcript",
        "what did Mark say in the meeting about hiring?",
        "[00:13:05] Mark: we've got budget for two more backend engineers this quarter, so let's "
        "open the reqs on Monday.",
    ),
    (
        "transcript",
        "the voice note about the car repair",
        "uh so the garage called, the brake pads need replacing, it's gonna be around three "
        "hundred quid",
    ),
    (
        "transcript",
        "the part of the lecture about photosynthesis",
        "[00:32:18] Professor: plants turn light energy into chemical energy, store it as "
        "glucose, and release oxygen as a by-product.",
    ),
    (
        "transcript",
        "what did the landlord say on the call?",
        "[00:01:55] Landlord: the rent goes up by fifty a month from January, and the boiler "
        "gets serviced next week.",
    ),
    (
        "transcript",
        "the interview recording where the candidate talks about leadership",
        "[00:09:30] Candidate: at my last job I managed a team of six and we shipped the "
        "payments rewrite two months early.",
    ),
    (
        "transcript",
        "what did my daughter's teacher say?",
        "[00:02:47] Ms. Alvarez: Emma reads well above her grade level, but she's shy about "
        "speaking up in class.",
    ),
    # --- summaries ---
    (
        "summary",
        "summary of our trip planning chat",
        "Summary: user plans 10 days in Japan in April; wants Kyoto and Osaka, budget about "
        "3000 USD, needs advice on the JR pass.",
    ),
    (
        "summary",
        "what was the gist of the contract review?",
        "Summary: the NDA is standard except clause 7, which extends confidentiality to five "
        "years; user wants it cut to two.",
    ),
    (
        "summary",
        "recap of the marathon training discussion",
        "Session summary: user is preparing for the Berlin marathon, runs 4 times a week, has "
        "knee pain after long runs; advised to add strength work.",
    ),
    (
        "summary",
        "what did we conclude about the database migration?",
        "Summary: the team moves from MySQL to PostgreSQL in Q3; main risk is stored "
        "procedures; rollback plan agreed.",
    ),
    (
        "summary",
        "overview of the user's tax questions",
        "Summary: user is self-employed and asked about deductible home-office costs and "
        "quarterly VAT filing deadlines.",
    ),
    (
        "summary",
        "what happened in our last conversation about stress?",
        "Summary: user felt overwhelmed at work, talked about burnout, agreed to try a fixed "
        "shutdown time of 6 pm.",
    ),
    (
        "summary",
        "summary of the book we discussed",
        "Summary: discussed 'Sapiens'; the user found the chapter on the agricultural "
        "revolution the most convincing.",
    ),
    (
        "summary",
        "where did we leave the garden project?",
        "Summary: user will plant tomatoes and basil in raised beds after the last frost; "
        "compost has been delivered.",
    ),
    # --- non-English (same language, then cross-lingual) ---
    (
        "non_english",
        "quel est le plat préféré de Claire ?",
        "Claire adore la blanquette de veau de sa grand-mère.",
    ),
    (
        "non_english",
        "quand est-ce qu'on part en vacances ?",
        "Le départ pour la Bretagne est prévu le 2 août.",
    ),
    (
        "non_english",
        "Wann ist der Termin mit dem Kunden?",
        "Das Treffen mit der Firma Bauer wurde auf Donnerstag, 10 Uhr, verschoben.",
    ),
    (
        "non_english",
        "Was macht Anna beruflich?",
        "Anna arbeitet als Architektin in einem Münchner Büro.",
    ),
    (
        "non_english",
        "¿dónde vive mi hermano?",
        "Mi hermano Diego se mudó a Valparaíso hace dos años.",
    ),
    (
        "non_english",
        "¿qué le gusta leer a Lucía?",
        "Lucía devora novelas policiacas, sobre todo de Agatha Christie.",
    ),
    (
        "non_english",
        "a che ora chiude il negozio?",
        "La bottega di via Roma fa orario continuato fino alle 19:30.",
    ),
    ("non_english", "what is Pierre afraid of?", "Pierre a une peur panique des araignées."),
    (
        "non_english",
        "quelle est la couleur préférée de l'utilisateur ?",
        "User's favourite colour is teal.",
    ),
    # --- short queries (2-3 words) ---
    (
        "short",
        "wifi password",
        "The home network key is 'blue-otter-42'; the router is in the hallway.",
    ),
    ("short", "passport expiry", "User's passport is valid until October 2026."),
    ("short", "gym schedule", "User lifts weights on Mondays, Wednesdays and Fridays before work."),
    ("short", "mum's number", "Mother's mobile: +44 7700 900123."),
    (
        "short",
        "favourite pizza",
        "User always orders a margherita with extra basil and buffalo mozzarella.",
    ),
    (
        "short",
        "insurance policy",
        "Car cover is with Direct Line, policy DL-55812, renews in June.",
    ),
    ("short", "kids' school", "The children attend Greenfield Primary on Oak Lane."),
    (
        "short",
        "flight to Berlin",
        "Booked Lufthansa LH 1714 from Munich, leaving 07:10 on 3 June, seat 14C.",
    ),
    (
        "short",
        "sourdough routine",
        "User feeds the starter every evening and bakes a loaf each Sunday.",
    ),
]

# Off-topic memories that answer none of the queries (negatives for every query).
DISTRACTORS: list[str] = [
    "The Eiffel Tower was completed in 1889.",
    "user: convert 25 USD to euros please",
    "assistant: Sure, here's a haiku about autumn leaves.",
    "The quarterly board meeting minutes were archived.",
    "Python 3.12 removed the distutils module.",
    "A cheetah can reach speeds of about 110 km/h.",
    "abstract geometric pattern, teal and orange triangles, seamless tile",
    "[00:45:02] Host: thanks everyone for listening, see you next week.",
    "user: lol ok",
    "Summary: user tested the calculator tool; no issues found.",
    "The printer on the second floor is out of toner.",
    "Mount Everest is 8,849 metres tall.",
    "user: how do you say 'good morning' in Korean?",
    "assistant: The capital of Australia is Canberra.",
    "Water boils at 100 °C at sea level.",
    "low-poly 3D render of a floating island with a waterfall",
    "The meeting room booking system is down for maintenance on Saturday.",
    "user: what's 17 times 23?",
    "Il pleut depuis trois jours à Nantes.",
    "Der Zug nach Hamburg hat 20 Minuten Verspätung.",
]

THRESHOLDS = [round(0.10 + 0.05 * i, 2) for i in range(13)]  # 0.10 .. 0.70
PERCENTILES = [5, 25, 50, 75, 95]


def _percentiles(values: npt.NDArray[np.float64]) -> dict[str, float]:
    return {f"p{p}": round(float(np.percentile(values, p)), 4) for p in PERCENTILES}


def _row(
    t: float,
    pos: npt.NDArray[np.float64],
    neg: npt.NDArray[np.float64],
    top1_ok: npt.NDArray[np.bool_],
    n_queries: int,
) -> dict[str, float]:
    tp = int((pos >= t).sum())
    fp = int((neg >= t).sum())
    recall = tp / len(pos)
    precision = tp / (tp + fp) if tp + fp else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "threshold": t,
        "recall_pos": round(recall, 4),
        "neg_kept": round(fp / len(neg), 4),
        "neg_kept_per_query": round(fp / n_queries, 2),
        "precision": round(precision, 4),
        "f1": round(f1, 4),
        "recall_at_1": round(float((top1_ok & (pos >= t)).mean()), 4),
    }


def calibrate(encoder: OnnxEncoder, min_recall: float) -> dict[str, Any]:
    categories = [c for c, _, _ in PAIRS]
    queries = [q for _, q, _ in PAIRS]
    memories = [m for _, _, m in PAIRS] + DISTRACTORS
    n = len(PAIRS)

    q_emb = encoder.encode(queries).astype(np.float64)
    m_emb = encoder.encode(memories).astype(np.float64)
    sims = q_emb @ m_emb.T  # (n queries, n + distractors): cosine, vectors are L2-normalised

    pos = np.diag(sims[:, :n]).copy()
    mask = np.ones_like(sims, dtype=bool)
    mask[np.arange(n), np.arange(n)] = False
    neg = sims[mask]
    top1_ok = sims.argmax(axis=1) == np.arange(n)

    table = [_row(t, pos, neg, top1_ok, n) for t in THRESHOLDS]
    meeting = [r for r in table if r["recall_pos"] >= min_recall]
    recommended = max(r["threshold"] for r in meeting) if meeting else min(THRESHOLDS)
    f1_best = max(table, key=lambda r: (r["f1"], -r["threshold"]))["threshold"]

    # Exact cut that keeps `min_recall` of the positives, floored to the 0.05 grid.
    exact = float(np.quantile(pos, 1 - min_recall, method="lower"))
    exact_floored = math.floor(round(exact / 0.05, 6)) * 0.05
    # How much that cut moves with the sample: bootstrap over the positive pairs.
    rng = np.random.default_rng(0)
    boot = [
        np.quantile(rng.choice(pos, size=pos.size), 1 - min_recall, method="lower")
        for _ in range(2000)
    ]
    exact_ci = [
        round(float(np.percentile(boot, 2.5)), 4),
        round(float(np.percentile(boot, 97.5)), 4),
    ]

    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        by_cat[c].append(i)
    per_category = {
        c: {
            "pairs": len(idx),
            "median_pos": round(float(np.median(pos[idx])), 4),
            "min_pos": round(float(pos[idx].min()), 4),
            "recall_at_recommended": round(float((pos[idx] >= recommended).mean()), 4),
            "recall_at_1_no_threshold": round(float(top1_ok[idx].mean()), 4),
        }
        for c, idx in by_cat.items()
    }
    hardest = sorted(range(n), key=lambda i: pos[i])[:8]
    riskiest_negatives = np.argsort(-np.where(mask, sims, -np.inf), axis=None)[:8]

    return {
        "model": encoder.model_id,
        "positives": n,
        "distractors": len(DISTRACTORS),
        "negative_pairs": int(neg.size),
        "distribution": {"positive": _percentiles(pos), "negative": _percentiles(neg)},
        "recall_at_1_no_threshold": round(float(top1_ok.mean()), 4),
        "table": table,
        "min_recall": min_recall,
        "recommended_threshold": round(recommended, 2),
        "f1_optimal_threshold": round(f1_best, 2),
        "exact_threshold_for_min_recall": round(exact, 4),
        "exact_threshold_floored": round(exact_floored, 2),
        "exact_threshold_bootstrap_95ci": exact_ci,
        "per_category": per_category,
        "lowest_positives": [
            {"score": round(float(pos[i]), 4), "query": queries[i], "memory": memories[i]}
            for i in hardest
        ],
        "highest_negatives": [
            {
                "score": round(float(sims.flat[k]), 4),
                "query": queries[k // sims.shape[1]],
                "memory": memories[k % sims.shape[1]],
            }
            for k in riskiest_negatives
        ],
    }


def _print(result: dict[str, Any]) -> None:
    print(
        f"model {result['model']}: {result['positives']} positive pairs, "
        f"{result['negative_pairs']} negative pairs ({result['distractors']} distractors)"
    )
    print(f"{'cosine':10}" + "".join(f"{'p' + str(p):>8}" for p in PERCENTILES))
    for kind, dist in result["distribution"].items():
        print(f"{kind:10}" + "".join(f"{dist['p' + str(p)]:8.3f}" for p in PERCENTILES))
    print(f"recall@1 without threshold: {result['recall_at_1_no_threshold']:.3f}\n")
    header = f"{'thr':>5} {'recall':>7} {'neg kept':>9} {'neg/query':>9} {'prec':>6} {'F1':>6}"
    print(header + f" {'R@1':>6}")
    for r in result["table"]:
        print(
            f"{r['threshold']:5.2f} {r['recall_pos']:7.3f} {r['neg_kept']:9.4f} "
            f"{r['neg_kept_per_query']:9.2f} {r['precision']:6.3f} {r['f1']:6.3f} "
            f"{r['recall_at_1']:6.3f}"
        )
    print(f"\n{'category':14} {'pairs':>5} {'median':>7} {'min':>7} {'kept@rec':>9} {'R@1':>6}")
    for c, s in result["per_category"].items():
        print(
            f"{c:14} {s['pairs']:5d} {s['median_pos']:7.3f} {s['min_pos']:7.3f} "
            f"{s['recall_at_recommended']:9.3f} {s['recall_at_1_no_threshold']:6.3f}"
        )
    print("\nlowest-scoring positives:")
    for h in result["lowest_positives"]:
        print(f"  {h['score']:.3f}  {h['query']!r} -> {h['memory'][:70]!r}")
    print("highest-scoring negatives:")
    for h in result["highest_negatives"]:
        print(f"  {h['score']:.3f}  {h['query']!r} -> {h['memory'][:70]!r}")
    print(
        f"\nrecommended threshold (highest keeping >= {result['min_recall']:.0%} of positives): "
        f"{result['recommended_threshold']:.2f}  "
        f"(exact cut {result['exact_threshold_for_min_recall']:.3f}, bootstrap 95% CI "
        f"{result['exact_threshold_bootstrap_95ci'][0]:.3f}-"
        f"{result['exact_threshold_bootstrap_95ci'][1]:.3f}); "
        f"F1-optimal: {result['f1_optimal_threshold']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="EMBEDDING_MODEL_PATH (default: packaged)")
    parser.add_argument("--min-recall", type=float, default=0.95)
    parser.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    encoder = OnnxEncoder.load(args.model, provider=args.provider)
    result = calibrate(encoder, args.min_recall)
    result = {
        "benchmark": "calibrate_threshold",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        **result,
    }
    _print(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
