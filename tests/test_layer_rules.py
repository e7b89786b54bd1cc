"""Per-example gradients factored by layer against tf.vectorized_map of the whole
model; every aggregator under XLA and with a replica id known only at run time."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_aggregator, two_replicas

from cg_tf.robust.aggregators import REGISTRY
from cg_tf.robust.collectives import Collectives
from cg_tf.robust.gradients import GradientSource
from cg_tf.robust.layer_rules import Stacked
from cg_tf.training import models
from cg_tf.training.robust_model import RobustModel

C = 3


class Scale(keras.layers.Layer):
    """A layer with a weight and no rule: takes the vectorized_map fallback."""

    def build(self, shape):
        self.w = self.add_weight(shape=shape[-1:], initializer="random_normal")

    def call(self, x):
        return x * self.w


def net(kind):
    keras.utils.set_random_seed(0)
    L = keras.layers
    shapes = {"dense_seq": (5, 4), "embedding": (6,)}
    x = inputs = keras.Input(shapes.get(kind, (9, 9, 2)),
                             dtype="int32" if kind == "embedding" else None)
    if kind == "embedding":  # Repeated ids: one row gets several positions' gradients.
        x = L.Embedding(7, 4, name="emb")(x)
    elif kind == "dense_seq":  # Dense on [n, T, I], with and without bias.
        x = L.Dense(6, activation="tanh", name="d1")(x)
        x = L.Dense(4, use_bias=False, name="d2")(x)
    elif kind == "conv":
        x = L.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="c1")(x)
        x = L.Conv2D(3, 2, padding="valid", dilation_rate=2, name="c2")(x)
        x = L.Conv2D(5, 1, use_bias=False, name="c3")(x)
    elif kind == "norm":
        x = L.Conv2D(4, 3, name="c1")(x)
        x = L.ReLU()(L.BatchNormalization(name="bn")(x))
        x = L.LayerNormalization(name="ln")(x)
    elif kind == "fallback":
        x = Scale(name="scale")(L.Conv2D(4, 3, name="c1")(x))
    elif kind == "nested":
        inner = keras.Sequential([L.Conv2D(4, 3), L.ReLU(), L.Dense(3)], name="inner")
        x = inner(x)
    x = L.Flatten()(x)
    return keras.Model(inputs, L.Dense(C, name="logits")(x))


def batch(shape, n=8, seed=0, ids=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 7, (n, *shape)) if ids else rng.normal(size=(n, *shape))
    return (tf.constant(x.astype(np.int32 if ids else np.float32)),
            tf.constant(rng.integers(0, C, n).astype(np.int32)))


def sync():
    return Collectives(tf.distribute.get_replica_context())


@pytest.mark.parametrize("kind", ["dense_seq", "conv", "norm", "embedding", "fallback", "nested"])
def test_layer_rules_match_vectorized_map(kind):
    model = net(kind)
    x, y = batch(model.input_shape[1:], ids=kind == "embedding")
    src = GradientSource(model)
    assert src.factored
    bn = [v for v in model.non_trainable_variables]
    start = [v.numpy() for v in bn]
    fast, losses, _ = src.per_example(x, y, None, sync())
    for v, s in zip(bn, start):  # The reference advances the BN averages again.
        v.assign(s)
    src.factored = False
    slow, slow_losses, _ = src.per_example(x, y, 4, sync())
    np.testing.assert_allclose(losses, slow_losses, rtol=1e-5, atol=1e-6)
    for v, f, s in zip(src.variables, fast, slow):
        np.testing.assert_allclose(f.stacked().numpy().reshape(s.g.shape), s.g,
                                   rtol=1e-4, atol=1e-5, err_msg=v.path)


def test_a_subclassed_model_falls_back_to_vectorized_map():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(C)

        def call(self, x, training=None):
            return self.d(keras.ops.reshape(x, [x.shape[0], -1]))

    model = Sub()
    x, y = batch((4, 2))
    model(x)
    src = GradientSource(model)
    assert not src.factored
    values, _, _ = src.per_example(x, y, None, sync())
    assert all(isinstance(v, Stacked) for v in values)


@pytest.mark.parametrize("kind,positions", [("dense_seq", True), ("embedding", True),
                                            ("conv", True), ("nested", True), ("flat", False)])
def test_layers_applied_at_positions(kind, positions):
    """Median of means takes k passes for these (patches cost more than a native
    backward) and the factored groups for flat Dense nets."""
    if kind == "flat":
        model = models.fc((9, 9, 2), C, (6, 5))
    else:
        model = net(kind)
    assert GradientSource(model).positions is positions


def run_step(name, jit, strategy=None):
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = net("norm")
        robust = RobustModel(model, make_aggregator(name, c=2, k=2))
        robust.compile(optimizer=keras.optimizers.SGD(0.1))
    step = tf.function(lambda b: strategy.run(robust.train_step, args=(b,)), jit_compile=jit)
    for s in range(3 if name in ("rm3", "ra3") else 1):
        x, y = batch(model.input_shape[1:], seed=s)
        data = tf.data.Dataset.from_tensors({"image": x, "label": y})
        for b in strategy.experimental_distribute_dataset(data):
            step(b)
    return [v.numpy() for v in model.trainable_variables]


@pytest.mark.parametrize("name", REGISTRY)
def test_every_aggregator_compiles_with_xla_to_the_same_update(name):
    for a, b in zip(run_step(name, False), run_step(name, True)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["winsorized", "median", "median_of_means"])
def test_batchnorm_and_layernorm_rules_give_one_update_for_any_replica_count(name):
    for a, b in zip(run_step(name, False), run_step(name, False, two_replicas())):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class HiddenReplicaId:
    """A replica context whose replica id has no value before the step runs, as
    under TPUStrategy (MirroredStrategy's is a constant per traced replica)."""

    def __init__(self, ctx):
        self._ctx = ctx

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    @property
    def replica_id_in_sync_group(self):
        hidden = tf.cast(tf.random.uniform([], maxval=0.5), tf.int32)  # 0, known only at run
        return self._ctx.replica_id_in_sync_group + hidden


def run_hidden_id(name, monkeypatch, strategy, jit):
    """The train step with a replica id it cannot read before it runs (as under
    TPUStrategy, which compiles the replica function whole)."""
    from cg_tf.robust.collectives import Collectives
    monkeypatch.setattr(Collectives, "current", classmethod(
        lambda cls, compiled=False: cls(HiddenReplicaId(tf.distribute.get_replica_context()),
                                        not compiled)))
    return run_step(name, jit, strategy)


@pytest.mark.parametrize("name", REGISTRY)
def test_every_aggregator_needs_no_static_replica_id(name, monkeypatch):
    # Two replicas (MirroredStrategy on logical CPUs), and one compiled whole by
    # XLA (XLA cannot span the logical CPUs' mirrored variables: TPUStrategy's
    # compile of a multi-replica step is what stays untested without a TPU).
    # The same update as with the replica id MirroredStrategy gives as a constant.
    for strategy, jit in ((two_replicas(), False), (None, True)):
        want = run_step(name, False, strategy)
        with monkeypatch.context() as patch:
            got = run_hidden_id(name, patch, strategy, jit)
        for a, b in zip(want, got):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
