// The engine's figures on the operator's page: /metrics (Prometheus text, read without a key,
// totals only) polled every few seconds and kept for the last minutes in this tab; throughput
// is the tokens-generated counter's rise between two polls.
import { lossChart } from "./chart.js";
import { bytes, clear, el } from "./dom.js";

const POLL_MS = 3000;
const KEEP_MS = 10 * 60 * 1000;

// name{labels} value lines into {name: [{labels, value}]}; comments skipped.
export function parseMetrics(text) {
  const series = {};
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!match || line.startsWith("#")) continue;
    const labels = {};
    for (const [, k, v] of (match[2] || "").matchAll(/(\w+)="([^"]*)"/g)) labels[k] = v;
    (series[match[1]] ||= []).push({ labels, value: Number(match[3]) });
  }
  return series;
}

const one = (series, name) => (series[name] ? series[name][0].value : null);

export function enginePanel() {
  const samples = [];
  const figures = el("tbody");
  const chartBox = el("div", { id: "op-engine-chart" });
  const status = el("p", { id: "op-engine-status", class: "status", role: "status" });
  let timer = null;
  let gone = false;

  async function poll() {
    timer = null;
    if (gone) return;
    try {
      // No Authorization header: /metrics takes no key, and the console sends it nowhere else.
      const response = await fetch(new URL("../metrics", document.baseURI).toString());
      if (!response.ok) throw new Error(`/metrics: HTTP ${response.status}`);
      const series = parseMetrics(await response.text());
      const now = Date.now();
      const generated = one(series, "prefix_server_generated_tokens_total");
      const previous = samples[samples.length - 1];
      const rate = previous && generated !== null
        ? Math.max(0, generated - previous.generated) / ((now - previous.at) / 1000) : 0;
      const resident = (series.prefix_server_pool_resident_bytes || []).map((s) => [s.labels.tier, s.value]);
      samples.push({ at: now, generated, rate, queue: one(series, "prefix_server_queue_depth"),
        running: one(series, "prefix_server_running_rows") });
      while (samples.length && now - samples[0].at > KEEP_MS) samples.shift();
      const last = samples[samples.length - 1];
      const rows = [
        ["generated", "Tokens generated", last.generated],
        ["throughput", "Tokens per second (last poll)", rate.toFixed(1)],
        ["queue", "Queue depth (waiting requests)", last.queue],
        ["running", "Running rows", last.running],
        ...resident.map(([tier, value]) => [`resident-${tier}`, `Prefix pool resident (${tier})`, bytes(value)]),
      ];
      clear(figures).append(...rows.map(([id, label, value]) =>
        el("tr", { dataset: { figure: id } }, el("td", {}, label), el("td", { class: "num" }, value ?? "—"))));
      const start = samples[0].at;
      const points = samples.map((s) => ({
        step: Math.round((s.at - start) / 1000), train_loss: s.rate, valid_loss: s.queue,
      }));
      const span = Math.max(1, Math.round((now - start) / 1000));
      clear(chartBox).append(lossChart(points, span, { x: "s", label: "tokens per second (line), queue depth (dashed)" }));
      status.textContent = "";
    } catch (error) {
      status.textContent = error.message;
    }
    if (!gone) timer = setTimeout(poll, POLL_MS);
  }

  const panel = el("div", { id: "op-engine" },
    el("h3", {}, "Engine"),
    el("p", { class: "status" }, `From /metrics every ${POLL_MS / 1000} s, kept for the last ${KEEP_MS / 60000} minutes while this page is open.`),
    el("table", { id: "op-engine-figures" }, figures), chartBox, status);
  poll();
  return { panel, stop: () => { gone = true; if (timer) clearTimeout(timer); } };
}
