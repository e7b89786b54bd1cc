"""What a robust step's collectives move across replicas, against plain SGD's.

  python -m tools.collective_bytes [--models=fc,fc3,small_cnn,resnet18] [--replicas=8]
      [--json PATH]

Plain SGD all-reduces the gradient once: P floats (the trainable parameters).
A per-example aggregator's step (cg_tf.robust.tiled.aggregate_batch) gives each
replica its share of every variable's coordinates over the global batch B,
per computation (a large variable, or the small ones side by side) by one of
two collectives, then all-reduces the update (P) in the optimizer, which adds
the shares:

  gather    the factors the layer rules record (per example: a dense layer's
            input and output gradient, a convolution's input (or its
            patches, where those are smaller) and output gradient, a bias's
            and a normalization's per-example values): an all-reduce of a
            buffer of the global batch, B x F floats, of which a replica sends
            2 (R - 1) / R in a ring;
  exchange  each replica forms its own examples' values and sends every other
            replica its rows: an all-to-all of b x P' floats a replica (b =
            B / R, P' the coordinates padded to R equal shares), of which it
            sends (R - 1) / R.

A computation takes the one that sends fewer bytes (tiled.exchanges). The
factors (F) and coordinates are counted from the rules themselves, on one
example of each model, so the table is the implementation's. Printed per
model: P, F, B, plain SGD's all-reduce, and what a replica sends a step with
every computation gathered (the design before the exchange), every one
exchanged, and as the step chooses (each with the update's all-reduce).
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


def all_to_all_sent(payload: int, replicas: int) -> float:
    """Bytes one replica sends in an all-to-all of `payload` bytes (its own)."""
    return (replicas - 1) / replicas * payload


def sent(gathered: int, exchanged: int, batch: int, replicas: int) -> float:
    """Bytes a replica sends for the values: the factors' gather (`gathered`
    floats per example) and the exchange (`exchanged` coordinates)."""
    return (ring_sent(FLOAT * batch * gathered, replicas)
            + all_to_all_sent(FLOAT * batch // replicas * exchanged, replicas))


def traffic(params: int, routes: dict, batch: int, replicas: int) -> dict:
    """The step's collectives in bytes: plain SGD's payload and what a replica
    sends, and what it sends in a robust step (with the update's all-reduce)
    with every computation gathered, exchanged, or as the step chooses.
    `routes`: per-example floats, summed over computations: `factors` (all
    of them gathered), `coordinates` (all exchanged), and the chosen split,
    `gathered` factors and `exchanged` coordinates."""
    plain = ring_sent(FLOAT * params, replicas)
    return {"params": params, "batch": batch, "replicas": replicas, **routes,
            "plain_payload": FLOAT * params, "plain_sent": plain,
            "all_gathered_sent": plain + sent(routes["factors"], 0, batch, replicas),
            "all_exchanged_sent": plain + sent(0, routes["coordinates"], batch, replicas),
            "chosen_sent": plain + sent(routes["gathered"], routes["exchanged"], batch,
                                        replicas)}


def routes_per_example(name: str, replicas: int) -> tuple[int, dict]:
    """P of a model, and the floats of its computations per example (`traffic`'s
    `routes`), from its layer rules on one example."""
    import numpy as np
    import tensorflow as tf

    from cg_tf.robust import tiled
    from cg_tf.robust.collectives import Collectives
    from cg_tf.robust.gradients import GradientSource
    net = build_net(name, WORKLOADS[name][0])
    source = GradientSource(net)
    if not source.factored:
        raise ValueError(f"{name}: not factored by layer rules")
    x = tf.constant(np.random.default_rng(0).random((1, *SETUPS[name][2]), np.float32))
    y = tf.constant([0], tf.int32)
    values, _, _ = source.per_example(x, y, None, Collectives.current(), expand=False)
    routes = dict.fromkeys(("factors", "coordinates", "gathered", "exchanged"), 0)
    for c in tiled.computations(values):
        coordinates, factors = c.coordinates(values, replicas), c.factors(values)
        routes["factors"] += factors
        routes["coordinates"] += coordinates
        if replicas > 1 and c.exchanged(values, replicas):
            routes["exchanged"] += coordinates
        else:
            routes["gathered"] += factors
    return sum(int(np.prod(v.shape)) for v in net.trainable_variables), routes


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def define_flags() -> None:
    """The command line's flags (defined when it runs: tests import the functions)."""
    flags.DEFINE_list("models", ["fc", "fc3", "small_cnn", "resnet18"], "Models.")
    flags.DEFINE_integer("replicas", 8, "Replicas.", lower_bound=2)
    flags.DEFINE_string("json", None, "Write the rows here too.")


def main(argv):
    del argv
    unknown = [m for m in FLAGS.models if m not in WORKLOADS]
    if unknown:
        raise app.UsageError(f"--models: unknown {', '.join(unknown)}; known: "
                             f"{', '.join(WORKLOADS)}")
    rows = []
    print(f"{FLAGS.replicas} replicas; MB a replica sends a step (with the update's all-reduce)")
    print("| model | P | F | B | plain SGD | all gathered | all exchanged | as chosen | "
          "chosen / plain |")
    print("| --- " * 9 + "|")
    for name in FLAGS.models:
        params, routes = routes_per_example(name, FLAGS.replicas)
        row = {"model": name, **traffic(params, routes, WORKLOADS[name][1], FLAGS.replicas)}
        rows.append(row)
        print(f"| {name} | {params:,} | {routes['factors']:,} | {row['batch']} | "
              f"{megabytes(row['plain_sent'])} | {megabytes(row['all_gathered_sent'])} | "
              f"{megabytes(row['all_exchanged_sent'])} | {megabytes(row['chosen_sent'])} | "
              f"{row['chosen_sent'] / row['plain_sent']:,.1f} |")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    define_flags()
    common_flags.run(main)
