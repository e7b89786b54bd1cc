// The Memorization tab: accuracy curves (pristine, corrupt, test) of several
// runs side by side, learning-time histograms, coherence and f_p over steps,
// and a table of final values. Plain DOM and SVG; data from this plugin's
// JSON routes (relative URLs resolve under /data/plugin/memorization/).

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const ACCURACY = [["pristine", "eval/pristine/accuracy", "Pristine training examples"],
                  ["corrupt", "eval/corrupt/accuracy", "Corrupt training examples (noisy label)"],
                  ["test", "eval/test/accuracy", "Test set"]];
const PANELS = [["coherence/model", "m-coherence of the probe (whole model)", null],
                ["update/aggregate/f_pristine", "f_p: pristine share of the robust update", null],
                ["update/mean/f_pristine", "f_p: pristine share of the mean update", null],
                ["aggregator/removed_mass/corrupt", "Gradient mass removed: corrupt examples",
                 [0, 1]],
                ["aggregator/removed_mass/pristine", "Gradient mass removed: pristine examples",
                 [0, 1]]];

async function getJson(path) {
  const response = await fetch(path);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function el(tag, attrs = {}, parent = null, text = null) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
                                      : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

// A line chart of {run: [[step, value], ...]} with one colored path per run.
function lineChart(parent, title, seriesByRun, colorOf, yRange) {
  const W = 360, H = 220, L = 44, R = 10, T = 24, B = 30;
  const box = el("div", {class: "chart"}, parent);
  const svg = el("svg:svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`}, box);
  el("svg:text", {x: L, y: 15, class: "title"}, svg, title);
  const points = Object.values(seriesByRun).flat().filter((p) => p[1] !== null);
  if (!points.length) {
    el("svg:text", {x: L, y: H / 2, class: "empty"}, svg, "no data yet");
    return;
  }
  const xMax = Math.max(...points.map((p) => p[0]), 1);
  let [yMin, yMax] = yRange || [Math.min(...points.map((p) => p[1])),
                                Math.max(...points.map((p) => p[1]))];
  if (yMax === yMin) { yMax += 1; yMin -= yRange ? 0 : 1; }
  const sx = (x) => L + (x / xMax) * (W - L - R);
  const sy = (y) => T + (1 - (y - yMin) / (yMax - yMin)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = yMin + (i / 4) * (yMax - yMin);
    el("svg:line", {x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid"}, svg);
    el("svg:text", {x: L - 4, y: sy(y) + 4, class: "tick", "text-anchor": "end"}, svg,
       fmt(y, 2));
    const x = (i / 4) * xMax;
    el("svg:text", {x: sx(x), y: H - B + 14, class: "tick", "text-anchor": "middle"}, svg,
       String(Math.round(x)));
  }
  el("svg:text", {x: W - R, y: H - 4, class: "tick", "text-anchor": "end"}, svg, "step");
  for (const [run, series] of Object.entries(seriesByRun)) {
    const pts = series.filter((p) => p[1] !== null);
    if (!pts.length) continue;
    const d = pts.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`);
    const path = el("svg:path", {d: d.join(""), class: "curve", "data-run": run,
                                 stroke: colorOf(run)}, svg);
    el("svg:title", {}, path, `${run}: ${fmt(pts[pts.length - 1][1])} at step ` +
       `${pts[pts.length - 1][0]}`);
  }
}

// Learning-time histograms of one run: pristine vs corrupt, as bar outlines.
function histogramChart(parent, run, hist) {
  const W = 360, H = 180, L = 44, R = 10, T = 24, B = 30;
  const box = el("div", {class: "chart"}, parent);
  const svg = el("svg:svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`}, box);
  el("svg:text", {x: L, y: 15, class: "title"}, svg, `${run}: first step learned`);
  const groups = Object.entries(hist);
  const buckets = groups.flatMap(([, h]) => h.buckets);
  if (!buckets.length) {
    el("svg:text", {x: L, y: H / 2, class: "empty"}, svg, "nothing learned yet");
    return;
  }
  const xMin = Math.min(...buckets.map((b) => b[0]));
  const xMax = Math.max(...buckets.map((b) => b[1]), xMin + 1);
  const yMax = Math.max(...buckets.map((b) => b[2]), 1);
  const sx = (x) => L + ((x - xMin) / (xMax - xMin)) * (W - L - R);
  const sy = (y) => T + (1 - y / yMax) * (H - T - B);
  el("svg:line", {x1: L, x2: W - R, y1: sy(0), y2: sy(0), class: "grid"}, svg);
  el("svg:text", {x: L, y: H - B + 14, class: "tick"}, svg, String(Math.round(xMin)));
  el("svg:text", {x: W - R, y: H - B + 14, class: "tick", "text-anchor": "end"}, svg,
     `${Math.round(xMax)} (step)`);
  el("svg:text", {x: L - 4, y: sy(yMax) + 4, class: "tick", "text-anchor": "end"}, svg,
     String(Math.round(yMax)));
  groups.forEach(([group, h], i) => {
    let d = `M${sx(h.buckets[0][0]).toFixed(1)},${sy(0)}`;
    for (const [left, right, count] of h.buckets) {
      d += `L${sx(left).toFixed(1)},${sy(count).toFixed(1)}L${sx(right).toFixed(1)},` +
           `${sy(count).toFixed(1)}`;
    }
    d += `L${sx(h.buckets[h.buckets.length - 1][1]).toFixed(1)},${sy(0)}`;
    el("svg:path", {d, class: `histogram ${group}`, "data-run": run}, svg);
    el("svg:text", {x: W - R - 90, y: T + 12 + 14 * i, class: `legend ${group}`}, svg,
       `${group} (${h.buckets.reduce((a, b) => a + b[2], 0).toFixed(0)})`);
  });
}

function table(parent, rows, colorOf) {
  const t = el("table", {class: "runs"}, parent);
  const head = el("tr", {}, el("thead", {}, t));
  const columns = ["run", "aggregator", "noise_rate", "step", "pristine accuracy",
                   "corrupt accuracy", "test accuracy", "adjusted overfit"];
  for (const c of columns) el("th", {}, head, c.replace("_", " "));
  const body = el("tbody", {}, t);
  for (const row of rows) {
    const tr = el("tr", {}, body);
    for (const c of columns) {
      const v = row[c];
      const td = el("td", {}, tr, typeof v === "number" && !Number.isInteger(v) ? fmt(v)
                                                                             : (v ?? "–"));
      if (c === "run") td.style.borderLeft = `6px solid ${colorOf(row.run)}`;
    }
  }
}

const STYLE = `
  body { font-family: Roboto, sans-serif; font-size: 13px; margin: 16px; color: #212121; }
  h2 { font-size: 15px; font-weight: 500; margin: 20px 0 8px; }
  .charts { display: flex; flex-wrap: wrap; gap: 12px; }
  .chart { border: 1px solid #e0e0e0; border-radius: 4px; background: #fff; }
  .title { font-size: 12px; font-weight: 500; }
  .tick, .empty { font-size: 10px; fill: #616161; }
  .grid { stroke: #eee; }
  .curve { fill: none; stroke-width: 2; }
  .histogram { stroke-width: 1.5; fill-opacity: 0.15; }
  .histogram.pristine, .legend.pristine { stroke: #1f77b4; fill: #1f77b4; }
  .histogram.corrupt, .legend.corrupt { stroke: #d62728; fill: #d62728; }
  .legend { font-size: 11px; stroke: none; }
  .runs-picker label { margin-right: 14px; white-space: nowrap; }
  .swatch { display: inline-block; width: 12px; height: 4px; margin: 0 4px 2px 2px; }
  table.runs { border-collapse: collapse; }
  table.runs th, table.runs td { padding: 4px 10px; border-bottom: 1px solid #e0e0e0;
                                 text-align: right; }
  table.runs th:first-child, table.runs td:first-child { text-align: left; }
  .error { color: #c62828; }
`;

export async function render() {
  el("style", {}, document.head, STYLE);
  const root = el("div", {id: "memorization"}, document.body);
  let runs;
  try {
    runs = (await getJson("runs")).runs;
  } catch (e) {
    el("p", {class: "error"}, root, `Could not load runs: ${e.message}`);
    return;
  }
  if (!runs.length) {
    el("p", {}, root, "No cg_tf runs in this logdir yet.");
    return;
  }
  const colorOf = (run) => COLORS[runs.findIndex((r) => r.name === run) % COLORS.length];
  const selected = new Set(runs.map((r) => r.name));
  const picker = el("div", {class: "runs-picker"}, root);
  el("b", {}, picker, "Runs: ");
  const content = el("div", {}, root);
  for (const run of runs) {
    const label = el("label", {}, picker);
    const box = el("input", {type: "checkbox", checked: ""}, label);
    el("span", {class: "swatch", style: `background:${colorOf(run.name)}`}, label);
    label.appendChild(document.createTextNode(run.name));
    box.addEventListener("change", () => {
      box.checked ? selected.add(run.name) : selected.delete(run.name);
      draw(content, runs.filter((r) => selected.has(r.name)), colorOf);
    });
  }
  await draw(content, runs, colorOf);
}

async function draw(content, runs, colorOf) {
  content.replaceChildren();
  if (!runs.length) return;
  const names = runs.map((r) => r.name).join(",");
  const has = (tag) => runs.some((r) => r.tags.includes(tag));
  const scalars = (tag) => getJson(`scalars?tag=${encodeURIComponent(tag)}` +
                                   `&runs=${encodeURIComponent(names)}`);

  el("h2", {}, content, "Accuracy against the training label");
  const acc = el("div", {class: "charts"}, content);
  const accData = await Promise.all(ACCURACY.map(([, tag]) => has(tag) ? scalars(tag) : {}));
  ACCURACY.forEach(([, , title], i) => lineChart(acc, title, accData[i], colorOf, [0, 1]));

  el("h2", {}, content, "Final values");
  table(content, (await getJson(`table?runs=${encodeURIComponent(names)}`)).rows, colorOf);

  el("h2", {}, content, "When examples are first learned (tracked pristine vs corrupt)");
  const hist = el("div", {class: "charts"}, content);
  const hists = await Promise.all(runs.map(
      (r) => getJson(`histograms?run=${encodeURIComponent(r.name)}`)));
  runs.forEach((r, i) => histogramChart(hist, r.name, hists[i]));

  el("h2", {}, content, "Coherence and the update's pristine share (probe sample)");
  const probe = el("div", {class: "charts"}, content);
  for (const [tag, title, range] of PANELS) {
    if (has(tag)) lineChart(probe, title, await scalars(tag), colorOf, range);
  }
}
