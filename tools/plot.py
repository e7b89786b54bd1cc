"""The papers' figure and the runs table from a logdir of cg_tf runs.

  python -m tools.plot --logdir runs --out figure.png [--csv metrics.csv]

Draws pristine / corrupt / test accuracy against step (epoch when the runs'
steps per epoch differ), one panel per run titled by what sets it apart, with a
caption of what all runs share, as figure.png and figure.pdf; prints the table
of final values (Markdown), and with --csv exports every scalar of every run.
"""

import os
import sys

from absl import app, flags, logging

from cg_tf import common_flags
from cg_tf.measure import report
from cg_tf.storage import files

FLAGS = flags.FLAGS
flags.DEFINE_string("logdir", None, "Directory holding the runs (e.g. runs/).")
flags.DEFINE_string("out", None, "PNG file of the figure; a PDF is written beside it.")
flags.DEFINE_string("csv", None, "Also write every scalar of every run to this CSV file.")
flags.DEFINE_integer("columns", 3, "Panels per row.")
flags.mark_flags_as_required(["logdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # TensorBoard's event loading is chatty
    if not os.path.isdir(FLAGS.logdir):
        sys.exit(f"error: --logdir={FLAGS.logdir} is not a directory")
    for flag in ("out", "csv"):  # their folders made before any work
        common_flags.make_output_folder(flag, getattr(FLAGS, flag))
    runs = report.load_runs(FLAGS.logdir)
    if not runs:
        sys.exit(f"error: no cg_tf runs under --logdir={FLAGS.logdir}")
    # One figure compares runs of one dataset: a logdir of several gets one
    # figure each, named after it (a run that does not record its dataset, of
    # an older cg_tf, goes in "unknown").
    datasets = {}
    for r in runs:
        datasets.setdefault(report.dataset_name(r.config) or "unknown", []).append(r)
    stem, ext = os.path.splitext(FLAGS.out)
    outs = {d: FLAGS.out if len(datasets) == 1 else f"{stem}_{d}{ext}" for d in datasets}
    # A run at the logdir itself is named ".": its panel takes the directory's name.
    import tensorflow as tf  # here: cg_tf.console silences its loading lines first
    here = os.path.basename(os.path.abspath(FLAGS.logdir))
    try:
        print(report.markdown(report.table(runs)))
        for dataset, group in sorted(datasets.items()):
            figure = report.accuracy_figure(
                {r.name if r.name != "." else here: [r] for r in group}, outs[dataset],
                FLAGS.columns)
            print("\n".join(f"{k}: {v}" for k, v in figure.items()))
        if FLAGS.csv:
            report.write_csv(runs, FLAGS.csv)
            print(f"metrics: {FLAGS.csv}")
    except (OSError, tf.errors.OpError) as e:  # a full disk, a read-only folder
        folders = [os.path.dirname(os.path.abspath(p)) for p in (FLAGS.out, FLAGS.csv) if p]
        refusal = next(filter(None, (files.refused_write(e, f) for f in folders)), None)
        if refusal is None:
            raise
        sys.exit(f"error: cannot write the figure or the table: {refusal.reason} "
                 f"({refusal.remedy})")


if __name__ == "__main__":
    common_flags.run(main)
