// Fine-tuning through OpenAI's API: upload a JSONL training file (the server checks every line
// and names the first bad one), start a job, watch its loss per step from the job's events,
// cancel it.
import { call } from "./api.js";
import { lossChart } from "./chart.js";
import { append, clear, el, when } from "./dom.js";
import { listPrefixes } from "./prefixes.js";

const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1000;

function field(label, input) {
  return el("label", {}, label, input);
}

function option(value, text, selected = false) {
  return el("option", { value, selected }, text);
}

// The metrics events, oldest first; a resumed job repeats steps: the last report of a step wins.
function lossPoints(events) {
  const byStep = new Map();
  for (const event of [...events].reverse()) {
    if (event.type === "metrics" && event.data) byStep.set(event.data.step, event.data);
  }
  return [...byStep.values()].sort((a, b) => a.step - b.step);
}

async function allEvents(id) {
  return (await call("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?limit=1000`)).data;
}

export async function showFineTuning(page) {
  const [models, prefixes] = await Promise.all([call("GET", "/v1/models"), listPrefixes()]);
  const base = models.data.find((m) => m.owned_by === "system").id;
  let selected = null;
  let timer = null;
  let gone = false;

  // Training files ------------------------------------------------------------------------
  const fileInput = el("input", { id: "ft-file", type: "file", accept: ".jsonl,application/jsonl" });
  const fileError = el("p", { id: "ft-file-error", class: "error", role: "alert" });
  const fileSelect = el("select", { id: "ft-training-file", required: true });
  const uploadForm = el(
    "form",
    { id: "ft-upload" },
    field("JSONL training file", fileInput),
    el("div", { class: "buttons" }, el("button", { type: "submit" }, "Upload")),
    fileError,
  );
  const refreshFiles = async (pick = null) => {
    const files = (await call("GET", "/v1/files?purpose=fine-tune&limit=1000")).data;
    clear(fileSelect).append(
      ...files.map((f) => option(f.id, `${f.filename} (${f.id}, ${when(f.created_at)})`, f.id === pick)),
    );
  };
  uploadForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    fileError.textContent = "";
    if (!fileInput.files.length) return;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", fileInput.files[0]);
    try {
      const stored = await call("POST", "/v1/files", { form });
      await refreshFiles(stored.id);
      uploadForm.reset();
    } catch (error) {
      fileError.textContent = error.message; // the server's own words: "file: line 3: ..."
    }
  });

  // A new job -----------------------------------------------------------------------------
  const jobError = el("p", { id: "ft-job-error", class: "error", role: "alert" });
  const modelSelect = el(
    "select",
    { id: "ft-model" },
    option(base, `${base} (from scratch)`, true),
    ...prefixes.filter((p) => p.compatible).map((p) => option(p.id, `${p.id} (transfer)`)),
  );
  // The transferability ranking: each usable prefix's mean loss on a few of the chosen file's
  // examples beside the base model's, lowest first; choosing one starts the job from it.
  const RANK_SAMPLE = 8;
  const rankButton = el("button", { id: "ft-rank-button", type: "button" }, "Rank transfer sources");
  const rankStatus = el("p", { id: "ft-rank-status", class: "status", role: "status" });
  const rankBody = el("tbody");
  const ranking = el("table", { id: "ft-ranking", hidden: true },
    el("thead", {}, el("tr", {}, ...["Source", "Loss", ""].map((h) => el("th", {}, h)))), rankBody);
  const useButton = (id) => {
    const button = el("button", { type: "button" }, "Use");
    button.addEventListener("click", () => {
      if (![...modelSelect.options].some((o) => o.value === id)) modelSelect.append(option(id, `${id} (transfer)`));
      modelSelect.value = id;
    });
    return button;
  };
  rankButton.addEventListener("click", async () => {
    if (!fileSelect.value) return;
    rankButton.disabled = true;
    rankStatus.textContent = "Scoring…";
    try {
      const answer = await call("POST", "/v1/fine_tuning/transferability", {
        json: { training_file: fileSelect.value, sample_size: RANK_SAMPLE },
      });
      const loss = (value) => (value === null || value === undefined ? "—" : value.toFixed(4));
      const rows = [
        ...answer.data.map((c) => ({ id: c.prefix, loss: c.loss, error: c.error })),
        { id: answer.model, loss: answer.base_loss, error: null, base: true },
      ];
      // Lowest first; a candidate the server could not score (null loss) goes last.
      rows.sort((a, b) => (a.loss ?? Infinity) - (b.loss ?? Infinity));
      clear(rankBody).append(
        ...rows.map((r) =>
          el("tr", { dataset: { model: r.id, loss: r.loss ?? "" }, class: r.base ? "base" : null },
            el("td", {}, r.base ? `${r.id} (base model)` : r.id),
            el("td", { class: "num" }, r.error ? `${loss(r.loss)} (${r.error})` : loss(r.loss)),
            el("td", {}, r.loss === null ? "" : useButton(r.id)))),
      );
      ranking.hidden = false;
      rankStatus.textContent = `${answer.lines.length} examples, ${answer.target_tokens} target tokens` +
        (answer.truncated ? "; more candidates were usable than the server scores" : "");
    } catch (error) {
      rankStatus.textContent = error.message;
    } finally {
      rankButton.disabled = false;
    }
  });
  fileSelect.addEventListener("change", () => {
    ranking.hidden = true;
    rankStatus.textContent = "";
  });

  const method = el(
    "select",
    { id: "ft-method" },
    option("prefix_tuning", "prefix tuning", true),
    option("prompt_tuning", "prompt tuning"),
  );
  const tokens = el("input", { id: "ft-tokens", type: "number", min: 1, placeholder: "auto" });
  const epochs = el("input", { id: "ft-epochs", type: "number", min: 1, placeholder: "auto" });
  const batch = el("input", { id: "ft-batch", type: "number", min: 1, placeholder: "auto" });
  const rate = el("input", { id: "ft-lr", type: "number", min: 0, step: "any", placeholder: "auto" });
  const suffix = el("input", { id: "ft-suffix", type: "text", maxlength: 64, placeholder: "name" });
  const jobForm = el(
    "form",
    { id: "ft-start" },
    field("Training file", fileSelect),
    field("Start from", modelSelect),
    el("div", { class: "buttons" }, rankButton),
    rankStatus,
    ranking,
    field("Method", method),
    el("fieldset", { class: "settings" }, el("legend", {}, "Settings"),
      field("Virtual tokens", tokens), field("Epochs", epochs), field("Batch size", batch),
      field("Learning-rate multiplier", rate)),
    field("Suffix", suffix),
    el("div", { class: "buttons" }, el("button", { type: "submit" }, "Start job")),
    jobError,
  );
  jobForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    jobError.textContent = "";
    const hyperparameters = {};
    if (epochs.value) hyperparameters.n_epochs = Number(epochs.value);
    if (batch.value) hyperparameters.batch_size = Number(batch.value);
    if (rate.value) hyperparameters.learning_rate_multiplier = Number(rate.value);
    const settings = { hyperparameters };
    if (tokens.value) settings.num_virtual_tokens = Number(tokens.value);
    const body = {
      model: modelSelect.value,
      training_file: fileSelect.value,
      method: { type: method.value, [method.value]: settings },
    };
    if (suffix.value) body.suffix = suffix.value;
    try {
      const job = await call("POST", "/v1/fine_tuning/jobs", { json: body });
      select(job.id);
    } catch (error) {
      jobError.textContent = error.message;
    }
  });

  // Jobs and the selected one's chart -----------------------------------------------------
  const jobsBody = el("tbody");
  const detail = el("div", { id: "ft-detail" });
  const refreshJobs = async () => {
    const jobs = (await call("GET", "/v1/fine_tuning/jobs?limit=100")).data;
    clear(jobsBody).append(
      ...jobs.map((job) => {
        const tr = el(
          "tr",
          { dataset: { job: job.id }, class: job.id === selected ? "selected" : null },
          el("td", {}, el("a", { href: "#fine-tuning" }, job.id)),
          el("td", {}, job.model),
          el("td", {}, job.method.type),
          el("td", { class: "status" }, job.status),
          el("td", {}, job.fine_tuned_model || job.user_provided_suffix || ""),
          el("td", {}, when(job.created_at)),
        );
        tr.querySelector("a").addEventListener("click", (event) => {
          event.preventDefault();
          select(job.id);
        });
        return tr;
      }),
    );
  };

  async function tick() {
    timer = null;
    if (gone) return;
    let finished = true;
    try {
      await refreshJobs();
      if (selected) finished = await drawJob(selected);
    } catch (error) {
      clear(detail).append(el("p", { class: "error" }, error.message));
    }
    if (!gone && !finished) timer = setTimeout(tick, POLL_MS);
  }

  async function drawJob(id) {
    const [job, events] = await Promise.all([
      call("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`),
      allEvents(id),
    ]);
    const points = lossPoints(events);
    const total = points.length ? points[points.length - 1].total_steps : 0;
    const cancel = el("button", { id: "ft-cancel", type: "button", class: "danger", disabled: FINISHED.has(job.status) }, "Cancel");
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await call("POST", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/cancel`);
      } catch (error) {
        detail.append(el("p", { class: "error" }, error.message));
      }
      if (!timer) tick();
    });
    const last = points[points.length - 1];
    append(clear(detail), [
      el("h3", {}, job.id, " ", el("span", { id: "ft-status", class: "status" }, job.status)),
      el("p", {}, job.fine_tuned_model ? `Prefix: ${job.fine_tuned_model}` : `From ${job.model}`,
        last ? ` · step ${last.step}/${last.total_steps}, training loss ${last.train_loss.toFixed(4)}` : ""),
      job.error ? el("p", { class: "error", id: "ft-error" }, `${job.error.code}: ${job.error.message}`) : null,
      lossChart(points, total),
      el("div", { class: "buttons" }, cancel),
      el("ul", { class: "events" },
        ...events.slice(0, 8).map((e) => el("li", { class: e.level }, `${when(e.created_at)} ${e.message}`))),
    ]);
    return FINISHED.has(job.status);
  }

  function select(id) {
    selected = id;
    if (timer) clearTimeout(timer);
    tick();
  }

  page.append(
    el("h2", {}, "Fine-tuning"),
    el(
      "div",
      { class: "grid2" },
      el("div", {}, el("h3", {}, "Training file"), uploadForm, el("h3", {}, "New job"), jobForm),
      el(
        "div",
        {},
        el("h3", {}, "Jobs"),
        el("table", { id: "ft-jobs" }, el("thead", {}, el("tr", {}, ...["Job", "From", "Method", "Status", "Prefix", "Created"].map((h) => el("th", {}, h)))), jobsBody),
        detail,
      ),
    ),
  );
  await Promise.all([refreshFiles(), refreshJobs()]);
  return () => {
    gone = true;
    if (timer) clearTimeout(timer);
  };
}
