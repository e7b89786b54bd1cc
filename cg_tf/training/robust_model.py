"""The robust train step: a keras.Model whose update aggregates gradients.

    model = RobustModel(net, Winsorized(c=4))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(dataset, epochs=10)     # or model.fit(x, y, batch_size=100)

`net` is any Keras model that maps a batch of inputs to logits (or, with a
compiled loss that takes them, to probabilities); the data are arrays or a
tf.data dataset yielding `(inputs, labels)` or the reader's dicts (`image`,
`label`, ...) in batches of one static size (the aggregators are defined over a
batch of B examples: batch with `drop_remainder=True`; `fit` on arrays drops
the last partial batch of each epoch and says so). The loss is the softmax
cross-entropy of integer labels and logits unless `compile(loss=...)` names
another that gives one value per example (cg_tf.robust.gradients.per_example_loss);
the optimizer is any Keras optimizer, except that rm3, ra3 and median_of_means
refuse one with momentum (SGD's or RMSprop's `momentum`, the `beta_1` of Adam
and its kin). Examples are weighed by the aggregator alone: sample and class
weights are refused. Under a `tf.distribute` strategy
scope each replica takes its part of the global batch; every aggregator
(cg_tf.robust.aggregators) yields a replica's part of the global update (its
share of the order statistics' coordinates, its examples' part of a mean), and
Keras' optimizer.apply sums the parts across replicas. Weight decay (L2,
coupled) is added to the aggregated gradient; for rm3/ra3 to each step's
gradient before the median, as in the authors' code
(for the per-example aggregators adding it before or after is the same).

`fit` and `evaluate` report the mean loss and accuracy over the epoch or the
dataset, against the dataset's labels (the noisy ones, on a noisy dataset); a
non-finite loss stops `fit` with NonFiniteLoss.
"""

import collections.abc
import dataclasses
import sys

import keras
import numpy as np
import tensorflow as tf

from cg_tf import keras_internals
from cg_tf.robust import aggregators
from cg_tf.robust.aggregators import Aggregator, Mean
from cg_tf.robust.collectives import Collectives, tally
from cg_tf.robust.gradients import (DEFAULT_BN_MODE, GradientSource, check_bn_mode, check_chunk,
                                   example_losses, per_example_loss)


# The prefix of the aggregator's state in the variables RobustModel saves.
STATE_KEY = "aggregator_state_"


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss (`loss`)."""

    def __init__(self, message: str, loss: float = float("nan")):
        super().__init__(message)
        self.loss = loss


WEIGHTS_REFUSED = ("the aggregator alone weighs the examples of a batch (a weighted "
                   "winsorized mean or median is another statistic); leave it out, or "
                   "repeat or drop examples in the data")


def features_and_labels(data) -> tuple:
    """(inputs, labels) of a batch given as the reader's dict or a tuple; a
    sample weight in the tuple is refused (WEIGHTS_REFUSED)."""
    if isinstance(data, dict):
        return data["image"], data["label"]
    x, y, weights = keras.utils.unpack_x_y_sample_weight(data)
    if weights is not None:
        raise ValueError(f"RobustModel: the data carry sample weights: {WEIGHTS_REFUSED}")
    return x, y


def check_net(net: keras.Model) -> None:
    """The per-example gradients take a model of one input (the images) and
    one output (the logits); a functional net shows its own (a subclassed one
    is taken on trust)."""
    for what in ("inputs", "outputs"):
        try:
            tensors = getattr(net, what, None)
        except ValueError:  # a Sequential model not built yet
            tensors = None
        if tensors and len(tensors) > 1:
            raise ValueError(f"RobustModel: net {net.name!r} has {len(tensors)} {what}; the "
                             "per-example gradients take a model of one input (the images) and "
                             "one output (the logits)")


def output_classes(net: keras.Model) -> int | None:
    """The number of logits of a functional net (None if it does not show it)."""
    try:
        return int(net.outputs[0].shape[-1])
    except (AttributeError, ValueError, TypeError, IndexError):
        return None


LABELS_OUT_OF_RANGE = "cg_tf: a label is out of range"  # the in-graph check's marker
# What an XLA-compiled step (which drops assertions) reports as its loss when a
# label of its batch is outside the net's classes: no cross-entropy is -inf.
LABELS_OUTSIDE_LOSS = float("-inf")
# Strategies whose steps XLA compiles whole whatever jit_compile says.
ALWAYS_COMPILED = (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)


class LabelsOutOfRange(ValueError):
    """A batch of a dataset held labels outside the net's classes."""


def checked_labels(y: tf.Tensor, classes: int) -> tf.Tensor:
    """`y`, once every label is in [0, classes) (an InvalidArgumentError
    carrying LABELS_OUT_OF_RANGE otherwise). XLA drops the check: a step
    compiled whole (jit_compile, or any step under TPUStrategy) counts the
    labels outside instead, zeroes that batch's gradients and reports its loss
    as LABELS_OUTSIDE_LOSS, which StopOnNonFiniteLoss refuses (no logs key of
    its own: Keras would then report the epoch's last batch instead of its
    mean); arrays are checked before fit starts in any case."""
    checks = [tf.debugging.assert_non_negative(y, message=LABELS_OUT_OF_RANGE),
              tf.debugging.assert_less(y, tf.cast(classes, y.dtype), message=LABELS_OUT_OF_RANGE)]
    with tf.control_dependencies(checks):
        return tf.identity(y)


def optimizer_momentum(optimizer) -> tuple[float, str]:
    """An optimizer's momentum and what it is called: SGD's and RMSprop's
    `momentum`, the first-moment decay `beta_1` of Adam and its kin (AdamW,
    Adamax, Nadam, Lion); (0.0, "") for one without."""
    for attr in ("momentum", "beta_1"):
        value = getattr(optimizer, attr, None)
        if isinstance(value, (int, float)) and value:
            return float(value), f"{type(optimizer).__name__}'s {attr}"
    return 0.0, ""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises NonFiniteLoss at the first batch whose loss is NaN or infinite
    (LabelsOutOfRange instead for the -inf an XLA-compiled step reports at a
    batch with labels outside the net's classes). fit runs it before every other callback,
    so none of them (a checkpoint, a measurement) sees that step: the one
    stop of both routes."""

    def on_train_batch_end(self, batch, logs=None):
        loss = float(np.mean((logs or {}).get("loss", 0.0)))
        if loss == LABELS_OUTSIDE_LOSS:
            raise LabelsOutOfRange(f"RobustModel.fit: batch {batch} of the epoch holds labels "
                                   "outside the net's classes")
        if not np.isfinite(loss):
            raise NonFiniteLoss(f"RobustModel.fit: the loss is {loss} at batch {batch} of the "
                                "epoch; stopped (the weights are no longer finite: lower the "
                                "learning rate, or check the data and the loss)", loss)


@dataclasses.dataclass(frozen=True)
class Names:
    """What the settings a check names are called where they were given: the
    command line's flags, or RobustModel's arguments (errors raised through
    the Python API speak Python)."""
    aggregator: str = "--aggregator"
    batch: str = "--batch_size"
    chunk: str = "--per_example_chunk"
    momentum: str = "--momentum"
    bn_mode: str = "--bn_mode"


FLAGS = Names()
ARGUMENTS = Names(aggregator="RobustModel's aggregator", batch="batch_size",
                  chunk="per_example_chunk", momentum="",  # "": the optimizer's own name
                  bn_mode="bn_mode")


def check_layout(aggregator: Aggregator, global_batch: int, replicas: int, momentum: float,
                 per_example_chunk: int | None, names: Names = FLAGS) -> None:
    """Raises ValueError, naming the settings as `names` calls them, for a
    batch layout or an optimizer's momentum the aggregator cannot run with:
    the one rule of the command lines and of fit."""
    try:
        aggregator.check(global_batch, replicas, names.batch)
        aggregator.check_momentum(momentum, names.momentum)
    except ValueError as e:
        raise ValueError(f"{names.aggregator}={aggregator.spec}: {e}") from None
    if aggregator.per_example:
        check_chunk(per_example_chunk, global_batch // replicas, names.chunk)


def robust_layers(aggregator: Aggregator, net: keras.Model, names: Names = FLAGS) -> list[bool]:
    """Per trainable variable of `net`, whether `aggregator` aggregates it
    robustly; a ValueError naming the aggregator as `names` calls it when its
    layer filter cannot tell (cg_tf.robust.layer_filter) or leaves no layer."""
    where = f"{names.aggregator}={aggregator.spec}"
    try:
        robust = aggregator.layers.robust(net)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not any(robust):
        raise ValueError(f"{where}: the layer filter {aggregator.layers.name!r} leaves no layer "
                         f"of {net.name} to aggregate robustly")
    return robust


def split_off(x, y, fraction: float) -> tuple[tuple, tuple]:
    """((x, y) of training, (x, y) of validation): the last `fraction` of the
    examples, before any shuffling, as Keras' validation_split takes them."""
    if not 0 < fraction < 1:
        raise ValueError(f"RobustModel.fit: validation_split must be in (0, 1), got {fraction}")
    cut = int(len(x) * (1 - fraction))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def array_batches(x, y, batch_size: int, shuffle: bool) -> tf.data.Dataset:
    """Arrays (inputs, labels) as batches of `batch_size`, reshuffled each epoch
    if `shuffle`; the examples that do not fill a last batch are left out of
    each epoch (different ones each epoch when shuffled), with a notice."""
    if y is None:
        raise ValueError("RobustModel.fit: arrays need their labels (y)")
    n = len(x)
    if len(y) != n:
        raise ValueError(f"RobustModel.fit: {n} inputs but {len(y)} labels")
    if not 1 <= batch_size <= n:
        raise ValueError(f"RobustModel.fit: batch_size must be between 1 and the {n} "
                         f"examples, got {batch_size}")
    left = n % batch_size
    if left:
        print(f"RobustModel.fit: {left} of the {n} examples do not fill a batch of "
              f"{batch_size} and are left out of each epoch"
              f"{' (other ones each epoch: the data are reshuffled)' if shuffle else ''}",
              file=sys.stderr)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(n, reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _reducible(logs: dict) -> dict:
    """A step's scalar outputs, shaped so that Keras 3 can combine them: under
    a multi-worker strategy its fit averages them along an axis 0, which a
    scalar lacks (a known incompatibility of Keras 3 with tf.distribute)."""
    strategy = tf.distribute.get_strategy()
    if (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and keras_internals.in_multi_worker_mode(strategy)):
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}
    return logs


@keras.saving.register_keras_serializable(package="cg_tf")
class RobustModel(keras.Model):
    """Wraps a network; `fit` and the CLI trainer run the robust update.

    `model.save("m.keras")` and `keras.models.load_model("m.keras")` round-trip
    it (the net, the aggregator and its state across steps, the optimizer and
    the compiled loss); `model.net` is the plain Keras model, to serve or save.

    per_example_chunk: per-example gradients computed this many at a time (a
                       memory bound; it must divide the per-replica batch)
    bn_mode:           "batch_stats" or "exact" (cg_tf.robust.gradients)
    weight_decay:      L2 coefficient added to the aggregated gradient
    """

    def __init__(self, net: keras.Model, aggregator: Aggregator = Mean(), *,
                 per_example_chunk: int | None = None, bn_mode: str = DEFAULT_BN_MODE,
                 weight_decay: float = 0.0, names: Names = ARGUMENTS, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be an Aggregator (cg_tf.robust.aggregators), "
                            f"got {aggregator!r}; parse a 'name:value' string with "
                            "aggregators.parse")
        # What its errors call the settings: its arguments, or (the trainer's) flags.
        self.names = names
        check_chunk(per_example_chunk, name=names.chunk)
        check_bn_mode(bn_mode, names.bn_mode)
        check_net(net)
        robust_layers(aggregator, net, names)
        self._checked_layout = None  # what check() last passed
        self.net = net
        self.classes = output_classes(net)  # None: the net does not show it
        self.aggregator = aggregator
        self.per_example_chunk = per_example_chunk
        self.bn_mode = bn_mode
        self.weight_decay = weight_decay
        self.source = GradientSource(net, bn_mode)
        # State kept across steps (rm3/ra3's two stored gradients), checkpointed
        # with the model.
        self.aggregator_state = aggregator.build(self, net.trainable_variables)
        self.built = net.built  # no weights of its own: built when the net is
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")

    def get_config(self) -> dict:
        return {"net": keras.saving.serialize_keras_object(self.net),
                "aggregator": self.aggregator.to_json(),
                "per_example_chunk": self.per_example_chunk, "bn_mode": self.bn_mode,
                "weight_decay": self.weight_decay, "name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> "RobustModel":
        config = dict(config)
        net = keras.saving.deserialize_keras_object(config.pop("net"))
        return cls(net, aggregators.from_json(config.pop("aggregator")), **config)

    def compile_from_config(self, config: dict) -> None:
        """What load_model calls to compile as the saved model was (Keras skips
        a model whose compile is its own unless it defines this)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        self.optimizer.build(self.net.trainable_variables)  # its saved slots load next

    def _state_variables(self) -> list:
        """The aggregator's state across steps (rm3/ra3's stored gradients)."""
        return list(self.aggregator_state.variables) if self.aggregator_state else []

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for i, v in enumerate(self._state_variables()):
            store[f"{STATE_KEY}{i}"] = v.numpy()

    def load_own_variables(self, store):
        super().load_own_variables({k: store[k] for k in store.keys()
                                    if not k.startswith(STATE_KEY)})
        for i, v in enumerate(self._state_variables()):
            v.assign(store[f"{STATE_KEY}{i}"])

    def call(self, x, training=False):
        if isinstance(x, dict):  # the reader's batch
            x = x["image"]
        return self.net(x, training=training)

    def check(self, global_batch: int, replicas: int) -> None:
        """Raises ValueError for a batch layout, or a momentum of the compiled
        optimizer, this model cannot train with (the one rule of both routes:
        the trainer calls it before it writes anything, fit before it trains;
        a layout it passed is not checked again)."""
        key = (global_batch, replicas, self.optimizer)
        if self._checked_layout is not None and self._checked_layout[:2] == key[:2] \
                and self._checked_layout[2] is self.optimizer:
            return
        momentum, name = optimizer_momentum(self.optimizer)
        check_layout(self.aggregator, global_batch, replicas, momentum, self.per_example_chunk,
                     dataclasses.replace(self.names, momentum=self.names.momentum or name))
        self._checked_layout = key

    def update_part(self, x, y, sync: Collectives):
        """This replica's part of the update direction (the parts of all
        replicas sum to it), and this replica's tally [sum of losses, number
        correct]."""
        parts, counts = self.aggregator.gradient(self.source, x, y, sync,
                                                 self.per_example_chunk)
        if self.weight_decay:
            decay = self.weight_decay / sync.replicas
            parts = [g + decay * tf.convert_to_tensor(v)
                     for g, v in zip(parts, self.source.variables)]
        return self.aggregator.finish(parts, self.aggregator_state, sync), counts

    def aggregated_gradient(self, x, y, sync: Collectives | None = None):
        """The global update direction (the same on every replica: the parts
        all-reduced), and this replica's tally [sum of losses, number correct]."""
        sync = sync or Collectives.current()
        parts, counts = self.update_part(x, y, sync)
        return sync.sum(parts), counts

    @property
    def metrics(self):
        """What fit and evaluate report, per epoch: the mean loss and accuracy,
        then the metrics given to compile (Keras' own loss tracker left out:
        the train step tracks the loss it minimizes)."""
        ours = [self.loss_tracker, self.accuracy_tracker]
        return ours + [m for m in super().metrics
                       if all(m is not o for o in ours) and m.name != "loss"]

    def _compiled_metrics(self) -> list:
        return self.metrics[2:]

    def _compiled_results(self) -> dict:
        out = {}
        for m in self._compiled_metrics():
            result = m.result()
            out.update(result if isinstance(result, dict) else {m.name: result})
        return out

    def _track(self, loss_sum, correct, n):
        self.loss_tracker.update_state(loss_sum / n, sample_weight=n)
        self.accuracy_tracker.update_state(correct / n, sample_weight=n)

    def train_step(self, data):
        """One robust update; returns the loss and accuracy of the global batch."""
        x, y = features_and_labels(data)
        outside = None
        compiled = self.jit_compile or isinstance(tf.distribute.get_strategy(), ALWAYS_COMPILED)
        if self.source.loss is example_losses and self.classes is not None:
            if compiled:
                # XLA drops assertions: counted here, refused after the step
                outside = tf.reduce_sum(tf.cast((y < 0) | (y >= self.classes), tf.float32))
            else:
                y = checked_labels(y, self.classes)
        sync = Collectives.current(compiled)
        with self.source.recording() as forwards:  # the outputs the gradients came from
            grads, counts = self.update_part(x, y, sync)
        if self._compiled_metrics():
            self.compute_metrics(x, *(tf.concat(part, 0) for part in zip(*forwards)), None)
        totals = tf.unstack(sync.sum([counts if outside is None
                                      else tf.concat([counts, outside[None]], 0)])[0])
        total_loss, total_correct = totals[:2]
        if outside is not None:  # a bad label: zero gradients, and the loss says why
            grads = [tf.where(totals[2] > 0, tf.zeros_like(g), g) for g in grads]
            total_loss = tf.where(totals[2] > 0, LABELS_OUTSIDE_LOSS, total_loss)
        # optimizer.apply sums the replicas' parts into the update: the last
        # collective of the chain, and the only one of the update's size.
        grads = sync.after(grads)
        # The updates go in any order, each as soon as it is ready: every
        # gradient above is computed from the tensors that the forward read
        # (layer_rules), and automatic control dependencies make each
        # variable's update wait for the reads of that variable.
        self.optimizer.apply(grads, self.net.trainable_variables)
        n = float(x.shape[0] * sync.replicas)
        # Every replica holds the global values: its share of the trackers' sums
        # is the same, so their means are right.
        self._track(total_loss, total_correct, n)
        return _reducible({"loss": total_loss / n, "accuracy": total_correct / n,
                           **self._compiled_results()})

    def test_step(self, data):
        x, y = features_and_labels(data)
        logits = self(x, training=False)
        loss, correct = tf.unstack(tally(y, self.source.loss(y, logits), logits))
        self._track(loss, correct, tf.cast(tf.shape(x)[0], tf.float32))
        if self._compiled_metrics():
            self.compute_metrics(x, y, logits, None)
        return _reducible({"loss": self.loss_tracker.result(),
                           "accuracy": self.accuracy_tracker.result(),
                           **self._compiled_results()})

    def predict_step(self, data):
        return super().predict_step(data["image"] if isinstance(data, dict) else data)

    def compile(self, optimizer="sgd", loss=None, **kwargs):
        """keras.Model.compile with any optimizer, a per-example loss (default:
        the softmax cross-entropy of integer labels and logits) and any metrics
        (of the outputs the train step's gradients came from); fit and evaluate
        report the loss, the accuracy and those metrics."""
        for refused in ("weighted_metrics", "loss_weights"):
            if kwargs.get(refused) is not None:
                raise ValueError(f"RobustModel.compile: {refused} is refused: "
                                 f"{WEIGHTS_REFUSED}")
        self.source.loss = per_example_loss(loss)
        # Keras keeps the loss in the compile config that save() writes.
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def fit(self, x=None, y=None, batch_size=None, epochs=1, *, shuffle=True,
            validation_split=0.0, validation_data=None, callbacks=None, sample_weight=None,
            class_weight=None, **kwargs):
        """keras.Model.fit on a tf.data dataset of static batches or on arrays
        (batched here, the last partial batch left out), after the checks the
        command line makes: the batch layout, the optimizer's momentum, the
        labels. Sample and class weights are refused; a non-finite loss stops it."""
        for name, value in (("sample_weight", sample_weight), ("class_weight", class_weight)):
            if value is not None:
                raise ValueError(f"RobustModel.fit: {name} is refused: {WEIGHTS_REFUSED}")
        if self.optimizer is None:
            raise ValueError("RobustModel.fit: compile the model first")
        if isinstance(x, (keras.utils.PyDataset, collections.abc.Iterator)):
            raise ValueError(f"RobustModel.fit: x is a {type(x).__name__}; fit takes arrays (x "
                             "and y) or a tf.data.Dataset of (inputs, labels) batches: wrap it "
                             "with tf.data.Dataset.from_generator and batch it with "
                             "drop_remainder=True")
        if not hasattr(x, "element_spec"):  # arrays (a distributed dataset is checked by its maker)
            if isinstance(x, (list, tuple, dict)):
                raise ValueError(f"RobustModel.fit: x is a {type(x).__name__} of {len(x)} "
                                 "inputs; the per-example gradients take a model of one input "
                                 "(one array of examples)")
            if validation_split and validation_data is None:
                (x, y), validation_data = split_off(x, y, validation_split)
            self._check_label_values(y)
            x = array_batches(x, y, batch_size or 32, shuffle)
        if isinstance(x, tf.data.Dataset):
            inputs, labels = features_and_labels(x.element_spec)
            if labels is None:
                raise ValueError("RobustModel.fit: the dataset gives no labels; it must give "
                                 "(inputs, labels) batches")
            if not isinstance(inputs, tf.TensorSpec):
                raise ValueError(f"RobustModel.fit: the dataset's inputs are a "
                                 f"{type(inputs).__name__}, not one tensor; the per-example "
                                 "gradients take a model of one input")
            if inputs.shape[0] is None:
                raise ValueError("RobustModel.fit: the dataset's batch size is not static; "
                                 "batch it with drop_remainder=True (the aggregators are "
                                 "defined over batches of one size)")
            self.check(inputs.shape[0], self.distribute_strategy.num_replicas_in_sync)
            self._check_labels(labels)
        if not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.net.trainable_variables)
        try:
            return super().fit(x, None, None, epochs, shuffle=False,
                               validation_data=validation_data,
                               callbacks=[StopOnNonFiniteLoss(), *(callbacks or [])], **kwargs)
        except (tf.errors.InvalidArgumentError, LabelsOutOfRange) as e:
            if not isinstance(e, LabelsOutOfRange) and LABELS_OUT_OF_RANGE not in str(e):
                raise
            raise ValueError(f"RobustModel.fit: a batch holds a label outside 0 .. "
                             f"{self.classes - 1}, the classes of {self.net.name}") from None

    def _check_label_values(self, y) -> None:
        """Array labels of the default loss are class numbers of the net."""
        if self.source.loss is not example_losses or self.classes is None or y is None:
            return
        y = np.asarray(y)
        if y.size and np.issubdtype(y.dtype, np.integer) and (
                y.min() < 0 or y.max() >= self.classes):
            bad = y.min() if y.min() < 0 else y.max()
            raise ValueError(f"RobustModel.fit: y holds the label {bad}, outside 0 .. "
                             f"{self.classes - 1}, the classes of {self.net.name}")

    def save(self, filepath, *args, **kwargs):
        if str(filepath).endswith((".h5", ".hdf5")):
            raise ValueError(f"RobustModel.save: {filepath}: the legacy HDF5 format cannot "
                             "hold a RobustModel (it would not load); save to a .keras file")
        return super().save(filepath, *args, **kwargs)

    def _check_labels(self, spec) -> None:
        """The default loss takes integer class labels, one per example."""
        if self.source.loss is not example_losses:
            return
        if not spec.dtype.is_integer or spec.shape.rank not in (1, 2) or (
                spec.shape.rank == 2 and spec.shape[1] != 1):
            raise ValueError(f"RobustModel.fit: the labels are {spec.dtype.name} of shape "
                             f"{spec.shape.as_list()}; the default loss takes integer class "
                             "labels, one per example (for one-hot or soft labels compile "
                             "with loss=keras.losses.CategoricalCrossentropy(from_logits=True))")

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras builds a model under a strategy on a batch averaged over the
        replicas, which fails for a batch of dicts under MultiWorkerMirrored; a
        built net and an optimizer that fit built need nothing of it."""
        if not self.net.built:
            super()._maybe_symbolic_build(iterator, data_batch)
