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

from cg_tf import train_flags
from cg_tf.common_flags import OVERWRITE
from cg_tf.data import build
from cg_tf.measure import report
from cg_tf.storage.files import refused_write
from cg_tf.training import trainer
from cg_tf.train_flags import config_from_flags, setup_devices

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(train_flags)
flags.adopt_module_key_flags(common_flags)  # --seed and --overwrite in --help


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    setup_devices()
    try:
        config = config_from_flags()
        if config.data_dir == build.DEMO_DATA_DIR:
            build.ensure_demo_dataset()
        run = trainer.Trainer(config, OVERWRITE.value)
        summary = run.run()
    except (ValueError, trainer.NonFiniteLoss) as e:
        sys.exit(f"error: {e}")
    except trainer.Terminated as e:
        print(f"{FLAGS.model_dir}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (OSError, tf.errors.OpError) as e:
        if (refusal := refused_write(e, FLAGS.model_dir)) is None:
            raise
        sys.exit(f"error: cannot write {FLAGS.model_dir}: {refusal.reason} (the checkpoints "
                 f"written before are intact: {refusal.remedy} and rerun the command to "
                 "resume)")
    print(report.summary_text(summary, config.model_dir))
    if run.complete:
        print(f"\n{config.model_dir} was already complete ({summary['steps']} steps): "
              "nothing was changed")
    print(f"\nsummary: {os.path.join(config.model_dir, trainer.SUMMARY_FILE)}")
    print(f"TensorBoard: tensorboard --logdir {os.path.dirname(os.path.abspath(config.model_dir))}")


if __name__ == "__main__":
    common_flags.run(main)
