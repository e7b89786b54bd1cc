"""Trains a model with a robust gradient aggregator.

  python -m cg_tf.train --flagfile=configs/NAME.flags [--flag=value ...]

With no flags it runs the default demo (configs/demo.flags holds the same
values): noisy digits, built by the pipeline on first use, a fully connected
net, winsorized gradients.
"""

import os
import sys

import tensorflow as tf
from absl import app, flags, logging

from cg_tf import common_flags
from cg_tf.common_flags import SEED
from cg_tf.data import verify
from cg_tf.robust.aggregators import Winsorized
from cg_tf.training import trainer
from cg_tf.training.trainer import TrainConfig

DEMO_DATA_DIR = "data/digits_noisy50"

FLAGS = flags.FLAGS
# A flag per TrainConfig field (its help text and validation live there); the
# defaults below are the demo's (configs/demo.flags holds the same values).
DEMO = {"data_dir": DEMO_DATA_DIR, "model_dir": "runs/demo", "fc_widths": (256,),
        "aggregator": Winsorized(c=4), "epochs": 60}
common_flags.define(TrainConfig, DEMO, skip=("seed",))
flags.adopt_module_key_flags(common_flags)  # those and --seed in --help
# pipelines.shared_flags defines --overwrite too (for --output_dir): one flag, either meaning.
flags.DEFINE_bool("overwrite", False, "Start --model_dir over if it holds a run with another "
                  "configuration (deletes only what a run writes there).", allow_override=True)
flags.DEFINE_integer("num_cpu_devices", None, "Split the CPU into N logical devices.")


def config_from_flags() -> TrainConfig:
    """The run the flags ask for; raises ValueError naming a bad flag."""
    return common_flags.from_flags(TrainConfig, {"seed": SEED.value})


def ensure_demo_data(data_dir: str) -> None:
    """Builds the default noisy digits dataset with the pipeline on first use."""
    from cg_tf.data import build, records
    from cg_tf.data.noise import NoiseSpec
    from cg_tf.data.sources import make_source
    if os.path.exists(os.path.join(data_dir, records.INFO_FILE)):
        return
    logging.info("building the demo dataset in %s (first use)", data_dir)
    build.build_dataset(make_source("digits"), build.BuildConfig(
        data_dir, NoiseSpec("uniform", 0.5, 0), num_shards=4, overwrite=True))


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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    setup_devices()
    try:
        config = config_from_flags()
        if config.data_dir == DEMO_DATA_DIR:
            ensure_demo_data(config.data_dir)
        run = trainer.Trainer(config, FLAGS.overwrite)
        summary = run.run()
    except (ValueError, trainer.NonFiniteLoss) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    except (OSError, tf.errors.OpError) as e:
        if (message := storage_failure(e)) is None:
            raise
        logging.error("%s", message)
        sys.exit(f"error: cannot write {FLAGS.model_dir}: {message} (the checkpoints "
                 "written before are intact; free space and rerun the command to resume)")
    print("\n".join(f"{k:>28}: {v}" for k, v in summary.items()
                    if not isinstance(v, dict)))
    if run.complete:
        print(f"\n{config.model_dir} was already complete ({summary['steps']} steps): "
              "nothing was changed")
    print(f"\nsummary: {os.path.join(config.model_dir, trainer.SUMMARY_FILE)}")
    print(f"TensorBoard: tensorboard --logdir {os.path.dirname(os.path.abspath(config.model_dir))}")


if __name__ == "__main__":
    common_flags.run(main)
