"""Trains a model with a robust gradient aggregator.

  python -m cg_tf.train --flagfile=configs/NAME.flags [--flag=value ...]

With no flags it runs the default demo (configs/demo.flags holds the same
values): noisy digits, built by the pipeline on first use, a fully connected
net, winsorized gradients.
"""

import os
import sys

from cg_tf import common_flags  # isort: skip (first: it quiets TensorFlow before it loads)
import tensorflow as tf
from absl import app, flags

from cg_tf.common_flags import SEED
from cg_tf.data import build, verify
from cg_tf.robust import aggregators
from cg_tf.robust.aggregators import Winsorized
from cg_tf.training import trainer
from cg_tf.training.trainer import TrainConfig

FLAGS = flags.FLAGS
# A flag per TrainConfig field (its help text and validation live there); the
# defaults below are the demo's (configs/demo.flags holds the same values).
DEMO = {"data_dir": build.DEMO_DATA_DIR, "model_dir": "runs/train_demo",
        "fc_widths": (256,), "aggregator": Winsorized(c=4), "epochs": 60}
common_flags.define(TrainConfig, DEMO, skip=("seed",))
flags.adopt_module_key_flags(common_flags)  # those and --seed in --help
# pipelines.shared_flags defines --overwrite too (for --output_dir): one flag, either meaning.
flags.DEFINE_bool("overwrite", False, "Start --model_dir over if it holds a run with another "
                  "configuration (deletes only what a run writes there).", allow_override=True)
flags.DEFINE_integer("num_cpu_devices", None, "Split the CPU into N logical devices.")


def config_from_flags() -> TrainConfig:
    """The run the flags ask for; raises ValueError naming a bad flag."""
    return common_flags.from_flags(TrainConfig, {"seed": SEED.value})


def setup_devices() -> None:
    """--num_cpu_devices: split the CPU before TensorFlow initializes."""
    if FLAGS.num_cpu_devices:
        from cg_tf.training.strategies import split_cpu
        split_cpu(FLAGS.num_cpu_devices)


# What a write failing for lack of space or permission says, in an OSError or in
# TensorFlow's error (a checkpoint, an event file).
_STORAGE_FAILURES = ("No space left on device", "Read-only file system", "Permission denied",
                     "Disk quota exceeded")


def storage_failure(e: Exception) -> str | None:
    """The message of a write that failed for lack of space or permission, or
    None for any other error (which keeps its traceback)."""
    if isinstance(e, OSError):
        return str(e)
    if isinstance(e, tf.errors.OpError) and any(s in e.message for s in _STORAGE_FAILURES):
        return verify.op_message(e)
    return None


# The accuracies of a run's summary, as the table of its end shows them.
SUMMARY_ROWS = (("pristine_accuracy", "pristine training examples"),
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
    rows = [(label, summary[key]) for key, label in SUMMARY_ROWS if summary.get(key) is not None]
    width = max(len(label) for label, _ in rows)
    lines += ["", "accuracy", *(f"  {label:<{width}}  {value:6.3f}" for label, value in rows)]
    corrupt, true = summary.get("corrupt_accuracy"), summary.get("corrupt_true_label_accuracy")
    if corrupt is not None and true is not None:
        lines += ["", f"It fits {corrupt:.0%} of the corrupt training examples to their noisy "
                      f"label (memorization) and classifies {true:.0%} of them as their true "
                      "class."]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    setup_devices()
    try:
        config = config_from_flags()
        if config.data_dir == build.DEMO_DATA_DIR:
            build.ensure_demo_dataset()
        run = trainer.Trainer(config, FLAGS.overwrite)
        summary = run.run()
    except (ValueError, trainer.NonFiniteLoss) as e:
        sys.exit(f"error: {e}")
    except (OSError, tf.errors.OpError) as e:
        if (message := storage_failure(e)) is None:
            raise
        sys.exit(f"error: cannot write {FLAGS.model_dir}: {message} (the checkpoints "
                 "written before are intact; free space and rerun the command to resume)")
    print(summary_text(summary, config.model_dir))
    if run.complete:
        print(f"\n{config.model_dir} was already complete ({summary['steps']} steps): "
              "nothing was changed")
    print(f"\nsummary: {os.path.join(config.model_dir, trainer.SUMMARY_FILE)}")
    print(f"TensorBoard: tensorboard --logdir {os.path.dirname(os.path.abspath(config.model_dir))}")


if __name__ == "__main__":
    common_flags.run(main)
