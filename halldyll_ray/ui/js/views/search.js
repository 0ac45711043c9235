// Search playground: a query, mode, threshold and filters; each result with its scores, the
// matched part highlighted and why it passed.

import { post, userPath } from "../api.js";
import { failure, field, fill, h, highlight, num, values } from "../dom.js";
import { TYPES, memoryCard, modelNames, modelOptions, userChoices } from "./common.js";

/** Why a result is in the list, from the fields the API returns. */
function why(result, threshold) {
  const sim = result.similarity;
  const bar = threshold === null ? "the server's SIMILARITY_THRESHOLD" : `the threshold ${num(threshold, 2)}`;
  switch (result.source) {
    case "semantic":
      return `Vector search: cosine similarity ${num(sim)} of its best part passed ${bar}; ranked by that similarity.`;
    case "fulltext":
      return `Full-text search (BM25): the words matched; score ${num(result.score)} is its full-text rank${sim === null ? "" : `, its cosine similarity ${num(sim)}`}.`;
    case "hybrid":
      return `Hybrid: the vector list and the BM25 full-text list fused into score ${num(result.score)}${sim === null ? " (found by full text only)" : `; cosine similarity ${num(sim)}`}.`;
    default:
      return `score ${num(result.score)}`;
  }
}

export async function render(root, ctx) {
  const { me } = ctx;
  const models = await modelNames();
  const form = h("form.filters", { "aria-label": "Search" },
    field({ label: "Query", name: "query", required: true, size: 40 }),
    field({ label: "Mode", name: "mode", options: [["", "server default"], ["hybrid", "hybrid"], ["semantic", "semantic"], ["fulltext", "fulltext"]] }),
    field({ label: "Threshold (−1 to 1)", name: "threshold", type: "number", step: "0.01", min: "-1", max: "1" }),
    field({ label: "Limit", name: "limit", type: "number", min: "1", max: "100", value: "10" }),
    field({ label: "Group", name: "group", options: [["part", "a result per matching part"], ["memory", "a result per memory"]] }),
    field({ label: "User", name: "user", options: await userChoices(me) }),
    field({ label: "Type", name: "types", options: [["", "all types"], ...TYPES.map((t) => [t, t])] }),
    field({ label: "AI model", name: "model", options: await modelOptions("any") }),
    field({ label: "Session", name: "session_id" }),
    field({ label: "Tags (comma-separated)", name: "tags" }),
    h("button.primary", { type: "submit" }, "Search"));
  const status = h("p.meta", { role: "status", "aria-live": "polite" });
  const results = h("ol", { id: "results", "aria-label": "Results" });
  root.append(h("h1", "Search playground"), form, status, results);

  let generation = 0; // only the latest search's answer is shown
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const mine = ++generation;
    const v = values(form);
    const threshold = v.threshold === "" ? null : Number(v.threshold);
    const request = { query: v.query, group: v.group, limit: Number(v.limit) || 10 };
    if (v.mode) request.mode = v.mode;
    if (threshold !== null) request.threshold = threshold;
    if (v.types) request.types = [v.types];
    if (v.model) request.model = v.model;
    if (v.session_id) request.session_id = v.session_id;
    const tags = v.tags.split(",").map((t) => t.trim()).filter(Boolean);
    if (tags.length) request.tags = tags;
    fill(results);
    status.textContent = "Searching…";
    let answer;
    const started = performance.now();
    try {
      answer = await post(`${userPath(v.user)}/search`, request);
    } catch (err) {
      if (mine !== generation) return;
      if (err.status === 401) { ctx.onUnauthenticated(); return; }
      status.textContent = "";
      results.append(h("li", failure(err)));
      return;
    }
    if (mine !== generation) return;
    const ms = Math.round(performance.now() - started);
    status.textContent = `${answer.results.length} result${answer.results.length === 1 ? "" : "s"} in ${ms} ms`;
    answer.results.forEach((r, i) => {
      const explain = h("div.why",
        h("dl.props",
          h("dt", "rank"), h("dd", String(i + 1)),
          h("dt", "score"), h("dd", num(r.score)),
          h("dt", "similarity"), h("dd", num(r.similarity)),
          h("dt", "found by"), h("dd", r.source),
          h("dt", "matched part"), h("dd", `${r.matched.part} #${r.matched.index}`)),
        h("blockquote", { class: "matched" }, highlight(r.matched.text, v.query)),
        h("p", why(r, threshold)));
      results.append(h("li", memoryCard(r.memory, { me, user: v.user, models, query: v.query, extra: explain })));
    });
  });
}
