// The dashboard's shell: sign-in, the navigation and a view per location hash (#/memories ...).

import { ApiError, get, session } from "./api.js";
import { failure, fill, h } from "./dom.js";
import * as admin from "./views/admin.js";
import * as context from "./views/context.js";
import * as memories from "./views/memories.js";
import * as plots from "./views/plots.js";
import * as search from "./views/search.js";

const VIEWS = { memories, search, context, admin, plots };
const $ = (id) => document.getElementById(id);
const state = { me: null };

function showAlert(message) {
  const box = $("alert");
  if (!message) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = message;
  box.hidden = false;
}

function signedOut(message) {
  state.me = null;
  session.clear();
  $("nav").hidden = true;
  $("signout").hidden = true;
  $("who").textContent = "";
  fill($("view"));
  $("signin").hidden = false;
  showAlert(message || "");
  $("signin-key").focus();
}

async function signIn(key) {
  session.set(key);
  try {
    state.me = await get("/v1/me");
  } catch (err) {
    signedOut(err instanceof ApiError && err.status === 401
      ? "That API key was refused (unknown, expired, revoked, or its user is disabled)."
      : `Could not sign in: ${err.message}`);
    return false;
  }
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("signout").hidden = false;
  $("nav-admin").hidden = state.me.role !== "admin";
  $("who").textContent = `${state.me.username} (${state.me.role})`;
  showAlert("");
  return true;
}

/** A segment of the address decoded; one that is not valid percent-encoding (`%E0%A4%A`)
 * stays as it is (the API then answers it as an unknown id) instead of throwing. */
function decoded(part) {
  try { return decodeURIComponent(part); } catch { return part; }
}

/** "#/view/a/b" → ["view", "a", "b"]. */
function currentRoute() {
  const parts = window.location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decoded);
  return parts.length ? parts : ["memories"];
}

let rendering = 0;
async function route() {
  if (!state.me) return;
  const [name, ...params] = currentRoute();
  const view = VIEWS[name] || memories;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  // A fresh container per visit: a slower render of the previous view, still awaiting the
  // API, appends to its own (now detached) container, never to this one.
  const root = h("div");
  fill($("view"), root);
  const mine = ++rendering;
  document.title = `${name} · halldyll-ray`;
  try {
    await view.render(root, {
      me: state.me,
      params,
      // An API 401 mid-session (the key was revoked or expired) signs out.
      onUnauthenticated: () => signedOut("The API key is no longer valid; sign in again."),
    });
  } catch (err) {
    if (mine !== rendering) return;
    if (err instanceof ApiError && err.status === 401) {
      signedOut("The API key is no longer valid; sign in again.");
      return;
    }
    root.append(failure(err));
  }
}

function start() {
  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("signin-key");
    const key = input.value.trim();
    input.value = "";
    if (key && (await signIn(key))) {
      $("main").focus(); // before the view renders: focus never jumps under the person's feet
      await route();
    }
  });
  $("signout").addEventListener("click", () => signedOut("Signed out."));
  window.addEventListener("hashchange", () => route());
  const key = session.key();
  if (key) signIn(key).then((ok) => ok && route());
  else signedOut();
}

start();
