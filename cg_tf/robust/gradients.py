"""Gradient sources for the robust train step: per example, per group, per step.

Per-example gradients of a functional model come factored by layer
(`layer_rules`): one batched forward and one backward, then a rule per layer.
A model the rules cannot run (not functional, a layer with several inputs)
runs statelessly inside `tf.vectorized_map`, one example at a time, as does
`--bn_mode=exact`. BatchNormalization cannot normalize one example alone,
so two semantics are offered:

  batch_stats (default)  each example is normalized with the statistics of the
                         whole global batch (synchronized across replicas), held
                         constant: every example sees the same normalization the
                         batch forward uses, but gradients do not flow through
                         the statistics. The moving averages are updated once.
  exact                  per-example gradients are rows of the jacobian of the
                         per-example losses of the ordinary batched forward, so
                         they include the coupling through the batch statistics
                         and sum exactly to the batch gradient (B backward passes
                         over the replica's batch: slow; statistics per replica).

Models without BatchNormalization get the same gradients either way.
"""

import contextlib
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import logging

from cg_tf import keras_internals
from cg_tf.robust import layer_rules
from cg_tf.robust.layer_rules import PerExample, Stacked

# How per-example gradients treat BatchNorm (GradientSource); the first is the default.
BN_MODES = ("batch_stats", "exact")
DEFAULT_BN_MODE = BN_MODES[0]


def example_losses(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example softmax cross-entropy of integer labels and logits (float32):
    the loss of the command lines and of RobustModel unless compiled with another."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32))


def per_example_loss(loss) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A function (labels, outputs) -> one float32 loss per example, from what
    Keras' compile takes as a loss: None (`example_losses`), a keras.losses.Loss
    (its unreduced values: the aggregator is the reduction), a function of
    (y_true, y_pred), or a name keras.losses.get knows."""
    if loss is None:
        return example_losses
    fn = keras.losses.get(loss)
    if fn is None:
        raise ValueError(f"unknown loss {loss!r}")
    call = fn.call if isinstance(fn, keras.losses.Loss) else fn

    def losses(labels, outputs):
        values = tf.cast(call(labels, tf.cast(outputs, tf.float32)), tf.float32)
        if values.shape.rank != 1:
            raise ValueError(f"the loss {getattr(fn, 'name', fn)!r} gives values of shape "
                             f"{values.shape} for a batch; it must give one per example")
        return values

    return losses


def check_bn_mode(bn_mode: str, name: str = "--bn_mode") -> None:
    """Raises ValueError unless `bn_mode` (called `name` where it was given) is
    one of BN_MODES."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"{name} must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")


def check_chunk(chunk: int | None, per_replica_batch: int | None = None,
                name: str = "--per_example_chunk") -> None:
    """Raises ValueError unless `chunk` (called `name` where it was given) is
    unset or positive and, given the per-replica batch, divides it (a chunk at
    least as large as the batch is the whole batch)."""
    if chunk is None:
        return
    if chunk < 1:
        raise ValueError(f"{name} must be positive, got {chunk}")
    if per_replica_batch is not None and per_replica_batch % chunk_size(chunk, per_replica_batch):
        raise ValueError(f"{name}={chunk} does not divide the per-replica batch "
                         f"of {per_replica_batch}")


def chunk_size(chunk: int | None, batch: int) -> int:
    """Examples per chunk of per-example gradients: `chunk`, or the whole batch
    when it is unset or larger."""
    return min(chunk or batch, batch)


def _bn_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [l for l in keras_internals.flatten_layers(model)
            if isinstance(l, keras.layers.BatchNormalization)]


class GradientSource:
    """Computes gradients of one model for the robust train step."""

    def __init__(self, model: keras.Model, bn_mode: str = DEFAULT_BN_MODE,
                 loss: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] = example_losses):
        check_bn_mode(bn_mode)
        self.model = model
        self.bn_mode = bn_mode
        self.loss = loss  # labels, outputs -> per-example losses (per_example_loss)
        self._recorded: list | None = None  # by recording()
        self.bn = _bn_layers(model)
        self._bn_probe = None
        if self.bn and bn_mode == "batch_stats":
            try:  # A functional model exposes the BN layers' inputs.
                self._bn_probe = keras.Model(model.inputs, [l.input for l in self.bn])
            except (AttributeError, ValueError, TypeError) as e:
                raise ValueError("--bn_mode=batch_stats needs a functional Keras model; "
                                 "use --bn_mode=exact") from e
        unruled = layer_rules.unfactorable_reason(model)
        # The layer rules run the model (the probe's frozen forward uses them then).
        self.ruled = unruled is None
        reason = "--bn_mode=exact" if self.bn and bn_mode == "exact" else unruled
        if reason:
            logging.info("per-example gradients by tf.vectorized_map: %s", reason)
        self.factored = reason is None
        self.positions = self.factored and layer_rules.applied_at_positions(model)

    @contextlib.contextmanager
    def recording(self):
        """Collects, as a list of (labels, outputs), what every batched forward
        in the block computed (for the train step's metrics)."""
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None

    def _record(self, y: tf.Tensor, logits: tf.Tensor) -> None:
        if self._recorded is not None:
            self._recorded.append((y, logits))

    @property
    def variables(self) -> list:
        return self.model.trainable_variables

    # -- ordinary backward passes ---------------------------------------------

    def summed(self, x: tf.Tensor, y: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """Gradient of the summed loss over x, per-example losses, and logits."""
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            losses = self.loss(y, logits)
            total = tf.reduce_sum(losses)
        self._record(y, logits)
        return tape.gradient(total, self.variables), losses, logits

    # -- per-example gradients --------------------------------------------------

    def _batch_bn_stats(self, x: tf.Tensor, sync) -> list[tuple[tf.Tensor, tf.Tensor]]:
        """Mean and variance of each BN layer's input over the global batch, the
        layers before it normalizing with theirs (as one training forward of
        the global batch would); advances each layer's moving averages once.

        A forward of the inputs per BN layer, in order, in inference mode with
        the earlier layers' statistics put in place of their moving averages
        (a training-mode forward would normalize with each replica's own
        statistics and advance the moving averages a second time)."""
        probe = self._bn_probe
        trainable = [tf.convert_to_tensor(v) for v in probe.trainable_variables]
        overrides, stats = {}, []
        for k, layer in enumerate(self.bn):
            non_trainable = [overrides.get(id(v), tf.convert_to_tensor(v))
                             for v in probe.non_trainable_variables]
            inputs, _ = probe.stateless_call(trainable, non_trainable, x, training=False)
            inp = inputs[k] if len(self.bn) > 1 else inputs
            mean, var = layer_rules.global_moments(layer, inp, sync)
            overrides[id(layer.moving_mean)], overrides[id(layer.moving_variance)] = mean, var
            stats.append((mean, var))
        return stats

    def _per_example_fn(self, x: tf.Tensor, sync, frozen_bn: bool = False):
        """A function of a chunk (x, y) -> per-example gradients [m, *shape] per
        variable, losses [m], logits [m, C]; BN statistics are those of x (all
        replicas) and the moving averages advance once, here; with `frozen_bn`
        BN uses its moving averages and nothing changes (for measurements)."""
        overrides = {}
        if self.bn and not frozen_bn:
            for layer, (mean, var) in zip(self.bn, self._batch_bn_stats(x, sync)):
                overrides[id(layer.moving_mean)] = mean
                overrides[id(layer.moving_variance)] = var
        trainable = [tf.convert_to_tensor(v) for v in self.model.trainable_variables]
        non_trainable = [overrides.get(id(v), tf.convert_to_tensor(v))
                         for v in self.model.non_trainable_variables]

        def one(example):
            xi, yi = example
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                # Inference mode: BN uses the (overridden) statistics, no updates.
                logits, _ = self.model.stateless_call(trainable, non_trainable, xi[None],
                                                      training=False)
                loss = self.loss(yi[None], logits)[0]
            return tape.gradient(loss, trainable), loss, logits[0]

        return lambda xc, yc: tf.vectorized_map(one, (xc, yc))

    def _factored_frozen(self, x: tf.Tensor, y: tf.Tensor):
        """Per-example gradients [m, *shape] per variable, losses and logits of a
        chunk by the layer rules, with BatchNorm frozen (the inference forward)."""
        values, losses, logits = self.per_example(x, y, None, None, frozen_bn=True)
        return ([tf.reshape(p.stacked(), [x.shape[0], *v.shape])
                 for p, v in zip(values, self.variables)], losses, tf.cast(logits, tf.float32))

    def fold_per_example(self, x: tf.Tensor, y: tf.Tensor, chunk: int | None, sync, init, step,
                         frozen_bn: bool = False):
        """Folds `step(state, i, labels, grads, losses, logits)` over the chunks
        of m examples of the replica's batch (i = chunk index; grads are
        per-example [m, *shape] per variable), starting from `init`.

        Chunks run in a tf.while_loop, so memory holds one chunk's per-example
        gradients and the graph holds one copy of the computation. `sync`
        (collectives.Collectives) sums BatchNorm statistics over replicas.
        With `frozen_bn`, BatchNorm uses its moving averages (inference
        statistics) and no state changes: gradients for measurements.
        """
        b = x.shape[0]
        check_chunk(chunk, b)
        m = chunk_size(chunk, b)
        n = b // m
        if self.bn and self.bn_mode == "exact" and not frozen_bn:
            state = init
            for i, (grads, losses, logits) in enumerate(self._jacobian_chunks(x, y, m)):
                state = step(state, i, y[i * m:(i + 1) * m], grads, losses, logits)
            return state
        if frozen_bn and self.ruled:  # the layer rules: no vectorized backward of a conv
            per_example = self._factored_frozen
        else:
            per_example = self._per_example_fn(x, sync, frozen_bn)
        if n == 1:
            return step(init, 0, y, *per_example(x, y))
        xs = tf.reshape(x, [n, m, *x.shape[1:]])
        ys = tf.reshape(y, [n, m, *y.shape[1:]])

        def body(i, state):
            return i + 1, step(state, i, ys[i], *per_example(xs[i], ys[i]))

        return tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), init))[1]

    def per_example(self, x: tf.Tensor, y: tf.Tensor, chunk: int | None, sync,
                    frozen_bn: bool = False, expand: bool = True
                    ) -> tuple[list[PerExample], tf.Tensor, tf.Tensor]:
        """Per-example values of every variable for the replica's batch, the
        per-example losses and the logits. Factored by layer where the model
        allows (the values a rule leaves `Unexpanded` stay so unless `expand`);
        otherwise per-example gradients in chunks of `chunk` examples.
        With `frozen_bn`, BatchNorm uses its moving averages, no state changes
        and the forward is not recorded (for measurements)."""
        by_rules = self.ruled if frozen_bn else self.factored  # frozen BN: any rule fits
        record = (lambda logits: None) if frozen_bn else (lambda logits: self._record(y, logits))
        if by_rules:
            with tf.GradientTape() as tape:
                logits, recordings = layer_rules.record_forward(
                    self.model, x, None if frozen_bn else sync, frozen=frozen_bn)
                losses = self.loss(y, logits)
                total = tf.reduce_sum(losses)
            grads = tape.gradient(total, [r.watched for r in recordings])
            record(logits)
            return (layer_rules.per_example_values(self.variables, recordings, grads, expand),
                    losses, logits)
        n = x.shape[0] // chunk_size(chunk, x.shape[0])

        def step(state, i, labels, grads, losses, logits):
            arrays, losses_array, logits_array = state
            return ([a.write(i, g) for a, g in zip(arrays, grads)], losses_array.write(i, losses),
                    logits_array.write(i, logits))

        init = ([tf.TensorArray(v.dtype, size=n) for v in self.variables],
                tf.TensorArray(tf.float32, size=n), tf.TensorArray(tf.float32, size=n))
        arrays, losses, logits = self.fold_per_example(x, y, chunk, sync, init, step, frozen_bn)
        logits = logits.concat()
        record(logits)
        return ([Stacked(tf.reshape(a.concat(), [x.shape[0], *v.shape]))
                 for a, v in zip(arrays, self.variables)], losses.concat(), logits)

    def _jacobian_chunks(self, x, y, chunk):
        with tf.GradientTape(persistent=True) as tape:
            logits = self.model(x, training=True)
            losses = self.loss(y, logits)
            parts = [(losses[s:s + chunk], logits[s:s + chunk])
                     for s in range(0, x.shape[0], chunk)]
        for part, part_logits in parts:
            grads = tape.jacobian(part, self.variables, experimental_use_pfor=True)
            yield ([tf.zeros((part.shape[0], *v.shape), v.dtype) if g is None else g
                    for g, v in zip(grads, self.variables)], part, part_logits)
        del tape

