"""Whether a BatchNorm net's evaluation is held back by its moving statistics,
from a run's last checkpoint.

  python -m tools.batchnorm_statistics --flagfile=FLAGS --model_dir=RUN [the run's other flags]

Rebuilds the run from its own flags (as `cg_tf.train` does) and restores its
last checkpoint; prints the accuracy on the run's pristine and test subsets
with BatchNorm in inference mode (the moving statistics, what the run's
evaluation uses) and with each batch's own statistics (dropout held off);
and, per BatchNorm layer, the mean variance of its input over the first
batch of the mixed subset (the net in inference mode up to it, so a lag in
one layer shows in the layers after it too) against its moving variance. A
moving variance many times the input's, with evaluation at chance where
batch statistics classify, is a moving average that has not caught up.
"""

from cg_tf import common_flags  # isort: skip (first: it quiets TensorFlow before it loads)
import sys

import keras
import numpy as np
import tensorflow as tf
from absl import app

from cg_tf.keras_internals import flatten_layers
from cg_tf.train_flags import config_from_flags, setup_devices
from cg_tf.training import trainer


def accuracy(net: keras.Model, batches: tf.data.Dataset, training: bool) -> float:
    """The share of `batches` ({"image", "label"}) the net classifies as
    labelled (NaN for none). In training mode BatchNorm takes each batch's
    statistics, dropout is held off (so the share does not vary from call to
    call), and the moving statistics, which each call advances, are put back."""
    held = [v.numpy() for v in net.non_trainable_variables]
    dropouts = [l for l in flatten_layers(net) if isinstance(l, keras.layers.Dropout)]
    rates = [l.rate for l in dropouts]
    for layer in dropouts:
        layer.rate = 0.0
    hits = total = 0
    try:
        for batch in batches:
            guess = np.argmax(net(batch["image"], training=training), axis=-1)
            hits += int(np.sum(guess == batch["label"].numpy()))
            total += len(guess)
    finally:  # the net as it was, whatever happened
        for v, value in zip(net.non_trainable_variables, held):
            v.assign(value)
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
    return hits / total if total else float("nan")


def batch_norms(net: keras.Model) -> dict[str, keras.layers.BatchNormalization]:
    """The net's BatchNormalization layers by name; ValueError if it has none,
    or has one inside a nested model (whose input this tool cannot reach)."""
    bns = {l.name: l for l in net.layers if isinstance(l, keras.layers.BatchNormalization)}
    top = {id(l) for l in bns.values()}
    nested = [l.name for l in flatten_layers(net)
              if isinstance(l, keras.layers.BatchNormalization) and id(l) not in top]
    if nested:
        raise ValueError(f"{net.name} has BatchNormalization inside a nested model "
                         f"({', '.join(nested)}); this tool reads top-level layers only")
    if not bns:
        raise ValueError(f"{net.name} has no BatchNormalization layer")
    return bns


def variances(net: keras.Model, images) -> dict[str, tuple[float, float]]:
    """{BatchNorm layer: (the mean over channels of its input's variance over
    `images`, of its moving variance)}, the net in inference mode."""
    bns = batch_norms(net)
    inputs = keras.Model(net.inputs, {n: l.input for n, l in bns.items()})(images,
                                                                          training=False)
    statistics = {}
    for name, x in inputs.items():
        x = np.asarray(x)
        statistics[name] = (float(np.var(x, axis=tuple(range(x.ndim - 1))).mean()),
                            float(bns[name].moving_variance.numpy().mean()))
    return statistics


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    setup_devices()
    try:
        run = trainer.Trainer(config_from_flags())
        batch_norms(run.model.net)
        step = run.restore()
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not step:
        sys.exit(f"error: {run.config.model_dir} holds no checkpoint")
    net = run.model.net
    subsets = run.reader.eval_subsets()
    for name in ("pristine", "test"):
        if name in subsets:
            print(f"step {step}, {name}: accuracy {accuracy(net, subsets[name], False):.3f} "
                  f"with the moving statistics, {accuracy(net, subsets[name], True):.3f} "
                  "with each batch's own")
    images = next(iter(subsets["mixed"]))["image"]
    for layer, (batch, moving) in variances(net, images).items():
        print(f"{layer}: input variance {batch:.4f}, moving variance {moving:.4f}")


if __name__ == "__main__":
    common_flags.run(main)
