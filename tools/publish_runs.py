"""Copies a sweep's runs into a results folder that a repository can hold, and
keeps unfinished ones resumable from it.

  python -m tools.publish_runs --sweep_dir=runs/sweep_winsorize_fashion_mnist \
      --out=docs/results/winsorization_fashion_mnist

For each run under <sweep_dir>/runs: what a reader of the results needs
(config.json, manifest.json, summary.json, learning_events.csv, the event
files) goes to <out>/runs/<run>/; for a run that has not finished, also its
last checkpoint (and a checkpoint state naming only it), so that a long sweep
can go on in another session or on another machine: copy <out>/runs/ back
under the sweep's output directory and rerun the sweep's command (complete
runs are skipped, unfinished ones resume from the checkpoint). A run that has
finished since loses its copied checkpoint. The sweep's report files
(summary.csv, settings.csv, curves.csv, summary.md, figure.png, figure.pdf,
report_files.json) are copied too when they exist.

With --report, the report is then written afresh from the runs in <out>/runs
(their config.json, manifest.json and event files), as this version of the
code writes it: a study's runs made by older code get today's report columns
(the late test accuracy, the fall step). --sweep_dir may then be left out, to
rewrite the report of a folder published before.
"""

import os
import shutil

from absl import app, flags

from cg_tf import common_flags
from cg_tf.experiments import noise_grid, runner
from cg_tf.measure import report
from cg_tf.training.trainer import CHECKPOINTS, name_latest

_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "The sweep's --output_dir.")
_OUT = flags.DEFINE_string("out", None, "The results folder (its runs/ is written).")
_REPORT = flags.DEFINE_bool("report", False, "Then write the report from <out>/runs with this "
                            "code (see the module docstring).")

RECORDS = ("config.json", runner.MANIFEST, "summary.json", "learning_events.csv")


def run_files(run_dir: str) -> list[str]:
    """The names of a run's files that a reader of its results needs."""
    return [n for n in sorted(os.listdir(run_dir))
            if n in RECORDS or n.startswith("events.out.tfevents.")]


def publish_run(run_dir: str, out_dir: str) -> str:
    """Copies one run (see the module docstring); returns what was copied, in words."""
    import tensorflow as tf  # here: cg_tf.console silences its loading lines first
    os.makedirs(out_dir, exist_ok=True)
    for name in run_files(run_dir):
        shutil.copy2(os.path.join(run_dir, name), os.path.join(out_dir, name))
    complete = (runner.read_manifest(run_dir) or {}).get("status") == "complete"
    copied = os.path.join(out_dir, CHECKPOINTS)
    if os.path.isdir(copied):
        shutil.rmtree(copied)
    latest = tf.train.latest_checkpoint(os.path.join(run_dir, CHECKPOINTS))
    if complete or latest is None:
        return "complete" if complete else "no checkpoint yet"
    os.makedirs(copied)
    for path in tf.io.gfile.glob(latest + ".*"):
        shutil.copy2(path, copied)
    name_latest(copied, latest)
    return f"resumable from {os.path.basename(latest)}"


def main(_):
    if not _OUT.value or not (_SWEEP_DIR.value or _REPORT.value):
        raise app.UsageError("--out is required, with --sweep_dir, --report or both")
    if _SWEEP_DIR.value:
        publish_sweep(_SWEEP_DIR.value, _OUT.value)
    if _REPORT.value:
        runs = os.path.join(_OUT.value, "runs")
        if not os.path.isdir(runs):
            raise app.UsageError(f"--out={_OUT.value} holds no runs/ to report")
        paths, text = noise_grid.write_report(_OUT.value, *noise_grid.published(runs))
        report.print_outputs(text, paths, runs)


def publish_sweep(sweep_dir: str, out: str) -> None:
    runs = os.path.join(sweep_dir, "runs")
    if not os.path.isdir(runs):
        raise app.UsageError(f"--sweep_dir={sweep_dir} holds no runs/")
    for name in sorted(os.listdir(runs)):
        if os.path.isdir(os.path.join(runs, name)):
            how = publish_run(os.path.join(runs, name), os.path.join(out, "runs", name))
            print(f"{name}: {how}")
    for name in (*noise_grid.REPORT_FILES, runner.REPORT_RECORD):
        path = os.path.join(sweep_dir, name)
        if os.path.exists(path):
            shutil.copy2(path, os.path.join(out, name))


if __name__ == "__main__":
    common_flags.run(main)
