"""Per-example gradients factored by layer, for fast per-example aggregation.

One batched forward records, for every layer with trainable weights, what its
weight gradient is made of; one backward of the summed per-example losses
gives each layer's output gradient. Because the per-example losses are
independent (BatchNorm normalizes with the global batch statistics held
constant), the output gradient of example i is exactly dL_i/dz_i, and a rule
per layer class turns (input, output gradient) into per-example gradients
without forming them for the whole variable:

  Dense               kernel: sum over positions of x_t (outer) dz_t; bias: sum of dz_t
  Conv2D              kernel: sum over output positions of patch (outer) dz; bias: sum of dz
  BatchNormalization  gamma: sum of dz * x_hat over positions; beta: sum of dz
  LayerNormalization  the same with the layer's own normalization
  Embedding           table: sum over positions of one_hot(id) (outer) dz

Per-example gradients are `PerExample` values: `Outer(x [n, T, I], d [n, T, O])`
(example i's gradient is sum_t x[i, t] (outer) d[i, t], an [I, O] matrix formed
tile by tile, never for the whole variable), `Patches` (a convolution's
`Outer` whose patches are taken a block of rows at a time, where they are
used) or `Stacked(g [n, *shape])`. A rule may leave them `Unexpanded`, as the
smaller tensors they are made from (a convolution's input rather than its kh x
kw patches of it): replicas gather those (`gathered`) and expand them after.

Rules live in a registry keyed by layer class (`register`), as tf-privacy's
fast clipping registry does; a layer with weights and no rule falls back to
per-example vector-Jacobian products of that layer alone (`tf.vectorized_map`),
with a one-time log line naming it.

A rule reads its layer's weights in its forward, as tensors, and forms the
per-example values from those tensors, the inputs and the output gradients,
never from a later read of a variable: the step's updates may then be applied
in any order, even between the forward and the backward (an update does not
change a tensor read before it).
"""

import functools
from typing import Callable, NamedTuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from cg_tf import keras_internals

# -- per-example values of one variable ------------------------------------------


class Outer(NamedTuple):
    """Example i's gradient is sum_t x[i, t] (outer) d[i, t], reshaped to the variable."""

    x: tf.Tensor  # [n, T, I]
    d: tf.Tensor  # [n, T, O]

    @property
    def count(self) -> int:
        return self.x.shape[0]

    def groups(self, k: int) -> "Outer":
        """k consecutive groups of examples as k examples (a group's gradient is
        the sum of its members'): their positions are all the members' positions."""
        n, t = self.count, self.x.shape[1]
        return Outer(tf.reshape(self.x, [k, n // k * t, -1]), tf.reshape(self.d, [k, n // k * t, -1]))

    def stacked(self) -> tf.Tensor:
        """Every example's gradient, [n, I, O]."""
        return tf.einsum("bti,bto->bio", self.x, self.d)

    def concat(self, other: "Outer") -> "Outer":
        """The same examples with the other's positions added (a layer called twice)."""
        return Outer(tf.concat([self.x, other.x], 1), tf.concat([self.d, other.d], 1))


class Stacked(NamedTuple):
    """Per-example gradients held whole: g [n, *shape]."""

    g: tf.Tensor

    @property
    def count(self) -> int:
        return self.g.shape[0]

    def groups(self, k: int) -> "Stacked":
        return Stacked(tf.reduce_sum(tf.reshape(self.g, [k, -1, *self.g.shape[1:]]), 1))

    def stacked(self) -> tf.Tensor:
        return self.g

    def concat(self, other: "Stacked") -> "Stacked":
        return Stacked(self.g + other.g)


class Patches(NamedTuple):
    """A convolution's per-example values, its patches not taken: example i's
    gradient is that of Outer(patches of example i, d[i]), where the patches'
    values are x[i, idx] (`idx` [T, I] indexes the flattened input, 0 the
    zero in front of it that padding reads). A block of rows (of the I patch
    features) is taken alone (`rows`), so no replica or tile holds all the
    patches."""

    x: tf.Tensor    # [n, 1 + H * W * C]: a zero, then the input flattened
    d: tf.Tensor    # [n, T, O]
    idx: tf.Tensor  # [T, I] int32

    @property
    def count(self) -> int:
        return self.x.shape[0]

    def rows(self, start, count: int) -> "Patches":
        """The patch features [start, start + count) (`start` may be a tensor)."""
        return Patches(self.x, self.d, tf.slice(self.idx, [0, start], [self.idx.shape[0], count]))

    def outer(self) -> Outer:
        """The values with their patches taken ([n, T, I])."""
        return Outer(tf.gather(self.x, self.idx, axis=1), self.d)

    def groups(self, k: int) -> Outer:
        return self.outer().groups(k)

    def stacked(self) -> tf.Tensor:
        return self.outer().stacked()


PerExample = Outer | Stacked | Patches


@functools.lru_cache(maxsize=None)
def patch_index(shape: tuple[int, int, int], sizes: tuple[int, int], strides: tuple[int, int],
                rates: tuple[int, int], padding: str) -> np.ndarray:
    """[T, I] (int32): for each output position and patch feature of
    `tf.image.extract_patches` on an input of `shape` (H, W, C), 1 + the index
    of the value it reads in the flattened input, or 0 where it reads padding
    (the patches of the index image itself)."""
    with tf.init_scope():
        image = tf.reshape(tf.range(1, int(np.prod(shape)) + 1, dtype=tf.int32), [1, *shape])
        patches = tf.image.extract_patches(image, [1, *sizes, 1], [1, *strides, 1],
                                           [1, *rates, 1], padding)
        return patches.numpy().reshape(-1, patches.shape[-1])


def flat_with_zero(x: tf.Tensor) -> tf.Tensor:
    """[n, 1 + the rest]: a zero, then each example's values flattened."""
    flat = tf.reshape(x, [x.shape[0], -1])
    return tf.concat([tf.zeros_like(flat[:, :1]), flat], 1)


class Unexpanded(NamedTuple):
    """Per-example values held as the tensors they are made from, each [n, ...],
    because those are smaller: `expand(*tensors)` gives the PerExample."""

    tensors: tuple[tf.Tensor, ...]
    expand: Callable[..., PerExample]

    @property
    def count(self) -> int:
        return self.tensors[0].shape[0]

    def expanded(self) -> PerExample:
        return self.expand(*self.tensors)


def expanded(values: PerExample | Unexpanded) -> PerExample:
    return values.expanded() if isinstance(values, Unexpanded) else values


def _tensors(values: PerExample | Unexpanded) -> tuple[tf.Tensor, ...]:
    """What stands for `values` in a gather (the fields of Outer and Stacked)."""
    if isinstance(values, Patches):
        raise TypeError("Patches are gathered Unexpanded (their index is no example's)")
    return values.tensors if isinstance(values, Unexpanded) else tuple(values)


def floats_per_example(values: PerExample | Unexpanded) -> int:
    """The floats a gather moves per example for `values`."""
    return sum(t.shape[1:].num_elements() for t in _tensors(values))


def gathered(values: list[PerExample | Unexpanded], sync) -> list[PerExample]:
    """Every replica's values, for the global batch (concatenated in replica
    order, in one collective: collectives.Collectives.gather), expanded."""
    parts = [_tensors(v) for v in values]
    flat = [t for p in parts for t in p]
    flat = sync.gather(flat) if sync.replicas > 1 else flat
    out = []
    for v, p in zip(values, parts):
        mine, flat = flat[:len(p)], flat[len(p):]
        out.append(v.expand(*mine) if isinstance(v, Unexpanded) else type(v)(*mine))
    return out


# -- rules -------------------------------------------------------------------------


class Recording(NamedTuple):
    """What a rule's forward left for the backward: the tensors whose gradient
    is needed (`watched`), and a function of their gradients giving the
    per-example values of each of the layer's trainable variables."""

    watched: list[tf.Tensor]
    per_example: Callable[[list[tf.Tensor]], list[tuple[object, PerExample]]]


class Rule:
    """How one layer class records its forward. `forward(layer, x, sync)` returns
    (output, Recording) or None when the layer's configuration is not covered
    (the layer then takes the fallback)."""

    def forward(self, layer, x: tf.Tensor, sync):
        raise NotImplementedError


def _positions(t: tf.Tensor) -> tf.Tensor:
    """[n, ..., C] -> [n, T, C]."""
    return tf.reshape(t, [t.shape[0], -1, t.shape[-1]])


def _with_bias(layer, dz, kernel_values):
    out = [(layer.kernel, kernel_values)]
    if layer.use_bias:
        out.append((layer.bias, Stacked(tf.reduce_sum(_positions(dz), 1))))
    return out


def _plain(layer) -> bool:
    """Not quantized and without LoRA (those keep their kernel in other variables)."""
    return not (getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False))


class DenseRule(Rule):
    def forward(self, layer, x, sync):
        if not _plain(layer):
            return None
        z = tf.tensordot(x, tf.convert_to_tensor(layer.kernel), 1)
        if layer.use_bias:
            z = z + layer.bias
        return layer.activation(z), Recording(
            [z], lambda g: _with_bias(layer, g[0], Outer(_positions(x), _positions(g[0]))))


class Conv2DRule(Rule):
    def forward(self, layer, x, sync):
        if layer.data_format != "channels_last" or layer.groups != 1:
            return None
        padding = layer.padding.upper()
        kh, kw = layer.kernel_size
        strides, rates = [1, *layer.strides, 1], [1, *layer.dilation_rate, 1]
        z = tf.nn.convolution(x, tf.convert_to_tensor(layer.kernel), layer.strides, padding,
                              dilations=layer.dilation_rate)
        if layer.use_bias:
            z = z + layer.bias

        idx = patch_index(tuple(x.shape[1:]), (kh, kw), tuple(layer.strides),
                          tuple(layer.dilation_rate), padding)

        def kernel_values(x, dz):
            return Patches(flat_with_zero(x), _positions(dz), tf.constant(idx))

        # The patches hold about kh x kw / stride^2 copies of the input: the
        # input is gathered when it is the smaller (a 1 x 1 convolution of
        # stride 2 is the other way round), the patches otherwise.
        smaller = x.shape[1:].num_elements() < idx.size
        return layer.activation(z), Recording([z], lambda g: _with_bias(
            layer, g[0], Unexpanded((x, g[0]), kernel_values) if smaller
            else kernel_values(x, g[0]).outer()))


def _scale_shift(layer, out_grad, x_hat, axes: list[int]):
    """gamma, beta per-example values: out = gamma * x_hat + beta over `axes`."""
    rank = x_hat.shape.rank
    summed = [a for a in range(1, rank) if a not in axes]
    out = []
    if layer.scale:
        out.append((layer.gamma, Stacked(tf.reduce_sum(out_grad * x_hat, summed))))
    if layer.center:
        out.append((layer.beta, Stacked(tf.reduce_sum(out_grad, summed))))
    return out


def _affine(layer, x_hat, axes):
    shape = [1] * x_hat.shape.rank
    for a in axes:
        shape[a] = x_hat.shape[a]
    out = x_hat
    if layer.scale:
        out = out * tf.reshape(layer.gamma, shape)
    if layer.center:
        out = out + tf.reshape(layer.beta, shape)
    return out


def global_moments(layer, x: tf.Tensor, sync) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean and variance of a BatchNormalization layer's input x over the global
    batch (sums over replicas); advances the layer's moving averages once, as
    one training forward would."""
    x = tf.cast(x, tf.float32)
    axis = (layer.axis if isinstance(layer.axis, int) else layer.axis[0]) % x.shape.rank
    axes = [a for a in range(x.shape.rank) if a != axis]
    n = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
    count, total, squares = sync.sum([n, tf.reduce_sum(x, axes),
                                      tf.reduce_sum(tf.square(x), axes)])
    mean = total / count
    var = tf.maximum(squares / count - tf.square(mean), 0.0)
    m = layer.momentum
    layer.moving_mean.assign(layer.moving_mean * m + mean * (1 - m))
    layer.moving_variance.assign(layer.moving_variance * m + var * (1 - m))
    return mean, var


def _normalized(layer, x, mean, var):
    """A BatchNormalization layer's output with the statistics (mean, var) held
    constant, and its Recording (gamma and beta per example)."""
    rank = x.shape.rank
    axis = (layer.axis if isinstance(layer.axis, int) else layer.axis[0]) % rank
    shape = [1] * rank
    shape[axis] = x.shape[axis]
    x_hat = ((tf.cast(x, tf.float32) - tf.reshape(mean, shape))
             * tf.reshape(tf.math.rsqrt(var + layer.epsilon), shape))
    out = _affine(layer, x_hat, [axis])
    return out, Recording([out], lambda g: _scale_shift(layer, g[0], x_hat, [axis]))


class BatchNormRule(Rule):
    """batch_stats semantics: normalize with the statistics of the global batch
    (summed over replicas), held constant; the moving averages advance once."""

    def forward(self, layer, x, sync):
        if not layer.trainable:
            return None
        # Held constant: the examples' losses stay independent.
        mean, var = map(tf.stop_gradient, global_moments(layer, x, sync))
        return _normalized(layer, x, mean, var)


class FrozenBatchNormRule(Rule):
    """Inference semantics (record_forward's `frozen`): normalize with the
    moving statistics; nothing changes."""

    def forward(self, layer, x, sync):
        return _normalized(layer, x, tf.cast(layer.moving_mean, tf.float32),
                           tf.cast(layer.moving_variance, tf.float32))


class LayerNormRule(Rule):
    def forward(self, layer, x, sync):
        axes = [a % x.shape.rank for a in
                (layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis])]
        weights = [tf.ones_like(v) if v is getattr(layer, "gamma", None) else tf.zeros_like(v)
                   for v in layer.trainable_variables]
        x_hat, _ = layer.stateless_call(weights, [], x)  # Keras' own normalization.
        out = _affine(layer, x_hat, axes)
        return out, Recording([out], lambda g: _scale_shift(layer, g[0], x_hat, axes))


class EmbeddingRule(Rule):
    """An embedding lookup is a Dense layer on one-hot inputs: the per-example
    table gradient is sum_t one_hot(id_t) (outer) dz_t (one-hot held whole:
    for vocabularies of moderate size)."""

    def forward(self, layer, x, sync):
        if not _plain(layer):
            return None
        ids = tf.cast(x, tf.int32)
        z = tf.gather(tf.convert_to_tensor(layer.embeddings), ids)
        one_hot = tf.one_hot(tf.reshape(ids, [ids.shape[0], -1]), layer.input_dim)
        return z, Recording([z], lambda g: [(layer.embeddings,
                                             Outer(one_hot, _positions(g[0])))])


_REGISTRY: dict[type, Rule] = {}


def register(layer_class: type, rule: Rule) -> None:
    """Use `rule` for layers of exactly `layer_class` (subclasses may differ)."""
    _REGISTRY[layer_class] = rule


register(keras.layers.Dense, DenseRule())
register(keras.layers.Conv2D, Conv2DRule())
register(keras.layers.BatchNormalization, BatchNormRule())
register(keras.layers.LayerNormalization, LayerNormRule())
register(keras.layers.Embedding, EmbeddingRule())


# -- the fallback: per-example vector-Jacobian products of one layer -----------------

_LOGGED: set[str] = set()


def _fallback(layer, x, training):
    if not tf.is_tensor(x):
        raise NotFactorable(f"layer {layer.name} takes {type(x).__name__} inputs")
    if layer.name not in _LOGGED:
        _LOGGED.add(layer.name)
        logging.info("per-example gradients: no layer rule for %s (%s); using "
                     "tf.vectorized_map for it", layer.name, type(layer).__name__)
    trainable = [tf.convert_to_tensor(v) for v in layer.trainable_variables]
    non_trainable = [tf.convert_to_tensor(v) for v in layer.non_trainable_variables]
    out = layer(x, training=training)
    kwargs = {"training": training} if keras_internals.call_has_training_arg(layer) else {}

    def per_example(grads):
        def one(args):
            xi, gi = args
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                yi, _ = layer.stateless_call(trainable, non_trainable, xi[None], **kwargs)
                dot = tf.reduce_sum(tf.cast(yi, tf.float32) * gi[None])
            return tape.gradient(dot, trainable)

        stacked = tf.vectorized_map(one, (x, grads[0]))
        return [(v, Stacked(g)) for v, g in zip(layer.trainable_variables, stacked)]

    return out, Recording([out], per_example)


class NotFactorable(ValueError):
    """The model cannot be run through the layer rules (e.g. not functional)."""


# -- the recording forward --------------------------------------------------------


def record_forward(model: keras.Model, x: tf.Tensor, sync, frozen: bool = False
                   ) -> tuple[tf.Tensor, list[Recording]]:
    """The model's training forward on x through the layer rules: the outputs
    and one Recording per call of a layer with trainable weights. `frozen`:
    the inference forward instead (layers without weights in inference mode,
    BatchNormalization on its moving statistics; nothing changes)."""
    recordings: list[Recording] = []

    def run(net, inputs):
        functional = keras_internals.functional_graph(net)
        if functional is None:
            raise NotFactorable(f"{net.name} is not a functional Keras model")
        return keras_internals.run_through_graph(functional, inputs, wrap)

    def wrap(op):
        if keras_internals.functional_graph(op) is not None and op.trainable_variables:
            return lambda *args, **kwargs: (
                run(op, args[0]) if len(args) == 1 and not set(kwargs) - {"training", "mask"}
                else _raise(op))
        if not getattr(op, "trainable_variables", None):
            return keras_internals.operation_fn(op, training=not frozen)

        def call(*args, **kwargs):
            if len(args) != 1 or set(kwargs) - {"training", "mask"}:
                _raise(op)
            rule = _REGISTRY.get(type(op))
            if frozen and isinstance(op, keras.layers.BatchNormalization):
                rule = FrozenBatchNormRule()
            result = rule.forward(op, args[0], sync) if rule else None
            if result is None:
                result = _fallback(op, args[0], not frozen)
            out, recording = result
            recordings.append(recording)
            return out

        return call

    out = run(model, x)
    return (out[0] if isinstance(out, (list, tuple)) else out), recordings


def unfactorable_reason(model: keras.Model) -> str | None:
    """Why `record_forward` cannot run the model (not functional all the way
    down, a layer with weights called on several tensors), or None."""
    functional = keras_internals.functional_graph(model)
    if functional is None:
        return f"{model.name} is not a functional Keras model"
    for node in _weighted_calls(functional):
        op = node.operation
        if len(node.input_tensors) != 1:
            return f"layer {op.name} is called with {len(node.input_tensors)} inputs"
        if keras_internals.functional_graph(op) is not None and (reason := unfactorable_reason(op)):
            return reason
    return None


def applied_at_positions(model: keras.Model) -> bool:
    """Whether a layer with weights of a factorable model is applied at several
    positions of an example (outputs with axes besides batch and features:
    convolutions, Dense on sequences, embeddings of several ids)."""
    for node in _weighted_calls(keras_internals.functional_graph(model)):
        if keras_internals.functional_graph(node.operation) is not None:
            if applied_at_positions(node.operation):
                return True
        elif any(len(t.shape) > 2 for t in node.outputs):
            return True
    return False


def _weighted_calls(functional: keras.Model):
    """The calls (graph nodes) of a functional model's layers with trainable
    weights, at its own level (a nested functional model is one call)."""
    for nodes in keras_internals.nodes_by_depth(functional).values():
        for node in nodes:
            op = node.operation
            if op and not node.is_input and getattr(op, "trainable_variables", None):
                yield node


def _raise(op):
    raise NotFactorable(f"layer {op.name} is called with several inputs")


def _joinable(values: PerExample | Unexpanded) -> Outer | Stacked:
    """`values` in a form whose `concat` joins another call's of the same layer."""
    values = expanded(values)
    return values.outer() if isinstance(values, Patches) else values


def per_example_values(variables: list, recordings: list[Recording],
                       grads: list[list[tf.Tensor]], expand: bool = True
                       ) -> list[PerExample | Unexpanded]:
    """Each variable's per-example values (a layer called several times adds
    up), expanded unless `expand` is False."""
    by_id: dict[int, PerExample | Unexpanded] = {}
    for recording, g in zip(recordings, grads):
        for v, values in recording.per_example(g):
            key = id(v)
            by_id[key] = _joinable(by_id[key]).concat(_joinable(values)) if key in by_id else values
    missing = [v.path for v in variables if id(v) not in by_id]
    if missing:
        raise NotFactorable(f"no per-example values for {', '.join(missing)}")
    return [by_id[id(v)] if not expand else expanded(by_id[id(v)]) for v in variables]
