// The Memorization tab: accuracy curves (pristine, corrupt, test) of several
// runs side by side, a table of final values, when examples were learned for
// good, coherence and f_p over steps, the network's health; every panel with
// axis labels and a caption saying what it measures. Plain DOM and SVG; data from this plugin's
// JSON routes (relative URLs resolve under /data/plugin/memorization/).

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
// Each panel: [tag, title, y-axis label, y range (null: the data's), caption].
const ACCURACY = [
  ["eval/pristine/accuracy", "Pristine training examples", "accuracy", [0, 1],
   "Share of the tracked pristine training examples classified as their label: " +
   "what is learned from the signal."],
  ["eval/corrupt/accuracy", "Corrupt training examples, against their noisy label",
   "accuracy", [0, 1],
   "Share of the tracked corrupt training examples classified as their wrong (noisy) " +
   "label: memorization."],
  ["eval/test/accuracy", "Test set", "accuracy", [0, 1],
   "Share of the test examples classified as their label: generalization."]];
const PANELS = [
  ["coherence/model", "m-coherence of the per-example gradients", "m-coherence", null,
   "‖Σ gᵢ‖² / Σ ‖gᵢ‖² over the per-example gradients gᵢ of the probe's m examples " +
   "(whole model): 1 when they are orthogonal, m when identical. High: the examples " +
   "pull together."],
  ["update/aggregate/f_pristine", "Pristine share of the robust update (f_p)", "f_p", null,
   "⟨U, K_p⟩ / ⟨U, U⟩: the part of the run's update U coming from the kept parts K_p of " +
   "the probe's pristine gradients. The rest comes from corrupt examples."],
  ["update/mean/f_pristine", "Pristine share of the plain SGD update (f_p)", "f_p", null,
   "⟨G, G_p⟩ / ⟨G, G⟩, G the sum of the probe's per-example gradients and G_p that of its " +
   "pristine examples: what plain SGD would take from the signal."],
  ["aggregator/removed_mass/corrupt", "Gradient mass removed: corrupt examples",
   "fraction removed", [0, 1],
   "Σ |g − kept| / Σ |g| over the probe's corrupt examples: how much of their " +
   "gradients the aggregator's cut discards."],
  ["aggregator/removed_mass/pristine", "Gradient mass removed: pristine examples",
   "fraction removed", [0, 1],
   "The same for the probe's pristine examples: the price the cut takes from the signal."]];
const HEALTH = [
  ["health/max_weight_growth", "Weight growth since the start", "norm / norm at start", null,
   "The largest, over layers, of a layer's weight norm over its norm at the start. A " +
   "run that drifts (weights growing without bound, as winsorized SGD can at length) " +
   "climbs here long after its accuracy peaked; health/weight_norm/* has each layer."],
  ["health/logits_std", "Spread of the logits", "standard deviation", null,
   "Standard deviation of the logits on a fixed sample of 500 training examples: " +
   "overconfident outputs grow it."],
  ["health/dead_units", "Dead hidden units", "fraction of units", [0, 1],
   "Share of the ReLU units that output 0 on every example of the fixed sample " +
   "(channels for a conv layer); health/dead_units/* has each layer."]];
const LEARNED_CAPTION =
    "Step from which each tracked training example has been classified as its training " +
    "label at every evaluation up to the last (learned for good), on log-spaced bins " +
    "(merged where no evaluation falls); bar height: the share of the group's tracked " +
    "examples in the bin. Pristine examples are learned early; " +
    "corrupt ones late if at all (memorization).";
const GROUP_COLORS = {pristine: "#1f77b4", corrupt: "#d62728"};

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

// A panel: a title (HTML, wraps), an SVG plot area with axes, a caption.
function panel(parent, title, caption, W, H) {
  const box = el("div", {class: "chart"}, parent);
  el("div", {class: "chart-title"}, box, title);
  const svg = el("svg:svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`}, box);
  if (caption) el("p", {class: "caption"}, box, caption);
  return {box, svg};
}

// Horizontal grid lines at the y ticks, labelled on the left.
function yGrid(svg, ticks, sy) {
  const {W, L, R} = SIZE;
  for (const y of ticks) {
    el("svg:line", {x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid"}, svg);
    el("svg:text", {x: L - 4, y: sy(y) + 4, class: "tick", "text-anchor": "end"}, svg,
       tickText(y));
  }
}

function axisLabels(svg, W, H, L, B, xLabel, yLabel) {
  el("svg:text", {x: L + (W - L) / 2, y: H - 4, class: "axis-label x",
                  "text-anchor": "middle"}, svg, xLabel);
  el("svg:text", {x: -(H - B) / 2, y: 12, transform: "rotate(-90)", class: "axis-label y",
                  "text-anchor": "middle"}, svg, yLabel);
}

const SIZE = {W: 380, H: 230, L: 58, R: 14, T: 10, B: 42};

// Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi].
function niceTicks(lo, hi, count = 4) {
  // A range too small to split (constant values, float noise) gets unit steps.
  const raw = hi - lo > 1e-9 * Math.max(1, Math.abs(lo), Math.abs(hi)) ? (hi - lo) / count : 1;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw * 0.999);
  const ticks = [Math.floor(lo / step + 1e-9) * step];
  while (ticks.length < 2 || (ticks[ticks.length - 1] < hi - step * 1e-9 && ticks.length < 50)) {
    ticks.push(ticks[ticks.length - 1] + step);
  }
  return ticks.map((t) => +t.toFixed(10));
}

function tickText(t) {
  return String(+t.toPrecision(6));
}

// A line chart of {run: [[step, value], ...]} with one colored path per run,
// on x from 0 to `xMax` (the longest run's last step), or from 1 on a log
// scale (VIEW.logSteps: the early, log-spaced evaluations readable).
const VIEW = {logSteps: false};

function lineChart(parent, [, title, yLabel, yRange, caption], seriesByRun, colorOf, xMax) {
  const {W, H, L, R, T, B} = SIZE;
  const {svg} = panel(parent, title, caption, W, H);
  axisLabels(svg, W, H, L, B, VIEW.logSteps ? "training step (log scale)" : "training step",
             yLabel);
  const points = Object.values(seriesByRun).flat().filter((p) => p[1] !== null);
  if (!points.length) {
    el("svg:text", {x: L + 8, y: H / 2, class: "empty"}, svg, "no data yet");
    return;
  }
  xMax = Math.max(xMax || 0, ...points.map((p) => p[0]), 1);
  const values = points.map((p) => p[1]);
  const yTicks = yRange ? niceTicks(...yRange)
                        : niceTicks(Math.min(...values), Math.max(...values) || 1);
  const [yMin, yMax] = [yTicks[0], yTicks[yTicks.length - 1]];
  const sx = VIEW.logSteps
      ? (x) => L + (Math.log(Math.max(x, 1)) / Math.log(Math.max(xMax, 2))) * (W - L - R)
      : (x) => L + (x / xMax) * (W - L - R);
  const sy = (y) => T + (1 - (y - yMin) / (yMax - yMin)) * (H - T - B);
  yGrid(svg, yTicks, sy);
  const xTicks = VIEW.logSteps ? logTicks(xMax) : niceTicks(0, xMax).filter((t) => t <= xMax);
  for (const x of xTicks) {
    el("svg:text", {x: sx(x), y: H - B + 14, class: "tick", "text-anchor": "middle"}, svg,
       tickText(x));
  }
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

// Powers of ten in [1, xMax], and xMax itself.
function logTicks(xMax) {
  const ticks = [];
  for (let t = 1; t <= xMax / 3; t *= 10) ticks.push(t);
  return [...ticks, xMax];
}

// When one run's tracked examples were learned for good: per group, the share
// of its tracked examples on each log-spaced bin of steps, from 1 to the run's
// last evaluation.
function learnedChart(parent, run, hist) {
  const {W, H, L, R, T, B} = SIZE;
  const {box, svg} = panel(parent, `${run}: when examples were learned for good`, null, W, H);
  const groups = Object.entries(hist);
  // Shares of the tracked examples; counts for a run that did not record them.
  const tracked = groups.every(([, h]) => h.tracked);
  axisLabels(svg, W, H, L, B, "training step (log scale)",
             tracked ? "% of tracked examples" : "tracked examples");
  if (!groups.length) {
    el("svg:text", {x: L + 8, y: H / 2, class: "empty"}, svg,
       "no learning times yet (none evaluated, or a run of an older cg_tf)");
    el("p", {class: "caption"}, box, LEARNED_CAPTION);
    return;
  }
  const xMax = Math.max(...groups.map(([, h]) => h.step), 2);
  const share = (h, count) => tracked ? 100 * count / h.tracked : count;
  const yTicks = niceTicks(0, Math.max(
      ...groups.flatMap(([, h]) => h.buckets.map((b) => share(h, b[2]))), 1));
  const yMax = yTicks[yTicks.length - 1];
  const sx = (x) => L + (Math.log(Math.max(x, 1)) / Math.log(xMax)) * (W - L - R);
  const sy = (y) => T + (1 - y / yMax) * (H - T - B);
  yGrid(svg, yTicks, sy);
  for (const t of logTicks(xMax)) {
    el("svg:line", {x1: sx(t), x2: sx(t), y1: T, y2: H - B, class: "grid"}, svg);
    el("svg:text", {x: sx(t), y: H - B + 14, class: "tick", "text-anchor": "middle"}, svg,
       String(Math.round(t)));
  }
  const legend = el("div", {class: "legend"}, box);
  for (const [group, h] of groups) {
    let d = `M${sx(h.buckets[0][0]).toFixed(1)},${sy(0)}`;
    for (const [left, right, count] of h.buckets) {
      const y = sy(share(h, count)).toFixed(1);
      d += `L${sx(left).toFixed(1)},${y}L${sx(right).toFixed(1)},${y}`;
    }
    d += `L${sx(h.buckets[h.buckets.length - 1][1]).toFixed(1)},${sy(0)}`;
    el("svg:path", {d, class: `histogram ${group}`, "data-run": run,
                    stroke: GROUP_COLORS[group], fill: GROUP_COLORS[group]}, svg);
    const learned = h.buckets.reduce((a, b) => a + b[2], 0);
    const item = el("span", {class: "legend-item"}, legend);
    el("span", {class: "swatch", style: `background:${GROUP_COLORS[group]}`}, item);
    item.appendChild(document.createTextNode(tracked
        ? `${group}: ${learned} of ${h.tracked} tracked ` +
          `(${Math.round(share(h, learned))}%) learned for good by step ${h.step}`
        : `${group}: ${learned} learned for good by step ${h.step}`));
  }
  el("p", {class: "caption"}, box, LEARNED_CAPTION);
}

// The tracked examples themselves: filters over one run's shown examples at
// one evaluation; each a pure function of the rows the examples route gives.
const EXAMPLE_FILTERS = {
  "all shown": (rows) => rows,
  "memorized corrupt examples (learned for good, noisy label)": (rows) => rows.filter(
      (r) => r.group === "corrupt" && r.learned_for_good !== null),
  "pristine examples never learned": (rows) => rows.filter(
      (r) => r.group === "pristine" && r.first_learned === null),
  "earliest learned for good": (rows) => rows.filter((r) => r.learned_for_good !== null)
      .sort((a, b) => a.learned_for_good - b.learned_for_good),
  "latest learned for good": (rows) => rows.filter((r) => r.learned_for_good !== null)
      .sort((a, b) => b.learned_for_good - a.learned_for_good)};
const EXAMPLES_CAPTION =
    "The first tracked training examples of each group, as the model saw them (a " +
    "thumbnail), with their training label (noisy for a corrupt example) and true label, " +
    "the prediction at the chosen evaluation, and the step each was first classified as " +
    "its training label and the step since which it has been at every evaluation " +
    "(learned for good). Blue edge: pristine, red edge: corrupt; the prediction in green " +
    "when it is the true class, in red when it is a corrupt example's noisy label. " +
    "TensorBoard keeps 10 evaluations of a run unless started with " +
    "--samples_per_plugin=memorization=0.";

function select(parent, label, options, value, onChange) {
  const wrap = el("label", {class: "control"}, parent, `${label} `);
  const s = el("select", {}, wrap);
  for (const o of options) {
    const opt = el("option", {value: String(o)}, s, String(o));
    if (String(o) === String(value)) opt.selected = true;
  }
  s.addEventListener("change", () => onChange(s.value));
  return s;
}

function exampleCard(parent, r) {
  const card = el("div", {class: `example ${r.group}`, "data-group": r.group,
                          "data-learned": r.learned_for_good ?? ""}, parent);
  if (r.thumbnail) el("img", {src: r.thumbnail, alt: r.id, title: r.id}, card);
  const lines = el("div", {class: "example-text"}, card);
  el("div", {}, lines, r.group === "corrupt"
      ? `label ${r.label_name} (true ${r.true_label_name})` : `label ${r.label_name}`);
  // Green: the true class; red: a corrupt example's noisy label (memorized).
  const [kind, note] = r.prediction === r.true_label
      ? ["hit", r.group === "corrupt" ? ": the true class" : ""]
      : r.prediction === r.label ? ["memorized", ": the noisy label"] : ["miss", ""];
  el("div", {class: kind}, lines, `predicted ${r.prediction_name}${note}`);
  el("div", {}, lines, r.learned_for_good !== null
      ? `learned for good at ${r.learned_for_good}`
      : r.first_learned !== null ? `learned at ${r.first_learned}, since forgotten`
                                 : "never learned");
}

// The examples view of the selected runs: run, evaluation and filter choosers,
// then a card per example. An evaluation's examples are fetched once; the
// filters work on them in the browser.
async function examplesView(parent, runs) {
  const box = el("div", {class: "examples-view"}, parent);
  const state = {run: runs[0].name, step: null, filter: Object.keys(EXAMPLE_FILTERS)[0],
                 data: null, error: null};
  const load = async () => {
    const query = `examples?run=${encodeURIComponent(state.run)}` +
                  (state.step === null ? "" : `&step=${state.step}`);
    try {
      state.data = await getJson(query);
      state.error = null;
    } catch (e) {
      state.error = e.message;  // the controls stay: choose another run or step
    }
    render();
  };
  const render = () => {
    box.replaceChildren();
    const controls = el("div", {class: "controls"}, box);
    select(controls, "Run", runs.map((r) => r.name), state.run,
           (v) => { state.run = v; state.step = null; state.data = null; load(); });
    const data = state.data;
    if (data && data.steps.length) {
      select(controls, "Evaluation at step", data.steps, state.step ?? data.step,
             (v) => { state.step = Number(v); load(); });
      select(controls, "Show", Object.keys(EXAMPLE_FILTERS), state.filter,
             (v) => { state.filter = v; render(); });
    }
    if (state.error) {
      el("p", {class: "error"}, box, `Could not load examples: ${state.error}`);
    } else if (data && !data.steps.length) {
      el("p", {class: "empty-note"}, box,
         "This run shows no examples (--examples_shown=0, or a run of an older cg_tf).");
    } else if (data) {
      const shown = EXAMPLE_FILTERS[state.filter](data.examples.slice());
      el("p", {class: "count"}, box,
         `${shown.length} of ${data.examples.length} shown examples at step ${data.step}`);
      const grid = el("div", {class: "examples"}, box);
      for (const r of shown) exampleCard(grid, r);
    }
    box.dataset.examples = "drawn";
  };
  await load();
}

// Panels whose y ranges are drawn alike.
const PAIRED = [["update/aggregate/f_pristine", "update/mean/f_pristine"]];

// The nice range covering every value of several {run: series}, or null.
function sharedRange(datas) {
  const values = datas.flatMap((d) => Object.values(d).flat()).map((p) => p[1])
      .filter((v) => v !== null);
  if (!values.length) return null;
  const ticks = niceTicks(Math.min(...values), Math.max(...values));
  return [ticks[0], ticks[ticks.length - 1]];
}

// A run whose probe stopped before its last evaluation (the last point of an
// accuracy curve, {run: series}) says so, and why.
function probeNotes(parent, probeSeries, evaluations) {
  for (const [run, evals] of Object.entries(evaluations)) {
    const series = probeSeries[run] || [];
    const last = series.length ? series[series.length - 1][0] : null;
    const end = evals.length ? evals[evals.length - 1][0] : null;
    if (last !== null && end !== null && last < end) {
      el("p", {class: "probe-note"}, parent,
         `${run}: the probe's last measurement is at step ${last}, its last evaluation at ` +
         `${end}: probing had taken more than its share of the run's time ` +
         "(--probe_max_share), so the later scheduled probes were skipped.");
    }
  }
}

function table(parent, rows, colorOf) {
  const t = el("table", {class: "runs"}, parent);
  const head = el("tr", {}, el("thead", {}, t));
  // The noise rate asked for and the share of labels it changed (uniform noise
  // may redraw an example's own label).
  const columns = ["run", "aggregator", "noise_rate", "labels_changed", "step",
                   "pristine accuracy", "corrupt accuracy", "test accuracy", "adjusted overfit"];
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
  h2 { font-size: 15px; font-weight: 500; margin: 20px 0 4px; }
  .section-caption { color: #616161; margin: 0 0 8px; max-width: 1170px; }
  .charts { display: flex; flex-wrap: wrap; gap: 12px; }
  .chart { border: 1px solid #e0e0e0; border-radius: 4px; background: #fff; width: 380px;
           padding: 8px 0 6px; }
  .chart-title { font-size: 12px; font-weight: 500; padding: 0 10px 4px; }
  .caption, .legend { font-size: 11px; color: #616161; padding: 0 10px; margin: 4px 0 0; }
  .legend-item { display: block; }
  .tick, .empty { font-size: 10px; fill: #616161; }
  .axis-label { font-size: 11px; fill: #424242; }
  .grid { stroke: #eee; }
  .curve { fill: none; stroke-width: 2; }
  .histogram { stroke-width: 1.5; fill-opacity: 0.15; }
  .runs-picker label { margin-right: 14px; white-space: nowrap; }
  .swatch { display: inline-block; width: 12px; height: 4px; margin: 0 4px 2px 2px; }
  table.runs { border-collapse: collapse; }
  table.runs th, table.runs td { padding: 4px 10px; border-bottom: 1px solid #e0e0e0;
                                 text-align: right; }
  table.runs th:first-child, table.runs td:first-child { text-align: left; }
  .error { color: #c62828; }
  .controls { margin: 4px 0 8px; }
  .control { margin-right: 16px; }
  .examples { display: flex; flex-wrap: wrap; gap: 8px; }
  .example { width: 150px; border: 1px solid #e0e0e0; border-left: 4px solid #1f77b4;
             border-radius: 4px; padding: 6px; background: #fff; display: flex; gap: 6px; }
  .example.corrupt { border-left-color: #d62728; }
  .example img { width: 48px; height: 48px; object-fit: contain; image-rendering: pixelated;
                 background: #000; flex: none; }
  .example-text { font-size: 11px; line-height: 1.35; }
  .hit { color: #2e7d32; }
  .memorized { color: #c62828; font-weight: 500; }
  .miss { color: #757575; }
  .count, .empty-note { color: #616161; }
  .log-steps { margin-right: 20px; }
  .probe-note { color: #8d6e00; font-size: 12px; margin: 6px 0 0; }
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
  const content = el("div", {}, root);
  const redraw = () => draw(content, runs.filter((r) => selected.has(r.name)), colorOf);
  const scale = el("label", {class: "log-steps"}, picker);
  const logBox = el("input", {type: "checkbox"}, scale);
  scale.appendChild(document.createTextNode("log-scale steps"));
  logBox.addEventListener("change", () => { VIEW.logSteps = logBox.checked; redraw(); });
  el("b", {}, picker, "Runs: ");
  for (const run of runs) {
    const label = el("label", {}, picker);
    const box = el("input", {type: "checkbox", checked: ""}, label);
    el("span", {class: "swatch", style: `background:${colorOf(run.name)}`}, label);
    label.appendChild(document.createTextNode(run.name));
    box.addEventListener("change", () => {
      box.checked ? selected.add(run.name) : selected.delete(run.name);
      redraw();
    });
  }
  await draw(content, runs, colorOf);
}

async function draw(content, runs, colorOf) {
  // data-drawn: "true" once every panel is drawn (panels arrive one by one).
  content.dataset.drawn = "false";
  await drawPanels(content, runs, colorOf);
  content.dataset.drawn = "true";
}

async function drawPanels(content, runs, colorOf) {
  content.replaceChildren();
  if (!runs.length) return;
  // One parameter a run: a run's name may hold any character, commas too.
  const names = runs.map((r) => `runs=${encodeURIComponent(r.name)}`).join("&");
  const has = (tag) => runs.some((r) => r.tags.includes(tag));
  const scalars = (tag) => getJson(`scalars?tag=${encodeURIComponent(tag)}` +
                                   `&${names}`);
  const section = (title, caption) => {
    el("h2", {}, content, title);
    if (caption) el("p", {class: "section-caption"}, content, caption);
  };
  const rows = (await getJson(`table?${names}`)).rows;
  const xMax = Math.max(...rows.map((r) => r.step || 0));

  section("Accuracy against the training label",
          "On fixed samples of the training set (pristine: label kept; corrupt: label " +
          "replaced by the noise) and of the test set, at each evaluation.");
  const acc = el("div", {class: "charts"}, content);
  const accData = await Promise.all(ACCURACY.map(([tag]) => has(tag) ? scalars(tag) : {}));
  ACCURACY.forEach((spec, i) => lineChart(acc, spec, accData[i], colorOf, xMax));

  section("Final values",
          "At each run's last evaluation. Adjusted overfit: training accuracy (against " +
          "the training labels) minus what a model that only generalizes would score, " +
          "noise/classes + (1 − noise) × test accuracy; 0 means no memorization.");
  table(content, rows, colorOf);

  section("When examples are learned for good (tracked pristine vs corrupt)", null);
  const hist = el("div", {class: "charts"}, content);
  const hists = await Promise.all(runs.map(
      (r) => getJson(`histograms?run=${encodeURIComponent(r.name)}`)));
  runs.forEach((r, i) => learnedChart(hist, r.name, hists[i]));


  section("Coherence and the update's pristine share",
          "From the per-example gradients of a fixed probe sample of m training examples " +
          "(pristine and corrupt), measured while the run's time budget allows.");
  const probe = el("div", {class: "charts"}, content);
  const probeData = Object.fromEntries(await Promise.all(PANELS.filter(([tag]) => has(tag))
      .map(async ([tag]) => [tag, await scalars(tag)])));
  for (const spec of PANELS) {
    if (!(spec[0] in probeData)) continue;
    // The two f_p panels share one y range, so that they compare at a glance.
    const pair = PAIRED.find((p) => p.includes(spec[0]));
    const range = spec[3] || (pair && sharedRange(pair.map((t) => probeData[t] || {})));
    lineChart(probe, [...spec.slice(0, 3), range, spec[4]], probeData[spec[0]], colorOf, xMax);
  }
  probeNotes(content, probeData[PANELS[0][0]] || {}, accData[0] || {});

  section("Network health",
          "Whether the run stays sound at length: weights that grow without bound, " +
          "logits that blow up and units that die mark a drifting run.");
  const healthCharts = el("div", {class: "charts"}, content);
  for (const spec of HEALTH) {
    if (has(spec[0])) lineChart(healthCharts, spec, await scalars(spec[0]), colorOf, xMax);
  }

  section("The examples themselves", EXAMPLES_CAPTION);
  await examplesView(content, runs);
}
