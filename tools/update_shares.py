"""The pristine and corrupt shares of the probe's update over training, against
their null expectation, from the event files of a label-noise study.

  python -m tools.update_shares --study=docs/results/label_noise_fashion_mnist \
      [--num_shards=8]

Reads every cg_tf run under STUDY/runs (their `update/mean/f_pristine` and
`update/mean/f_corrupt` scalars, cg_tf.measure.tags) and writes beside them
STUDY/update_shares.csv (run, noise_rate, step, f_p, f_c, null_f_p) and the
figure STUDY/update_shares.png / .pdf: f_p against step (log scale), one panel
per noise rate, its null as a dashed line of the same colour. A run whose probe
has no corrupt example (no noise) has f_p = 1 at every step: it is in the CSV,
not in the figure.

What f_p is (cg_tf.measure.probe): with g_i the loss gradients of the m
examples of the fixed probe sample at the weights of the step, G = sum g_i and
G_p the sum over its pristine examples, f_p = <G, G_p> / <G, G> and f_c =
1 - f_p. To first order a step -lr G / m lowers the probe's summed loss by
lr <G, G> / m, of which lr <G, G_p> / m is due to the pristine examples'
gradients; since the inner product is symmetric, that is also the part of
the reduction that falls on the pristine examples' own losses. So f_p is the
pristine share of the first-order loss reduction of a full-batch step on the
probe sample (not of the training mini-batch the run stepped on).

The null: f_p if every example contributed in proportion to its count (no
coherence), i.e. the pristine fraction n_p / m of the probe sample. The run
does not record n_p, so it is derived from the run's recorded source, noise
and probe size with the pipeline's own pure functions: the noise
(cg_tf.data.noise), the shard of each example and its order in the shard
(cg_tf.data.hashing, as pipelines.noisy_labels writes them), then the
reader's round-robin over the --num_shards shards (Reader.eval_subsets: the
probe is the first m examples of the mixed subset, the training split in
file order).
"""

import json
import os
import sys

from absl import app, flags, logging

from cg_tf import common_flags
from cg_tf.measure import report, tags

FLAGS = flags.FLAGS

F_P = tags.update_share_tag("mean", "pristine")
F_C = tags.update_share_tag("mean", "corrupt")
COLUMNS = ["run", "noise_rate", "step", "f_p", "f_c", "null_f_p"]
CSV_FILE, FIGURE_FILE = "update_shares.csv", "update_shares.png"
# The reader interleaves up to this many shard files at once (Reader._records):
# the round-robin of `file_order` holds up to it.
READER_CYCLE = 16
# Colours by noise rate (those of matplotlib's tab10 after pristine blue).
COLOURS = {0.25: "#ff7f0e", 0.5: "#2ca02c", 0.75: "#9467bd", 1.0: "#d62728"}


def define_flags() -> None:
    """The command line's flags (defined when it runs, so that importing the
    module's functions defines none)."""
    flags.DEFINE_string("study", None, "A study directory: its runs in STUDY/runs; the CSV "
                        "and figure are written in it.")
    flags.DEFINE_integer("num_shards", 8, "Shards per split of the datasets the runs read "
                         "(configs/sweep_label_noise_mnist.flags: 8): they set the probe's "
                         "examples, so its pristine count.")
    flags.mark_flag_as_required("study")


# -- the null: the probe sample's pristine fraction --------------------------------


def file_order(ids: list[str], num_shards: int) -> list[str]:
    """The training examples' ids in the order the reader streams the split:
    shard by hash and within a shard by hash (pipelines.noisy_labels), the
    shards' files then read round-robin (Reader._records' interleave)."""
    from cg_tf.data import hashing
    if num_shards > READER_CYCLE:
        raise ValueError(f"{num_shards} shards: the reader interleaves {READER_CYCLE} at a "
                         "time, which this order does not follow")
    shards = [[] for _ in range(num_shards)]
    for i in ids:
        shards[hashing.stable_randint(0, i, "shard", num_shards)].append(i)
    for shard in shards:
        shard.sort(key=lambda i: (hashing.stable_hash64(0, i, "order"), i))
    longest = max(map(len, shards), default=0)
    return [s[k] for k in range(longest) for s in shards if k < len(s)]


def corrupt_ids(pairs: list[tuple[str, int]], noise: dict, num_classes: int) -> set[str]:
    """The ids of the (id, true label) training examples whose training label
    differs from the true one (a record's is_corrupt) under the run's noise."""
    from cg_tf.data import noise as noise_lib
    spec = noise_lib.NoiseSpec(noise.get("mode", "uniform"), float(noise.get("rate", 0.0)),
                               int(noise.get("seed", 0)))
    if spec.mode == "permute":
        new = noise_lib.permuted_labels(
            spec, [(i, y) for i, y in pairs if noise_lib.is_selected(spec, i)])
        return {i for i, y in pairs if new.get(i, y) != y}
    return {i for i, y in pairs
            if noise_lib.pointwise_label(spec, i, y, num_classes) != y}


def probe_pristine(pairs: list[tuple[str, int]], noise: dict, num_classes: int,
                   num_shards: int, probe_size: int) -> int:
    """How many of the probe's examples (the first `probe_size` in file order)
    are pristine."""
    probe = file_order([i for i, _ in pairs], num_shards)[:probe_size]
    if len(probe) < probe_size:
        raise ValueError(f"{len(pairs)} training examples: fewer than the probe's {probe_size}")
    corrupt = corrupt_ids(pairs, noise, num_classes)
    return sum(i not in corrupt for i in probe)


def training_examples(spec: str) -> tuple[list[tuple[str, int]], int]:
    """(id, true label) of a source's readable training examples, and its classes."""
    from cg_tf.data import records
    from cg_tf.data.sources import make_source
    source = make_source(spec)
    pairs = [(e.example_id, int(e.label)) for task in source.read_tasks()
             if task.split == records.TRAIN_SPLIT for e in source.read(task) if not e.error]
    return pairs, source.num_classes


def null_share(config: dict, num_shards: int, read=training_examples) -> float:
    """The probe's pristine fraction n_p / m for a run's recorded configuration."""
    m = config.get("probe_size")
    if not m:
        raise ValueError("the run has no gradient probe (probe_size 0 or unrecorded)")
    if not (config.get("noise") or {}).get("rate"):
        return 1.0
    pairs, num_classes = read(config["source"])
    batches = len(pairs) // config["batch_size"]
    if config.get("steps_per_epoch") not in (None, batches):
        raise ValueError(f"{config['source']} gives {len(pairs)} training examples, "
                         f"{batches} batches an epoch; the run had {config['steps_per_epoch']} "
                         "(a subsample, or another source)")
    return probe_pristine(pairs, config["noise"], num_classes, num_shards, m) / m


# -- the shares ------------------------------------------------------------------


def noise_rate(run: report.Run) -> float:
    return float((run.config.get("noise") or {}).get("rate", 0.0))


def share_rows(run: report.Run, null: float) -> list[dict]:
    """A CSV row per step at which the run has both f_p and f_c."""
    f_c = dict(run.scalars.get(F_C, []))
    return [{"run": run.name, "noise_rate": noise_rate(run), "step": step,
             "f_p": f_p + 0.0, "f_c": f_c[step] + 0.0, "null_f_p": null}  # no -0.0
            for step, f_p in run.scalars.get(F_P, []) if step in f_c]


def figure(runs: list[report.Run], rows: list[dict], path: str) -> dict[str, str]:
    """f_p against step (log) and its null (dashed), one panel per noise rate
    with corrupt examples in its probe, a line per run (seed); PNG and PDF."""
    plt = report.pyplot()
    from matplotlib.lines import Line2D
    drawn = sorted((r for r in runs if any(row["run"] == r.name and row["null_f_p"] < 1
                                           for row in rows)), key=noise_rate)
    if not drawn:
        raise ValueError("no run with corrupt examples in its probe to draw")
    rates = sorted({noise_rate(r) for r in drawn})
    with plt.rc_context(report.FIGURE_STYLE):
        fig, axes = plt.subplots(1, len(rates), figsize=(2.6 * len(rates) + 0.4, 3.0),
                                 sharex=True, sharey=True, squeeze=False, layout="constrained")
        for ax, rate in zip(axes.flat, rates):
            colour = COLOURS.get(rate, "black")
            group = [r for r in drawn if noise_rate(r) == rate]
            for k, run in enumerate(group):
                mine = [row for row in rows if row["run"] == run.name]
                ax.plot([r["step"] for r in mine], [r["f_p"] for r in mine], "-", color=colour,
                        marker="o", markersize=2, linewidth=1.0, alpha=1.0 if k == 0 else 0.45)
            null = next(row["null_f_p"] for row in rows if row["run"] == group[0].name)
            ax.axhline(null, color=colour, linestyle="--", linewidth=1.3)
            ax.set_xscale("log")
            ax.set_ylim(0, 1)
            seeds = f", {len(group)} seeds" if len(group) > 1 else ""
            ax.set_title(f"{rate * 100:g}% noise (null {null:.2f}){seeds}")
            ax.grid(alpha=0.3)
            ax.tick_params(labelleft=True)
        fig.supxlabel("step (log scale)", fontsize=9.5)
        fig.supylabel("pristine share $f_p$ (corrupt: $f_c = 1 - f_p$)", fontsize=9.5)
        proxies = [Line2D([], [], color="0.3", marker="o", markersize=2, linewidth=1.0),
                   Line2D([], [], color="0.3", linestyle="--", linewidth=1.3)]
        labels = ["$f_p$ on the probe sample (a line per seed)", "null: its pristine fraction"]
        fig.legend(proxies, labels, loc="outside upper center", ncols=2, frameon=False,
                   title=report.caption(drawn), title_fontsize=9.5)
    return report.save_figure(fig, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # TensorBoard's event loading is chatty
    logdir = os.path.join(FLAGS.study, "runs")
    if not os.path.isdir(logdir):
        sys.exit(f"error: {logdir} is not a directory")
    runs = []
    for run in report.load_runs(logdir):
        if run.scalars.get(F_P):
            runs.append(run)
        else:
            print(f"{run.name}: no {F_P} (no probe): left out")
    if not runs:
        sys.exit(f"error: no run under {logdir} has {F_P}")
    cache = {}

    def read(spec):
        if spec not in cache:
            cache[spec] = training_examples(spec)
        return cache[spec]

    rows = []
    for run in sorted(runs, key=noise_rate):
        null = null_share(run.config, FLAGS.num_shards, read)
        rows += share_rows(run, null)
        print(f"{run.name}: {len(run.scalars[F_P])} probe steps, null f_p {null:g} "
              f"(probe of {run.config['probe_size']})")
    csv_path = os.path.join(FLAGS.study, CSV_FILE)
    report.write_table(csv_path, rows, COLUMNS)
    paths = figure(runs, rows, os.path.join(FLAGS.study, FIGURE_FILE))
    print(json.dumps({"csv": csv_path, **paths}, indent=1))


if __name__ == "__main__":
    define_flags()
    common_flags.run(main)
