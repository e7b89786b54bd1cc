"""Per-example gradients factored by layer against tf.vectorized_map of the whole
model; the tiled aggregation against NumPy; every aggregator under XLA."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_aggregator, np_trimmed, np_winsorized, two_replicas

from cg_tf.robust import tiled
from cg_tf.robust.aggregators import REGISTRY, Median, Trimmed, Winsorized
from cg_tf.robust.collectives import Collectives
from cg_tf.robust.gradients import GradientSource
from cg_tf.robust.layer_rules import Outer, Stacked
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


def test_sorting_network_sorts_every_zero_one_input():
    """The 0-1 principle: a comparator network that sorts every 0/1 input sorts
    every input."""
    for n in range(1, 13):
        for bits in itertools.product([0, 1], repeat=n):
            wires = list(bits)
            for low, high in tiled.sorting_network(n):
                wires[low], wires[high] = min(wires[low], wires[high]), max(wires[low], wires[high])
            assert wires == sorted(bits), (n, bits)


# Running lists (c <= 8), selection networks (larger c, the median) and, past
# the network's budget (n = 257), running lists up to c = 31, then the sort.
# The lists and the clipped sums go over the examples in one block, or (small
# budgets) in a loop over blocks with a remainder after it.
@pytest.mark.parametrize("n,c,blocks", [
    *((n, c, "one") for n, c in [(12, 2), (7, 3), (9, 0), (30, 14), (100, 4), (20, 8), (64, 31),
                                 (257, 40)]),
    *((n, c, "loop") for n, c in [(12, 2), (9, 0), (30, 14), (100, 4), (257, 20)])])
def test_tiled_aggregation_against_numpy(n, c, blocks, monkeypatch, request):
    """Ties and zeros everywhere (integer inputs, zeroed output gradients), several
    tiles with a ragged last one, one position (a Dense layer: values formed in
    each pass) or three (a convolution: a tile's values formed once by a matmul),
    and stacked values."""
    tiled._compiled.cache_clear()  # compiled with the budgets set here, and only here
    request.addfinalizer(tiled._compiled.cache_clear)
    monkeypatch.setattr(tiled, "TILE", 64)
    monkeypatch.setattr(tiled, "SMALL", 0)
    if blocks == "loop":
        monkeypatch.setattr(tiled, "CHAIN_BUDGET", 2 * tiled._chain_length((c, n - 1 - c), n) + 1)
        monkeypatch.setattr(tiled, "SUM_BLOCK", 3)
    rng = np.random.default_rng(n + c)
    positions = 1 + 2 * (n % 2)
    x = rng.integers(-2, 3, (n, positions, 37)).astype(np.float32)
    d = rng.normal(size=(n, positions, 11)).astype(np.float32)
    d[rng.random(d.shape) < 0.3] = 0
    full = np.einsum("bti,bto->bio", x, d)
    variables = [tf.Variable(tf.zeros([37, 11]))] * 2
    for stat, ref in [(Winsorized(c), lambda a: np_winsorized(a, c)),
                      (Trimmed(c), lambda a: np_trimmed(a, c)),
                      (Median(), lambda a: np.median(a, 0))]:
        got = tiled.aggregate([Outer(tf.constant(x), tf.constant(d)), Stacked(tf.constant(full))],
                              stat, variables)
        for g in got:
            np.testing.assert_allclose(g, ref(full), rtol=2e-5, atol=2e-5, err_msg=stat.name)


@pytest.mark.parametrize("replicas", [2, 4])
def test_replica_shares_are_disjoint_and_sum_to_the_whole(replicas):
    """Each replica computes its block of ceil(rows / replicas) rows of a
    variable (by XLA, its replica id a tensor it reads at run time, as under
    TPUStrategy): zeros elsewhere, and the shares sum to the statistic."""
    rng = np.random.default_rng(replicas)
    x = rng.normal(size=(10, 1, 37)).astype(np.float32)
    d = rng.normal(size=(10, 1, 11)).astype(np.float32)
    full = np.einsum("bti,bto->bio", x, d)
    values = Outer(tf.constant(x), tf.constant(d))
    share = -(-37 // replicas)
    for stat, ref in [(Winsorized(2), np_winsorized(full, 2)), (Median(), np.median(full, 0))]:
        compiled = tiled._compiled(tiled._signature(values, stat), replicas)
        hidden = lambda r: tf.constant(r) + tf.cast(tf.random.uniform([], maxval=0.5), tf.int32)
        shares = [compiled(values, hidden(r)).numpy() for r in range(replicas)]
        for r, s in enumerate(shares):
            outside = np.ones(37, bool)
            outside[r * share:(r + 1) * share] = False
            assert not s[outside].any(), (stat.name, r)
        np.testing.assert_allclose(sum(shares), ref, rtol=2e-5, atol=2e-5, err_msg=stat.name)


def test_small_variables_are_sorted_beside_tiled_ones(monkeypatch):
    monkeypatch.setattr(tiled, "TILE", 64)
    monkeypatch.setattr(tiled, "SMALL", 100)
    rng = np.random.default_rng(1)
    big, small, other = (rng.normal(size=(10, *s)).astype(np.float32) for s in [(20, 8), (7,), (3, 5)])
    variables = [tf.Variable(tf.zeros(v.shape[1:])) for v in (big, small, other)]
    for stat, ref in [(Winsorized(2), lambda a: np_winsorized(a, 2)),
                      (Median(), lambda a: np.median(a, 0))]:
        got = tiled.aggregate([Stacked(tf.constant(v)) for v in (big, small, other)], stat, variables)
        for g, v in zip(got, (big, small, other)):
            np.testing.assert_allclose(g, ref(v), rtol=2e-5, atol=2e-5, err_msg=stat.name)


def test_outliers_never_enter_the_sum():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(20, 50)).astype(np.float32) * 1e-3
    g[3] = 1e9
    got = tiled.aggregate([Stacked(tf.constant(g))], Winsorized(1), [tf.Variable(tf.zeros([50]))])
    np.testing.assert_allclose(got[0], np_winsorized(g.astype(np.float64), 1), rtol=1e-5, atol=1e-9)


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
        lambda cls: cls(HiddenReplicaId(tf.distribute.get_replica_context()))))
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
