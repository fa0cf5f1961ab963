// Tokens per day per prefix, from GET /v1/usage?group_by=day: a bar chart of the last days and
// the same figures as a table. A tenant's key sees its own usage; the admin's every tenant's.
import { all } from "./api.js";
import { barChart, colour } from "./bars.js";
import { el } from "./dom.js";

const DAY = 86400;
const DAYS = 14;
const BASE = "(refused before a model was read)";

// The tokens a row counts: prompt, completion and trained; virtual tokens are in the table.
const tokens = (row) => row.prompt_tokens + row.completion_tokens + row.tuning_tokens;
const day = (seconds) => new Date(seconds * 1000).toISOString().slice(0, 10);
const failed = (row) => row.failed_invalid + row.failed_rate_limited + row.failed_overloaded + row.failed_error;

function swatch(i) {
  const box = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  box.setAttribute("width", "12");
  box.setAttribute("height", "12");
  const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
  for (const [k, v] of Object.entries({ width: 12, height: 12, fill: colour(i) })) rect.setAttribute(k, String(v));
  box.append(rect);
  return box;
}

export async function showUsage(page, { role }) {
  const start = Math.floor(Date.now() / 1000 / DAY - (DAYS - 1)) * DAY;
  const rows = await all(`/v1/usage?group_by=day&start=${start}&limit=1000`);
  const admin = role === "admin";
  const seriesOf = (row) => {
    const model = row.model === null ? BASE : row.model;
    return admin ? `${row.tenant} · ${model}` : model;
  };
  const days = [...new Set(rows.map((r) => day(r.start_time)))].sort();
  const series = [...new Set(rows.map(seriesOf))].sort();
  const totals = new Map();
  for (const row of rows) {
    const k = `${day(row.start_time)}\n${seriesOf(row)}`;
    totals.set(k, (totals.get(k) || 0) + tokens(row));
  }
  page.append(
    el("h2", {}, "Usage"),
    el("p", {}, `Tokens per day (prompt, completion and fine-tuning tokens) per ${admin ? "tenant and model" : "prefix or model"}, the last ${DAYS} days (UTC).`),
  );
  if (!rows.length) {
    page.append(el("p", { id: "usage-empty" }, "No usage in these days."));
    return;
  }
  page.append(
    el("div", { id: "usage-chart" }, barChart(days, series, (d, s) => totals.get(`${d}\n${s}`) || 0)),
    el("ul", { class: "legend" }, ...series.map((s, i) => el("li", {}, swatch(i), s))),
    el(
      "table",
      { id: "usage-table" },
      el(
        "thead",
        {},
        el("tr", {}, ...["Day", ...(admin ? ["Tenant"] : []), "Model", "Requests", "Prompt", "Completion", "Virtual", "Tuning", "Tokens", "Failed", "Cancelled"].map((h) => el("th", {}, h))),
      ),
      el(
        "tbody",
        {},
        ...rows
          .slice()
          .sort((a, b) => b.start_time - a.start_time || seriesOf(a).localeCompare(seriesOf(b)))
          .map((row) =>
            el(
              "tr",
              { dataset: { model: row.model === null ? "" : row.model, day: day(row.start_time) } },
              el("td", {}, day(row.start_time)),
              admin ? el("td", {}, row.tenant) : null,
              el("td", {}, row.model === null ? BASE : row.model),
              ...[row.requests, row.prompt_tokens, row.completion_tokens, row.virtual_tokens, row.tuning_tokens, tokens(row), failed(row), row.cancelled].map((v) =>
                el("td", { class: "num" }, v),
              ),
            ),
          ),
      ),
    ),
  );
}
