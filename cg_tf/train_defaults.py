"""The trainer's command-line defaults, and its flags for a program that trains
with part of what it does.

`python -m cg_tf.train`'s defaults are the demo's (configs/demo.flags holds the
same values), TrainConfig's own for the other fields; cg_tf.train_flags defines
every TrainConfig flag with them. The studies' tools (tools.drift,
tools.median_weight) take the few training options they use from here: the
same names, types, help text, checks and defaults as the trainer's, so a tool
and a training run given the same flags train the same net. Importing this
module defines no flag.
"""

from collections.abc import Iterable

from cg_tf import common_flags
from cg_tf.data import build
from cg_tf.robust.aggregators import Winsorized
from cg_tf.training.trainer import TrainConfig

DEMO = {"data_dir": build.DEMO_DATA_DIR, "model_dir": "runs/train_demo",
        "fc_widths": (256,), "aggregator": Winsorized(c=4), "epochs": 60}


def define(names: Iterable[str], without_default: Iterable[str] = ()) -> None:
    """The trainer's flags of these TrainConfig fields (nested ones included,
    e.g. eval_sample_size); those in `without_default` (a tool's --data_dir)
    default to None, for the program to require."""
    common_flags.define(TrainConfig, DEMO | dict.fromkeys(without_default), only=names)


def config_from_flags(names: Iterable[str], **values) -> TrainConfig:
    """The TrainConfig of the flags `define(names)` made, with `values` (e.g. a
    tool's model_dir) and the trainer's defaults for every other field; raises
    ValueError naming a bad flag."""
    return common_flags.from_flags(TrainConfig, values, only=names, defaults=DEMO)
