// A tenant's API keys (/v1/tenants/{name}/keys): list them (never a secret: ids, dates, which
// is revoked, which one this console holds), issue one (its secret shown once, here only),
// revoke one in two clicks. The operator's page shows the same panel for any tenant.
import { ApiError, call, ownTenant } from "./api.js";
import { clear, el, when } from "./dom.js";

function path(tenant, id = null) {
  const base = `/v1/tenants/${encodeURIComponent(tenant)}/keys`;
  return id === null ? base : `${base}/${encodeURIComponent(id)}`;
}

function revokeButton(tenant, item, status, refresh) {
  // Two clicks rather than window.confirm: the page never opens a dialog.
  const button = el("button", { type: "button", class: "danger" }, "Revoke");
  button.addEventListener("click", async () => {
    if (!button.dataset.armed) {
      button.dataset.armed = "1";
      button.textContent = "Confirm revoke";
      return;
    }
    try {
      await call("DELETE", path(tenant, item.key_id));
      status.textContent = `Revoked ${item.key_id}.`;
      await refresh();
    } catch (error) {
      status.textContent = error.message; // e.g. 409: a tenant keeps one active key
    }
  });
  return button;
}

export function keysPanel(tenant) {
  const status = el("p", { class: "status", role: "status" });
  const body = el("tbody");
  const issued = el("div", { id: "key-issued" });
  const refresh = async () => {
    const keys = (await call("GET", path(tenant))).data;
    clear(body).append(
      ...keys.map((item) =>
        el(
          "tr",
          { dataset: { key: item.key_id } },
          el("td", {}, el("code", {}, item.key_id)),
          el("td", {}, when(item.created_at)),
          el("td", { class: "key-state" }, item.revoked ? "revoked" : item.current ? "active (this console's)" : "active"),
          el("td", { class: "actions" }, item.revoked || item.current ? null : revokeButton(tenant, item, status, refresh)),
        ),
      ),
    );
  };
  const issue = el("button", { id: "key-issue", type: "button" }, "Issue a key");
  issue.addEventListener("click", async () => {
    status.textContent = "";
    try {
      const made = await call("POST", path(tenant));
      const secret = el("input", { id: "key-secret", type: "text", readonly: true, value: made.api_key, size: 60 });
      const copy = el("button", { type: "button" }, "Copy");
      copy.addEventListener("click", () => {
        secret.select();
        navigator.clipboard?.writeText(made.api_key).catch(() => {});
      });
      const hide = el("button", { type: "button" }, "Done");
      hide.addEventListener("click", () => clear(issued));
      clear(issued).append(
        el("p", {}, "New key ", el("code", {}, made.key_id), ": copy it now, it is not shown again."),
        el("div", { class: "buttons" }, secret, copy, hide),
      );
      await refresh();
    } catch (error) {
      status.textContent = error.message; // 409: ten active keys already
    }
  });
  const panel = el(
    "div",
    { class: "keys" },
    el("div", { class: "buttons" }, issue),
    issued,
    el(
      "table",
      { id: "key-table" },
      el("thead", {}, el("tr", {}, ...["Key id", "Created", "State", ""].map((h) => el("th", {}, h)))),
      body,
    ),
    status,
  );
  return { panel, refresh };
}

export async function showKeys(page) {
  page.append(el("h2", {}, "API keys"));
  const content = el("div");
  page.append(content);
  const open = async (tenant) => {
    const { panel, refresh } = keysPanel(tenant);
    await refresh();
    clear(content).append(el("p", {}, "Tenant ", el("strong", { id: "key-tenant" }, tenant), ". Rotate a key: issue a new one, move your clients to it, revoke the old one."), panel);
  };
  const tenant = await ownTenant();
  if (tenant) return open(tenant);
  // A new tenant with nothing stored yet: no route names it, so it says its name.
  const name = el("input", { id: "key-tenant-name", type: "text", required: true });
  const error = el("p", { class: "error", role: "alert" });
  const form = el("form", {}, el("label", {}, "Your tenant name", name), el("div", { class: "buttons" }, el("button", { type: "submit" }, "Show keys")), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await open(name.value.trim());
    } catch (failure) {
      if (failure instanceof ApiError && failure.status === 401) throw failure;
      error.textContent = failure.message;
    }
  });
  content.append(form);
}
