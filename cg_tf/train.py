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
from cg_tf.measure.monitor import MonitorConfig
from cg_tf.robust import gradients
from cg_tf.training import robust_model, trainer
from cg_tf.training.models import MODELS
from cg_tf.training.strategies import STRATEGIES

DEMO_DATA_DIR = "data/digits_noisy50"

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(common_flags)  # --seed in --help
flags.DEFINE_string("data_dir", DEMO_DATA_DIR, "Dataset made by pipelines.noisy_labels; the "
                    "default is built from digits (50% uniform noise) if missing.")
flags.DEFINE_string("model_dir", "runs/demo", "Checkpoints, event files, config.json and "
                    "summary.json; one process at a time.")
# pipelines.shared_flags defines --overwrite too (for --output_dir): one flag, either meaning.
flags.DEFINE_bool("overwrite", False, "Start --model_dir over if it holds a run with another "
                  "configuration (deletes only what a run writes there).", allow_override=True)
flags.DEFINE_string("model", "fc", f"One of {', '.join(MODELS)}.")
flags.DEFINE_list("fc_widths", ["256"], "Hidden layer widths of the fc model.")
flags.DEFINE_string("aggregator", "winsorized", f"One of {', '.join(robust_model.AGGREGATORS)}.")
flags.DEFINE_integer("winsorize_c", 4, "Values clipped per side, per coordinate (winsorized).")
flags.DEFINE_integer("trim_c", 4, "Values dropped per side, per coordinate (trimmed).")
flags.DEFINE_integer("mom_groups", 3, "Groups of median_of_means (3 = M3).")
flags.DEFINE_integer("per_example_chunk", None, "Per-example gradients per chunk (memory bound).")
flags.DEFINE_string("bn_mode", "batch_stats", f"One of {', '.join(gradients.BN_MODES)}.")
flags.DEFINE_integer("batch_size", 100, "Global batch size.")
flags.DEFINE_integer("epochs", 60, "Training epochs (ignored if --steps is set).")
flags.DEFINE_integer("steps", None, "Training steps (overrides --epochs).")
flags.DEFINE_string("optimizer", "sgd", f"One of {', '.join(trainer.OPTIMIZERS)}.")
flags.DEFINE_float("learning_rate", 0.1, "Base learning rate (never rescaled).")
flags.DEFINE_float("momentum", 0.0, "SGD momentum.")
flags.DEFINE_float("weight_decay", 0.0, "L2 weight decay added to the gradient.")
flags.DEFINE_string("lr_schedule", "constant", f"One of {', '.join(trainer.LR_SCHEDULES)}.")
flags.DEFINE_list("lr_decay_epochs", [], "Epochs at which the step schedule decays.")
flags.DEFINE_float("lr_decay_factor", 0.1, "Decay factor of the step schedule.")
flags.DEFINE_string("strategy", "default", f"One of {', '.join(STRATEGIES)}.")
flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu.")
flags.DEFINE_integer("num_cpu_devices", None, "Split the CPU into N logical devices.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step.")
flags.DEFINE_bool("mixed_precision", False, "Compute in bfloat16 (variables stay float32).")
flags.DEFINE_bool("deterministic", False, "Seeded op determinism (reproducible resume).")
flags.DEFINE_list("image_size", [], "HEIGHT,WIDTH to resize images to (needed for image folders).")
flags.DEFINE_string("augment", "none", "none, flip, flip_crop or randaugment.")
flags.DEFINE_integer("checkpoint_every", 200, "Steps between checkpoints.")
flags.DEFINE_integer("log_every", 50, "Steps between training logs and summaries.")
flags.DEFINE_integer("eval_sample_size", 1000, "Examples per evaluation subset.")
flags.DEFINE_integer("eval_every", None, "Steps between evaluations (default: every epoch).")
flags.DEFINE_bool("eval_log_spaced", True, "Also evaluate at steps 1, 2, 4, ... before that.")
flags.DEFINE_integer("probe_size", None, "Examples of the gradient probe (coherence, f_p, "
                     "aggregator diagnostics); default: the batch size; 0: no probe.")
flags.DEFINE_float("probe_max_share", 0.1, "Skip a probe while probing has taken more than "
                   "this share of the run's time.")
flags.DEFINE_bool("export_learned", True, "At the end, write the ids of the training examples "
                  "the model classifies as their training label, and of the others.")


def config_from_flags() -> trainer.TrainConfig:
    c = {"winsorized": FLAGS.winsorize_c, "trimmed": FLAGS.trim_c}.get(FLAGS.aggregator, 0)
    return trainer.TrainConfig(
        data_dir=FLAGS.data_dir, model_dir=FLAGS.model_dir, model=FLAGS.model,
        fc_widths=tuple(int(w) for w in FLAGS.fc_widths),
        aggregator=robust_model.AggregatorConfig(
            FLAGS.aggregator, c=c, groups=FLAGS.mom_groups, chunk=FLAGS.per_example_chunk,
            bn_mode=FLAGS.bn_mode, weight_decay=FLAGS.weight_decay),
        batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, steps=FLAGS.steps,
        optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum,
        lr_schedule=FLAGS.lr_schedule,
        lr_decay_epochs=tuple(int(e) for e in FLAGS.lr_decay_epochs),
        lr_decay_factor=FLAGS.lr_decay_factor, seed=SEED.value, strategy=FLAGS.strategy,
        tpu=FLAGS.tpu, jit_compile=FLAGS.jit_compile, mixed_precision=FLAGS.mixed_precision,
        deterministic=FLAGS.deterministic,
        image_size=tuple(int(s) for s in FLAGS.image_size) or None, augment=FLAGS.augment,
        checkpoint_every=FLAGS.checkpoint_every, log_every=FLAGS.log_every,
        eval_sample_size=FLAGS.eval_sample_size,
        monitor=MonitorConfig(eval_every=FLAGS.eval_every, eval_log_spaced=FLAGS.eval_log_spaced,
                              probe_size=FLAGS.probe_size,
                              probe_max_share=FLAGS.probe_max_share,
                              export_learned=FLAGS.export_learned))


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
