// The console's one client of the public API. The key lives in this tab's sessionStorage and
// travels only in the Authorization header: never in a URL (which servers and proxies log),
// never in a cookie.

const KEY = "prefix-server.api-key";

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type;
    this.field = error.field;
    this.line = error.line;
  }
}

// Paths are relative to the console's own (/console/), so a server under a root path works.
function url(path) {
  return new URL(`..${path}`, document.baseURI).toString();
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${key.get()}`, ...extra };
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return new ApiError(response.status, body);
}

export async function call(method, path, { json, form, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const response = await fetch(url(path), init);
  if (!response.ok) throw await failure(response);
  if (response.status === 204) return null;
  return response.json();
}

// Which kind of key this is, with one call both kinds may make (GET /v1/usage): "tenant" or
// "admin". Answers to a tenant's key carry OpenAI's x-ratelimit-* headers and the admin key is
// never rate limited, so its answers carry none (docs/api.md, "Rate limits"). A refused key
// throws the 401.
export async function identify() {
  const response = await fetch(url("/v1/usage?limit=1"), { headers: headers() });
  if (!response.ok) throw await failure(response);
  return response.headers.has("x-ratelimit-limit-requests") ? "tenant" : "admin";
}

// The tenant a tenant key belongs to, from what the key may read: its own prefixes, its
// fine-tuning jobs (organization_id) or its usage rows. null when it has none of these yet
// (the keys page then asks for the name, and the server refuses a wrong one with 403).
export async function ownTenant() {
  const [prefixes, jobs, usage] = await Promise.all([
    call("GET", "/v1/prefixes?scope=own&limit=1"),
    call("GET", "/v1/fine_tuning/jobs?limit=1"),
    call("GET", "/v1/usage?limit=1"),
  ]);
  return prefixes.data[0]?.owner || jobs.data[0]?.organization_id || usage.data[0]?.tenant || null;
}

export async function blob(path) {
  const response = await fetch(url(path), { headers: headers() });
  if (!response.ok) throw await failure(response);
  return response.blob();
}

// Every page of a cursor-paged listing (`next`), up to `pages` pages.
export async function all(path, pages = 10) {
  const items = [];
  let cursor = null;
  for (let i = 0; i < pages; i += 1) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await call("GET", cursor ? `${path}${sep}cursor=${encodeURIComponent(cursor)}` : path);
    items.push(...page.data);
    cursor = page.next;
    if (!cursor) break;
  }
  return items;
}

// POST a streaming request and call onEvent with each server-sent event's JSON, until
// `data: [DONE]`. fetch, not EventSource: EventSource can send neither a body nor a header.
export async function stream(path, body, onEvent, signal) {
  const response = await fetch(url(path), {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new ApiError(200, parsed);
        onEvent(parsed);
      }
    }
  }
}
