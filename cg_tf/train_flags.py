"""The training run's flags, one per TrainConfig field (their help text and
checks live there), for every program that trains: `cg_tf.train` and the
pipelines that run training stages (`pipelines.sweep`, `pipelines.easy_hard`).

The defaults are the demo's (configs/demo.flags holds the same values), from
cg_tf.train_defaults, where the studies' tools take theirs.
"""

from absl import flags

from cg_tf import common_flags
from cg_tf.common_flags import SEED
from cg_tf.train_defaults import DEMO
from cg_tf.training.trainer import TrainConfig

common_flags.define(TrainConfig, DEMO, skip=("seed",))
NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", None,
                                       "Split the CPU into N logical devices.", lower_bound=1)


def config_from_flags() -> TrainConfig:
    """The run the flags ask for; raises ValueError naming a bad flag."""
    return common_flags.from_flags(TrainConfig, {"seed": SEED.value})


def setup_devices() -> None:
    """--num_cpu_devices: split the CPU before TensorFlow initializes."""
    if NUM_CPU_DEVICES.value:
        from cg_tf.training.strategies import split_cpu
        split_cpu(NUM_CPU_DEVICES.value)
