// A grouped bar chart as inline SVG: one group per day, one bar per series (a prefix or model)
// in it, each bar titled with its value. Built with DOM calls like chart.js: no library, and
// nothing the Content-Security-Policy would have to allow.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 720;
const HEIGHT = 260;
const PAD = { left: 64, right: 16, top: 14, bottom: 32 };
const COLOURS = ["#1f6feb", "#d97706", "#2da44e", "#8250df", "#cf222e", "#0969da", "#bf8700", "#57606a"];

function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

export function colour(i) {
  return COLOURS[i % COLOURS.length];
}

// groups: labels along x (days); series: names; value(group, series) -> number.
export function barChart(groups, series, value, label = "tokens") {
  const chart = svg("svg", {
    class: "chart bars",
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": `${label} per day`,
  });
  const values = groups.flatMap((g) => series.map((s) => value(g, s)));
  const top = Math.max(1, ...values);
  const base = HEIGHT - PAD.bottom;
  const inner = WIDTH - PAD.left - PAD.right;
  const groupWidth = inner / Math.max(1, groups.length);
  const barWidth = Math.min(48, (groupWidth * 0.8) / Math.max(1, series.length));
  chart.append(
    svg("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: base }),
    svg("line", { class: "axis", x1: PAD.left, y1: base, x2: WIDTH - PAD.right, y2: base }),
    svg("text", { x: PAD.left - 6, y: PAD.top + 4, "text-anchor": "end" }, String(top)),
    svg("text", { x: PAD.left - 6, y: base, "text-anchor": "end" }, "0"),
  );
  groups.forEach((group, g) => {
    const start = PAD.left + g * groupWidth + (groupWidth - barWidth * series.length) / 2;
    chart.append(svg("text", { x: PAD.left + (g + 0.5) * groupWidth, y: HEIGHT - 10, "text-anchor": "middle" }, group));
    series.forEach((name, s) => {
      const v = value(group, name);
      if (!v) return;
      const h = (v / top) * (base - PAD.top);
      const bar = svg("rect", {
        class: "bar",
        x: (start + s * barWidth).toFixed(1),
        y: (base - h).toFixed(1),
        width: Math.max(1, barWidth - 2).toFixed(1),
        height: h.toFixed(1),
        fill: colour(s),
        "data-series": name,
        "data-group": group,
        "data-value": v,
      });
      bar.append(svg("title", {}, `${group} ${name}: ${v} ${label}`));
      chart.append(bar);
    });
  });
  return chart;
}
