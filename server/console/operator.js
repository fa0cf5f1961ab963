// The operator's page (admin key): the tenants that used the server, from GET /v1/usage (the
// API has no route that lists tenants, so a tenant that never used anything is looked up by
// name); one tenant's quotas, rate limits and stored bytes (GET /v1/tenants/{name}), changed
// with PATCH; its keys.
import { all, call } from "./api.js";
import { bytes, clear, el, when } from "./dom.js";
import { keysPanel } from "./keys.js";
import { enginePanel } from "./engine.js";

const QUOTAS = [
  ["max_prefixes", "Max prefixes", "quotas"],
  ["max_bytes", "Max bytes", "quotas"],
  ["max_virtual_tokens", "Max virtual tokens", "quotas"],
  ["requests_per_minute", "Requests per minute", "rate_limits"],
  ["tokens_per_minute", "Tokens per minute", "rate_limits"],
];

const tokens = (row) => row.prompt_tokens + row.completion_tokens + row.tuning_tokens;

// Usage rows (one per tenant and model over the whole span) summed per tenant.
function byTenant(rows) {
  const totals = new Map();
  for (const row of rows) {
    const t = totals.get(row.tenant) || { tenant: row.tenant, requests: 0, tokens: 0, models: new Set(), failed: 0 };
    t.requests += row.requests;
    t.tokens += tokens(row);
    t.failed += row.failed_invalid + row.failed_rate_limited + row.failed_overloaded + row.failed_error;
    if (row.model) t.models.add(row.model);
    totals.set(row.tenant, t);
  }
  return [...totals.values()].sort((a, b) => a.tenant.localeCompare(b.tenant));
}

function limitText(value) {
  return value === null || value === undefined ? "no limit" : String(value);
}

async function tenantDetail(name, box) {
  const info = await call("GET", `/v1/tenants/${encodeURIComponent(name)}`);
  const inputs = {};
  const error = el("p", { id: "op-error", class: "error", role: "alert" });
  const form = el("form", { id: "op-limits" });
  for (const [field, label] of QUOTAS) {
    inputs[field] = el("input", { id: `op-${field}`, type: "text", inputmode: "numeric", placeholder: "unchanged" });
    form.append(el("label", {}, label, inputs[field]));
  }
  form.append(el("div", { class: "buttons" }, el("button", { type: "submit" }, "Save")), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const body = {};
    for (const [field, label] of QUOTAS) {
      const value = inputs[field].value.trim();
      if (value === "") continue;
      // Only digits: Number("1,000") is NaN, which JSON sends as null, and null means "the
      // default again", so a typo would silently lift the limit. The server checks the range.
      // Digits beyond 2^53 would be rounded, and past 1e308 become Infinity, also sent as null.
      const number = Number(value);
      if (value !== "default" && !(/^[0-9]+$/.test(value) && Number.isSafeInteger(number))) {
        error.textContent = `${label}: expected a whole number up to ${Number.MAX_SAFE_INTEGER}, \u201cdefault\u201d or blank, found \u201c${value}\u201d; nothing was changed`;
        inputs[field].focus();
        return;
      }
      body[field] = value === "default" ? null : number;
    }
    try {
      await call("PATCH", `/v1/tenants/${encodeURIComponent(name)}`, { json: body });
      await tenantDetail(name, box);
    } catch (failure) {
      error.textContent = failure.message;
    }
  });
  const { panel, refresh } = keysPanel(name);
  await refresh();
  clear(box).append(
    el("h3", { id: "op-tenant" }, info.tenant),
    el("p", {}, `Created ${when(info.created_at)}. Stores ${info.usage.prefixes} prefixes, ${bytes(info.usage.bytes)}.`),
    el(
      "table",
      { id: "op-quotas" },
      el("thead", {}, el("tr", {}, el("th", {}, "Limit"), el("th", {}, "Now"))),
      el(
        "tbody",
        {},
        ...QUOTAS.map(([field, label, group]) =>
          el("tr", { dataset: { field } }, el("td", {}, label), el("td", { class: "num" }, limitText(info[group][field]))),
        ),
      ),
    ),
    el("h4", {}, "Change"),
    el("p", { class: "status" }, "A number sets a limit, 0 refuses everything, \u201cdefault\u201d follows the server's default again; blank leaves it."),
    form,
    el("h4", {}, "Keys"),
    panel,
  );
}

export async function showOperator(page) {
  const rows = await all("/v1/usage?group_by=prefix&limit=1000");
  const detail = el("div", { id: "op-detail" });
  const status = el("p", { id: "op-status", class: "error", role: "alert" });
  const open = (name) => {
    status.textContent = "";
    for (const tr of page.querySelectorAll("#op-tenants tbody tr")) tr.classList.toggle("selected", tr.dataset.tenant === name);
    tenantDetail(name, detail).catch((error) => {
      clear(detail);
      status.textContent = error.message; // 404: no such tenant
    });
  };
  const lookup = el("input", { id: "op-lookup", type: "text", placeholder: "tenant name", required: true });
  const find = el("form", { id: "op-find" }, el("label", {}, "Look up a tenant", lookup), el("div", { class: "buttons" }, el("button", { type: "submit" }, "Open")));
  find.addEventListener("submit", (event) => {
    event.preventDefault();
    open(lookup.value.trim());
  });
  const tenants = byTenant(rows);
  const engine = enginePanel();
  page.append(
    el("h2", {}, "Operator"),
    el(
      "div",
      { class: "grid2" },
      el(
        "div",
        {},
        el("h3", {}, "Tenants"),
        el("p", { class: "status" }, "Every tenant that used the server (GET /v1/usage); the API lists no others, so look those up by name."),
        el(
          "table",
          { id: "op-tenants" },
          el("thead", {}, el("tr", {}, ...["Tenant", "Requests", "Tokens", "Failed", "Models"].map((h) => el("th", {}, h)))),
          el(
            "tbody",
            {},
            ...tenants.map((t) => {
              const link = el("button", { type: "button", class: "link" }, t.tenant);
              link.addEventListener("click", () => open(t.tenant));
              return el(
                "tr",
                { dataset: { tenant: t.tenant } },
                el("td", {}, link),
                el("td", { class: "num" }, t.requests),
                el("td", { class: "num" }, t.tokens),
                el("td", { class: "num" }, t.failed),
                el("td", { class: "num" }, t.models.size),
              );
            }),
          ),
        ),
        find,
        status,
        engine.panel,
      ),
      detail,
    ),
  );
  return engine.stop;
}
