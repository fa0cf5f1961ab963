// One prompt, answered side by side by the base model and up to four prefixes or stored
// ensembles, each column streamed from /v1/completions as it is generated. Each token is its
// own span; hovering it shows its log-probability and the most likely alternatives.
import { call, stream } from "./api.js";
import { clear, el } from "./dom.js";
import { listEnsembles } from "./ensembles.js";
import { listPrefixes } from "./prefixes.js";

const MAX_PREFIXES = 4;
const TOP = 5;

function number(id, label, attributes) {
  return el("label", {}, label, el("input", { id, type: "number", ...attributes }));
}

// A chunk's text as the stream sent it (each token decoded alone can lose the spaces between
// tokens), titled with the log-probability of each of its tokens and their alternatives.
function chunkSpan(text, logprobs) {
  const lines = (logprobs?.tokens || []).map((token, i) => {
    const value = logprobs.token_logprobs[i];
    const alternatives = Object.entries(logprobs.top_logprobs?.[i] || {})
      .sort((a, b) => b[1] - a[1])
      .map(([other, lp]) => `${JSON.stringify(other)} ${lp.toFixed(3)}`);
    const head = value === null || value === undefined ? "logprob n/a" : `logprob ${value.toFixed(3)}`;
    return `${head}${alternatives.length ? `\ntop: ${alternatives.join(", ")}` : ""}`;
  });
  return el("span", { class: "token", title: lines.join("\n\n") || null }, text);
}

function settings() {
  const value = (id) => document.getElementById(id).value;
  const body = {
    max_tokens: Number(value("pg-max-tokens")),
    temperature: Number(value("pg-temperature")),
    top_p: Number(value("pg-top-p")),
    logprobs: TOP,
  };
  if (value("pg-top-k") !== "") body.top_k = Number(value("pg-top-k"));
  if (value("pg-seed") !== "") body.seed = Number(value("pg-seed"));
  return body;
}

// A vote ensemble's answer exists only once every member has finished: one unstreamed call.
async function runVote(model, prompt, body, column, signal) {
  const state = column.querySelector(".state");
  state.textContent = "voting…";
  try {
    const answer = await call("POST", "/v1/completions", { json: { ...body, model, prompt }, signal });
    const choice = answer.choices[0];
    column.querySelector(".output").append(chunkSpan(choice.text, choice.logprobs));
    state.textContent = `finished: ${choice.finish_reason}`;
  } catch (error) {
    state.textContent = signal.aborted ? "stopped" : `error: ${error.message}`;
  }
  column.dataset.done = "1";
}

async function runColumn(model, prompt, body, column, signal, vote = false) {
  if (vote) return runVote(model, prompt, body, column, signal);
  const output = column.querySelector(".output");
  const state = column.querySelector(".state");
  state.textContent = "streaming…";
  let chunks = 0;
  try {
    await stream("/v1/completions", { ...body, model, prompt }, (event) => {
      for (const choice of event.choices || []) {
        if (choice.text) output.append(chunkSpan(choice.text, choice.logprobs));
        if (choice.finish_reason) state.textContent = `finished: ${choice.finish_reason}`;
      }
      chunks += 1;
      column.dataset.chunks = String(chunks);
    }, signal);
    column.dataset.done = "1";
    if (state.textContent === "streaming…") state.textContent = "finished";
  } catch (error) {
    state.textContent = signal.aborted ? "stopped" : `error: ${error.message}`;
    column.dataset.done = "1";
  }
}

export async function showPlayground(page) {
  const [models, prefixes, ensembles] = await Promise.all([
    call("GET", "/v1/models"),
    listPrefixes(),
    listEnsembles(),
  ]);
  const base = models.data.find((m) => m.owned_by === "system").id;
  const usable = prefixes.filter((p) => p.compatible);
  const methods = new Map(ensembles.map((e) => [e.id, e.method]));
  let controller = null;

  const choices = el("fieldset", { id: "pg-prefixes" }, el("legend", {}, `Prefixes and ensembles (up to ${MAX_PREFIXES})`));
  const options = [...usable.map((p) => [p.id, p.id]), ...ensembles.map((e) => [e.id, `${e.id} (${e.method} ensemble)`])];
  for (const [id, text] of options) {
    const box = el("input", { type: "checkbox", value: id });
    box.addEventListener("change", () => {
      const checked = choices.querySelectorAll("input:checked").length;
      for (const other of choices.querySelectorAll("input")) other.disabled = !other.checked && checked >= MAX_PREFIXES;
    });
    choices.append(el("label", { class: "choice" }, box, text));
  }
  if (!options.length) choices.append(el("p", {}, "No prefixes: the base model answers alone."));

  const columns = el("div", { id: "pg-columns", class: "columns" });
  const prompt = el("textarea", { id: "pg-prompt", rows: 4, placeholder: "Prompt" });
  const run = el("button", { id: "pg-run", type: "submit" }, "Generate");
  const stop = el("button", { id: "pg-stop", type: "button", disabled: true }, "Stop");
  stop.addEventListener("click", () => controller && controller.abort());

  const form = el(
    "form",
    { id: "pg-form" },
    el("label", { class: "wide" }, "Prompt", prompt),
    choices,
    el(
      "fieldset",
      { class: "settings" },
      el("legend", {}, "Sampling"),
      number("pg-max-tokens", "Max tokens", { min: 1, max: 4096, value: 32 }),
      number("pg-temperature", "Temperature", { min: 0, max: 2, step: 0.05, value: 0 }),
      number("pg-top-p", "Top p", { min: 0.01, max: 1, step: 0.01, value: 1 }),
      number("pg-top-k", "Top k", { min: 0, step: 1, placeholder: "off" }),
      number("pg-seed", "Seed", { min: 0, step: 1, placeholder: "random" }),
    ),
    el("div", { class: "buttons" }, run, stop),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (controller) controller.abort();
    controller = new AbortController();
    const picked = [...choices.querySelectorAll("input:checked")].map((box) => box.value);
    const body = settings();
    clear(columns);
    const runs = [base, ...picked].map((model) => {
      const column = el(
        "div",
        { class: "column", dataset: { model } },
        el("h3", {}, model === base ? `${model} (base)` : methods.has(model) ? `${model} (${methods.get(model)} ensemble)` : model),
        el("div", { class: "output" }),
        el("p", { class: "state" }),
      );
      columns.append(column);
      return runColumn(model, prompt.value, body, column, controller.signal, methods.get(model) === "vote");
    });
    run.disabled = true;
    stop.disabled = false;
    await Promise.all(runs);
    run.disabled = false;
    stop.disabled = true;
  });

  page.append(el("h2", {}, "Playground"), form, columns);
  return () => controller && controller.abort();
}
