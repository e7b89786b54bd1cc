"""Runs of a logdir as data: scalar series, configurations, the final-values
table, the papers' accuracy figure and a CSV of every metric.

Reads event files through TensorBoard's own data provider (as the plugin does),
so the tables and figures show exactly what the Memorization tab shows.
"""

import csv
import dataclasses
import json
import math
import posixpath
import textwrap

import numpy as np

from cg_tf.measure import tags
from cg_tf.robust import names


@dataclasses.dataclass
class Run:
    name: str
    config: dict
    scalars: dict[str, list[tuple[int, float]]]

    def last(self, tag: str) -> float | None:
        series = self.scalars.get(tag)
        return series[-1][1] if series else None


def read_configs(provider, ctx, experiment_id: str = "") -> dict[str, dict]:
    """{run: its configuration} for every cg_tf run a TensorBoard data provider has."""
    from tensorboard.data.provider import RunTagFilter
    data = provider.read_tensors(ctx, experiment_id=experiment_id, plugin_name=tags.PLUGIN_NAME,
                                 downsample=1, run_tag_filter=RunTagFilter(tags=[tags.RUN_CONFIG]))
    out = {}
    for run, by_tag in data.items():
        try:
            out[run] = json.loads(by_tag[tags.RUN_CONFIG][-1].numpy.item())
        except (ValueError, AttributeError):
            out[run] = {}
    return out


def read_runs(provider, ctx, experiment_id: str = "", configs: dict[str, dict] | None = None,
              runs: list[str] | None = None, tag_list: list[str] | None = None,
              downsample: int = 2 ** 31 - 1) -> list[Run]:
    """The scalars (`tag_list`, default all) of cg_tf runs (`runs`, default
    all, in name order) through a TensorBoard data provider."""
    from tensorboard.data.provider import RunTagFilter
    configs = read_configs(provider, ctx, experiment_id) if configs is None else configs
    names = sorted(configs) if runs is None else runs
    scalars = provider.read_scalars(ctx, experiment_id=experiment_id, plugin_name="scalars",
                                    downsample=downsample,
                                    run_tag_filter=RunTagFilter(runs=names, tags=tag_list))
    return [Run(name, configs[name], {tag: [(d.step, float(d.value)) for d in series]
                                      for tag, series in scalars.get(name, {}).items()})
            for name in names]


def load_runs(logdir: str) -> list[Run]:
    """Every cg_tf run under `logdir` (those with a run configuration), by name."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        tensor_size_guidance={"scalars": 0, "histograms": 1, tags.PLUGIN_NAME: 1})
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    return read_runs(data_provider.MultiplexerDataProvider(multiplexer, logdir),
                     context.RequestContext())


def aggregator_label(record: dict | None) -> str | None:
    """What a table calls a run's recorded aggregator (`names.label`: plain
    SGD, or `name[:value][@layers]`), or its name alone for a record that
    does not read."""
    if not record:
        return None
    try:
        return names.label(record)
    except (KeyError, TypeError):
        return record.get("name")


def table(runs: list[Run]) -> list[dict]:
    """A row per run: its setting, its last step and the last value of each column."""
    rows = []
    for run in runs:
        rows.append({
            "run": run.name, "aggregator": aggregator_label(run.config.get("aggregator")),
            "noise_rate": run.config.get("noise", {}).get("rate"),
            "labels_changed": run.config.get("labels_changed"),
            "step": max((s[-1][0] for s in run.scalars.values() if s), default=None),
            **{column: run.last(tag) for column, tag in tags.TABLE_COLUMNS.items()}})
    return rows


# A run's results (summary.json keys), as the tables of its end show them.
RESULT_ROWS = (("pristine_accuracy", "pristine training examples"),
               ("corrupt_accuracy", "corrupt ones, against their noisy label"),
               ("corrupt_true_label_accuracy", "corrupt ones, against their true label"),
               ("test_accuracy", "test"),
               ("test_top5_accuracy", "test, top 5"),
               ("adjusted_overfit", "adjusted overfit"))


def side_by_side(summaries: dict[str, dict]) -> str:
    """Runs' final metrics (summary.json's, or MemorizationCallback.summary) in
    columns headed by the dict's keys, and how much each memorized."""
    rows = [(key, label) for key, label in RESULT_ROWS
            if any(s.get(key) is not None for s in summaries.values())]
    width = max(len(label) for _, label in rows)
    column = max(20, *(len(name) + 2 for name in summaries))
    lines = [" " * (width + 2) + "".join(f"{name:>{column}}" for name in summaries)]
    for key, label in rows:
        cells = "".join(f"{s[key]:>{column}.3f}" if s.get(key) is not None else f"{'-':>{column}}"
                        for s in summaries.values())
        lines.append(f"{label:<{width}}  {cells}")
    said = [f"{name}: {s['corrupt_accuracy']:.0%}" + (
        f" (test {s['test_accuracy']:.3f})" if s.get("test_accuracy") is not None else "")
        for name, s in summaries.items() if s.get("corrupt_accuracy") is not None]
    if said:
        lines += ["", "Corrupt examples fitted to their noisy label: " + "; ".join(said) + "."]
    return "\n".join(lines)


def summary_text(summary: dict, model_dir: str) -> str:
    """A run's summary as a person reads it: the setting, the accuracies rounded,
    and what they say about memorization."""
    noise = summary.get("noise") or {}
    aggregator = names.spec(summary["aggregator"])
    steps = f"{summary['steps']} steps"
    if summary.get("steps_per_epoch"):
        epochs = summary['steps'] / summary['steps_per_epoch']
        steps += f" ({round(epochs, 2):g} epoch{'' if epochs == 1 else 's'})"
    data = summary["data_dir"]
    if noise.get("rate"):
        data += f" ({noise['rate']:.0%} {noise['mode']} label noise)"
    model = summary.get("architecture") or summary["model"]
    lines = [f"{model_dir}: {model} with {aggregator}, batch "
             f"{summary.get('batch_size', '?')}, {steps}, {summary['wall_seconds']:.0f} s",
             f"data: {data}"]
    rows = [(label, summary[key]) for key, label in RESULT_ROWS if summary.get(key) is not None]
    width = max(len(label) for label, _ in rows)
    lines += ["", "accuracy", *(f"  {label:<{width}}  {value:6.3f}" for label, value in rows)]
    corrupt, true = summary.get("corrupt_accuracy"), summary.get("corrupt_true_label_accuracy")
    if corrupt is not None and true is not None:
        lines += ["", f"It fits {corrupt:.0%} of the corrupt training examples to their noisy "
                      f"label (memorization) and classifies {true:.0%} of them as their true "
                      "class."]
    return "\n".join(lines)


def _cell(value) -> str:
    """A table cell: numbers to 3 decimals, missing (None, NaN) as -."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (numbers to 3 decimals, missing as -)."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict]) -> str:
    """The rows as aligned plain text for a console: the first column to the
    left, the others to the right (numbers to 3 decimals, missing as -)."""
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [columns, *([_cell(r[c]) for c in columns] for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
                     for line in cells)


def write_csv(runs: list[Run], path: str) -> None:
    """Every scalar of every run, one row per (run, tag, step) (local or gs://)."""
    write_table(path, [{"run": run.name, "tag": tag, "step": step, "value": value}
                       for run in runs for tag in sorted(run.scalars)
                       for step, value in run.scalars[tag]],
                ["run", "tag", "step", "value"])


def write_table(path: str, rows: list[dict], columns: list[str] | None = None) -> None:
    """Rows as CSV with a header (the first row's keys unless `columns`),
    written atomically to a local or gs:// path."""
    from cg_tf.storage import files
    columns = columns or (list(rows[0]) if rows else [])

    def write(f):
        if columns:
            writer = csv.DictWriter(f, columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    files.write_atomically(path, write)


CURVE_STYLES = {"pristine": ("pristine (train)", "-", "#1f77b4"),
                "corrupt": ("corrupt (train, noisy label)", "--", "#d62728"),
                "test": ("test", ":", "#2ca02c")}

# Matplotlib settings of the figures: sizes that stay legible at a paper
# column's width.
FIGURE_STYLE = {"font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9.5,
                "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 9,
                "axes.spines.top": False, "axes.spines.right": False}


def dataset_name(config: dict) -> str | None:
    """The dataset a run trained on as a reader names it: its source (`digits`,
    the folder of `idx:DIR`, the NAME of `tfds:NAME`), else the name of its
    directory (also for a dataset made from another's records)."""
    kind, _, arg = (config.get("source") or "").partition(":")
    if kind and kind != "records":
        return posixpath.basename(arg.rstrip("/")) or kind
    data_dir = (config.get("data_dir") or "").rstrip("/")
    return posixpath.basename(data_dir) or None


# The phrases of `describe`, in the order titles and captions give them.
PHRASES = ("aggregator", "data", "model", "noise", "noise_mode", "batch", "learning_rate",
           "clamp")


# A run's kernels, where it records them: held at their norm (--clamp_norms) or
# free, which a caption leaves out when every run shares it.
CLAMPED, FREE = "kernels held at their starting norm", "kernels free"


def describe(config: dict) -> dict[str, str]:
    """What a run's configuration says about its setting, as short phrases
    (`PHRASES`; those it does not record left out)."""
    record, noise = config.get("aggregator"), config.get("noise") or {}
    model = config.get("architecture") or config.get("model")
    rate = noise.get("rate")
    phrases = {
        "aggregator": record and (names.PLAIN_SGD if aggregator_label(record) == names.PLAIN_SGD
                                  else " ".join([record.get("name", "?"), *(
                                      f"{k}={v}" for k, v in record.items() if k != "name")])),
        "data": dataset_name(config),
        "model": model and f"model {model}",
        "noise": rate is not None and (f"{rate * 100:g}% noise" if rate else "no noise"),
        "noise_mode": rate and noise.get("mode") and f"{noise['mode']} noise",
        "batch": config.get("batch_size") and f"batch {config['batch_size']}",
        "learning_rate": config.get("learning_rate") and f"lr {config['learning_rate']:g}",
        "clamp": {True: CLAMPED, False: FREE}.get(config.get("clamp_norms"))}
    return {k: v for k, v in phrases.items() if v}


def _shared(described: list[dict[str, str]]) -> dict[str, str]:
    """The phrases alike in every one of `described` that has them (a run
    without noise has no noise mode)."""
    values = {k: {d[k] for d in described if k in d} for k in PHRASES}
    return {k: v.pop() for k, v in values.items() if len(v) == 1}


def caption(runs: list[Run]) -> str:
    """The setting every run shares (dataset, model, noise, batch, ...): the
    line over a figure; what differs goes in the panel titles."""
    shared = _shared([describe(r.config) for r in runs])
    if "noise_mode" in shared and "noise" in shared:  # "50% noise", "uniform noise"
        shared["noise"] = shared["noise"].replace("noise", shared.pop("noise_mode"))
    if shared.get("clamp") == FREE:  # the default goes without saying
        del shared["clamp"]
    if "aggregator" in shared:  # named, and last: "digits, ..., aggregator median"
        name = shared.pop("aggregator")
        shared["aggregator"] = name if name == names.PLAIN_SGD else f"aggregator {name}"
    return ", ".join(shared.values())


def panel_titles(panels: dict[str, list[Run]]) -> dict[str, str]:
    """A short title per panel: the phrases of `describe` that differ between
    panels (and are the same within one), e.g. "winsorized c=4, 50% noise".
    Where those do not tell every panel apart (runs differing in what their
    config does not record), the last part of each key, else the keys."""
    described = {key: [describe(r.config) for r in runs] for key, runs in panels.items()}
    shared = _shared([d for ds in described.values() for d in ds])
    from_config = {key: ", ".join(v for k, v in _shared(ds).items() if k not in shared)
                   for key, ds in described.items()}
    for titles in (from_config, {key: posixpath.basename(key.rstrip("/")) for key in panels}):
        if all(titles.values()) and len(set(titles.values())) == len(titles):
            return titles
    return {key: key for key in panels}


def x_axis(runs: list[Run]) -> tuple[str, dict[str, float]]:
    """The x axis of runs' curves: ("epoch", {run: 1 / its steps per epoch})
    when their steps per epoch differ (other batch or dataset sizes, so a step
    means other things) and every run records it; else ("step", {run: 1})."""
    per_epoch = {r.name: r.config.get("steps_per_epoch") for r in runs}
    if all(per_epoch.values()) and len(set(per_epoch.values())) > 1:
        return "epoch", {name: 1 / steps for name, steps in per_epoch.items()}
    return "step", {r.name: 1.0 for r in runs}


# Up to this many runs, a band spans their lowest and highest value; with more,
# one standard deviation either side of the mean.
MIN_MAX_RUNS = 3


@dataclasses.dataclass(frozen=True)
class Band:
    """Series of several runs (e.g. one setting's seeds) at the steps all of
    them have: their mean, standard deviation, min and max, and the band a
    figure draws around the mean (`low`, `high`; see MIN_MAX_RUNS)."""
    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    runs: int

    @property
    def low(self) -> np.ndarray:
        return self.min if self.runs <= MIN_MAX_RUNS else self.mean - self.std

    @property
    def high(self) -> np.ndarray:
        return self.max if self.runs <= MIN_MAX_RUNS else self.mean + self.std

    @staticmethod
    def meaning(runs: int) -> str:
        """What the band of `runs` runs spans, as a caption says it."""
        spans = "min to max" if runs <= MIN_MAX_RUNS else "mean ± 1 standard deviation"
        return f"each panel the mean of {runs} runs (band: {spans})"


def band(series: list[list[tuple[int, float]]]) -> Band | None:
    """The Band of several (step, value) series over the steps every one of
    them has; None without such a step."""
    common = sorted(set.intersection(*(set(s for s, _ in one) for one in series))) \
        if series else []
    if not common:
        return None
    values = np.array([[dict(one)[s] for s in common] for one in series], float)
    return Band(np.array(common), values.mean(0), values.std(0), values.min(0), values.max(0),
                len(series))


def pyplot():
    """matplotlib.pyplot without a display (Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def accuracy_figure(panels: dict[str, list[Run]], path: str, columns: int = 3) -> dict[str, str]:
    """The papers' figure: one panel per setting (e.g. the seeds of one
    setting), with accuracy on pristine and corrupt training examples and on
    the test set against step (or epoch, see `x_axis`); a panel of several
    runs draws their mean and a band (`Band`). Panels share their y axis,
    each has the x range of its own runs and shows its ticks; titles say what differs (`panel_titles`), a caption
    what all share, one legend the curves. Written as PNG and PDF
    (`save_figure`); returns their paths."""
    if not panels:
        raise ValueError("no cg_tf runs to plot")
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    runs = [r for rs in panels.values() for r in rs]
    titles, (x_label, scale) = panel_titles(panels), x_axis(runs)
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    with plt.rc_context(FIGURE_STYLE):
        # Each panel its own x range (a 600-step run beside a 60,000-step one
        # fills its panel); runs of one length get the same range anyway.
        fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.5 * rows + 0.7),
                                 sharey=True, squeeze=False, layout="constrained")
        for ax, (key, panel) in zip(axes.flat, panels.items()):
            for curve, tag in tags.ACCURACY_CURVES.items():
                _plot_curve(ax, panel, tag, CURVE_STYLES[curve], scale)
            ax.set_title(titles[key])
            ax.set_ylim(0, 1.02)
            ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1])
            ax.grid(alpha=0.3)
            ax.tick_params(labelbottom=True, labelleft=True)  # sharing hides them
            ax.xaxis.set_major_locator(MaxNLocator("auto", integer=True, steps=[1, 2, 5, 10]))
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        fig.supxlabel(x_label, fontsize=9.5)
        fig.supylabel("accuracy", fontsize=9.5)
        text, sizes = caption(runs), {len(rs) for rs in panels.values()}
        if len(sizes) == 1 and sizes != {1}:  # e.g. the seeds of each setting
            text = "; ".join(filter(None, [text, Band.meaning(sizes.pop())]))
        legend(fig, axes.flat, text, [label for label, _, _ in CURVE_STYLES.values()])
    return save_figure(fig, path)


def _plot_curve(ax, panel: list[Run], tag: str, style: tuple[str, str, str],
                scale: dict[str, float]) -> None:
    """One curve of a panel: a run's series, or the mean and band of several
    runs (each run's own series where they share no step, or differ in scale)."""
    label, line, color = style
    drawn = [r for r in panel if r.scalars.get(tag)]
    spread = band([r.scalars[tag] for r in drawn]) if len(drawn) > 1 else None
    if spread is not None and len({scale[r.name] for r in drawn}) == 1:
        x = spread.steps * scale[drawn[0].name]
        ax.fill_between(x, spread.low, spread.high, color=color, alpha=0.2, linewidth=0)
        ax.plot(x, spread.mean, line, color=color, label=label, linewidth=1.4)
        return
    for run in drawn:
        steps, values = zip(*run.scalars[tag])
        ax.plot([s * scale[run.name] for s in steps], values, line, color=color, label=label,
                linewidth=1.6 if len(drawn) == 1 else 1.0)


def legend(fig, axes, text: str, order: list[str] | None = None) -> None:
    """Above the panels, the caption `text` and under it one legend for every
    curve label drawn in `axes` (the first panel may lack one, e.g. no corrupt
    curve at 0% noise). One artist, so the layout keeps the two apart."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    labels = [k for k in order if k in handles] if order else list(handles)
    # About 14 characters an inch; entries side by side if they fit, else stacked.
    inches = fig.get_figwidth()
    title = textwrap.fill(text, int(inches * 14)) or None
    in_a_row = sum(len(k) / 14 + 0.7 for k in labels) <= inches
    drawn = fig.legend([handles[k] for k in labels], labels, loc="outside upper center",
                       ncols=max(len(labels), 1) if in_a_row else 1, frameon=False,
                       title=title, title_fontsize=9.5)
    drawn.get_title().set_multialignment("center")


def figure_paths(path: str) -> dict[str, str]:
    """The files of the figure `path` names: a PNG and a PDF with its stem."""
    stem = posixpath.splitext(path)[0]
    return {"figure": stem + ".png", "figure_pdf": stem + ".pdf"}


def save_figure(fig, path: str) -> dict[str, str]:
    """Saves a matplotlib figure as PNG and PDF (`figure_paths`) to local or
    gs:// paths, closes it and returns the paths."""
    from cg_tf.storage import files
    plt, paths = pyplot(), figure_paths(path)
    with plt.rc_context({"pdf.fonttype": 42}):  # TrueType in the PDF, as publishers ask
        for key, fmt in (("figure", "png"), ("figure_pdf", "pdf")):
            files.write_atomically(paths[key], lambda f: fig.savefig(f, format=fmt, dpi=200),
                                   mode="wb")
    plt.close(fig)
    return paths


def print_outputs(text: str, paths: dict[str, str], logdir: str) -> None:
    """A pipeline's closing words: its summary and where things are."""
    print("\n" + text + "\n")
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    print(f"TensorBoard: tensorboard --logdir {logdir}")
