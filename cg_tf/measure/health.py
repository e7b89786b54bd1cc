"""The network's health along a run: how far each layer's weights have grown
since the start, the logits' spread, and the hidden units that never fire.

Winsorized SGD at the papers' length can collapse: hidden units die while the
accuracy falls, and the output layer's weights may grow without bound
(docs/results/winsorization_fashion_mnist). These measures show
it as it happens, on a fixed sample (the monitor's: the first 500 examples of
the mixed training subset); `Health` keeps each layer's starting norm in the run's
checkpoint, so a resumed run measures growth from the same start.
"""

import logging

import keras
import numpy as np
import tensorflow as tf

from cg_tf.measure import tags
from cg_tf.measure.probe import layer_of


def layer_norms(net: keras.Model) -> dict[str, float]:
    """The norm of each layer's trainable weights together (kernel and bias)."""
    squares = {}
    for v in net.trainable_variables:
        layer = layer_of(v, net.name)
        squares[layer] = squares.get(layer, 0.0) + float(tf.reduce_sum(tf.square(v)))
    return {layer: float(np.sqrt(s)) for layer, s in squares.items()}


def dead_fraction(activations: np.ndarray) -> float:
    """Share of the units (last axis; channels of a conv layer) that output at
    most 0 for every example and position of `activations`."""
    units = activations.reshape(-1, activations.shape[-1])
    return float((units.max(axis=0) <= 0).mean())


def _relu_outputs(net: keras.Model) -> keras.Model | None:
    """A model from the net's input to the output of each of its ReLU layers
    (a layer with a relu activation, or a ReLU layer); None for a net that is
    not functional or has none."""
    relus = [l for l in net.layers if isinstance(l, keras.layers.ReLU)
             or getattr(l, "activation", None) is keras.activations.relu]
    try:
        return keras.Model(net.input, {l.name: l.output for l in relus}) if relus else None
    except (AttributeError, ValueError, TypeError):
        return None


class Health:
    """Measures `net` on the fixed `sample` of images; the variable `start`
    holds each layer's norm when it was made (a run checkpoints it, so a
    resumed run restores it). Warns once per layer whose norm exceeds
    `warn_growth` times its start (0: never)."""

    def __init__(self, net: keras.Model, sample: tf.Tensor, warn_growth: float = 0.0):
        self.net, self.sample, self.warn_growth = net, sample, warn_growth
        norms = layer_norms(net)
        self.layers = list(norms)
        self.start = tf.Variable([norms[k] for k in self.layers], trainable=False,
                                 name="start_norms")
        self.relus = _relu_outputs(net)
        self._warned: set[str] = set()
        self._latest: tuple[int, dict[str, float]] | None = None  # (step, measures)

    def growth(self, norms: dict[str, float]) -> dict[str, float]:
        """Each layer's norm over its norm at the start."""
        return {k: norms[k] / max(float(s), 1e-12) for k, s in zip(self.layers,
                                                                  self.start.numpy())}

    def measure(self, step: int) -> dict[str, float]:
        """The scalars to write (names in cg_tf.measure.tags) at `step`."""
        norms = layer_norms(self.net)
        growth = self.growth(norms)
        out = {tags.weight_norm_tag(k): v for k, v in norms.items()}
        out[tags.MAX_WEIGHT_GROWTH] = max(growth.values())
        logits = self.net(self.sample, training=False)
        out[tags.LOGITS_STD] = float(tf.math.reduce_std(tf.cast(logits, tf.float32)))
        if self.relus is not None:
            dead = {k: (dead_fraction(a.numpy()), a.shape[-1])
                    for k, a in self.relus(self.sample, training=False).items()}
            out |= {tags.dead_units_tag(k): share for k, (share, _) in dead.items()}
            units = sum(n for _, n in dead.values())
            out[tags.DEAD_UNITS] = sum(share * n for share, n in dead.values()) / units
        self._warn(step, norms, growth)
        self._latest = (step, out)
        return out

    def _warn(self, step: int, norms: dict[str, float], growth: dict[str, float]) -> None:
        if not self.warn_growth:
            return
        for layer in self.layers:
            if growth[layer] > self.warn_growth and layer not in self._warned:
                self._warned.add(layer)
                logging.warning(
                    "step %d: the weights of layer %s have grown to %.1fx their norm at the "
                    "start (%.3g -> %.3g): the run may be drifting (weights growing "
                    "without bound; see health/* in TensorBoard)", step, layer,
                    growth[layer], norms[layer] / growth[layer], norms[layer])

    def summary(self, step: int) -> dict:
        """The measures at `step` (those of the last evaluation if it was at
        `step`, else new ones), grouped for summary.json."""
        values = self._latest[1] if self._latest and self._latest[0] == step else \
            self.measure(step)
        norms = {k: values[tags.weight_norm_tag(k)] for k in self.layers}
        return {"weight_norm": norms, "weight_growth": self.growth(norms),
                "logits_std": values[tags.LOGITS_STD], "dead_units": values.get(tags.DEAD_UNITS)}
