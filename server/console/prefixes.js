// The prefixes the tenant may use: its own (with export, visibility and delete) and other
// tenants' public ones (with export); uploading a PEFT folder by dropping its files (or
// choosing them). Visibility changes in place (PATCH /v1/prefixes/{owner}/{name}).
import { all, blob, call } from "./api.js";
import { bytes, clear, el, when } from "./dom.js";

export async function listPrefixes() {
  const [own, visible] = await Promise.all([
    all("/v1/prefixes?scope=own&limit=1000"),
    all("/v1/prefixes?scope=public&limit=1000"),
  ]);
  const ownIds = new Set(own.map((p) => p.id));
  return [...own.map((p) => ({ ...p, own: true })), ...visible.filter((p) => !ownIds.has(p.id))];
}

async function exportPrefix(prefix, status) {
  status.textContent = `Exporting ${prefix.id}…`;
  const zip = await blob(`/v1/prefixes/${encodeURIComponent(prefix.owner)}/${encodeURIComponent(prefix.name)}/adapter`);
  const link = el("a", { href: URL.createObjectURL(zip), download: `${prefix.name}-v${prefix.version}.zip` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  status.textContent = `Exported ${prefix.id}.`;
}

function deleteButton(prefix, status, refresh) {
  // Two clicks rather than window.confirm: the page never opens a dialog.
  const button = el("button", { type: "button", class: "danger" }, "Delete");
  button.addEventListener("click", async () => {
    if (!button.dataset.armed) {
      button.dataset.armed = "1";
      button.textContent = "Confirm delete";
      return;
    }
    try {
      await call("DELETE", `/v1/prefixes/${encodeURIComponent(prefix.owner)}/${encodeURIComponent(prefix.name)}`);
      status.textContent = `Deleted ${prefix.id}.`;
      refresh();
    } catch (error) {
      status.textContent = error.message;
    }
  });
  return button;
}

function visibilityButton(prefix, status, refresh) {
  const other = prefix.visibility === "public" ? "private" : "public";
  const button = el("button", { type: "button", class: "visibility" }, `Make ${other}`);
  button.addEventListener("click", async () => {
    try {
      const path = `/v1/prefixes/${encodeURIComponent(prefix.owner)}/${encodeURIComponent(prefix.name)}`;
      await call("PATCH", path, { json: { visibility: other } });
      status.textContent = `${prefix.id} is ${other} now.`;
      refresh();
    } catch (error) {
      status.textContent = error.message;
    }
  });
  return button;
}

function row(prefix, status, refresh) {
  const exportButton = el("button", { type: "button" }, "Export");
  exportButton.addEventListener("click", () =>
    exportPrefix(prefix, status).catch((error) => (status.textContent = error.message)),
  );
  return el(
    "tr",
    { dataset: { prefix: prefix.id } },
    el("td", {}, el("strong", {}, prefix.id), prefix.compatible ? null : el("span", { class: "badge" }, "incompatible")),
    el("td", { class: "description" }, prefix.description),
    el("td", {}, prefix.kind),
    el("td", { class: "num" }, prefix.num_virtual_tokens),
    el("td", { class: "num" }, bytes(prefix.bytes)),
    el("td", { class: "num" }, prefix.version),
    el("td", {}, prefix.visibility),
    el("td", {}, when(prefix.created_at)),
    el(
      "td",
      { class: "actions" },
      exportButton,
      prefix.own ? visibilityButton(prefix, status, refresh) : null,
      prefix.own ? deleteButton(prefix, status, refresh) : null,
    ),
  );
}

// The upload form: a PEFT folder's files (adapter_config.json and adapter_model.safetensors,
// dropped on the zone or chosen), a name, visibility, description; POST /v1/prefixes
// multipart, the server's refusal shown as text.
function uploadForm(refresh) {
  let files = [];
  const chosen = el("ul", { id: "up-chosen", class: "events" });
  const show = () => clear(chosen).append(...files.map((f) => el("li", {}, `${f.name} (${bytes(f.size)})`)));
  const input = el("input", { id: "up-files", type: "file", multiple: true });
  input.addEventListener("change", () => {
    files = [...input.files];
    show();
  });
  const zone = el("div", { id: "up-drop", class: "drop" }, "Drop a PEFT folder's files here (adapter_config.json and adapter_model.safetensors), or choose them: ", input);
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    files = [...event.dataTransfer.files];
    show();
  });
  const name = el("input", { id: "up-name", type: "text", required: true, maxlength: 64 });
  const visibility = el("select", { id: "up-visibility" }, el("option", { value: "private" }, "private"), el("option", { value: "public" }, "public"));
  const description = el("input", { id: "up-description", type: "text" });
  const overwrite = el("input", { id: "up-overwrite", type: "checkbox" });
  const error = el("p", { id: "up-error", class: "error", role: "alert" });
  const form = el(
    "form",
    { id: "up-form" },
    zone,
    chosen,
    el("label", {}, "Name", name),
    el("label", {}, "Visibility", visibility),
    el("label", {}, "Description", description),
    el("label", { class: "choice" }, overwrite, "New version of an existing prefix"),
    el("div", { class: "buttons" }, el("button", { type: "submit" }, "Upload")),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    if (!files.length) {
      error.textContent = "Drop or choose the folder's files first.";
      return;
    }
    const body = new FormData();
    body.append("name", name.value.trim());
    body.append("visibility", visibility.value);
    body.append("description", description.value);
    if (overwrite.checked) body.append("overwrite", "true");
    for (const file of files) body.append("files", file, file.name);
    try {
      await call("POST", "/v1/prefixes", { form: body });
      form.reset();
      files = [];
      show();
      await refresh();
    } catch (failure) {
      error.textContent = failure.message;
    }
  });
  return form;
}

export async function showPrefixes(page) {
  const status = el("p", { class: "status", role: "status" });
  const body = el("tbody");
  const refresh = async () => {
    const prefixes = await listPrefixes();
    clear(body).append(...prefixes.map((p) => row(p, status, refresh)));
    if (!prefixes.length) body.append(el("tr", {}, el("td", { colspan: 9 }, "No prefixes yet.")));
  };
  page.append(
    el("h2", {}, "Prefixes"),
    el("p", {}, "Your own prefixes and other tenants' public ones."),
    el(
      "table",
      { id: "prefix-table" },
      el(
        "thead",
        {},
        el("tr", {}, ...["Prefix", "Description", "Kind", "Virtual tokens", "Size", "Version", "Visibility", "Created", ""].map((h) => el("th", {}, h))),
      ),
      body,
    ),
    status,
    el("h3", {}, "Upload a prefix"),
    uploadForm(refresh),
  );
  await refresh();
}
