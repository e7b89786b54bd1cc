"""What the same clipped share does as the batch grows: a figure of published
studies against their batch size.

  python -m tools.share_figure --results=DIR,DIR,... --share=0.04 --classes=10 --out=FIGURE.png

Each results folder is a study as `tools.publish_runs` writes it: `summary.csv`
(a row per run) and `runs/<run>/config.json` (its batch size). Of each, the
figure keeps plain SGD and the runs winsorized on every layer whose c is
`--share` of the batch (c = 4 at batch 100 for 0.04), and draws against the
batch size, a panel each: the late test accuracy, the share of corrupt labels
fitted at the end and the epoch of the fall (its step x batch / training
examples), every seed a dot and the seeds' means joined (a run that never fell has no dot); and in a fourth panel how
often a class holding 1 / --classes of the labels has c or fewer examples in a
batch (Binomial(batch, 1 / classes) <= c), when winsorizing clips away every
pull towards it. Writes the figure as PNG and PDF, and its points as a
Markdown table beside them (FIGURE.md), which it also prints.
"""

from cg_tf import common_flags  # isort: skip (first: it quiets TensorFlow before it loads)
import csv
import json
import math
import os
import sys

from absl import app, flags

from cg_tf.measure import report
from cg_tf.storage import files

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined when it runs, so that importing the
    module's functions defines none)."""
    flags.DEFINE_list("results", None, "Results folders, each with summary.csv and runs/.")
    flags.DEFINE_float("share", None, "c / batch of the winsorized runs to keep, e.g. 0.04.")
    flags.DEFINE_integer("classes", None, "Number of classes (for the starvation panel).")
    flags.DEFINE_string("out", None, "PNG file of the figure; a PDF and the points' "
                        "Markdown table (.md) are written beside it.")
    flags.mark_flags_as_required(["results", "share", "classes", "out"])

PANELS = (("late_test_accuracy", "late test accuracy\n(mean over the last 10,000 steps)"),
          ("corrupt_accuracy", "corrupt labels fitted at the end"),
          ("fall_epoch", "fall: first evaluation 0.1\nbelow the peak (epoch)"))
KINDS = {"plain SGD": ("black", "o"), "winsorized": ("tab:red", "s")}


def starved(batch: int, c: int, classes: int) -> float:
    """P(Binomial(batch, 1 / classes) <= c): the chance that a class holding
    1 / classes of the labels has c or fewer examples in a batch."""
    p = 1 / classes
    return sum(math.comb(batch, k) * p ** k * (1 - p) ** (batch - k) for k in range(c + 1))


def kind(row: dict, batch: int, share: float) -> str | None:
    """"plain SGD", "winsorized" (every layer, c = share x batch) or None (left out)."""
    if row["aggregator"] == "mean":
        return "plain SGD"
    if (row["aggregator"] == "winsorized" and row["layers"] == "all"
            and int(row["parameter"]) == round(share * batch)):
        return "winsorized"
    return None


def points(rows: list[dict], batches: dict[str, int], share: float) -> list[dict]:
    """The runs the figure draws: each row of a study's summary.csv (`rows`,
    strings as read) that `kind` keeps, with its batch (`batches`, by run), its
    values as floats and its fall also in epochs (a fall that never came as None)."""
    kept = []
    for row in rows:
        batch = batches[row["run"]]
        which = kind(row, batch, share)
        fall = float(row["fall_step"]) if row["fall_step"] not in ("", "None") else None
        if which:
            kept.append({"kind": which, "batch": batch, "c": int(row["parameter"] or 0),
                         "seed": int(row["seed"]), "run": row["run"],
                         "late_test_accuracy": float(row["late_test_accuracy"]),
                         "corrupt_accuracy": float(row["corrupt_accuracy"]),
                         "fall_step": fall,
                         "fall_epoch": None if fall is None
                         else fall * batch / float(row["train_examples"])})
    return kept


def read_study(folder: str) -> tuple[list[dict], dict[str, int]]:
    """A results folder's summary.csv rows and each run's batch size; ValueError
    naming what is missing."""
    path = os.path.join(folder, "summary.csv")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no summary.csv: not a published study")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    batches = {}
    for row in rows:
        config = os.path.join(folder, "runs", row["run"], "config.json")
        if not os.path.isfile(config):
            raise ValueError(f"{config} is missing: the run's batch size is unknown")
        with open(config) as f:
            batches[row["run"]] = int(json.load(f)["batch_size"])
    return rows, batches


def figure(drawn: list[dict], share: float, classes: int, path: str) -> dict[str, str]:
    """The three result panels and the starvation panel against the batch (log 2)."""
    plt = report.pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    batches = sorted({p["batch"] for p in drawn})
    with plt.rc_context(report.FIGURE_STYLE):
        fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(11.5, 3.0), layout="constrained")
        for ax, (key, title) in zip(axes, PANELS):
            for name, (colour, marker) in KINDS.items():
                mine = [p for p in drawn if p["kind"] == name and p[key] is not None]
                ax.plot([p["batch"] for p in mine], [p[key] for p in mine], marker,
                        color=colour, alpha=0.5, markersize=4, linestyle="none")
                means = [(b, [p[key] for p in mine if p["batch"] == b]) for b in batches]
                means = [(b, sum(v) / len(v)) for b, v in means if v]
                ax.plot([b for b, _ in means], [m for _, m in means], "-", color=colour,
                        label=name if key == PANELS[0][0] else None)
            ax.set_title(title)
            if key == "fall_epoch":
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            else:
                ax.set_ylim(0, 1)
        ax = axes[-1]
        ax.plot(batches, [starved(b, round(share * b), classes) for b in batches], "-",
                color="tab:red", marker="s", markersize=4)
        ax.set_yscale("log")
        ax.set_title(f"a class of 1/{classes} with c or\nfewer examples of a batch")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        fig.supxlabel(f"batch size (winsorized: c = {share:g} x batch)", fontsize=9.5)
        fig.legend(loc="outside upper center", ncols=2, frameon=False,
                   title="every seed a dot, the seeds' mean joined", title_fontsize=9.5)
    return report.save_figure(fig, path)


def table(drawn: list[dict], share: float, classes: int) -> str:
    """The figure's points, a row per run, as Markdown."""
    rows = [{"setting": p["kind"] if p["kind"] == "plain SGD" else f"winsorized c = {p['c']}",
             "batch": p["batch"], "seed": p["seed"],
             **{key: p[key] for key, _ in PANELS[:2]},
             "fall_step": f"{p['fall_step']:,.0f}" if p["fall_step"] is not None else "none",
             "fall_epoch": f"{p['fall_epoch']:.1f}" if p["fall_epoch"] is not None else "none",
             "class starved": f"1 in {1 / starved(p['batch'], p['c'], classes):,.0f}"
             if p["c"] else None}
            for p in sorted(drawn, key=lambda p: (p["kind"], p["batch"], p["seed"]))]
    return report.markdown(rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not 0 < FLAGS.share < 0.5:
        sys.exit(f"error: --share must be between 0 and 0.5 (a side), got {FLAGS.share:g}")
    if FLAGS.classes < 2:
        sys.exit(f"error: --classes must be 2 or more, got {FLAGS.classes}")
    try:
        if os.path.dirname(FLAGS.out):
            os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --out={FLAGS.out}: cannot make its folder: {e.strerror}")
    drawn = []
    try:
        for folder in FLAGS.results:
            drawn += points(*read_study(folder), FLAGS.share)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not any(p["kind"] == "winsorized" for p in drawn):
        sys.exit(f"error: no run of --results is winsorized on every layer at c = "
                 f"{FLAGS.share:g} x batch")
    text = table(drawn, FLAGS.share, FLAGS.classes)
    points_path = os.path.splitext(FLAGS.out)[0] + ".md"
    files.write_atomically(points_path, lambda f: f.write(text))
    print(text)
    paths = figure(drawn, FLAGS.share, FLAGS.classes, FLAGS.out)
    print(json.dumps({**paths, "points": points_path}, indent=1))


if __name__ == "__main__":
    define_flags()
    common_flags.run(main)
