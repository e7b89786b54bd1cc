"""The first command: what winsorized gradients do to memorization, in a few minutes.

  python -m cg_tf.demo

Builds the embedded noisy digits (scikit-learn's 8x8 digits, 50% uniform label
noise; the Beam pipeline, on first use) and trains the same fully connected net
twice, with plain SGD and with winsorized gradients (c = 4), as two runs of one
TensorBoard logdir under --output_dir. Plain SGD fits the corrupt examples to
their noisy labels (memorization); winsorized gradients barely do, and keep
classifying them as their true class. It ends with both results side by side.
A rerun reports the finished runs without training again.
"""

import os
import sys

from cg_tf import common_flags  # isort: skip (first: it quiets TensorFlow before it loads)
from absl import app, flags

from cg_tf.common_flags import SEED
from cg_tf.data import build
from cg_tf.measure import report
from cg_tf.robust.aggregators import Mean, Winsorized
from cg_tf.training.trainer import TrainConfig, Trainer

# (pipelines.shared_flags defines it too: one flag, either meaning.)
OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/demo", "Where the two runs go (one "
                                 "TensorBoard logdir).", allow_override=True)
flags.adopt_module_key_flags(common_flags)

# Settings where plain SGD memorizes the digits' corrupt labels within minutes.
RUNS = {"sgd": ("plain SGD", Mean()), "winsorized_c4": ("winsorized, c = 4", Winsorized(c=4))}
SETTINGS = {"model": "fc", "fc_widths": (1024,), "batch_size": 50, "learning_rate": 0.5,
            "epochs": 100, "log_every": 500}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    summaries = {}
    try:
        build.ensure_demo_dataset()
        for name, (label, aggregator) in RUNS.items():
            print(f"training {label} ({os.path.join(OUTPUT_DIR.value, name)})", flush=True)
            config = TrainConfig(data_dir=build.DEMO_DATA_DIR, aggregator=aggregator,
                                 model_dir=os.path.join(OUTPUT_DIR.value, name), seed=SEED.value,
                                 **SETTINGS)
            summaries[label] = Trainer(config, common_flags.OVERWRITE.value).run()
    except ValueError as e:
        sys.exit(f"error: {e}")
    print("\n" + report.side_by_side(summaries))
    print(f"\nTensorBoard: tensorboard --logdir {OUTPUT_DIR.value}")


if __name__ == "__main__":
    common_flags.run(main)
