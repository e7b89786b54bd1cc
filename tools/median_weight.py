"""How much weight the median of three gradients gives one example's gradient.

  python -m tools.median_weight --data_dir=DATA --output_dir=OUT [--model=small_cnn]
      [--learning_rate=0.1 --batch_size=128 --epochs=60 --measure_epochs=0,10,20,40,60]
      [--batch_sizes=32,128 --triples=4]

RM3 takes the coordinate-wise median of three batch-mean gradients (this
step's and the two before), M3 of three group means of one batch. Remove one
example i from the first of three means G1, G2, G3 (its share d_i = g_i / B of
G1) and the median moves by D_i = med(G1, G2, G3) - med(G1 - d_i, G2, G3); the
weight the median gives the example is w_i = <D_i, d_i> / |d_i|^2. The mean of
the three gives every example w = 1/3 exactly, and so does the median to first
order (each coordinate of G1 is the median of the three with probability 1/3):
summed over the three steps a batch takes part in, RM3 weighs an example as
much as plain SGD does. It weighs one less only where d_i is large against
the spread of the three means, where the median stops following it.

The tool trains the net with plain SGD (--batch_size, or its older name
--train_batch; constant --learning_rate). Its training flags (TRAINING) are
the trainer's, defaults included: `python -m cg_tf.train`'s (an fc net with
one hidden layer of 256, lr 0.1, batch 100, 60 epochs); the small_cnn study
measured --model=small_cnn --batch_size=128 (docs/results/small_cnn_fashion_mnist).
At each of --measure_epochs it takes --triples triples of
consecutive batches of each size in --batch_sizes, at the same weights, and
records the mean weight of the pristine and of the corrupt examples of the
first batch of each triple. OUT/median_weight.csv: epoch, batch, group, weight,
examples; OUT/median_weight.png (and .pdf) the weights against the epoch;
OUT/config.json the flags.
"""

import os
import sys

import numpy as np
from absl import app, flags

from cg_tf import common_flags

FLAGS = flags.FLAGS

# The trainer's options this tool takes (cg_tf.train_defaults: the trainer's
# flags, checks and defaults); it trains with plain SGD at a constant rate.
TRAINING = ("data_dir", "model", "fc_widths", "init", "learning_rate", "batch_size", "epochs")


def define_flags() -> None:
    """The command line's flags (defined when it runs: importing defines none)."""
    from cg_tf import train_defaults
    train_defaults.define(TRAINING, without_default=("data_dir",))
    for name in TRAINING:
        flags.declare_key_flag(name)  # listed in --help as this program's own
    flags.DEFINE_alias("train_batch", "batch_size")  # its name before the trainer's
    flags.DEFINE_string("output_dir", None, "Where median_weight.csv and config.json go.")
    flags.DEFINE_list("measure_epochs", ["0", "10", "20", "40", "60"],
                      "Epochs after which to measure.")
    flags.DEFINE_list("batch_sizes", ["32", "128"], "Sizes of the three batches measured.")
    flags.DEFINE_integer("triples", 4, "Triples of batches per size and epoch.")
    flags.mark_flags_as_required(["data_dir", "output_dir"])


def median3(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))


def median_weights(means: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """w_i = <med(G1, G2, G3) - med(G1 - d_i, G2, G3), d_i> / |d_i|^2 for the three
    means [3, P] and the examples' shares d [n, P] of the first one (0 for d = 0)."""
    g1, g2, g3 = means
    moved = median3(g1, g2, g3)[None] - median3(g1[None] - shares, g2[None], g3[None])
    norms = np.square(shares).sum(1)
    return np.where(norms > 0, (moved * shares).sum(1) / np.maximum(norms, 1e-300), 0.0)


def per_example_gradients(net):
    """A function (x, y) -> [n, P]: each example's loss gradient, flattened over
    the trainable variables (the layer rules' per-example values, as the
    per-example aggregators get them)."""
    import tensorflow as tf

    from cg_tf.robust.collectives import Collectives
    from cg_tf.robust.gradients import GradientSource
    source = GradientSource(net)

    @tf.function  # one trace per batch size (the per-example values need a static batch)
    def stacked(x, y):
        values, _, _ = source.per_example(x, y, None, Collectives.current())
        return [v.stacked() for v in values]

    return lambda x, y: np.concatenate([g.numpy().reshape(len(x), -1)
                                        for g in stacked(x, y)], axis=1)


def measure(net, reader, epoch: int, sizes: list[int], triples: int) -> list[dict]:
    """Rows of the mean weight per (batch size, group) at the current weights."""
    gradients = per_example_gradients(net)
    rows = []
    for size in sizes:
        weights = {"pristine": [], "corrupt": []}
        data = reader.examples().unbatch().shuffle(10_000, seed=epoch).batch(size, True)
        batches = iter(data)
        for _ in range(triples):
            parts = [next(batches) for _ in range(3)]
            grads = [gradients(b["image"], b["label"]) for b in parts]
            w = median_weights(np.stack([g.mean(0) for g in grads]), grads[0] / size)
            corrupt = parts[0]["is_corrupt"].numpy().astype(bool)
            weights["pristine"] += list(w[~corrupt])
            weights["corrupt"] += list(w[corrupt])
        for group, values in weights.items():
            if values:
                rows.append({"epoch": epoch, "batch": size, "group": group,
                             "weight": float(np.mean(values)), "examples": len(values)})
    return rows


def _sizes() -> list[int]:
    try:
        sizes = [int(s) for s in FLAGS.batch_sizes]
    except ValueError:
        raise app.UsageError(f"--batch_sizes must be integers, got {FLAGS.batch_sizes}") from None
    if not sizes or min(sizes) < 1:
        raise app.UsageError(f"--batch_sizes must be positive, got {FLAGS.batch_sizes}")
    return sizes


def plot(rows: list[dict], path: str) -> None:
    """The mean weight against the epoch, a line per (batch size, group), with
    the mean's 1/3 (and plain SGD's 1 a step, over three steps) marked."""
    from cg_tf.measure import report
    plt = report.pyplot()
    with plt.rc_context(report.FIGURE_STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.4), layout="constrained")
        for size in sorted({r["batch"] for r in rows}):
            for group, style in (("pristine", "-"), ("corrupt", "--")):
                points = [(r["epoch"], r["weight"]) for r in rows
                          if r["batch"] == size and r["group"] == group]
                if points:
                    ax.plot(*zip(*points), style, marker="o", markersize=3,
                            label=f"B = {size}, {group}")
        ax.axhline(1 / 3, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xlabel("epoch of plain SGD")
        ax.set_ylabel("weight of one example in the median")
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    report.save_figure(fig, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    sizes = _sizes()
    import keras

    from cg_tf import train_defaults
    from cg_tf.data.reader import Reader
    from cg_tf.measure import report
    from cg_tf.storage import files
    from cg_tf.training.models import build_model
    from cg_tf.training.robust_model import RobustModel
    keras.utils.set_random_seed(0)
    try:  # the trainer's checks of its flags (no run directory: the tool writes none)
        config = train_defaults.config_from_flags(TRAINING, model_dir="")
        reader = Reader.open(config.data_dir, config.batch_size)
    except ValueError as e:  # a bad flag, named; the dataset's own errors
        sys.exit(f"error: {e}")
    net = build_model(config.model, reader.image_shape, reader.info.num_classes,
                      config.fc_widths, config.init)
    model = RobustModel(net)
    model.compile(optimizer=keras.optimizers.SGD(config.learning_rate))
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    files.write_json(os.path.join(FLAGS.output_dir, "config.json"),
                     {k: FLAGS[k].value for k in (*TRAINING, "measure_epochs", "batch_sizes",
                                                  "triples")})
    rows, done = [], 0
    for epoch in sorted({int(e) for e in FLAGS.measure_epochs if int(e) <= config.epochs}):
        if epoch > done:
            model.fit(reader.train_dataset(done * reader.steps_per_epoch),
                      epochs=1, steps_per_epoch=(epoch - done) * reader.steps_per_epoch,
                      verbose=0)
            done = epoch
        new = measure(net, reader, epoch, sizes, FLAGS.triples)
        rows += new
        print(f"epoch {epoch}: " + ", ".join(
            f"B={r['batch']} {r['group']} {r['weight']:.3f}" for r in new), flush=True)
        report.write_table(os.path.join(FLAGS.output_dir, "median_weight.csv"), rows,
                           ["epoch", "batch", "group", "weight", "examples"])
        plot(rows, os.path.join(FLAGS.output_dir, "median_weight.png"))


if __name__ == "__main__":
    define_flags()
    common_flags.run(main)
