// Context preview: the prompt block prepare_context gives for a session and a message under a
// token budget, with its sections, token counts and linked sources.

import { post, userPath } from "../api.js";
import { failure, field, fill, h, num, values } from "../dom.js";
import { modelOptions, userChoices } from "./common.js";

export async function render(root, ctx) {
  const { me } = ctx;
  const form = h("form.filters", { "aria-label": "Context request" },
    field({ label: "User", name: "user", options: await userChoices(me) }),
    field({ label: "Session", name: "session", required: true, value: "default" }),
    field({ label: "User message", name: "user_message", required: true, size: 40 }),
    field({ label: "Recent turns", name: "recent_turns", type: "number", min: "0", max: "100", value: "6" }),
    field({ label: "Token budget", name: "max_tokens", type: "number", min: "1", placeholder: "server default" }),
    field({ label: "AI model", name: "model", options: await modelOptions("none") }),
    h("button.primary", { type: "submit" }, "Preview"));
  const out = h("div", { id: "context-out" });
  root.append(h("h1", "Context preview"), form, out);

  let generation = 0; // only the latest preview is shown
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const mine = ++generation;
    const v = values(form);
    const request = { user_message: v.user_message, recent_turns: Number(v.recent_turns || 0) };
    if (v.max_tokens) request.max_tokens = Number(v.max_tokens);
    if (v.model) request.model = v.model;
    fill(out, h("p.meta", { role: "status" }, "Building…"));
    let block;
    try {
      block = await post(`${userPath(v.user)}/sessions/${encodeURIComponent(v.session)}/prepare`, request);
    } catch (err) {
      if (mine !== generation) return;
      if (err.status === 401) { ctx.onUnauthenticated(); return; }
      fill(out, failure(err));
      return;
    }
    if (mine !== generation) return;
    const link = (id) => h("a", { href: `#/memories/${encodeURIComponent(v.user)}/${id}` }, id.slice(0, 8));
    fill(out,
      h("p", { role: "status" }, `${block.token_count} of ${block.max_tokens} tokens `,
        h("meter", { min: 0, max: block.max_tokens, value: block.token_count, "aria-label": "tokens used" })),
      block.sections.map((section) => {
        const tokens = section.items.reduce((sum, item) => sum + item.tokens, 0);
        return h("section", { "aria-label": `section ${section.name}` },
          h("h2", `${section.name} · ${tokens} tokens · ${section.items.length} item${section.items.length === 1 ? "" : "s"}`),
          h("table", h("thead", h("tr", h("th", "source"), h("th", "type"), h("th.num", "score"), h("th.num", "tokens"), h("th", "text"))),
            h("tbody", section.items.map((item) => h("tr",
              h("td", item.memory_id ? link(item.memory_id) : "—"), h("td", item.type),
              h("td.num", num(item.score, 3)), h("td.num", String(item.tokens)), h("td", item.text))))));
      }),
      h("h2", "Sources"),
      block.sources.length ? h("p", block.sources.map((id, i) => [i ? ", " : "", link(id)])) : h("p.meta", "None."),
      h("h2", "Prompt block"),
      h("pre", { "aria-label": "prompt block" }, block.text));
  });
}
