"""Runs of a logdir as data: scalar series, configurations, the final-values
table, the papers' accuracy figure and a CSV of every metric.

Reads event files through TensorBoard's own data provider (as the plugin does),
so the tables and figures show exactly what the Memorization tab shows.
"""

import csv
import dataclasses
import json
import math

from cg_tf.measure import tags
from cg_tf.robust import aggregators


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


def aggregator_spec(record: dict | None) -> str | None:
    """`name` or `name:value` of a run's recorded aggregator (as recorded, if
    this version does not know it)."""
    if not record:
        return None
    try:
        return aggregators.from_json(record).spec
    except (KeyError, TypeError):
        return record.get("name")


def table(runs: list[Run]) -> list[dict]:
    """A row per run: its setting, its last step and the last value of each column."""
    rows = []
    for run in runs:
        rows.append({
            "run": run.name, "aggregator": aggregator_spec(run.config.get("aggregator")),
            "noise_rate": run.config.get("noise", {}).get("rate"),
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


def summary_text(summary: dict, model_dir: str) -> str:
    """A run's summary as a person reads it: the setting, the accuracies rounded,
    and what they say about memorization."""
    noise = summary.get("noise") or {}
    aggregator = aggregators.from_json(summary["aggregator"]).spec
    steps = f"{summary['steps']} steps"
    if summary.get("steps_per_epoch"):
        steps += f" ({summary['steps'] / summary['steps_per_epoch']:g} epochs)"
    data = summary["data_dir"]
    if noise.get("rate"):
        data += f" ({noise['rate']:.0%} {noise['mode']} label noise)"
    lines = [f"{model_dir}: {summary['model']} with {aggregator}, batch "
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


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (numbers to 3 decimals, missing as -)."""
    if not rows:
        return ""
    columns = list(rows[0])
    cell = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else (  # noqa: E731
        f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


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


def accuracy_figure(panels: dict[str, list[Run]], path: str, columns: int = 3) -> None:
    """The papers' figure: one panel per setting (title: its runs, e.g. the
    seeds of one setting), with accuracy on pristine and corrupt training
    examples and on the test set against step; panels share their axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not panels:
        raise ValueError("no cg_tf runs to plot")
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows),
                             sharex=True, sharey=True, squeeze=False)
    for ax, (title, runs) in zip(axes.flat, panels.items()):
        for i, run in enumerate(runs):
            for key, tag in tags.ACCURACY_CURVES.items():
                label, style, color = CURVE_STYLES[key]
                if run.scalars.get(tag):
                    steps, values = zip(*run.scalars[tag])
                    ax.plot(steps, values, style, color=color, label=None if i else label,
                            linewidth=1.8 if len(runs) == 1 else 1.0)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    # One legend for every curve drawn (the first panel may lack one, e.g.
    # no corrupt curve at 0% noise).
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = [label for label, _, _ in CURVE_STYLES.values() if label in legend]
    axes.flat[0].legend([legend[k] for k in labels], labels, fontsize=8, loc="center right")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """Saves a matplotlib figure as PNG to a local or gs:// path and closes it."""
    import matplotlib.pyplot as plt

    from cg_tf.storage import files
    files.write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")
    plt.close(fig)


def print_outputs(paths: dict[str, str], logdir: str) -> None:
    """A pipeline's closing words: its Markdown summary and where things are."""
    from cg_tf.storage import files
    print(files.read_text(paths["md"]))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    print(f"TensorBoard: tensorboard --logdir {logdir}")
