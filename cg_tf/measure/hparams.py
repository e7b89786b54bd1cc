"""A run's settings and headline metrics for TensorBoard's HParams dashboard.

Every monitored run (the trainer's, a sweep's or easy/hard's stages, a
MemorizationCallback's) writes at its start the HParams plugin's records: the
experiment's columns (`COLUMNS`, `METRICS`: the same in every run, so the
dashboard takes any run's) and this run's values (`values`). The metrics are
the run's own scalars (final values are their last points), plus the peak test
accuracy, written once at the end (`PEAK_TEST_ACCURACY`). Pointed at a sweep's
`runs/`, the dashboard tables and plots its runs by aggregator, noise and seed.
"""

import os

import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from cg_tf.measure import tags
from cg_tf.robust import names

PEAK_TEST_ACCURACY = "hparams/peak_test_accuracy"

# Setting name -> its description; a run gives the ones it knows (`values`).
# Numbers get a domain, so the dashboard shows and filters them as numbers.
WHOLE = hp.IntInterval(0, 2 ** 31 - 1)
DOMAINS = {"aggregator_parameter": WHOLE, "seed": WHOLE, "batch_size": WHOLE, "steps": WHOLE,
           "noise_rate": hp.RealInterval(0.0, 1.0),
           "learning_rate": hp.RealInterval(0.0, float("inf"))}
COLUMNS = {
    "aggregator": "the aggregator's name (plain SGD: the batch's mean gradient)",
    "aggregator_parameter": "its parameter: c of winsorized and trimmed, k of median of means "
                            "(0 if it has none)",
    "layers": "the layers it aggregates robustly (all, hidden, output)",
    "noise_rate": "the noise rate asked for",
    "noise_mode": "how labels were corrupted",
    "seed": "the run's seed",
    "learning_rate": "the learning rate",
    "batch_size": "the global batch size",
    "steps": "training steps",
    "model": "the model",
}
METRICS = {
    tags.eval_tag("test", "accuracy"): "test accuracy (final)",
    PEAK_TEST_ACCURACY: "test accuracy (peak)",
    tags.eval_tag("pristine", "accuracy"): "pristine training examples fitted",
    tags.eval_tag("corrupt", "accuracy"): "corrupt training examples fitted (memorized)",
    tags.ADJUSTED_OVERFIT: "adjusted overfit",
}


def values(run_config: dict, **known) -> dict:
    """A run's HParams from its run config (cg_tf.measure.monitor's: the
    aggregator's record, the dataset's noise, ...) and what else the caller
    knows (`seed`, `steps`, ...); settings it does not know are left out."""
    aggregator = run_config["aggregator"]
    parameter = next((v for k, v in aggregator.items() if k not in ("name", "layers")), 0)
    noise = run_config.get("noise") or {}
    name = names.label({"name": aggregator["name"]})  # plain SGD for mean
    out = {"aggregator": name, "aggregator_parameter": parameter,
           "layers": aggregator.get("layers", "all"), "noise_rate": noise.get("rate"),
           "noise_mode": noise.get("mode"), "batch_size": run_config.get("batch_size"),
           "learning_rate": run_config.get("learning_rate"), "model": run_config.get("model"),
           **known}
    return {k: v for k, v in out.items() if k in COLUMNS and v is not None}


def trial_name(directory: str) -> str:
    """A run's trial in the dashboard: the last three parts of its directory
    (`sweep_demo/runs/mean_noise0.5_seed0`). TensorBoard merges trials of one
    name into one row, so the name must tell apart the runs of two sweeps or
    two easy/hard experiments that a log directory may hold."""
    parts = os.path.normpath(directory).replace("\\", "/").split("/")
    return "/".join(p for p in parts[-3:] if p not in ("", "."))


def write_start(writer, hparams: dict, trial: str | None = None) -> None:
    """The experiment's columns and this run's values (as trial `trial`, the
    run's name), at the run's start."""
    with writer.as_default():
        hp.hparams_config(hparams=[hp.HParam(name, DOMAINS.get(name), description=text)
                                   for name, text in COLUMNS.items()],
                          metrics=[hp.Metric(tag, display_name=text)
                                   for tag, text in METRICS.items()])
        hp.hparams(hparams, trial_id=trial)


def write_peak(writer, test_accuracies: list[tuple[int, float]]) -> None:
    """The peak of the run's test accuracy curve, at its last step."""
    if test_accuracies:
        step = max(s for s, _ in test_accuracies)
        with writer.as_default():
            tf.summary.scalar(PEAK_TEST_ACCURACY, max(v for _, v in test_accuracies), step)
