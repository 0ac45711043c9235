// What several views share: whose memories a person may pick, the model registry, and how a
// memory is shown (each type as itself) with its edit and delete controls.

import { del, get, patch, userPath } from "../api.js";
import { failure, field, fill, h, highlight, num, values, when } from "../dom.js";

export const TYPES = ["conversation", "fact", "image", "transcription", "summary"];
const WRITERS = new Set(["admin", "user", "service"]);

/** Roles whose keys may edit and delete memories (memory.write); the server decides anyway. */
export const canWrite = (me) => WRITERS.has(me.role);

/** [[value, label]] of the users whose memories `me` may read: Admins every user, Viewers
 * their grants, everyone else themselves. */
export async function userChoices(me) {
  const choices = [["me", `me (${me.username})`]];
  if (me.role === "admin") {
    const page = await get("/v1/users", { limit: 1000 });
    for (const u of page.items) if (u.id !== me.id) choices.push([u.id, `${u.username} (${u.role})`]);
  } else if (me.role === "viewer") {
    const grants = await get("/v1/users/me/grants");
    for (const g of grants.items) choices.push([g.owner_id, `owner ${g.owner_id}`]);
  }
  return choices;
}

let modelsCache = null;
const modelLabel = (m) => (m.version ? `${m.name} ${m.version}` : m.name);
async function registered() {
  if (!modelsCache) modelsCache = (await get("/v1/models")).items;
  return modelsCache;
}
/** id → "name version" of the registered AI models (for showing a memory's model). */
export async function modelNames() {
  return new Map((await registered()).map((m) => [m.id, modelLabel(m)]));
}
/** [[name, label]] of the registered AI models, for a filter (the API takes a name). */
export async function modelOptions(none = "any") {
  return [["", none], ...(await registered()).map((m) => [m.name, modelLabel(m)])];
}
export const forgetModels = () => { modelsCache = null; };

const prop = (label, value) => (value === null || value === undefined || value === "" ? null : [h("dt", label), h("dd", value)]);

function jsonProps(label, obj) {
  if (!obj || !Object.keys(obj).length) return null;
  return [h("dt", label), h("dd", h("dl.props", Object.entries(obj).map(([k, v]) =>
    [h("dt", k), h("dd", typeof v === "object" ? JSON.stringify(v) : String(v))])))];
}

function messagesList(messages, query) {
  return h("ol.messages", { "aria-label": "Messages" }, messages.map((m) =>
    h("li", h("span.role", m.name ? `${m.role} (${m.name})` : m.role),
      highlight(m.content, query), h("span.meta", ` · #${m.seq} · ${when(m.created_at)}`))));
}

/** The body of a memory, by type. */
function body(stored, { query, user, detail }) {
  const m = stored.memory;
  switch (stored.type) {
    case "conversation": {
      const box = h("div", m.title ? h("strong", highlight(m.title, query)) : null);
      if (stored.messages && stored.messages.length) {
        box.append(messagesList(stored.messages, query));
      } else if (stored.message_count) {
        const holder = h("div");
        const show = h("button", {
          type: "button",
          onclick: async () => {
            show.disabled = true;
            try {
              const full = await get(`${userPath(user)}/memories/${stored.id}`);
              fill(holder, messagesList(full.messages, query));
            } catch (err) { fill(holder, failure(err)); }
          },
        }, `Show ${stored.message_count} message${stored.message_count === 1 ? "" : "s"}`);
        holder.append(show);
        box.append(holder);
        if (detail) show.click();
      } else {
        box.append(h("p.meta", "No messages yet."));
      }
      return box;
    }
    case "fact":
      return h("div", h("p", highlight(m.statement, query)), h("dl.props",
        [h("dt", "confidence"), h("dd", h("meter", { min: 0, max: 1, value: m.confidence, "aria-label": "confidence" }), ` ${num(m.confidence, 2)}`)],
        prop("reinforced", `${stored.reinforcement_count} time${stored.reinforcement_count === 1 ? "" : "s"}`),
        prop("kind", m.kind),
        prop("expires", stored.expires_at ? when(stored.expires_at) : "never"),
        prop("source", m.source)));
    case "image":
      return h("div", h("p", highlight(m.prompt, query)), h("dl.props",
        prop("negative prompt", m.negative_prompt),
        prop("generator", m.generator),
        prop("seed", m.seed === null || m.seed === undefined ? null : String(m.seed)),
        prop("steps", m.steps), prop("guidance scale", m.guidance_scale),
        prop("scheduler", m.scheduler),
        prop("size", m.size ? `${m.size.width} × ${m.size.height}` : null),
        jsonProps("ControlNet", m.controlnet), jsonProps("InstantID", m.instantid),
        prop("uri", m.uri)));
    case "transcription":
      return h("div", h("dl.props",
        prop("language", m.language || "unknown"),
        prop("duration", m.duration_seconds === null || m.duration_seconds === undefined ? null : `${num(m.duration_seconds, 1)} s`),
        prop("audio", m.audio_uri)),
      m.segments && m.segments.length
        ? h("table", h("caption.visually-hidden", "Segments"),
          h("thead", h("tr", h("th", "start"), h("th", "end"), h("th", "speaker"), h("th", "text"))),
          h("tbody", m.segments.map((s) => h("tr", h("td.num", num(s.start, 1)), h("td.num", num(s.end, 1)),
            h("td", s.speaker || ""), h("td", highlight(s.text, query))))))
        : h("p", highlight(m.text, query)));
    case "summary":
      return h("div", h("p", highlight(m.text, query)), m.covers && m.covers.length
        ? h("div", h("span.meta", "Covers: "), m.covers.map((id, i) => [i ? ", " : "",
          h("a", { href: `#/memories/${encodeURIComponent(user || "me")}/${id}` }, id.slice(0, 8))]))
        : null);
    default:
      return h("pre", JSON.stringify(m, null, 2));
  }
}

/** The edit form of a memory: the fields MemoryUpdate allows for its type. */
function editForm(stored, onSave, onCancel) {
  const m = stored.memory;
  const fields = [];
  if (stored.type === "conversation") fields.push(field({ label: "Title", name: "title", value: m.title || "" }));
  if (stored.type === "fact") {
    fields.push(field({ label: "Statement", name: "statement", type: "textarea", value: m.statement }));
    fields.push(field({ label: "Confidence (0–1)", name: "confidence", type: "number", step: "0.01", min: "0", max: "1", value: m.confidence }));
    fields.push(field({ label: "Kind", name: "kind", value: m.kind, options: [["permanent", "permanent"], ["ephemeral", "ephemeral"]] }));
  }
  if (stored.type === "summary" || stored.type === "transcription") {
    fields.push(field({ label: "Text", name: "text", type: "textarea", value: m.text }));
  }
  fields.push(field({ label: "Tags (comma-separated)", name: "tags", value: stored.tags.join(", ") }));
  fields.push(field({ label: "Importance (0–1)", name: "importance", type: "number", step: "0.01", min: "0", max: "1", value: stored.importance }));
  const form = h("form.inline", { "aria-label": "Edit memory" }, fields,
    h("button.primary", { type: "submit" }, "Save"),
    h("button", { type: "button", onclick: onCancel }, "Cancel"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const v = values(form);
    const update = {
      tags: v.tags ? v.tags.split(",").map((t) => t.trim()).filter(Boolean) : [],
      importance: Number(v.importance),
    };
    if ("title" in v) update.title = v.title;
    if ("statement" in v) update.statement = v.statement;
    if ("confidence" in v) update.confidence = Number(v.confidence);
    if ("kind" in v) update.kind = v.kind;
    if ("text" in v) update.text = v.text;
    onSave(update);
  });
  return form;
}

/**
 * A memory as a card: its type as itself, then Edit and Delete for roles that write.
 * opts: {me, user ("me" or an id), query (to highlight), models (id → name), extra (a node
 * shown under the header), detail (open the messages)}.
 */
export function memoryCard(stored, opts) {
  const { me, user, query, models, extra } = opts;
  const card = h("article.card", { "aria-label": `${stored.type} ${stored.id}`, "data-memory-id": stored.id });
  const status = h("div", { role: "status" });
  const draw = (s) => {
    const model = s.model_id ? (models && models.get(s.model_id)) || s.model_id : null;
    const actions = h("div.actions");
    if (canWrite(me)) {
      const edit = h("button", { type: "button", "aria-label": `Edit ${s.type} ${s.id.slice(0, 8)}` }, "Edit");
      const remove = h("button.danger", { type: "button", "aria-label": `Delete ${s.type} ${s.id.slice(0, 8)}` }, "Delete");
      edit.addEventListener("click", () => {
        const form = editForm(s, async (update) => {
          try {
            const saved = await patch(`${userPath(user)}/memories/${s.id}`, update);
            if (s.messages && s.messages.length) saved.messages = s.messages;
            draw(saved);
            fill(status, "Saved.");
          } catch (err) { fill(status, failure(err)); }
        }, () => draw(s));
        actions.replaceWith(form);
        form.querySelector("input, textarea, select").focus();
      });
      remove.addEventListener("click", () => {
        const confirm = h("button.danger", { type: "button" }, "Confirm delete");
        const cancel = h("button", { type: "button", onclick: () => draw(s) }, "Keep");
        confirm.addEventListener("click", async () => {
          try {
            await del(`${userPath(user)}/memories/${s.id}`);
            fill(card, h("p.meta", { role: "status" }, `Deleted ${s.type} ${s.id}.`));
          } catch (err) { fill(status, failure(err)); }
        });
        fill(actions, h("span", "Delete this memory for good? "), confirm, cancel);
        confirm.focus();
      });
      actions.append(edit, remove);
    }
    fill(card,
      h("header",
        h("span", { class: `badge ${s.type}` }, s.type),
        h("a.meta", { href: `#/memories/${encodeURIComponent(user || "me")}/${s.id}`, "aria-label": `Open ${s.type} ${s.id}` }, s.id.slice(0, 8)),
        h("span.meta", when(s.created_at)),
        s.session_id ? h("span.meta", `session ${s.session_id}`) : null,
        model ? h("span.meta", `model ${model}`) : null,
        h("span.meta", `importance ${num(s.importance, 2)}`),
        s.tags.map((t) => h("span.tag", t))),
      extra || null,
      body(s, opts),
      actions, status);
  };
  draw(stored);
  return card;
}
