"""What the same clipped share does as the batch grows: a figure of published
studies against their batch size.

  python -m tools.share_figure --results=DIR,... --share=0.04 --classes=10 --out=FIG.png

Each results folder is a study as `tools.publish_runs` writes it: `summary.csv`
(a row per run) and `runs/<run>/config.json` (its batch size). Of each, the
figure keeps plain SGD and the runs winsorized on every layer whose c is
`--share` of the batch (c = 4 at batch 100 for 0.04), and refuses runs that
differ in anything else (noise, steps, the clamp, the net, ...). It draws
against the batch size, a panel each: the late test accuracy, the share of
corrupt labels fitted at the end and the epoch of the fall (its step x batch
/ training examples), every seed a dot and the seeds' means joined (the
fall's mean over the seeds that fell; a run that never fell has no dot); and
in a fourth panel how often a class holding 1 / --classes of the labels has c
or fewer examples in a batch (Binomial(batch, 1 / classes) <= c), when
winsorizing clips away every pull towards it. Writes the figure as PNG and
PDF, and its points as a Markdown table beside them (FIG.md), which it also
prints.
"""

from cg_tf import common_flags  # isort: skip (first: it quiets TensorFlow before it loads)
import csv
import json
import math
import os
import sys

from absl import app, flags

from cg_tf.measure import report
from cg_tf.storage import files, rundir

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
# What the runs of one figure must share: every training setting but the
# batch, the aggregator and the seed (and what records them).
VARIES = {"batch_size", "aggregator", "seed", "epochs", "provenance", "monitor",
          "per_example_chunk", "deterministic"}


def starved(batch: int, c: int, classes: int) -> float:
    """P(Binomial(batch, 1 / classes) <= c): the chance that a class holding
    1 / classes of the labels has c or fewer examples in a batch (summed in
    logs, so that large batches neither overflow nor lose the small terms)."""
    p = 1 / classes
    logs = [math.lgamma(batch + 1) - math.lgamma(k + 1) - math.lgamma(batch - k + 1)
            + k * math.log(p) + (batch - k) * math.log1p(-p) for k in range(c + 1)]
    top = max(logs)
    return math.exp(top) * sum(math.exp(v - top) for v in logs)


def one_in(probability: float) -> str:
    """'1 in N' for a probability (N rounded), or 'under 1e-300'."""
    return f"1 in {1 / probability:,.0f}" if probability > 1e-300 else "under 1e-300"


def whole_c(share: float, batch: int) -> int:
    """c = share x batch; ValueError where that is not a whole number of values."""
    c = share * batch
    if abs(c - round(c)) > 1e-9:
        raise ValueError(f"--share={share:g} x batch {batch} is {c:g}, not a whole number "
                         "of values")
    return round(c)


def kind(row: dict) -> str | None:
    """"plain SGD", "winsorized" (on every layer) or None (not drawn)."""
    if row["aggregator"] == "mean":
        return "plain SGD"
    if row["aggregator"] == "winsorized" and row["layers"] == "all":
        return "winsorized"
    return None


def number(row: dict, key: str) -> float | None:
    """A summary.csv value as a float; None where it is empty (a fall that
    never came, no corrupt examples)."""
    return None if row[key] in ("", "None") else float(row[key])


def point(row: dict, config: dict, share: float) -> dict | None:
    """A run the figure draws, from its summary.csv row (strings as read) and
    its config.json, or None (a winsorized run of another share). Its values
    as floats (`number`), its fall also in epochs, and the
    settings it must share with the others (`comparable`)."""
    which, batch = kind(row), int(config["batch_size"])
    c = whole_c(share, batch)
    if which == "winsorized" and int(row["parameter"]) != c:
        return None
    fall, examples = number(row, "fall_step"), int(row["train_examples"])
    return {"kind": which, "batch": batch, "c": c, "seed": int(row["seed"]), "run": row["run"],
            "late_test_accuracy": number(row, "late_test_accuracy"),
            "corrupt_accuracy": number(row, "corrupt_accuracy"),
            "fall_step": fall, "fall_epoch": None if fall is None else fall * batch / examples,
            "setting": {"training examples": examples, "noise rate": row["noise_rate"]}
            | {k: v for k, v in config.items() if k not in VARIES}}


def read_study(folder: str, share: float) -> list[dict]:
    """The points of a results folder (`point`); ValueError naming the file and
    the run where something is missing or unreadable."""
    path = os.path.join(folder, "summary.csv")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no summary.csv: not a published study")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    drawn = []
    for row in rows:
        if not kind(row):
            continue
        config = os.path.join(folder, "runs", row["run"], "config.json")
        if not os.path.isfile(config):
            raise ValueError(f"{config} is missing: the run's batch size is unknown")
        with open(config) as f:
            recorded = json.load(f)
        try:
            found = point(row, recorded, share)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}, run {row['run']}: {e}") from None
        if found:
            drawn.append(found | {"run": os.path.join(folder, "runs", row["run"])})
    return drawn


def comparable(drawn: list[dict]) -> None:
    """ValueError naming the first setting two of the runs differ in."""
    first = drawn[0]
    for other in drawn[1:]:
        changed = rundir.differences(first["setting"], other["setting"])
        if changed:
            raise ValueError(f"runs {first['run']} and {other['run']} differ in {changed[0]}: "
                             "one figure compares batches of one setting")


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
            if key != "fall_epoch":
                ax.set_ylim(0, 1)
            elif any(p[key] for p in drawn):
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
        ax = axes[-1]
        ax.plot(batches, [starved(b, whole_c(share, b), classes) for b in batches], "-",
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
                   title="every seed a dot, the seeds' mean joined (the fall's: of the "
                         "seeds that fell)", title_fontsize=9.5)
    return report.save_figure(fig, path)


def table(drawn: list[dict], classes: int) -> str:
    """The figure's points, a row per run, as Markdown."""
    rows = [{"setting": p["kind"] if p["kind"] == "plain SGD" else f"winsorized c = {p['c']}",
             "batch": p["batch"], "seed": p["seed"],
             **{key: p[key] for key, _ in PANELS[:2]},
             "fall_step": f"{p['fall_step']:,.0f}" if p["fall_step"] is not None else "none",
             "fall_epoch": f"{p['fall_epoch']:.1f}" if p["fall_epoch"] is not None else "none",
             "class starved": one_in(starved(p["batch"], p["c"], classes))
             if p["kind"] == "winsorized" else None}
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
        drawn = [p for folder in FLAGS.results for p in read_study(folder, FLAGS.share)]
        if not any(p["kind"] == "winsorized" for p in drawn):
            raise ValueError(f"no run of --results is winsorized on every layer at c = "
                             f"{FLAGS.share:g} x batch")
        comparable(drawn)
    except ValueError as e:
        sys.exit(f"error: {e}")
    common_flags.make_output_folder("out", FLAGS.out)
    text = table(drawn, FLAGS.classes)
    points_path = os.path.splitext(FLAGS.out)[0] + ".md"
    files.write_atomically(points_path, lambda f: f.write(text))
    print(text)
    paths = figure(drawn, FLAGS.share, FLAGS.classes, FLAGS.out)
    print(json.dumps({**paths, "points": points_path}, indent=1))


if __name__ == "__main__":
    define_flags()
    common_flags.run(main)
