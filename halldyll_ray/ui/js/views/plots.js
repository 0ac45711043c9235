// Plots (uPlot, vendored): memories over time by type, facts by confidence, the user's
// storage, and the service's request rate and latency (GET /v1/stats, Admins).

import { all, get, userPath } from "../api.js";
import { failure, field, fill, h, num, values } from "../dom.js";
import { TYPES, userChoices } from "./common.js";

const COLORS = { conversation: "#0550ae", fact: "#116329", image: "#6e40c9", transcription: "#9a6700", summary: "#a40e26" };
const DAY = 86400;

function chart(title, summary, opts, data, width) {
  const box = h("figure.chart", { role: "img", "aria-label": `${title}. ${summary}` });
  const caption = h("figcaption", h("h3", title), h("p.meta", summary));
  box.append(caption);
  // uPlot is loaded by a classic script next to this module (vendor/uPlot.iife.min.js).
  const UPlot = window.uPlot;
  const plot = new UPlot({ width: width || 560, height: 260, ...opts }, data, box);
  box.plot = plot;
  return box;
}

/** A y range from 0 to a little over the largest value (counts, sizes and latencies). */
const fromZero = (u, min, max) => [0, max > 0 ? max * 1.1 : 1];

const bars = () => window.uPlot.paths.bars({ size: [0.7, 60] });

/** Memories per day, a series per type. */
function overTime(memories) {
  const days = new Map();
  for (const m of memories) {
    const day = Math.floor(new Date(m.created_at).getTime() / 1000 / DAY) * DAY;
    if (!days.has(day)) days.set(day, Object.fromEntries(TYPES.map((t) => [t, 0])));
    days.get(day)[m.type] += 1;
  }
  const seen = [...days.keys()].sort((a, b) => a - b);
  // Every day from the day before the first to the day after the last (at most ~3 years): a
  // day without memories is a real 0, and a single day still gets an axis of days.
  let xs = seen;
  if (seen.length && (seen[seen.length - 1] - seen[0]) / DAY <= 1100) {
    xs = [];
    for (let d = seen[0] - DAY; d <= seen[seen.length - 1] + DAY; d += DAY) xs.push(d);
  }
  const count = (x, t) => (days.has(x) ? days.get(x)[t] : 0);
  const data = [xs, ...TYPES.map((t) => xs.map((x) => count(x, t)))];
  const summary = TYPES.map((t) => `${t} ${memories.filter((m) => m.type === t).length}`).join(", ") + ` over ${seen.length} day${seen.length === 1 ? "" : "s"}`;
  return chart("Memories over time by type", summary, {
    // A day either side, so that one day of data is a readable day, not years of axis.
    scales: { x: { time: true }, y: { range: fromZero } },
    series: [{}, ...TYPES.map((t) => ({ label: t, stroke: COLORS[t], width: 2, points: { show: true, size: 6 } }))],
    axes: [{}, { label: "memories / day" }],
  }, data);
}

/** Facts in ten confidence bins. */
function byConfidence(facts) {
  const bins = new Array(10).fill(0);
  for (const f of facts) bins[Math.min(9, Math.floor(f.memory.confidence * 10))] += 1;
  const xs = bins.map((_, i) => i / 10 + 0.05);
  return chart("Facts by confidence", `${facts.length} facts; bins of 0.1: ${bins.join(", ")}`, {
    scales: { x: { time: false, range: [0, 1] }, y: { range: fromZero } },
    series: [{ label: "confidence" }, { label: "facts", fill: "#11632955", stroke: COLORS.fact, paths: bars(), points: { show: false } }],
    axes: [{ label: "confidence" }, { label: "facts" }],
  }, [xs, bins]);
}

/** Count and size (bytes of each memory's JSON, an estimate of what it holds) by type. */
function storage(memories, capped) {
  const rows = TYPES.map((t) => {
    const ofType = memories.filter((m) => m.type === t);
    const bytes = ofType.reduce((sum, m) => sum + new Blob([JSON.stringify(m.memory)]).size, 0);
    const messages = ofType.reduce((sum, m) => sum + (m.message_count || 0), 0);
    return { t, count: ofType.length, bytes, messages };
  });
  const xs = TYPES.map((_, i) => i);
  const figure = chart("Storage by type", rows.map((r) => `${r.t}: ${r.count} memories, ${(r.bytes / 1024).toFixed(1)} KiB`).join("; "), {
    scales: { x: { time: false, range: [-0.5, TYPES.length - 0.5] }, y: { range: fromZero } },
    series: [{ label: "type", value: (_, i) => (i === null ? "" : TYPES[i]) },
      { label: "KiB", fill: "#0550ae55", stroke: COLORS.conversation, paths: bars(), points: { show: false } }],
    axes: [{ values: (_, ticks) => ticks.map((i) => TYPES[i] || ""), splits: () => xs, label: "type" }, { label: "KiB" }],
  }, [xs, rows.map((r) => r.bytes / 1024)]);
  const tableEl = h("table", h("caption.visually-hidden", "Storage by type"),
    h("thead", h("tr", h("th", "type"), h("th.num", "memories"), h("th.num", "messages"), h("th.num", "KiB (content)"))),
    h("tbody", rows.map((r) => h("tr", h("td", r.t), h("td.num", String(r.count)), h("td.num", String(r.messages)), h("td.num", (r.bytes / 1024).toFixed(1))))));
  return h("div", figure, tableEl, capped ? h("p.meta", "Counted over the newest 5000 memories.") : null);
}

/** Every minute from the replica's start (at most the window) to now; a minute without a
 * request counts 0 requests and has no latency. */
function perMinute(stats) {
  const byMinute = new Map(stats.minutes.map((m) => [Date.parse(m.at) / 1000, m]));
  const now = Math.floor(Date.now() / 60000) * 60;
  const started = Math.floor(Date.parse(stats.started_at) / 60000) * 60;
  const first = Math.min(now - 60, Math.max(started, now - (stats.window_minutes - 1) * 60));
  const xs = [];
  for (let t = first; t <= now; t += 60) xs.push(t);
  for (const t of byMinute.keys()) if (t < first || t > now) xs.push(t);  // clock skew
  xs.sort((a, b) => a - b);
  const empty = { requests: 0, errors: 0, mean_ms: null, p95_ms: null };
  return { xs, minutes: xs.map((t) => byMinute.get(t) || empty) };
}

function service(stats) {
  const { xs, minutes } = perMinute(stats);
  const total = stats.routes.reduce((s, r) => s + r.requests, 0);
  const rate = chart("Request rate", `${total} requests since ${new Date(stats.started_at).toLocaleString()}; per minute over the last ${stats.window_minutes} minutes`, {
    scales: { x: { time: true }, y: { range: fromZero } },
    series: [{}, { label: "requests / min", stroke: "#0550ae", width: 2, points: { show: true, size: 6 } },
      { label: "5xx / min", stroke: "#a40e26", width: 2, points: { show: true, size: 6 } }],
    axes: [{}, { label: "per minute" }],
  }, [xs, minutes.map((m) => m.requests), minutes.map((m) => m.errors)]);
  const latency = chart("Latency", "mean and 95th percentile (bucket bound) per minute, ms", {
    scales: { x: { time: true }, y: { range: fromZero } },
    series: [{}, { label: "mean ms", stroke: "#116329", width: 2, points: { show: true, size: 6 } },
      { label: "p95 ms", stroke: "#9a6700", width: 2, points: { show: true, size: 6 } }],
    axes: [{}, { label: "ms" }],
  }, [xs, minutes.map((m) => m.mean_ms), minutes.map((m) => m.p95_ms)]);
  const routes = h("table", h("caption.visually-hidden", "Requests by route"),
    h("thead", h("tr", ["method", "route", "requests", "5xx", "mean ms", "p95 ms", "max ms"].map((x, i) => h(i > 1 ? "th.num" : "th", x)))),
    h("tbody", [...stats.routes].sort((a, b) => b.requests - a.requests).map((r) => h("tr",
      h("td", r.method), h("td", h("code", r.route)), h("td.num", String(r.requests)), h("td.num", String(r.errors)),
      h("td.num", num(r.mean_ms, 1)), h("td.num", num(r.p95_ms, 0)), h("td.num", num(r.max_ms, 1))))));
  return h("div", h("div.grid2", rate, latency), h("h3", "By route (this Ingress replica)"), routes);
}

export async function render(root, ctx) {
  const { me } = ctx;
  const form = h("form.filters", { "aria-label": "Whose memories" },
    field({ label: "User", name: "user", options: await userChoices(me) }),
    h("button.primary", { type: "submit" }, "Plot"));
  const mine = h("div", { id: "plots-memories" });
  const svc = h("div", { id: "plots-service" });
  root.append(h("h1", "Plots"), form, mine, h("h2", "The service"), svc);

  async function drawMemories() {
    const { user } = values(form);
    fill(mine, h("p.meta", { role: "status" }, "Loading…"));
    try {
      const memories = await all(`${userPath(user)}/memories`, { limit: 500 }, 5000);
      const facts = memories.filter((m) => m.type === "fact");
      fill(mine, h("div.grid2", overTime(memories), byConfidence(facts)), storage(memories, memories.length >= 5000));
    } catch (err) {
      if (err.status === 401) { ctx.onUnauthenticated(); return; }
      fill(mine, failure(err));
    }
  }
  form.addEventListener("submit", (event) => { event.preventDefault(); drawMemories(); });
  await drawMemories();
  try {
    fill(svc, service(await get("/v1/stats")));
  } catch (err) {
    if (err.status === 401) { ctx.onUnauthenticated(); return; }
    fill(svc, failure(err));
  }
}
