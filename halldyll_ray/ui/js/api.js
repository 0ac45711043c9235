// The public HTTP API, called with the signed-in API key: the same routes, permission matrix
// and audit as any other client. The key lives in this tab's sessionStorage only.

const KEY = "halldyll-ray.api-key";

/** An answer other than 2xx: the API's error body ({error: {code, message, request_id}}). */
export class ApiError extends Error {
  constructor(status, code, message, requestId, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
    this.field = field;
  }
  get denied() { return this.status === 403; }
}

export const session = {
  key: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

// A "." or ".." segment (also percent-encoded: URLs read %2e as a dot), a "?" or "#", a
// backslash (URLs read it as "/") or an encoded slash (the server reads %2F as "/") in a
// path: a value from the location hash would move the request to another route or query
// (#/admin/keys/..%2Fkeys%2F<id>%2Frotate%3F made "Create key" rotate that key). No user
// name, memory id or session id this dashboard puts in a path holds any of these.
const UNSAFE_PATH = /[?#\\]|%2f|%5c|(?:^|\/)(?:\.|%2e){1,2}(?:\/|$)/i;

/**
 * Call the API. `path`: the route, each value in it encoded (userPath, encodeURIComponent);
 * `query`: an object of query parameters (empty values are left out); `body`: sent as JSON.
 * Returns the parsed JSON (null for 204). Throws ApiError, without sending anything for a
 * path that would reach another route than the one it names.
 */
export async function call(method, path, { query, body } = {}) {
  if (UNSAFE_PATH.test(path)) {
    throw new ApiError(0, "invalid_path", `not a valid address in this dashboard: ${path}`, null);
  }
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const headers = { Accept: "application/json" };
  const key = session.key();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method, headers, credentials: "omit", cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, "network", `the service did not answer (${err.message})`, null);
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || "http_error",
      error.message || response.statusText, error.request_id || null, error.field);
  }
  return data;
}

export const get = (path, query) => call("GET", path, { query });
export const post = (path, body, query) => call("POST", path, { body, query });
export const patch = (path, body) => call("PATCH", path, { body });
export const del = (path) => call("DELETE", path);

/** Every page of a cursor-paged list, up to `max` items. */
export async function all(path, query, max = 2000) {
  const items = [];
  let cursor = null;
  do {
    const page = await get(path, { ...query, cursor, limit: query.limit || 500 });
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

/** A user in a path: "me" or an id. */
export const userPath = (user) => `/v1/users/${encodeURIComponent(user || "me")}`;
