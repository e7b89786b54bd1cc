"""What a robust step's collectives move across replicas, against plain SGD's.

  python -m tools.collective_bytes [--models=fc,fc3,small_cnn,resnet18] [--replicas=8]
      [--json PATH]

Plain SGD all-reduces the gradient once: P floats (the trainable parameters).
A per-example aggregator's step (cg_tf.robust.aggregators.global_values and
tiled.robust_share) all-reduces two things: the factors the layer rules
record (per example: a dense layer's input and output gradient, a
convolution's input (or its patches, where those are smaller) and output
gradient, a normalization's per-example scale and shift values), gathered from every replica as one buffer of the
global batch B; and the update (P), in the optimizer's all-reduce, which adds
the replicas' shares of the coordinates. The factors per example (F) are counted from the rules themselves, on
one example of each model, so the table is the implementation's.

Printed per model: P, F, B, each collective's payload (the buffer's bytes),
the robust step's total against plain SGD's, and the bytes a replica sends in
a ring all-reduce (2 (R - 1) / R of the payload). For comparison, the other
design: each replica forms its own examples' per-example gradients and sends
every other replica that replica's share of the coordinates (an all-to-all of
b x P (R - 1) / R floats a replica, b = B / R).
"""

import json

from absl import app, flags

from cg_tf import common_flags
from tools.timed_steps import SETUPS, build_net

FLAGS = flags.FLAGS

# model (its net as the timing tools build it, `timed_steps.SETUPS`) -> (classes,
# global batch): ResNet-18 with ImageNet's 1,000 classes at a global batch of 256.
WORKLOADS = {"fc": (10, 128), "fc3": (10, 128), "small_cnn": (10, 128), "resnet18": (1000, 256)}
FLOAT = 4  # bytes


def ring_sent(payload: int, replicas: int) -> float:
    """Bytes one replica sends in a ring all-reduce of `payload` bytes."""
    return 2 * (replicas - 1) / replicas * payload


def traffic(params: int, factors: int, batch: int, replicas: int) -> dict:
    """The step's collectives in bytes: plain SGD's and the robust step's
    payloads, and what a replica sends of each; the all-to-all alternative."""
    plain = FLOAT * params
    gather = FLOAT * batch * factors
    robust = gather + plain
    return {"params": params, "factors_per_example": factors, "batch": batch,
            "replicas": replicas, "plain_payload": plain, "gather_payload": gather,
            "robust_payload": robust, "robust_over_plain": robust / plain,
            "plain_sent": ring_sent(plain, replicas), "robust_sent": ring_sent(robust, replicas),
            "all_to_all_sent": FLOAT * batch // replicas * params * (replicas - 1) / replicas}


def factors_per_example(name: str) -> tuple[int, int]:
    """(P, F) of a model: its trainable parameters, and the floats its layer
    rules record for one example (what the replicas gather per example)."""
    import numpy as np
    import tensorflow as tf

    from cg_tf.robust import layer_rules
    from cg_tf.robust.collectives import Collectives
    from cg_tf.robust.gradients import GradientSource
    net = build_net(name, WORKLOADS[name][0])
    source = GradientSource(net)
    if not source.factored:
        raise ValueError(f"{name}: not factored by layer rules")
    x = tf.constant(np.random.default_rng(0).random((1, *SETUPS[name][2]), np.float32))
    y = tf.constant([0], tf.int32)
    values, _, _ = source.per_example(x, y, None, Collectives.current(), expand=False)
    factors = sum(layer_rules.floats_per_example(v) for v in values)
    return sum(int(np.prod(v.shape)) for v in net.trainable_variables), factors


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def define_flags() -> None:
    """The command line's flags (defined when it runs: tests import the functions)."""
    flags.DEFINE_list("models", ["fc", "fc3", "small_cnn", "resnet18"], "Models.")
    flags.DEFINE_integer("replicas", 8, "Replicas.")
    flags.DEFINE_string("json", None, "Write the rows here too.")


def main(argv):
    del argv
    unknown = [m for m in FLAGS.models if m not in WORKLOADS]
    if unknown:
        raise app.UsageError(f"--models: unknown {', '.join(unknown)}; known: "
                             f"{', '.join(WORKLOADS)}")
    rows = []
    print(f"| model | P | F | B | plain SGD all-reduce (MB) | factor gather (MB) | robust / "
          f"plain | sent a replica, plain / robust (MB) | all-to-all instead (MB) |")
    print("| --- " * 9 + "|")
    for name in FLAGS.models:
        params, factors = factors_per_example(name)
        row = {"model": name, **traffic(params, factors, WORKLOADS[name][1], FLAGS.replicas)}
        rows.append(row)
        print(f"| {name} | {params:,} | {factors:,} | {row['batch']} | "
              f"{megabytes(row['plain_payload'])} | {megabytes(row['gather_payload'])} | "
              f"{row['robust_over_plain']:,.1f} | {megabytes(row['plain_sent'])} / "
              f"{megabytes(row['robust_sent'])} | {megabytes(row['all_to_all_sent'])} |")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    define_flags()
    common_flags.run(main)
