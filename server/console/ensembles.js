// Stored ensembles (/v1/ensembles): make one from selected prefixes, list the tenant's own and
// everyone's public ones, delete an own one. A stored ensemble answers as a model wherever a
// prefix does, the playground included (docs/ensembles.md).
import { call, ownTenant } from "./api.js";
import { clear, el, when } from "./dom.js";
import { listPrefixes } from "./prefixes.js";

export async function listEnsembles() {
  return (await call("GET", "/v1/ensembles")).data;
}

function deleteButton(ensemble, status, refresh) {
  const button = el("button", { type: "button", class: "danger" }, "Delete");
  button.addEventListener("click", async () => {
    if (!button.dataset.armed) {
      button.dataset.armed = "1";
      button.textContent = "Confirm delete";
      return;
    }
    try {
      await call("DELETE", `/v1/ensembles/${encodeURIComponent(ensemble.owner)}/${encodeURIComponent(ensemble.name)}`);
      status.textContent = `Deleted ${ensemble.id}.`;
      await refresh();
    } catch (error) {
      status.textContent = error.message;
    }
  });
  return button;
}

export async function showEnsembles(page) {
  const [all, me] = await Promise.all([listPrefixes(), ownTenant()]);
  const prefixes = all.filter((p) => p.compatible);
  let owner = me; // the tenant's name, to offer Delete on its own ensembles
  const status = el("p", { class: "status", role: "status" });
  const error = el("p", { id: "en-error", class: "error", role: "alert" });
  const body = el("tbody");
  const refresh = async () => {
    const ensembles = await listEnsembles();
    clear(body).append(
      ...ensembles.map((e) =>
        el(
          "tr",
          { dataset: { ensemble: e.id } },
          el("td", {}, el("strong", {}, e.id)),
          el("td", { class: "description" }, e.description),
          el("td", {}, e.method),
          el("td", {}, e.prefixes.join(", ")),
          el("td", {}, e.visibility),
          el("td", {}, when(e.created_at)),
          el("td", { class: "actions" }, e.owner === owner ? deleteButton(e, status, refresh) : null),
        ),
      ),
    );
    if (!ensembles.length) body.append(el("tr", {}, el("td", { colspan: 7 }, "No ensembles yet.")));
  };

  const members = el("fieldset", { id: "en-prefixes" }, el("legend", {}, "Members (two or more)"));
  for (const prefix of prefixes) {
    members.append(el("label", { class: "choice" }, el("input", { type: "checkbox", value: prefix.id }), prefix.id));
  }
  const name = el("input", { id: "en-name", type: "text", required: true, maxlength: 64 });
  const method = el("select", { id: "en-method" }, el("option", { value: "mean" }, "mean (one answer, streamable)"), el("option", { value: "vote" }, "vote (the most frequent answer)"));
  const visibility = el("select", { id: "en-visibility" }, el("option", { value: "private" }, "private"), el("option", { value: "public" }, "public"));
  const description = el("input", { id: "en-description", type: "text" });
  const form = el(
    "form",
    { id: "en-form" },
    el("label", {}, "Name", name),
    el("label", {}, "Method", method),
    el("label", {}, "Visibility", visibility),
    el("label", {}, "Description", description),
    members,
    el("div", { class: "buttons" }, el("button", { type: "submit" }, "Create ensemble")),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const picked = [...members.querySelectorAll("input:checked")].map((box) => box.value);
    try {
      const made = await call("POST", "/v1/ensembles", {
        json: { name: name.value.trim(), prefixes: picked, method: method.value, visibility: visibility.value, description: description.value },
      });
      owner = made.owner;
      status.textContent = `Created ${made.id}.`;
      form.reset();
      await refresh();
    } catch (failure) {
      error.textContent = failure.message; // the server's: too few members, a name taken, ...
    }
  });

  page.append(
    el("h2", {}, "Ensembles"),
    el("p", {}, "Several prefixes answering as one model: by voting on their answers, or by decoding together from the mean of their distributions."),
    form,
    el(
      "table",
      { id: "en-table" },
      el("thead", {}, el("tr", {}, ...["Ensemble", "Description", "Method", "Members", "Visibility", "Created", ""].map((h) => el("th", {}, h)))),
      body,
    ),
    status,
  );
  await refresh();
}
