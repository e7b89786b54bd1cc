"""The robust train step: a keras.Model whose update aggregates gradients.

    model = RobustModel(net, Winsorized(c=4))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(dataset, epochs=10)

`net` is any Keras model that maps a batch of inputs to logits; the dataset
yields `(inputs, integer labels)` or the reader's dicts (`image`, `label`, ...)
in batches of one static size (the aggregators are defined over a batch of B
examples: batch with `drop_remainder=True`). Under a `tf.distribute` strategy
scope each replica takes its part of the global batch; every aggregator
(cg_tf.robust.aggregators) yields the same global value on every replica, which
is divided by the replica count because Keras' optimizer.apply sums across
replicas. Weight decay (L2, coupled) is added to the aggregated gradient; for
rm3/ra3 to each step's gradient before the median, as in the authors' code
(for the per-example aggregators adding it before or after is the same).

`fit` and `evaluate` report the mean loss (softmax cross-entropy of the
logits) and accuracy over the epoch or the dataset, against the dataset's
labels (the noisy ones, on a noisy dataset).
"""

import keras
import tensorflow as tf

from cg_tf import keras_internals
from cg_tf.robust.aggregators import Aggregator, Mean
from cg_tf.robust.collectives import Collectives, tally
from cg_tf.robust.gradients import DEFAULT_BN_MODE, GradientSource, check_chunk, example_losses


def features_and_labels(data) -> tuple:
    """(inputs, labels) of a batch given as the reader's dict or a tuple."""
    if isinstance(data, dict):
        return data["image"], data["label"]
    return data[0], data[1]


def check_layout(aggregator: Aggregator, global_batch: int, replicas: int, momentum: float,
                 per_example_chunk: int | None, flag: str = "--aggregator") -> None:
    """Raises ValueError, naming `flag` (the one that chose the aggregator), for
    a batch layout or optimizer the aggregator cannot run with."""
    try:
        aggregator.check(global_batch, replicas, momentum)
    except ValueError as e:
        raise ValueError(f"{flag}={aggregator.spec}: {e}") from None
    if aggregator.per_example:
        check_chunk(per_example_chunk, global_batch // replicas)


def _reducible(logs: dict) -> dict:
    """A step's scalar outputs, shaped so that Keras 3 can combine them: under
    a multi-worker strategy its fit averages them along an axis 0, which a
    scalar lacks (a known incompatibility of Keras 3 with tf.distribute)."""
    strategy = tf.distribute.get_strategy()
    if (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and keras_internals.in_multi_worker_mode(strategy)):
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}
    return logs


def all_before_any(updates: list[tf.Tensor]) -> list[tf.Tensor]:
    """The updates, each made to wait for all of them: no variable changes
    while the update of another is still being computed. Without it the
    optimizer may apply a variable's update as soon as that one is ready;
    tools.drift saw a hidden layer's winsorized aggregate come out of its step
    1% off its NumPy value in about half of its processes on 2 loaded cores,
    when the output layer's update (the mean) was ready first."""
    with tf.control_dependencies(updates):
        return [tf.identity(u) for u in updates]


class RobustModel(keras.Model):
    """Wraps a network; `fit` and the CLI trainer run the robust update.

    per_example_chunk: per-example gradients computed this many at a time (a
                       memory bound; it must divide the per-replica batch)
    bn_mode:           "batch_stats" or "exact" (cg_tf.robust.gradients)
    weight_decay:      L2 coefficient added to the aggregated gradient
    """

    def __init__(self, net: keras.Model, aggregator: Aggregator = Mean(), *,
                 per_example_chunk: int | None = None, bn_mode: str = DEFAULT_BN_MODE,
                 weight_decay: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be an Aggregator (cg_tf.robust.aggregators), "
                            f"got {aggregator!r}; parse a 'name:value' string with "
                            "aggregators.parse")
        check_chunk(per_example_chunk)
        if not any(aggregator.layers.robust(net.trainable_variables)):
            raise ValueError(f"{aggregator.spec}: the layer filter {aggregator.layers.name!r} "
                             f"leaves no layer of {net.name} to aggregate robustly")
        self.net = net
        self.aggregator = aggregator
        self.per_example_chunk = per_example_chunk
        self.bn_mode = bn_mode
        self.weight_decay = weight_decay
        self.source = GradientSource(net, bn_mode)
        # State kept across steps (rm3/ra3's two stored gradients), checkpointed
        # with the model.
        self.aggregator_state = aggregator.build(self, net.trainable_variables)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")

    def call(self, x, training=False):
        if isinstance(x, dict):  # the reader's batch
            x = x["image"]
        return self.net(x, training=training)

    def check(self, global_batch: int, replicas: int, momentum: float = 0.0) -> None:
        """Raises ValueError, naming the flag, for a batch layout this model
        cannot train with."""
        check_layout(self.aggregator, global_batch, replicas, momentum, self.per_example_chunk)

    def aggregated_gradient(self, x, y, sync: Collectives | None = None):
        """The global update direction (the same on every replica), and this
        replica's tally [sum of losses, number correct]."""
        sync = sync or Collectives.current()
        grads, counts = self.aggregator.gradient(self.source, x, y, sync,
                                                 self.per_example_chunk)
        if self.weight_decay:
            grads = [g + self.weight_decay * tf.convert_to_tensor(v)
                     for g, v in zip(grads, self.source.variables)]
        return self.aggregator.finish(grads, self.aggregator_state), counts

    @property
    def metrics(self):
        """What fit and evaluate report, per epoch: the mean loss and accuracy."""
        return [self.loss_tracker, self.accuracy_tracker]

    def _track(self, loss_sum, correct, n):
        self.loss_tracker.update_state(loss_sum / n, sample_weight=n)
        self.accuracy_tracker.update_state(correct / n, sample_weight=n)

    def train_step(self, data):
        """One robust update; returns the loss and accuracy of the global batch."""
        x, y = features_and_labels(data)
        sync = Collectives.current()
        grads, counts = self.aggregated_gradient(x, y, sync)
        total_loss, total_correct = tf.unstack(sync.sum([counts])[0])
        # optimizer.apply sums over replicas: last in the chain of collectives.
        grads = sync.after([g / sync.replicas for g in grads])
        self.optimizer.apply(all_before_any(grads), self.net.trainable_variables)
        n = float(x.shape[0] * sync.replicas)
        # Every replica holds the global values: its share of the trackers' sums
        # is the same, so their means are right.
        self._track(total_loss, total_correct, n)
        return _reducible({"loss": total_loss / n, "accuracy": total_correct / n})

    def test_step(self, data):
        x, y = features_and_labels(data)
        logits = self(x, training=False)
        loss, correct = tf.unstack(tally(y, example_losses(y, logits), logits))
        self._track(loss, correct, tf.cast(tf.shape(x)[0], tf.float32))
        return _reducible({m.name: m.result() for m in self.metrics})

    def predict_step(self, data):
        return super().predict_step(data["image"] if isinstance(data, dict) else data)

    def compile(self, optimizer="sgd", **kwargs):
        """keras.Model.compile with the optimizer (and jit_compile,
        steps_per_execution): the loss is the softmax cross-entropy of the
        logits the train step minimizes, the metrics its loss and accuracy."""
        for fixed in ("loss", "metrics", "weighted_metrics", "loss_weights"):
            if kwargs.get(fixed) is not None:
                raise ValueError(f"RobustModel.compile: {fixed} is fixed (the softmax "
                                 "cross-entropy of the logits, and the accuracy)")
        super().compile(optimizer=optimizer, **kwargs)

    def fit(self, x=None, *args, **kwargs):
        """keras.Model.fit, after checking that a tf.data batch size is static
        and that the aggregator can run with it."""
        if isinstance(x, tf.data.Dataset):
            inputs = features_and_labels(x.element_spec)[0]
            batch = inputs.shape[0]
            if batch is None:
                raise ValueError("RobustModel.fit: the dataset's batch size is not static; "
                                 "batch it with drop_remainder=True (the aggregators are "
                                 "defined over batches of one size)")
            replicas = self.distribute_strategy.num_replicas_in_sync
            momentum = float(getattr(self.optimizer, "momentum", 0.0) or 0.0)
            self.check(batch, replicas, momentum)
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.net.trainable_variables)
        return super().fit(x, *args, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras builds a model under a strategy on a batch averaged over the
        replicas, which fails for a batch of dicts under MultiWorkerMirrored; a
        built net and an optimizer that fit built need nothing of it."""
        if not self.net.built:
            super()._maybe_symbolic_build(iterator, data_batch)
