"""The robust train step: per-example gradients against closed form, the mean
aggregator against the batch gradient, invariance to replicas and chunking,
and the RM3/RA3 ring buffer."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_aggregator, np_trimmed, np_winsorized, replicas, two_replicas

from cg_tf.robust.aggregators import (REGISTRY, RM3, Mean, Median, MedianOfMeans, Trimmed,
                                      Winsorized, from_json, parse)
from cg_tf.robust import layer_filter, layer_rules, tiled
from cg_tf.robust.layer_filter import HiddenLayers
from cg_tf.robust.collectives import Collectives
from cg_tf.robust.gradients import GradientSource
from cg_tf.training import models
from cg_tf.training.robust_model import RobustModel, check_layout

B, C, SHAPE = 12, 3, (4, 4, 1)


def batch(seed=0, b=B, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return {"image": tf.constant(rng.normal(size=(b, *shape)).astype(np.float32)),
            "label": tf.constant(rng.integers(0, C, b).astype(np.int32))}


def bn_net(shape=(6, 6, 2)):
    """Conv -> BatchNorm -> ReLU -> pooling -> logits: a minimal net with BatchNorm."""
    x = inputs = keras.Input(shape)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(C, name="logits")(x))


def two_conv_net(shape=SHAPE):
    """A 3 x 3 convolution, whose input is smaller than its patches, then a
    1 x 1 of stride 2, whose patches are smaller than its input."""
    x = inputs = keras.Input(shape)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv3x3")(x)
    x = keras.layers.Conv2D(4, 1, strides=2, activation="relu", name="conv1x1")(x)
    return keras.Model(inputs, keras.layers.Dense(C, name="logits")(keras.layers.Flatten()(x)))


def mixed_net(shape=SHAPE):
    """Convolutions whose rows 2 replicas exchange (conv_a: its 3 x 3 x 1 x 8
    kernel is smaller than its output gradient) or gather (conv_b by its
    input, conv_c, a 1 x 1 of stride 2, by its patches), then logits."""
    x = inputs = keras.Input(shape)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_b")(x)
    x = keras.layers.Conv2D(16, 1, strides=2, activation="relu", name="conv_c")(x)
    return keras.Model(inputs, keras.layers.Dense(C, name="logits")(keras.layers.Flatten()(x)))


def make_net(kind, seed=0):
    keras.utils.set_random_seed(seed)
    if kind == "convs":
        return two_conv_net()
    if kind == "mixed":
        return mixed_net()
    if kind == "softmax":
        return models.fc(SHAPE, C, widths=())
    if kind == "fc":
        return models.fc(SHAPE, C, widths=(6,))
    if kind == "cnn":
        return models.small_cnn(SHAPE, C)
    return bn_net()


def per_example(src, data, chunk=None):
    """Per-example gradients [B, ...] per variable and losses [B], via the fold."""
    x, y = data["image"], data["label"]
    n = len(x) // (chunk or len(x))
    init = ([tf.TensorArray(tf.float32, size=n) for _ in src.variables],
            tf.TensorArray(tf.float32, size=n))

    def step(state, i, labels, grads, losses, logits):
        arrays, losses_array = state
        return [a.write(i, g) for a, g in zip(arrays, grads)], losses_array.write(i, losses)

    arrays, losses = src.fold_per_example(
        x, y, chunk, Collectives(tf.distribute.get_replica_context()), init, step)
    return [a.concat() for a in arrays], losses.concat()


def softmax_regression_per_example(net, x, y):
    """Closed form: dL_i/dW = x_i (p_i - e_{y_i})^T, dL_i/db = p_i - e_{y_i}."""
    w, b0 = (v.numpy() for v in net.trainable_variables)
    flat = x.numpy().reshape(len(x), -1)
    logits = flat @ w + b0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = p - np.eye(C)[y.numpy()]
    return np.einsum("bi,bj->bij", flat, d), d


@pytest.mark.parametrize("chunk", [None, 4])
def test_per_example_gradients_match_closed_form(chunk):
    net = make_net("softmax")
    data = batch()
    (gw, gb), _ = per_example(GradientSource(net), data, chunk)
    want_w, want_b = softmax_regression_per_example(net, data["image"], data["label"])
    np.testing.assert_allclose(gw, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gb, want_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,bn_mode", [("fc", "batch_stats"), ("cnn", "batch_stats"),
                                          ("bn", "exact")])
def test_per_example_gradients_sum_to_the_batch_gradient(kind, bn_mode):
    net = make_net(kind)
    data = batch(shape=net.input_shape[1:])
    src = GradientSource(net, bn_mode)
    per, _ = per_example(src, data, 4)
    summed, _, _ = src.summed(data["image"], data["label"])
    for p, s in zip(per, summed):
        np.testing.assert_allclose(tf.reduce_sum(p, 0), s, rtol=1e-4, atol=1e-5)


def test_batch_stats_mode_normalizes_with_the_batch_statistics():
    """Held-constant batch statistics: each example's loss equals its loss in
    the batched training forward, and the moving averages advance once."""
    net = make_net("bn")
    data = batch(shape=(6, 6, 2))
    bn = net.get_layer("bn")
    before = bn.moving_mean.numpy().copy()
    _, losses = per_example(GradientSource(net, "batch_stats"), data)
    conv = net.get_layer("conv")(data["image"])
    mean = tf.reduce_mean(conv, [0, 1, 2]).numpy()
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.99 * before + 0.01 * mean, atol=1e-6)
    from cg_tf.robust.gradients import example_losses
    bn.moving_mean.assign(before)  # The batched forward uses batch statistics anyway.
    batched = example_losses(data["label"], net(data["image"], training=True))
    np.testing.assert_allclose(losses, batched, rtol=1e-4, atol=1e-5)


def test_mean_aggregator_is_the_batch_gradient():
    net = make_net("cnn")
    data = batch()
    model = RobustModel(net, Mean())
    grads, _ = model.aggregated_gradient(data["image"], data["label"])
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            data["label"], net(data["image"], training=True))
    for g, want in zip(grads, tape.gradient(loss, net.trainable_variables)):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


def strided_conv_net(shape=(6, 6, 2)):
    """Convolutions with stride, dilation and both paddings."""
    x = inputs = keras.Input(shape)
    x = keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu", name="s2")(x)
    x = keras.layers.Conv2D(4, 2, dilation_rate=2, padding="same", activation="relu",
                            name="dilated")(x)
    x = keras.layers.Conv2D(2, (2, 1), padding="valid", name="valid")(x)
    return keras.Model(inputs, keras.layers.Dense(C, name="logits")(keras.layers.Flatten()(x)))


@pytest.mark.parametrize("kind", ["fc", "convs", "strided"])
def test_per_example_aggregators_against_reference(kind, monkeypatch):
    """Every variable through the tiles (SMALL = 0): a convolution's patches
    taken a tile's rows at a time, from the input, with the padding the
    convolution reads."""
    monkeypatch.setattr(tiled, "SMALL", 0)
    keras.utils.set_random_seed(0)
    net = strided_conv_net() if kind == "strided" else make_net(kind)
    data = batch(shape=(6, 6, 2)) if kind == "strided" else batch()
    per, _ = per_example(GradientSource(net), data)
    expect = {"winsorized": lambda x: np_winsorized(np.asarray(x), 2),
              "trimmed": lambda x: np_trimmed(np.asarray(x), 2),
              "median": lambda x: np.median(x, axis=0)}
    for name, ref in expect.items():
        model = RobustModel(net, make_aggregator(name, c=2), per_example_chunk=4)
        grads, _ = model.aggregated_gradient(data["image"], data["label"])
        for g, p in zip(grads, per):
            np.testing.assert_allclose(g, ref(p), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 12])
def test_median_of_means_is_the_median_of_group_gradients(k):
    net = make_net("fc")
    data = batch()
    model = RobustModel(net, MedianOfMeans(k=k))
    grads, _ = model.aggregated_gradient(data["image"], data["label"])
    src, size = GradientSource(net), B // k
    groups = [src.summed(data["image"][i:i + size], data["label"][i:i + size])[0]
              for i in range(0, B, size)]
    for g, parts in zip(grads, zip(*groups)):
        np.testing.assert_allclose(g, np.median(np.stack(parts) / size, axis=0),
                                   rtol=1e-5, atol=1e-6)


PER_EXAMPLE = [n for n, cls in REGISTRY.items() if cls.per_example]


@pytest.mark.parametrize("layers", ["hidden", "output"])
@pytest.mark.parametrize("kind", ["fc", "cnn"])
@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_a_layer_filter_leaves_the_other_layers_to_the_mean(name, kind, layers):
    """hidden: every variable but the output layer's is the aggregator's own
    value (the unfiltered aggregator's); the output layer's is the batch mean.
    output: the reverse. On the cnn, median_of_means takes its by-passes path."""
    net = make_net(kind)
    data = batch()
    x, y = data["image"], data["label"]
    whole, _ = RobustModel(net, make_aggregator(name, c=2, k=3)).aggregated_gradient(x, y)
    mean, _ = RobustModel(net, Mean()).aggregated_gradient(x, y)
    chosen = make_aggregator(name, c=2, k=3, layers=layers)
    filtered, _ = RobustModel(net, chosen).aggregated_gradient(x, y)
    paths = [v.path for v in net.trainable_variables]
    output = [p.startswith("logits/") for p in paths]
    robust = output if layers == "output" else [not o for o in output]
    assert chosen.layers.robust(net) == robust
    for path, r, f, w, m in zip(paths, robust, filtered, whole, mean):
        np.testing.assert_allclose(f, w if r else m, rtol=1e-5, atol=1e-6, err_msg=path)
    # The filter changed something: the output layer's robust value is not its mean.
    assert not np.allclose(whole[-2], mean[-2], rtol=1e-3, atol=1e-5)


def test_a_filter_that_leaves_no_layer_is_refused():
    with pytest.raises(ValueError, match=r"winsorized:2@hidden: the layer filter 'hidden' "
                                         r"leaves no layer of .* to aggregate robustly"):
        RobustModel(make_net("softmax"), Winsorized(c=2, layers="hidden"))


class OutputFirst(keras.Model):
    """A subclassed model that creates its output layer before its hidden one:
    the order of its variables says nothing of which layer makes the output."""

    def __init__(self):
        super().__init__(name="output_first")
        self.out = keras.layers.Dense(C, name="out")
        self.hidden = keras.layers.Dense(6, name="hidden")

    def call(self, x):
        return self.out(self.hidden(keras.ops.reshape(x, (keras.ops.shape(x)[0], -1))))


def test_the_output_layer_is_read_from_the_models_structure():
    """The layer that makes the output, through weightless layers after it (an
    activation); a model whose structure does not name one layer is refused."""
    inputs = keras.Input(SHAPE)
    hidden = keras.layers.Dense(6, name="hidden")(keras.layers.Flatten()(inputs))
    logits = keras.layers.Dense(C, name="logits")(hidden)
    out = keras.layers.Dropout(0.1)(keras.layers.Activation("linear")(logits))
    net = keras.Model(inputs, out)
    logits_layer = net.get_layer("logits")
    assert layer_filter.output_layer(net) == {id(v) for v in logits_layer.trainable_variables}
    assert HiddenLayers().robust(net) == [True, True, False, False]
    subclassed = OutputFirst()
    subclassed(tf.zeros([1, *SHAPE]))
    with pytest.raises(ValueError, match=r"^RobustModel's aggregator=winsorized:2@hidden: model "
                                         r"'output_first' does not "
                                         r"show which layer makes its output \(a subclassed "
                                         r"model\)"):
        RobustModel(subclassed, Winsorized(c=2, layers="hidden"))
    RobustModel(subclassed, Winsorized(c=2))  # every layer: no output layer needed
    # A head that is a model of its own: its own output layer, not all of it.
    head = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="head_hidden"),
                             keras.layers.Dense(C, name="head_out")], name="head")
    nested = keras.Model(inputs, head(hidden))
    assert HiddenLayers().robust(nested) == [True, True, True, True, False, False]
    two_heads = keras.Model(inputs, [logits, keras.layers.Dense(2, name="aux")(hidden)])
    with pytest.raises(ValueError, match=r"has 2 outputs, so 'the output layer' .* is ambiguous"):
        layer_filter.output_layer(two_heads)  # (RobustModel refuses such a net before this)
    joined = keras.Model(inputs, keras.layers.Add()(
        [logits, keras.layers.Dense(C, name="skip")(hidden)]))
    with pytest.raises(ValueError, match=r"its output comes from 'add.*', which joins several "
                                         r"inputs"):
        RobustModel(joined, Winsorized(c=2, layers="hidden"))


def run_steps(strategy, aggregator, kind, batches, lr=0.1, chunk=None, weight_decay=0.0):
    """Weights after one train step per batch, starting from seed-0 weights."""
    with strategy.scope():
        net = make_net(kind)
        model = RobustModel(net, aggregator, per_example_chunk=chunk, weight_decay=weight_decay)
        model.compile(optimizer=keras.optimizers.SGD(lr))
    step = tf.function(lambda b: strategy.run(model.train_step, args=(b,)))
    for data in batches:
        for b in strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(data)):
            step(b)
    return [v.numpy() for v in net.trainable_variables]


@pytest.mark.parametrize("name", [*REGISTRY, "winsorized@hidden", "median_of_means@hidden",
                                  "winsorized@output"])
def test_one_two_and_four_replicas_give_the_same_update(name, monkeypatch):
    """Every variable goes by tiles (SMALL = 0), so each replica computes a
    share of its rows (the 6 hidden units' 16 input rows: 8 or 4 per replica;
    the logits' 6 rows: 3 or 2), and the optimizer's all-reduce adds the
    shares; weight decay is split among the replicas' parts. At 4 replicas
    every variable's rows are exchanged; at 2 the hidden kernel's factors are
    gathered and the rest exchanged (tiled.exchanges)."""
    monkeypatch.setattr(tiled, "SMALL", 0)
    name, _, layers = name.partition("@")
    config = make_aggregator(name, c=2, k=3, layers=layers or "all")
    batches = [batch(s) for s in range(4 if name in ("rm3", "ra3") else 1)]
    one = run_steps(tf.distribute.get_strategy(), config, "fc", batches, weight_decay=0.05)
    start = [v.numpy() for v in make_net("fc").trainable_variables]
    assert any(not np.allclose(a, s) for a, s in zip(one, start))  # It did update.
    # (two replicas for one aggregator: each layout compiles its own tiles)
    for n in (2, 4) if name == "winsorized" else (4,):
        for a, b in zip(one, run_steps(replicas(n), config, "fc", batches, weight_decay=0.05)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{n} replicas")


def all_reduce_payloads(monkeypatch) -> list[int]:
    """The floats of each all-reduce traced from now on, by every replica (the
    replica functions are traced in threads)."""
    from tensorflow.python.distribute import distribute_lib
    payloads = []
    original = distribute_lib.ReplicaContextBase.all_reduce

    def recording(ctx, op, value, options=None):
        payloads.append(sum(int(np.prod(v.shape)) for v in tf.nest.flatten(value)))
        return original(ctx, op, value, options)

    monkeypatch.setattr(distribute_lib.ReplicaContextBase, "all_reduce", recording)
    return payloads


@pytest.mark.parametrize("name", ["mean", "winsorized", "median_of_means", "rm3"])
def test_the_update_crosses_replicas_in_one_all_reduce(name, monkeypatch):
    """What a step all-reduces, per replica, in floats: the tally [loss sum,
    correct], the optimizer's sum of the replicas' parts of the update (P, once:
    the parts are disjoint shares, or 1 / replicas of a value every replica
    holds), and for a per-example aggregator the gathered factors of the global
    batch (fc 16-6-3: each dense layer's input, output gradient and the bias's
    copy of it). rm3 needs the whole gradient for its median: one more P."""
    payloads = all_reduce_payloads(monkeypatch)
    run_steps(replicas(2), make_aggregator(name, c=2, k=3), "fc", [batch(0)])
    params = 16 * 6 + 6 + 6 * 3 + 3
    factors = (16 + 6 + 6) + (6 + 3 + 3)
    gathered = {"mean": [], "rm3": [params]}.get(name, [B * factors])
    assert sorted(payloads) == sorted(2 * [*gathered, 2, params]), payloads


def exchange_payloads(monkeypatch) -> list[int]:
    """The floats each replica hands to each all-to-all traced from now on."""
    payloads = []
    original = Collectives.exchange

    def recording(self, xs):
        if xs:
            payloads.append(sum(int(np.prod(x.shape)) for x in xs))
        return original(self, xs)

    monkeypatch.setattr(Collectives, "exchange", recording)
    return payloads


@pytest.mark.parametrize("exchange", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["by bytes", "all gathered"])
def test_replicas_gather_factors_or_exchange_rows_whichever_sends_less(exchange, monkeypatch):
    """mixed_net at 2 replicas, each variable in a computation of its own.
    Gathered (P >= 2 R F), per example: conv_b's input (2 x 2 x 8, not its 4
    patches of 72) and output gradient (2 x 2 x 16), P = 1,152; conv_c's
    patch (16, not its input of 64) and output gradient (16), P = 256.
    Exchanged, the rows of each replica's share for its 6 examples, per
    example and replica: conv_a's kernel (rows 9 -> 2 x 5, 8 columns), the
    logits' (rows 16 -> 2 x 8, 3 columns), and the biases (1 row -> 2 x 1).
    With the exchange taken away (as in a step XLA compiles whole) every
    factor is gathered (slow; test_two_workers_match_two_replicas_on_one_worker
    gathers a conv net's factors across workers in the default run). The update
    is that of one replica either way."""
    monkeypatch.setattr(tiled, "SMALL", 0)
    if not exchange:
        monkeypatch.setattr(tiled, "exchanges", lambda *args: False)
    reduced, exchanged = all_reduce_payloads(monkeypatch), exchange_payloads(monkeypatch)
    config = make_aggregator("winsorized", c=2)
    two = run_steps(replicas(2), config, "mixed", [batch(0)])
    params = sum(int(np.prod(v.shape)) for v in mixed_net().trainable_variables)
    gathered = (32 + 64) + (16 + 16)
    if exchange:
        rows = 2 * (5 * 8 + 8 * 3 + 8 + 16 + 16 + 3)
        assert exchanged == 2 * [B // 2 * rows], exchanged
    else:
        # conv_a's input, output gradient and bias (its sum over positions),
        # the other biases, the logits' input and output gradient and bias
        gathered += (16 + 128 + 8) + 16 + 16 + (16 + 3 + 3)
        assert exchanged == []
    assert sorted(reduced) == sorted(2 * [B * gathered, 2, params]), reduced
    for a, b in zip(run_steps(tf.distribute.get_strategy(), config, "mixed", [batch(0)]), two):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["winsorized", "median"])
def test_small_variables_side_by_side_divide_among_replicas(name):
    """At the default tiled.SMALL every variable of the small net goes side by
    side into one computation, whose rows 4 replicas divide."""
    config = make_aggregator(name, c=2)
    one = run_steps(tf.distribute.get_strategy(), config, "fc", [batch(0)])
    for a, b in zip(one, run_steps(replicas(4), config, "fc", [batch(0)])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["winsorized", "median"])
def test_batchnorm_statistics_are_global_for_per_example_aggregators(name):
    config = make_aggregator(name, c=1)
    data = [batch(0, shape=(6, 6, 2))]
    for a, b in zip(run_steps(tf.distribute.get_strategy(), config, "bn", data),
                    run_steps(two_replicas(), config, "bn", data)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["winsorized", "trimmed", "median"])
def test_chunk_size_does_not_change_the_update(name):
    data = [batch(1)]
    whole = run_steps(tf.distribute.get_strategy(), make_aggregator(name, c=3), "cnn", data)
    for chunk in (1, 4):
        chunked = run_steps(tf.distribute.get_strategy(), make_aggregator(name, c=3), "cnn", data,
                            chunk=chunk)
        for a, b in zip(whole, chunked):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,combine", [("rm3", lambda g: np.median(g, axis=0)),
                                          ("ra3", lambda g: np.mean(g, axis=0))])
def test_temporal_ring_buffer(name, combine, tmp_path):
    lr = 0.5
    net = make_net("softmax")
    model = RobustModel(net, make_aggregator(name))
    model.compile(optimizer=keras.optimizers.SGD(lr))
    w0 = [v.numpy() for v in net.trainable_variables]
    src = GradientSource(net)
    grads = []
    for s in range(2):  # The first two steps only fill the buffer.
        data = batch(s)
        grads.append([g.numpy() / B for g in src.summed(data["image"], data["label"])[0]])
        model.train_step(data)
        for v, w in zip(net.trainable_variables, w0):
            np.testing.assert_array_equal(v.numpy(), w)
    ckpt = tf.train.Checkpoint(model=model)
    path = ckpt.save(str(tmp_path / "ckpt"))
    # A fresh model restored from the checkpoint continues exactly.
    net2 = make_net("softmax", seed=1)
    model2 = RobustModel(net2, make_aggregator(name))
    model2.compile(optimizer=keras.optimizers.SGD(lr))
    tf.train.Checkpoint(model=model2).restore(path).assert_existing_objects_matched()
    assert int(model2.aggregator_state.count) == 2
    data = batch(2)
    g3 = [g.numpy() / B for g in src.summed(data["image"], data["label"])[0]]
    model2.train_step(data)
    for v, w, a, b, c in zip(net2.trainable_variables, w0, *grads, g3):
        np.testing.assert_allclose(v.numpy(), w - lr * combine(np.stack([c, b, a])),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregator,batch_size,replicas,momentum,chunk,message", [
    (Winsorized(c=50), 100, 1, 0, None, r"--aggregator=winsorized:50: need 0 <= 2c <"),
    (Trimmed(c=60), 100, 1, 0, None, r"--aggregator=trimmed:60: need 0 <= 2c"),
    (MedianOfMeans(k=3), 100, 1, 0, None, r"--aggregator=median_of_means:3: 3 groups do not "
     "divide"),
    (RM3(), 100, 1, 0.9, None, r"--aggregator=rm3: refuses --momentum=0.9"),
    (Mean(), 101, 2, 0, None, r"--batch_size=101 is not divisible by the 2"),
    (Median(), 100, 2, 0, 7, r"--per_example_chunk=7 does not divide the per-replica batch of 50"),
])
def test_bad_layouts(aggregator, batch_size, replicas, momentum, chunk, message):
    with pytest.raises(ValueError, match=message):
        check_layout(aggregator, batch_size, replicas, momentum, chunk)


@pytest.mark.parametrize("spec,message", [
    ("sgd", r"--aggregator=sgd: unknown aggregator 'sgd'; one of mean, winsorized"),
    ("winsorized", r"--aggregator=winsorized: winsorized needs its c, e.g. winsorized:4"),
    ("winsorized:x", r"--aggregator=winsorized:x: c must be an integer"),
    ("median:3", r"--aggregator=median:3: median takes no parameter"),
    ("trimmed:-1", r"--aggregator=trimmed:-1: Trimmed\(c=-1\): c must be a whole number of 0 "
                   r"or more"),
    ("winsorized:4@hiden",
     r"--aggregator=winsorized:4@hiden: unknown layers 'hiden'; one of all, hidden, output"),
    ("rm3@hidden", r"--aggregator=rm3@hidden: rm3 takes no layer filter \(@hidden\)"),
    ("mean@hidden", r"--aggregator=mean@hidden: mean takes no layer filter"),
])
def test_bad_aggregator_names(spec, message):
    with pytest.raises(ValueError, match=message):
        parse(spec)


def test_names_read_back():
    for name in REGISTRY:
        a = make_aggregator(name, c=3, k=4)
        assert parse(a.spec) == a and from_json(a.to_json()) == a
    assert Winsorized(c=4).spec == "winsorized:4" and Winsorized(c=4).setting == "winsorized_c4"
    assert MedianOfMeans(k=3).setting == "median_of_means_k3" and Median().spec == "median"
    for name in PER_EXAMPLE:
        a = make_aggregator(name, c=3, k=4, layers="hidden")
        assert parse(a.spec) == a and from_json(a.to_json()) == a
        assert a.spec.endswith("@hidden") and a.setting.endswith("_hidden")
    # The papers' setting reads and records as before: no filter in the name or the record.
    assert parse("winsorized:4@all") == Winsorized(c=4)
    assert Winsorized(c=4).to_json() == {"name": "winsorized", "c": 4}
    assert Winsorized(4, layers="hidden").to_json() == {"name": "winsorized", "c": 4,
                                                        "layers": "hidden"}


class Mix(keras.layers.Layer):
    """A layer with a weight called on two tensors: the whole model falls back
    to vectorized_map."""

    def build(self, shapes):
        self.w = self.add_weight(shape=shapes[0][-1:], initializer="ones")

    def call(self, inputs):
        a, b = inputs
        return a * self.w + b


def two_bn_fallback_net():
    """Dense -> BN -> ReLU -> Dense -> BN, mixed with a weighted two-input layer."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    inputs = keras.Input((5,))
    h = L.ReLU()(L.BatchNormalization(name="bn1")(L.Dense(6, name="d1")(inputs)))
    g = L.BatchNormalization(name="bn2")(L.Dense(6, name="d2")(h))
    return keras.Model(inputs, L.Dense(C, name="logits")(Mix(name="mix")([g, h])))


def bn_state(net):
    return [v.numpy() for l in net.layers if isinstance(l, keras.layers.BatchNormalization)
            for v in (l.moving_mean, l.moving_variance)]


def test_batch_stats_on_the_fallback_path_are_global_and_advance_once():
    """batch_stats on a model the layer rules cannot run: each BatchNorm's
    statistics are those of the global batch with the layers before it
    normalized by theirs (a training forward over the whole batch), and the
    moving averages advance once per step, for any replica count."""
    rng = np.random.default_rng(0)
    data = {"image": tf.constant(rng.normal(size=(B, 5)).astype(np.float32) * 3 + 1),
            "label": tf.constant(rng.integers(0, C, B).astype(np.int32))}
    reference = two_bn_fallback_net()
    assert not GradientSource(reference).factored
    reference(data["image"], training=True)  # one training forward of the global batch
    for strategy in (tf.distribute.get_strategy(), two_replicas()):
        with strategy.scope():
            net = two_bn_fallback_net()
            model = RobustModel(net, Median())
            model.compile(optimizer=keras.optimizers.SGD(0.0))
        step = tf.function(lambda b: strategy.run(model.train_step, args=(b,)))
        for b in strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(data)):
            step(b)
        for got, want in zip(bn_state(net), bn_state(reference)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- the order of a step's updates (issue 30) ------------------------------------------


class Scale(keras.layers.Layer):
    """A layer with a weight, one input and no layer rule: the rules' per-layer
    fallback (vectorized_map) takes it."""

    def build(self, shape):
        self.w = self.add_weight(shape=shape[-1:], initializer="random_normal")

    def call(self, x):
        return keras.ops.tanh(x * self.w)


def deep_net(kind):
    """Two hidden layers or more, then the output layer."""
    keras.utils.set_random_seed(0)
    if kind == "fc2":
        return models.fc(SHAPE, C, widths=(6, 5))
    if kind == "cnn":
        return models.small_cnn(SHAPE, C)
    L = keras.layers
    inputs = keras.Input(SHAPE)
    h = Scale(name="scale")(L.Dense(6, activation="relu", name="d1")(L.Flatten()(inputs)))
    h = L.Dense(5, activation="relu", name="d2")(h)
    return keras.Model(inputs, L.Dense(C, name="logits")(h))


@pytest.mark.parametrize("kind,jit", [("fc2", False), ("fc2", True), ("cnn", False),
                                      ("fallback", False)])
def test_an_update_between_forward_and_backward_changes_no_aggregate(kind, jit, monkeypatch):
    """The step's updates may go in any order. The worst is forced here: every
    variable changes right after the forward has read it, before the backward
    and the layer rules run (control dependencies). Every aggregate is still
    the one of the pre-step weights: the rules form per-example values from
    the tensors the forward read, and an update does not change a tensor read
    before it. A rule that read a weight again (a kernel to backpropagate
    through, an activation recomputed) would see the changed weight here."""
    net = deep_net(kind)
    data = batch()
    model = RobustModel(net, Winsorized(c=2, layers="hidden"))

    def aggregate():  # traced anew: it sees the record_forward of the moment
        fn = tf.function(lambda x, y: model.aggregated_gradient(x, y)[0], jit_compile=jit)
        return [g.numpy() for g in fn(data["image"], data["label"])]

    start = [v.numpy() for v in net.trainable_variables]
    want = aggregate()
    forward = layer_rules.record_forward

    def forward_then_update(*args, **kwargs):
        out, recordings = forward(*args, **kwargs)
        updates = [v.value.assign_sub(tf.fill(v.shape, 0.1), read_value=False)
                   for v in net.trainable_variables]
        with tf.control_dependencies(updates):
            return tf.identity(out), recordings

    with monkeypatch.context() as m:
        m.setattr(layer_rules, "record_forward", forward_then_update)
        got = aggregate()
    for v, s in zip(net.trainable_variables, start):  # updated inside the step
        np.testing.assert_allclose(v.numpy(), s - 0.1, rtol=1e-6, atol=1e-6, err_msg=v.path)
    for v, g, w in zip(net.trainable_variables, got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=v.path)
    # At the changed weights the aggregates differ: a read after the update shows.
    for v, g, w in zip(net.trainable_variables, aggregate(), want):
        if "kernel" in v.path:
            assert not np.allclose(g, w, rtol=1e-3, atol=1e-5), v.path


@pytest.mark.parametrize("jit", [False, True])
def test_a_step_applies_the_aggregates_of_the_weights_before_it(jit):
    """One step of fit, with its updates in whatever order the runtime takes:
    the weights move by -lr times the aggregate of per-example gradients at
    the weights before the step (one tape per example; NumPy's winsorized mean
    for the hidden layers, the mean for the output layer: @hidden)."""
    net = deep_net("fc2")
    data = batch()
    x, y = data["image"], data["label"]
    start = [v.numpy() for v in net.trainable_variables]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    grads = []
    for xi, yi in zip(x, y):
        with tf.GradientTape() as tape:
            value = loss(yi[None], net(xi[None]))
        grads.append([g.numpy() for g in tape.gradient(value, net.trainable_variables)])
    model = RobustModel(net, Winsorized(c=2, layers="hidden"))
    model.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=jit)
    model.fit(x.numpy(), y.numpy(), batch_size=B, epochs=1, shuffle=False, verbose=0)
    for v, s, per in zip(net.trainable_variables, start, zip(*grads)):
        per = np.stack(per).astype(np.float64)
        want = per.mean(0) if v.path.startswith("logits/") else np_winsorized(per, 2)
        np.testing.assert_allclose(s - v.numpy(), want, rtol=1e-4, atol=1e-5, err_msg=v.path)
