// A loss chart as inline SVG: training loss per step as a line, validation loss (at epoch ends)
// as a dashed one. Built with DOM calls like every other element, so it needs no library and
// nothing the Content-Security-Policy would have to allow.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 640;
const HEIGHT = 260;
const PAD = { left: 52, right: 16, top: 14, bottom: 32 };

function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

// points: [{step, train_loss, valid_loss?}], in step order; totalSteps: the x axis' end;
// x: a unit for the x axis instead of steps (the operator's engine chart: seconds).
export function lossChart(points, totalSteps, { x: unit = null, label = "loss per step" } = {}) {
  const chart = svg("svg", {
    class: "chart",
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": label,
    "data-points": points.length,
  });
  const losses = points.flatMap((p) => [p.train_loss, p.valid_loss]).filter(Number.isFinite);
  const lastStep = Math.max(totalSteps || 0, ...points.map((p) => p.step), 1);
  const top = losses.length ? Math.max(...losses) : 1;
  const bottom = losses.length ? Math.min(...losses, 0) : 0;
  const span = top - bottom || 1;
  const x = (step) => PAD.left + (step / lastStep) * (WIDTH - PAD.left - PAD.right);
  const y = (loss) => PAD.top + ((top - loss) / span) * (HEIGHT - PAD.top - PAD.bottom);
  const left = PAD.left;
  const base = HEIGHT - PAD.bottom;

  chart.append(
    svg("line", { class: "axis", x1: left, y1: PAD.top, x2: left, y2: base }),
    svg("line", { class: "axis", x1: left, y1: base, x2: WIDTH - PAD.right, y2: base }),
    svg("text", { x: left - 6, y: PAD.top + 4, "text-anchor": "end" }, top.toFixed(2)),
    svg("text", { x: left - 6, y: base, "text-anchor": "end" }, bottom.toFixed(2)),
    svg("text", { x: left, y: HEIGHT - 10 }, unit ? `0 ${unit}` : "step 0"),
    svg("text", { x: WIDTH - PAD.right, y: HEIGHT - 10, "text-anchor": "end" }, unit ? `${lastStep} ${unit}` : `step ${lastStep}`),
  );
  const line = (key, cls) => {
    const coordinates = points
      .filter((p) => Number.isFinite(p[key]))
      .map((p) => `${x(p.step).toFixed(1)},${y(p[key]).toFixed(1)}`);
    if (coordinates.length) chart.append(svg("polyline", { class: cls, points: coordinates.join(" ") }));
  };
  line("train_loss", "train");
  line("valid_loss", "valid");
  return chart;
}
