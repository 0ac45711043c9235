// Admin: users and roles, API keys (a new key shown once), viewer grants, AI models and the
// audit log. Every action is an API call; what the role may not do comes back as a denial.

import { del, get, patch, post, userPath } from "../api.js";
import { failure, field, fill, h, values, when } from "../dom.js";
import { forgetModels } from "./common.js";

const ROLES = ["admin", "user", "service", "viewer"];
const KINDS = ["llm", "vision-language", "image-generation", "control", "face-recognition", "embedding", "speech", "other"];
const TABS = [["users", "Users"], ["keys", "API keys"], ["grants", "Viewer grants"], ["models", "AI models"], ["audit", "Audit log"]];

const table = (heads, rows) => h("table",
  h("thead", h("tr", heads.map((x) => h("th", x)))), h("tbody", rows));

/** Run an action, showing its failure (a denial as such) in `status`; true when it worked. */
async function attempt(status, action, done) {
  try {
    await action();
    if (done) fill(status, h("p.meta", done));
    return true;
  } catch (err) {
    fill(status, failure(err));
    return false;
  }
}

async function users(root) {
  const status = h("div", { role: "status" });
  const list = h("div");
  const form = h("form.inline", { "aria-label": "Create a user" },
    field({ label: "Username", name: "username", required: true }),
    field({ label: "Email", name: "email", type: "email" }),
    field({ label: "Role", name: "role", options: ROLES.map((r) => [r, r]), value: "user" }),
    h("button.primary", { type: "submit" }, "Create user"));
  root.append(h("h2", "Users and roles"), form, status, list);
  async function refresh() {
    const page = await get("/v1/users", { limit: 1000 });
    fill(list, table(["username", "email", "role", "status", "created", ""], page.items.map((u) => {
      const role = h("select", { "aria-label": `Role of ${u.username}` }, ROLES.map((r) => h("option", { value: r, selected: r === u.role }, r)));
      const save = h("button", { type: "button" }, "Set role");
      save.addEventListener("click", () => attempt(status, async () => {
        await patch(`/v1/users/${u.id}`, { role: role.value });
        await refresh();
      }, `${u.username} is now ${role.value}.`));
      const toggle = h("button", { type: "button" }, u.disabled ? "Enable" : "Disable");
      toggle.addEventListener("click", () => attempt(status, async () => {
        await patch(`/v1/users/${u.id}`, { disabled: !u.disabled });
        await refresh();
      }, `${u.username} ${u.disabled ? "enabled" : "disabled"}.`));
      return h("tr", h("td", u.username), h("td", u.email || "—"), h("td", role, " ", save),
        h("td", u.disabled ? "disabled" : "active", " ", toggle), h("td", when(u.created_at)),
        h("td", h("a", { href: `#/admin/keys/${u.id}` }, "keys")));
    })));
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const v = values(form);
    attempt(status, async () => {
      await post("/v1/users", { username: v.username, email: v.email || null, role: v.role });
      form.reset();
      await refresh();
    }, `Created ${v.username}.`);
  });
  await refresh();
}

async function keys(root, me, params) {
  const page = await get("/v1/users", { limit: 1000 });
  const owner = params[0] || me.id;
  const status = h("div", { role: "status" });
  const secret = h("div", { "aria-live": "polite" });
  const list = h("div");
  const pick = field({ label: "User", name: "user", options: page.items.map((u) => [u.id, `${u.username} (${u.role})`]), value: owner });
  pick.querySelector("select").addEventListener("change", (e) => { window.location.hash = `#/admin/keys/${e.target.value}`; });
  const form = h("form.inline", { "aria-label": "Create an API key" },
    field({ label: "Key name", name: "name", required: true }),
    field({ label: "Expires", name: "expires_at", type: "datetime-local" }),
    h("button.primary", { type: "submit" }, "Create key"));
  root.append(h("h2", "API keys"), pick, form, secret, status, list);
  const showOnce = (created, what) => fill(secret, h("div.secret",
    h("p", h("strong", `${what}: copy it now, it is shown once.`)),
    h("code", { "aria-label": "new API key" }, created.key),
    h("p.meta", `name ${created.name} · prefix ${created.prefix}`)));
  async function refresh() {
    const found = await get(`${userPath(owner)}/keys`);
    fill(list, table(["name", "prefix", "created", "expires", "last used", "revoked", ""], found.items.map((k) => {
      const rotate = h("button", { type: "button", disabled: Boolean(k.revoked_at) }, "Rotate");
      const revoke = h("button.danger", { type: "button", disabled: Boolean(k.revoked_at) }, "Revoke");
      rotate.addEventListener("click", () => attempt(status, async () => {
        showOnce(await post(`/v1/keys/${k.id}/rotate`), `The rotated key ${k.name}`);
        await refresh();
      }, `Rotated ${k.name}; the old key no longer works.`));
      revoke.addEventListener("click", () => attempt(status, async () => {
        await del(`/v1/keys/${k.id}`);
        await refresh();
      }, `Revoked ${k.name}.`));
      return h("tr", h("td", k.name), h("td", h("code", k.prefix)), h("td", when(k.created_at)),
        h("td", when(k.expires_at)), h("td", when(k.last_used_at)), h("td", when(k.revoked_at)),
        h("td", rotate, " ", revoke));
    })));
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const v = values(form);
    attempt(status, async () => {
      const body = { name: v.name };
      if (v.expires_at) body.expires_at = new Date(v.expires_at).toISOString();
      showOnce(await post(`${userPath(owner)}/keys`, body), "The new key");
      form.reset();
      await refresh();
    });
  });
  await refresh();
}

async function grants(root) {
  const page = await get("/v1/users", { limit: 1000 });
  const byId = new Map(page.items.map((u) => [u.id, u.username]));
  const viewers = page.items.filter((u) => u.role === "viewer");
  const status = h("div", { role: "status" });
  const list = h("div");
  root.append(h("h2", "Viewer grants"));
  if (!viewers.length) { root.append(h("p.notice", "No Viewer users yet: create one under Users.")); return; }
  const form = h("form.inline", { "aria-label": "Grant a viewer" },
    field({ label: "Viewer", name: "viewer", options: viewers.map((u) => [u.id, u.username]) }),
    field({ label: "May read the memories of", name: "owner", options: page.items.filter((u) => u.role !== "viewer").map((u) => [u.id, u.username]) }),
    h("button.primary", { type: "submit" }, "Grant"));
  root.append(form, status, list);
  async function refresh() {
    const rows = [];
    for (const v of viewers) {
      const found = await get(`/v1/users/${v.id}/grants`);
      for (const g of found.items) {
        const revoke = h("button.danger", { type: "button" }, "Revoke");
        revoke.addEventListener("click", () => attempt(status, async () => {
          await del(`/v1/users/${v.id}/grants/${g.owner_id}`);
          await refresh();
        }, "Grant revoked."));
        rows.push(h("tr", h("td", v.username), h("td", byId.get(g.owner_id) || g.owner_id), h("td", revoke)));
      }
    }
    fill(list, rows.length ? table(["viewer", "may read", ""], rows) : h("p.meta", "No grants."));
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const v = values(form);
    attempt(status, async () => {
      await post(`/v1/users/${v.viewer}/grants`, { owner_id: v.owner });
      await refresh();
    }, "Granted.");
  });
  await refresh();
}

async function models(root) {
  const status = h("div", { role: "status" });
  const list = h("div");
  const form = h("form.inline", { "aria-label": "Register an AI model" },
    field({ label: "Name", name: "name", required: true }),
    field({ label: "Kind", name: "kind", options: KINDS.map((k) => [k, k]) }),
    field({ label: "Version", name: "version" }),
    h("button.primary", { type: "submit" }, "Register"));
  root.append(h("h2", "AI models"), form, status, list);
  async function refresh() {
    const page = await get("/v1/models");
    fill(list, table(["name", "kind", "version", "registered", ""], page.items.map((m) => {
      const remove = h("button.danger", { type: "button" }, "Delete");
      // By id: a name may hold a "/" or be "..", which no request path can carry safely.
      remove.addEventListener("click", () => attempt(status, async () => {
        await del(`/v1/models/${encodeURIComponent(m.id)}`);
        forgetModels();
        await refresh();
      }, `Deleted ${m.name}.`));
      return h("tr", h("td", m.name), h("td", m.kind), h("td", m.version || "—"), h("td", when(m.created_at)), h("td", remove));
    })));
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const v = values(form);
    attempt(status, async () => {
      await post("/v1/models", { name: v.name, kind: v.kind, version: v.version || null });
      forgetModels();
      form.reset();
      await refresh();
    }, `Registered ${v.name}.`);
  });
  await refresh();
}

async function audit(root) {
  const form = h("form.filters", { "aria-label": "Audit filters" },
    field({ label: "Actor (user id)", name: "actor", size: 36 }),
    field({ label: "Target id", name: "target", size: 36 }),
    field({ label: "Action", name: "operation", placeholder: "e.g. memory.update" }),
    field({ label: "Outcome", name: "outcome", options: [["", "any"], ["ok", "ok"], ["denied", "denied"], ["error", "error"]] }),
    field({ label: "Request id", name: "request_id" }),
    h("button.primary", { type: "submit" }, "Filter"));
  const list = h("div", { id: "audit-rows" });
  const older = h("button", { type: "button", hidden: true }, "Older");
  root.append(h("h2", "Audit log"), form, list, older);
  let beforeId = null;
  let generation = 0; // only the latest filter's rows are shown
  async function load(reset) {
    const mine = ++generation;
    const v = values(form);
    if (reset) beforeId = null;
    fill(list, h("p.meta", { role: "status" }, "Loading…"));
    let rows;
    try {
      // The API's user_id matches the actor or the user acted for; the actor is kept here.
      const page = await get("/v1/audit", { user_id: v.actor, operation: v.operation, outcome: v.outcome, before_id: beforeId, limit: 200 });
      rows = page.items;
    } catch (err) {
      if (mine === generation) { fill(list, failure(err)); older.hidden = true; }
      return;
    }
    if (mine !== generation) return;
    // The API filters by user, action and outcome; actor, target and request id are matched here.
    const shown = rows.filter((r) => (!v.actor || r.actor_id === v.actor) && (!v.target || (r.target_ids || []).includes(v.target))
      && (!v.request_id || r.request_id === v.request_id));
    beforeId = rows.length ? rows[rows.length - 1].id : null;
    older.hidden = rows.length < 200;
    fill(list, h("p.meta", { role: "status" }, `${shown.length} row${shown.length === 1 ? "" : "s"}${rows.length === 200 ? " (press Older for more)" : ""}`),
      table(["#", "at", "actor", "acting for", "action", "target", "outcome", "request id", "details"], shown.map((r) =>
        h("tr", { class: `outcome-${r.outcome}` }, h("td.num", String(r.id)), h("td", when(r.at)),
          h("td", h("code", { title: r.actor_id }, (r.actor_id || "—").slice(0, 8))),
          h("td", h("code", { title: r.acting_for }, (r.acting_for || "—").slice(0, 8))),
          h("td", r.operation), h("td", r.target_type ? `${r.target_type} ${(r.target_ids || []).map((t) => String(t).slice(0, 8)).join(", ")}` : "—"),
          h("td", r.outcome), h("td", h("code", r.request_id || "—")),
          h("td", h("code", JSON.stringify(r.details || {})))))));
  }
  form.addEventListener("submit", (event) => { event.preventDefault(); load(true); });
  older.addEventListener("click", () => load(false));
  await load(true);
}

const SECTIONS = { users, keys, grants, models, audit };

export async function render(root, ctx) {
  const [tab = "users", ...rest] = ctx.params;
  root.append(h("h1", "Admin"), h("nav.tabs", { "aria-label": "Admin sections" }, TABS.map(([id, label]) =>
    h("a", { href: `#/admin/${id}`, "aria-current": id === tab ? "page" : null }, label))));
  const section = h("section", { "aria-label": tab });
  root.append(section);
  await (SECTIONS[tab] || users)(section, ctx.me, rest);
}
