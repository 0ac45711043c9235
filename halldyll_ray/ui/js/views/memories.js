// Memories: a timeline across types, filtered by type, AI model, session, tags and time; one
// memory by itself at #/memories/<user>/<id>.

import { get, userPath } from "../api.js";
import { failure, field, fill, h, values } from "../dom.js";
import { TYPES, memoryCard, modelNames, modelOptions, userChoices } from "./common.js";

const iso = (local) => (local ? new Date(local).toISOString() : "");

export async function render(root, ctx) {
  const { me, params } = ctx;
  const models = await modelNames();
  if (params.length >= 2) {
    const [user, id] = params;
    root.append(h("h1", "Memory"), h("p", h("a", { href: "#/memories" }, "← All memories")));
    const stored = await get(`${userPath(user)}/memories/${encodeURIComponent(id)}`);
    root.append(memoryCard(stored, { me, user, models, detail: true }));
    return;
  }
  const form = h("form.filters", { "aria-label": "Memory filters" },
    field({ label: "User", name: "user", options: await userChoices(me) }),
    field({ label: "Type", name: "types", options: [["", "all types"], ...TYPES.map((t) => [t, t])] }),
    field({ label: "AI model", name: "model", options: await modelOptions() }),
    field({ label: "Session", name: "session_id", placeholder: "session id" }),
    field({ label: "Tags (comma-separated)", name: "tags" }),
    field({ label: "Since", name: "since", type: "datetime-local" }),
    field({ label: "Until", name: "until", type: "datetime-local" }),
    field({ label: "Include shared", name: "include_shared", type: "checkbox", checked: true }),
    h("button.primary", { type: "submit" }, "Apply"));
  const count = h("p.meta", { role: "status", "aria-live": "polite" });
  const list = h("div", { id: "timeline" });
  const more = h("button", { type: "button", hidden: true }, "Load more");
  root.append(h("h1", "Memories"), form, count, list, more);

  let cursor = null;
  let shown = 0;
  let lastDay = null;
  let query = {};
  let user = "me";

  let generation = 0; // a newer Apply makes the answers of older requests stale
  // A page is on its way: "Load more" waits for it (two clicks sent the same cursor twice and
  // showed its page twice; one during an Apply added the new first page twice).
  let loading = false;
  async function load(reset) {
    if (!reset && loading) return;
    const mine = reset ? ++generation : generation;
    loading = true;
    if (reset) {
      more.hidden = true;
      const v = values(form);
      user = v.user;
      query = {
        types: v.types, model: v.model, session_id: v.session_id,
        tags: v.tags.split(",").map((t) => t.trim()).filter(Boolean).join(","),
        since: iso(v.since), until: iso(v.until), include_shared: v.include_shared, limit: 50,
      };
      cursor = null; shown = 0; lastDay = null;
      fill(list);
    }
    try {
      const page = await get(`${userPath(user)}/memories`, { ...query, cursor });
      if (mine !== generation) return;
      for (const stored of page.items) {
        const day = new Date(stored.created_at).toLocaleDateString(undefined,
          { weekday: "short", year: "numeric", month: "short", day: "numeric" });
        if (day !== lastDay) { list.append(h("h2.day", day)); lastDay = day; }
        list.append(memoryCard(stored, { me, user, models }));
      }
      shown += page.items.length;
      cursor = page.next_cursor;
      more.hidden = !cursor;
      count.textContent = shown ? `${shown} memor${shown === 1 ? "y" : "ies"}${cursor ? " (more below)" : ""}` : "No memories match.";
    } catch (err) {
      if (mine !== generation) return;
      if (err.status === 401) { ctx.onUnauthenticated(); return; }
      more.hidden = true;
      count.textContent = "";
      list.append(failure(err));
    } finally {
      if (mine === generation) loading = false;
    }
  }
  form.addEventListener("submit", (event) => { event.preventDefault(); load(true); });
  more.addEventListener("click", () => load(false));
  await load(true);
}
