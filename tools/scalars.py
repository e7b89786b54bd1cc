"""The scalars of a logdir's runs as a CSV, for a results README to cite.

  python -m tools.scalars --logdir=runs --tags=health/ --out=health.csv

Reads the event files as the Memorization tab does (cg_tf.measure.report) and
writes a row per (run, tag, step): run, tag, step, value, for the tags that
start with one of --tags (every tag without it), of every cg_tf run under
--logdir.
"""

import os
import sys

from absl import app, flags, logging

from cg_tf import common_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined when it runs: importing defines none)."""
    flags.DEFINE_string("logdir", None, "Directory holding the runs.")
    flags.DEFINE_list("tags", [], "Tag prefixes to export (default: every tag).")
    flags.DEFINE_string("out", None, "The CSV to write.")
    flags.mark_flags_as_required(["logdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from cg_tf.measure import report
    logging.set_verbosity(logging.WARNING)  # TensorBoard's event loading is chatty
    if not os.path.isdir(FLAGS.logdir):
        sys.exit(f"error: --logdir={FLAGS.logdir} is not a directory")
    runs = report.load_runs(FLAGS.logdir)
    prefixes = tuple(FLAGS.tags) or ("",)
    for run in runs:
        run.scalars = {t: s for t, s in run.scalars.items() if t.startswith(prefixes)}
    report.write_csv(runs, FLAGS.out)
    rows = sum(len(s) for r in runs for s in r.scalars.values())
    print(f"{FLAGS.out}: {rows} rows from {sum(bool(r.scalars) for r in runs)} runs")


if __name__ == "__main__":
    define_flags()
    common_flags.run(main)
