// A small element builder: text goes in as text nodes, never as HTML (memory content is data).

/**
 * h("tag.class", {attr: value, onclick: fn, for: id}, ...children)
 * Children: nodes, strings (text), numbers, arrays, null/false (skipped).
 */
export function h(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag || "div");
  if (classes.length) el.className = classes.join(" ");
  if (attrs && (attrs instanceof Node || typeof attrs !== "object" || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "for") {
      el.htmlFor = value;
    } else if (name === "value") {
      el.value = value;
    } else if (name === "checked" || name === "selected" || name === "disabled" || name === "hidden") {
      el[name] = Boolean(value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

let counter = 0;
/** A fresh element id. */
export const uid = (prefix = "f") => `${prefix}-${++counter}`;

/** A labelled form field: {label, name, type, value, options: [[value, text]], ...attrs}. */
export function field({ label, name, type = "text", options, ...attrs }) {
  const id = uid(name);
  let control;
  if (options) {
    control = h("select", { id, name, ...attrs },
      options.map(([value, text]) => h("option", { value, selected: String(attrs.value ?? "") === String(value) }, text)));
  } else if (type === "textarea") {
    control = h("textarea", { id, name, ...attrs });
  } else {
    control = h("input", { id, name, type, ...attrs });
  }
  if (type === "checkbox") return h("div.field.check", control, h("label", { for: id }, label));
  return h("div.field", h("label", { for: id }, label), control);
}

/** The values of a form's named controls (checkboxes as booleans, everything else as text). */
export function values(form) {
  const out = {};
  for (const el of form.elements) {
    if (!el.name) continue;
    out[el.name] = el.type === "checkbox" ? el.checked : el.value.trim();
  }
  return out;
}

/** How an API failure is shown: a denial as such, anything else with its code and request id. */
export function failure(err) {
  if (err && err.status === 403) {
    return h("div.denied", { role: "alert" },
      h("strong", "Permission denied"), err.message,
      err.requestId ? h("div.meta", `request id ${err.requestId}`) : null);
  }
  const status = err && err.status ? `${err.status} ${err.code}: ` : "";
  return h("div.denied", { role: "alert" }, `${status}${err ? err.message : "error"}`,
    err && err.requestId ? h("div.meta", `request id ${err.requestId}`) : null);
}

/** A date-time for people (local time), or "—". */
export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

export const num = (x, digits = 3) => (x === null || x === undefined ? "—" : Number(x).toFixed(digits));

/** `text` with each occurrence of the query's words wrapped in <mark>. */
export function highlight(text, query) {
  const words = [...new Set((query || "").toLowerCase().match(/[\p{L}\p{N}]{2,}/gu) || [])];
  if (!words.length) return [text];
  const escaped = words.map((w) => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  const pattern = new RegExp(`(${escaped.join("|")})`, "giu");
  return text.split(pattern).map((piece, i) => (i % 2 ? h("mark", piece) : piece));
}

/** Replace the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}
