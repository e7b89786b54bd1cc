"""The library face: RobustModel with Keras' compile/fit/evaluate on any
tf.data dataset, under a strategy scope, and the memorization callback; the
README's "your own model" lines, run exactly as printed."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, two_replicas

from cg_tf.measure import metrics, report, tags
from cg_tf.measure.callback import MemorizationCallback
from cg_tf.measure.monitor import LEARNING_EVENTS, MonitorConfig
from cg_tf.robust.aggregators import RM3, Mean, Median, MedianOfMeans, Trimmed, Winsorized
from cg_tf.training.robust_model import NonFiniteLoss, RobustModel

B, C, D = 12, 3, 5


def net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((D,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(C)])


def data(seed=0, n=B):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, D)).astype(np.float32), rng.integers(0, C, n).astype(np.int32))


def manual_steps(aggregator, batches, lr=0.1):
    """Weights after one train_step per batch on one replica, from seed-0 weights."""
    model = RobustModel(net(), aggregator)
    model.compile(optimizer=keras.optimizers.SGD(lr))
    for x, y in batches:
        model.train_step({"image": tf.constant(x), "label": tf.constant(y)})
    return [v.numpy() for v in model.net.trainable_variables]


@pytest.mark.parametrize("aggregator", [Mean(), Winsorized(c=2), Median()], ids=str)
@pytest.mark.parametrize("replicas", [1, 2])
def test_fit_runs_the_robust_update(aggregator, replicas):
    batches = [data(s) for s in range(3)]
    strategy = two_replicas() if replicas == 2 else tf.distribute.get_strategy()
    with strategy.scope():
        model = RobustModel(net(), aggregator)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    xs, ys = (np.concatenate(a) for a in zip(*batches))
    ds = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(B, drop_remainder=True)
    history = model.fit(ds, epochs=1, verbose=0)
    assert set(history.history) >= {"loss", "accuracy"}
    for got, want in zip(model.net.trainable_variables, manual_steps(aggregator, batches)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_fit_on_a_dataset_warns_of_nothing():
    # Keras warns that shuffle=True (its default, never passed) is ignored for a
    # dataset; fit passes shuffle=False for the data it is given.
    import warnings
    x, y = data(0, 2 * B)
    model = RobustModel(net(), Winsorized(c=1))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(B, drop_remainder=True),
                  verbose=0)
    assert not [str(w.message) for w in caught if "shuffle" in str(w.message)]


def test_fit_takes_the_readers_dicts_and_evaluate_averages_the_whole_set():
    x, y = data(0, 4 * B)
    dicts = tf.data.Dataset.from_tensor_slices({"image": x, "label": y, "example_id": y})
    model = RobustModel(net(), Winsorized(c=1))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(dicts.batch(B, drop_remainder=True), epochs=2, verbose=0)
    got = model.evaluate(dicts.batch(5), return_dict=True, verbose=0)  # a ragged last batch
    logits = model.net(x)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    assert got["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert got["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == y)))
    assert model.predict(dicts.batch(5), verbose=0).shape == (4 * B, C)


@pytest.mark.parametrize("make,message", [
    (lambda ds: ds.batch(B), "batch size is not static; batch it with drop_remainder=True"),
    (lambda ds: ds.batch(4, drop_remainder=True),
     re.escape("RobustModel's aggregator=winsorized:2: need 0 <= 2c < batch_size=4")),
])
def test_fit_refuses_what_the_aggregator_cannot_run_before_training(make, message):
    x, y = data(0, 4 * B)
    model = RobustModel(net(), Winsorized(c=2))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    before = [v.numpy() for v in model.net.trainable_variables]
    with pytest.raises(ValueError, match=message):
        model.fit(make(tf.data.Dataset.from_tensor_slices((x, y))), epochs=1, verbose=0)
    for a, v in zip(before, model.net.trainable_variables):
        np.testing.assert_array_equal(a, v.numpy())


def plain_keras_fit(loss, optimizer, x, y, batch):
    """Weights after Keras' own fit of the seed-0 net: the reference for the mean."""
    model = net()
    model.compile(optimizer=optimizer, loss=loss)
    model.fit(x, y, batch_size=batch, shuffle=False, epochs=1, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


def soft_squared_error(y, logits):
    """A custom per-example loss of one-hot labels and logits."""
    return tf.reduce_sum((tf.nn.softmax(logits) - y) ** 2, axis=-1)


@pytest.mark.parametrize("aggregator", [Mean(), Winsorized(c=0)], ids=str)
@pytest.mark.parametrize("loss,one_hot", [
    (lambda: keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2), True),
    (lambda: soft_squared_error, True),
    (lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True), False),
], ids=["smoothed_one_hot", "custom_function", "sparse"])
def test_any_loss_and_optimizer_give_kerass_own_update_under_the_mean(aggregator, loss, one_hot):
    # The mean of per-example gradients (winsorized with c = 0 goes through the
    # per-example layer rules) of any loss, applied by Adam, is what Keras' own
    # fit does with that loss and Adam.
    x, y = data(0, 3 * B)
    labels = np.eye(C, dtype=np.float32)[y] if one_hot else y
    model = RobustModel(net(), aggregator)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss())
    model.fit(x, labels, batch_size=B, shuffle=False, epochs=1, verbose=0)
    want = plain_keras_fit(loss(), keras.optimizers.Adam(0.01), x, labels, B)
    for got, w in zip(model.net.trainable_variables, want):
        np.testing.assert_allclose(got.numpy(), w, rtol=1e-5, atol=1e-6)
    got = model.evaluate(x, labels, batch_size=5, return_dict=True, verbose=0)
    assert got["loss"] == pytest.approx(float(keras.ops.mean(
        gradients_loss(loss())(labels, model.net(x)))), rel=1e-5)


def gradients_loss(loss):
    from cg_tf.robust.gradients import per_example_loss
    return per_example_loss(loss)


@pytest.mark.parametrize("aggregator", [Mean(), Winsorized(c=1), MedianOfMeans(k=3)], ids=str)
def test_compiled_metrics_see_the_outputs_the_update_came_from(aggregator):
    x, y = data(0, 3 * B)
    top2 = keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")
    model = RobustModel(net(), aggregator)
    model.compile(optimizer=keras.optimizers.SGD(0.1), metrics=[top2])
    history = model.fit(x, y, batch_size=B, shuffle=False, verbose=0)
    reference = RobustModel(net(), aggregator)
    reference.compile(optimizer=keras.optimizers.SGD(0.1))
    hits = []
    for i in range(3):  # top-2 hits of the weights each step starts from
        xb, yb = x[i * B:(i + 1) * B], y[i * B:(i + 1) * B]
        top = np.argsort(reference.net(xb).numpy(), -1)[:, -2:]
        hits += list((top == yb[:, None]).any(-1))
        reference.train_step((tf.constant(xb), tf.constant(yb)))
    assert history.history["top2"][-1] == pytest.approx(np.mean(hits))
    got = model.evaluate(x, y, batch_size=5, return_dict=True, verbose=0)
    top = np.argsort(model.net(x).numpy(), -1)[:, -2:]
    assert got["top2"] == pytest.approx(np.mean((top == y[:, None]).any(-1)))
    assert set(got) == {"loss", "accuracy", "top2"}


def test_compiled_metrics_are_the_same_on_two_replicas():
    x, y = data(0, 3 * B)
    history = {}
    for replicas in (1, 2):
        strategy = two_replicas() if replicas == 2 else tf.distribute.get_strategy()
        with strategy.scope():
            model = RobustModel(net(), Winsorized(c=1))
            model.compile(optimizer=keras.optimizers.SGD(0.1), metrics=[
                keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")])
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(B, drop_remainder=True)
        history[replicas] = model.fit(ds, epochs=2, verbose=0).history
    assert history[1]["top2"] == pytest.approx(history[2]["top2"], abs=1e-6)
    assert history[1]["loss"] == pytest.approx(history[2]["loss"], rel=1e-5)


def test_fit_takes_arrays_and_leaves_out_the_last_partial_batch(capsys):
    x, y = data(1, 1400)
    model = RobustModel(net(), Winsorized(c=2))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(x, y, batch_size=64, epochs=2, verbose=0, validation_split=0.1)
    assert len(history.history["loss"]) == 2 and "val_accuracy" in history.history
    # 1,260 training examples after the split: 19 batches of 64, 44 left out.
    assert "44 of the 1260 examples do not fill a batch of 64" in capsys.readouterr().err
    # Unshuffled, the same weights as the dataset of whole batches gives.
    same = [RobustModel(net(), Winsorized(c=2)) for _ in range(2)]
    for m in same:
        m.compile(optimizer=keras.optimizers.SGD(0.1))
    same[0].fit(x[:100], y[:100], batch_size=B, shuffle=False, verbose=0)
    same[1].fit(tf.data.Dataset.from_tensor_slices((x[:100], y[:100])).batch(
        B, drop_remainder=True), verbose=0)
    for a, b in zip(*(m.net.trainable_variables for m in same)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("aggregator,optimizer,message", [
    (RM3(), lambda: keras.optimizers.SGD(0.1, momentum=0.9),
     "aggregator=rm3: refuses SGD's momentum=0.9: the papers found momentum unstable"),
    (RM3(), lambda: keras.optimizers.Adam(0.01), "aggregator=rm3: refuses Adam's beta_1=0.9"),
    (MedianOfMeans(k=5), lambda: keras.optimizers.RMSprop(0.01, momentum=0.5),
     "aggregator=median_of_means:5: refuses RMSprop's momentum=0.5"),
    (Trimmed(c=25), lambda: keras.optimizers.SGD(0.1),
     re.escape("aggregator=trimmed:25: need 0 <= 2c < batch_size=50")),
    (MedianOfMeans(k=7), lambda: keras.optimizers.SGD(0.1), "7 groups do not divide"),
])
def test_fit_applies_the_command_lines_rules(aggregator, optimizer, message):
    x, y = data(0, 200)
    model = RobustModel(net(), aggregator)
    model.compile(optimizer=optimizer())
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, batch_size=50, verbose=0)


def test_fit_refuses_weights_and_labels_it_cannot_use():
    x, y = data(0, 4 * B)
    model = RobustModel(net(), Winsorized(c=1))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    before = [v.numpy() for v in model.net.trainable_variables]
    for kwargs in ({"sample_weight": np.zeros(4 * B)}, {"class_weight": {0: 1.0, 1: 2.0}}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} is refused: the aggregator "
                                             "alone weighs the examples"):
            model.fit(x, y, batch_size=B, verbose=0, **kwargs)
    weighted = tf.data.Dataset.from_tensor_slices((x, y, np.zeros(4 * B, np.float32)))
    with pytest.raises(ValueError, match="the data carry sample weights"):
        model.fit(weighted.batch(B, drop_remainder=True), verbose=0)
    with pytest.raises(ValueError, match=r"the labels are float32 of shape \[12\]; the default "
                                         "loss takes integer class labels"):
        model.fit(x, y.astype(np.float32) + 0.5, batch_size=B, verbose=0)
    with pytest.raises(ValueError, match="compile: weighted_metrics is refused"):
        model.compile(optimizer="sgd", weighted_metrics=["accuracy"])
    for a, v in zip(before, model.net.trainable_variables):
        np.testing.assert_array_equal(a, v.numpy())


def test_a_non_finite_loss_stops_fit():
    x, y = data(0, 4 * B)
    model = RobustModel(net(), Mean())
    model.compile(optimizer=keras.optimizers.SGD(1e35))  # the weights overflow at once
    seen = []  # what a user's callback (a checkpoint, say) is shown
    watch = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(float(logs["loss"])))
    with pytest.raises(NonFiniteLoss, match=r"the loss is (nan|inf) at batch 1 of the epoch"):
        model.fit(x, y, batch_size=B, shuffle=False, verbose=0, callbacks=[watch])
    assert len(seen) == 1 and np.isfinite(seen[0])  # the stop came before it saw batch 1


def test_an_aggregator_must_be_an_object():
    with pytest.raises(TypeError, match="aggregators.parse"):
        RobustModel(net(), "winsorized:4")


def test_memorization_callback_writes_what_the_tab_reads(digits_dir, tmp_path):
    from cg_tf.data.reader import Reader
    reader = Reader.open(digits_dir, batch_size=50, eval_sample_size=100)
    keras.utils.set_random_seed(0)
    mine = keras.Sequential([keras.Input(reader.image_shape), keras.layers.Flatten(),
                             keras.layers.Dense(32, activation="relu"),
                             keras.layers.Dense(reader.num_classes)])
    model = RobustModel(mine, Winsorized(c=2))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    log_dir = str(tmp_path / "runs" / "mine")
    callback = MemorizationCallback(reader, log_dir, MonitorConfig(probe_size=20), log_every=5)
    model.fit(reader.train_dataset(), epochs=2, steps_per_epoch=reader.steps_per_epoch,
              callbacks=[callback], verbose=0)
    total = 2 * reader.steps_per_epoch
    (run,) = report.load_runs(str(tmp_path / "runs"))
    assert run.config["aggregator"] == {"name": "winsorized", "c": 2}
    curve = run.scalars[tags.ACCURACY_CURVES["corrupt"]]
    # The trainer's schedule: log-spaced steps, every epoch, the last step.
    assert [s for s, _ in curve] == metrics.eval_schedule(total, reader.steps_per_epoch)
    assert curve[-1][1] == pytest.approx(callback.results["corrupt"]["accuracy"])
    assert tags.COHERENCE in run.scalars and tags.TRAIN_LOSS in run.scalars
    assert tags.clipped_fraction_tag("corrupt") in run.scalars  # the winsorized probe
    with open(os.path.join(log_dir, LEARNING_EVENTS)) as f:
        assert len(f.readlines()) == 1 + 200  # header, 100 pristine and 100 corrupt


def test_the_callback_probes_with_the_models_batchnorm_mode(digits_dir, tmp_path):
    from cg_tf.data.reader import Reader
    reader = Reader.open(digits_dir, batch_size=50, eval_sample_size=100)
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input(reader.image_shape), keras.layers.Flatten(),
                            keras.layers.Dense(16), keras.layers.BatchNormalization(),
                            keras.layers.ReLU(), keras.layers.Dense(reader.num_classes)])
    model = RobustModel(net, Winsorized(c=2), bn_mode="exact")
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    callback = MemorizationCallback(reader, str(tmp_path / "run"), MonitorConfig(probe_size=20))
    model.fit(reader.train_dataset(), epochs=1, steps_per_epoch=2, callbacks=[callback],
              verbose=0)
    assert callback.monitor.probe.source.bn_mode == "exact"


def test_memorization_callback_needs_the_number_of_steps(digits_dir, tmp_path):
    from cg_tf.data.reader import Reader
    reader = Reader.open(digits_dir, batch_size=50, eval_sample_size=100)
    model = keras.Sequential([keras.Input(reader.image_shape), keras.layers.Flatten(),
                              keras.layers.Dense(reader.num_classes)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    ds = reader.train_dataset(num_steps=3).map(lambda b: (b["image"], b["label"]))
    with pytest.raises(ValueError, match="pass steps_per_epoch to fit"):
        model.fit(ds, epochs=1, verbose=0, shuffle=False,
                  callbacks=[MemorizationCallback(reader, str(tmp_path / "run"))])


def readme_example() -> str:
    """The Python block of the README's "Your own model" section."""
    text = open(os.path.join(REPO, "README.md")).read()
    section = text[text.index("## Your own model"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_printed(digits_dir, tmp_path, monkeypatch, capsys):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 20
    os.makedirs(tmp_path / "data")
    os.symlink(digits_dir, tmp_path / "data" / "digits_noisy50")  # what the first command builds
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(compile(code, "README.md", "exec"), names)
    sgd, wins = names["summaries"]["plain SGD"], names["summaries"]["winsorized:4"]
    assert sgd["corrupt_accuracy"] >= 0.5 and wins["corrupt_accuracy"] <= 0.1, (sgd, wins)
    assert wins["test_accuracy"] > sgd["test_accuracy"]
    out = capsys.readouterr().out
    assert re.search(r"^ +plain SGD +winsorized:4$", out, re.M), out
    assert re.search(r"corrupt ones, against their noisy label +%.3f +%.3f" % (
        sgd["corrupt_accuracy"], wins["corrupt_accuracy"]), out), out
    runs = report.load_runs(str(tmp_path / "runs" / "python"))
    assert sorted(r.name for r in runs) == ["mean", "winsorized_c4"]
    assert all(tags.ACCURACY_CURVES["corrupt"] in r.scalars for r in runs)


@pytest.mark.parametrize("aggregator", [RM3(), Winsorized(c=2, layers="hidden")], ids=str)
def test_save_and_load_round_trip_and_training_continues_alike(aggregator, tmp_path):
    x, y = data(0, 6 * B)
    labels = np.eye(C, dtype=np.float32)[y]
    model = RobustModel(net(), aggregator, weight_decay=1e-3)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1))
    model.fit(x[:3 * B], labels[:3 * B], batch_size=B, shuffle=False, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, RobustModel) and loaded.aggregator == aggregator
    assert loaded.weight_decay == 1e-3
    for a, b in zip(model._state_variables(), loaded._state_variables()):  # RM3's history
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for m in (model, loaded):  # the same next steps, the loss and the optimizer restored
        m.fit(x[3 * B:], labels[3 * B:], batch_size=B, shuffle=False, verbose=0)
    for a, b in zip(model.net.trainable_variables, loaded.net.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loaded.net.predict(x, verbose=0), model.net(x), atol=1e-5)


def test_save_weights_and_model_checkpoint_work(tmp_path):
    x, y = data(0, 4 * B)
    model = RobustModel(net(), RM3())
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    best = str(tmp_path / "best.keras")
    model.fit(x, y, batch_size=B, epochs=2, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(best)])
    assert isinstance(keras.models.load_model(best), RobustModel)
    model.save_weights(str(tmp_path / "w.weights.h5"))
    other = RobustModel(net(seed=1), RM3())
    other.load_weights(str(tmp_path / "w.weights.h5"))
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_corrupt_labels_has_the_pipelines_semantics():
    from cg_tf.data import corrupt_labels
    from cg_tf.data.noise import NoiseSpec, pointwise_label
    y = np.random.default_rng(0).integers(0, 10, 5000)
    for mode in ("uniform", "uniform_other", "permute"):
        noisy, corrupt = corrupt_labels(y, 0.4, mode, seed=3)
        np.testing.assert_array_equal(corrupt, noisy != y)
        want = {"uniform": 0.4 * 0.9, "uniform_other": 0.4}.get(mode)
        if want:
            assert corrupt.mean() == pytest.approx(want, abs=0.03)
            assert all(noisy[i] == pointwise_label(NoiseSpec(mode, 0.4, 3), str(i), y[i], 10)
                       for i in range(0, 5000, 97))
        else:  # a permutation of the selected labels keeps the class counts
            np.testing.assert_array_equal(np.bincount(noisy, minlength=10),
                                          np.bincount(y, minlength=10))
            assert corrupt.mean() == pytest.approx(0.4 * 0.9, abs=0.03)
    with pytest.raises(ValueError, match="integer class labels"):
        corrupt_labels(y.astype(np.float32), 0.5)
    # Labels that tell no class count are refused, not returned unchanged.
    with pytest.raises(ValueError, match=r"^corrupt_labels: every label is 0, so the number of "
                                         r"classes is unknown; pass num_classes$"):
        corrupt_labels(np.zeros(10, int), 0.5)
    assert corrupt_labels(np.zeros(10, int), 1.0, "uniform_other", num_classes=3)[1].all()
    with pytest.raises(ValueError, match=r"num_classes must be an integer of 2 or more, got 0"):
        corrupt_labels(y, 0.5, num_classes=0)
    with pytest.raises(ValueError, match=r"integer class labels, one per example"):
        corrupt_labels(np.array([], int), 0.5)


def test_the_callback_watches_arrays_and_fills_fits_logs(tmp_path):
    from cg_tf import ArrayData, corrupt_labels
    from cg_tf.measure.monitor import LEARNED_IDS, LEARNING_EVENTS
    x, y = data(0, 600)
    noisy, corrupt = corrupt_labels(y, 0.5, seed=0)
    x_test, y_test = data(1, 100)
    arrays = ArrayData(x, noisy, y, batch_size=50, test=(x_test, y_test), eval_sample_size=100)
    model = RobustModel(net(), Winsorized(c=2))
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    callback = MemorizationCallback(arrays, str(tmp_path / "run"),
                                    MonitorConfig(eval_log_spaced=False, probe_size=50))
    history = model.fit(x, noisy, batch_size=50, epochs=3, verbose=0, callbacks=[callback])
    # Each epoch's evaluation, in History: recomputed here from the final weights.
    logits = model.net(x).numpy().argmax(-1)
    first = {"pristine": np.flatnonzero(~corrupt)[:100], "corrupt": np.flatnonzero(corrupt)[:100]}
    for group, index in first.items():
        want = float(np.mean(logits[index] == noisy[index]))
        assert history.history[f"{group}_accuracy"][-1] == pytest.approx(want)
        assert callback.summary[f"{group}_accuracy"] == pytest.approx(want)
    test_want = float(np.mean(model.net(x_test).numpy().argmax(-1) == y_test))
    assert history.history["test_accuracy"][-1] == pytest.approx(test_want)
    assert len(history.history["corrupt_true_label_accuracy"]) == 3
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["corrupt_accuracy"] == pytest.approx(callback.summary["corrupt_accuracy"])
    assert saved["steps"] == 3 * 12 and saved["noise"]["rate"] == pytest.approx(corrupt.mean())
    assert (tmp_path / "run" / LEARNING_EVENTS).exists() and (tmp_path / "run" / LEARNED_IDS).exists()
    # A second fit into the same directory is refused before it trains, unless overwrite.
    before = [v.numpy() for v in model.net.trainable_variables]
    with pytest.raises(ValueError, match="holds an earlier run's files"):
        model.fit(x, noisy, batch_size=50, epochs=1, verbose=0, callbacks=[
            MemorizationCallback(arrays, str(tmp_path / "run"))])
    for a, v in zip(before, model.net.trainable_variables):
        np.testing.assert_array_equal(a, v.numpy())
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ValueError, match=rf"^MemorizationCallback: log_dir="
                                         rf"'{tmp_path / 'a_file'}' is a file, not a directory$"):
        MemorizationCallback(arrays, str(tmp_path / "a_file"))
    again = MemorizationCallback(arrays, str(tmp_path / "run"), overwrite=True,
                                 config=MonitorConfig(eval_log_spaced=False, probe_size=0))
    model.fit(x, noisy, batch_size=50, epochs=1, verbose=0, callbacks=[again])
    assert len(report.load_runs(str(tmp_path))) == 1 and again.summary["steps"] == 12
    # The same callback in a second fit continues that history: nothing deleted.
    model.fit(x, noisy, batch_size=50, epochs=2, verbose=0, callbacks=[again])
    assert again.summary["steps"] == 36
    (run,) = report.load_runs(str(tmp_path))
    assert [s for s, _ in run.scalars[tags.eval_tag("test", "accuracy")]] == [12, 24, 36]
    with pytest.raises(ValueError, match="measures the model of its first fit"):
        other = RobustModel(net(), Mean())
        other.compile(optimizer=keras.optimizers.SGD(0.1))
        other.fit(x, noisy, batch_size=50, epochs=1, verbose=0, callbacks=[again])


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_silences_tensorflows_informational_lines(quiet):
    code = ("import cg_tf; cg_tf.quiet()\n" if quiet else "") + (
        "import logging\nimport tensorflow as tf\n"
        "print(float(tf.function(lambda x: x * 2, jit_compile=True)(tf.constant(1.0))))\n"
        "logging.warning('weights growing')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={k: v for k, v in os.environ.items()
                                                      if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert done.returncode == 0 and done.stdout.strip() == "2.0", done.stderr[-2000:]
    info = [line for line in done.stderr.splitlines() if re.match(r"I\d{4} ", line)]
    assert bool(info) != quiet, done.stderr  # e.g. oneDNN's and XLA's lines
    # The project's warnings read as the command lines print them.
    assert bool(re.search(r"^\d\d:\d\d:\d\d weights growing$", done.stderr, re.M)) == quiet


@pytest.mark.parametrize("call, message", [
    (lambda f, A: f([1, 15, 3], 0.5, num_classes=10),
     "corrupt_labels: labels holds the label 15, outside the num_classes=10 classes 0 to 9"),
    (lambda f, A: f([1, -1, 3], 0.5), "corrupt_labels: labels holds the negative label -1"),
    (lambda f, A: f([1, 9, 3], 0.5, num_classes=1),
     "corrupt_labels: num_classes must be an integer of 2 or more, got 1"),
    (lambda f, A: f([], 0.5), r"corrupt_labels: labels must be integer class labels, one per "
                              r"example; got float64 of shape \(0,\)"),
    (lambda f, A: f([1, 2], 1.5), r"corrupt_labels: rate must be in \[0, 1\], got 1.5"),
    (lambda f, A: A(np.zeros((3, 2)), [0, 1, 2], [0, 1, 2], 1, noise_rate=5),
     r"ArrayData: noise_rate must be in \[0, 1\], got 5"),
    (lambda f, A: A(np.zeros((3, 2)), [0, -1, 2], [0, 1, 2], 1),
     "ArrayData: labels holds the negative label -1"),
    (lambda f, A: A(np.zeros((3, 2)), [0, 1, 9], [0, 1, 2], 1, num_classes=3),
     "ArrayData: labels holds the label 9, outside the num_classes=3 classes 0 to 2"),
    (lambda f, A: A(np.zeros((3, 2)), [0, 1], [0, 1, 2], 1),
     "ArrayData: labels has 2 labels for 3 inputs"),
    (lambda f, A: A(np.zeros((3, 2)), [0, 1, 2], [0, 1, 2], 1, test=(np.zeros((2, 2)), [0])),
     "ArrayData: test labels has 1 labels for 2 inputs"),
    (lambda f, A: A(np.zeros((3, 2)), [0, 1, 2], [0, 1, 2], 1, test=(np.zeros((2, 5)), [0, 1])),
     r"ArrayData: test inputs have shape \(2, 5\), the training inputs \(3, 2\)"),
    (lambda f, A: A(np.zeros((0, 2)), [], [], 1),
     r"ArrayData: x must hold one or more inputs, got shape \(0, 2\)"),
], ids=["out of range", "negative", "one class", "empty", "rate", "array rate",
        "array negative", "array out of range", "array length", "test length", "test shape",
        "no inputs"])
def test_labels_and_rates_out_of_range_are_refused_naming_the_argument(call, message):
    from cg_tf import ArrayData, corrupt_labels
    with pytest.raises(ValueError, match=f"^{message}"):
        call(corrupt_labels, ArrayData)


def one_by_eight(outputs=1, inputs=1):
    """A functional net on 8 features with `inputs` inputs and `outputs` heads."""
    ins = [keras.Input((8,)) for _ in range(inputs)]
    h = keras.layers.Dense(6)(ins[0] if inputs == 1 else keras.layers.Concatenate()(ins))
    heads = [keras.layers.Dense(3)(h) for _ in range(outputs)]
    return keras.Model(ins if inputs > 1 else ins[0], heads if outputs > 1 else heads[0])


def generator_of(x, y):
    while True:
        yield x[:20], y[:20]


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.x[20 * i:20 * (i + 1)], self.y[20 * i:20 * (i + 1)]


FEATURES = np.random.default_rng(0).random((40, 8), dtype=np.float32)
CLASSES = np.arange(40) % 3


@pytest.mark.parametrize("make, fit, message", [
    (lambda: one_by_eight(outputs=2), None, r"^RobustModel: net '.*' has 2 outputs; the "
     r"per-example gradients take a model of one input \(the images\) and one output"),
    (lambda: one_by_eight(inputs=2), None, r"^RobustModel: net '.*' has 2 inputs"),
    (one_by_eight, lambda m: m.fit(generator_of(FEATURES, CLASSES), steps_per_epoch=2),
     r"^RobustModel.fit: x is a generator; fit takes arrays \(x and y\) or a tf.data.Dataset of "
     r"\(inputs, labels\) batches: wrap it with tf.data.Dataset.from_generator"),
    (one_by_eight, lambda m: m.fit(Batches(FEATURES, CLASSES)), r"^RobustModel.fit: x is a "
     r"Batches; fit takes arrays"),
    (one_by_eight, lambda m: m.fit(tf.data.Dataset.from_tensor_slices(FEATURES).batch(
        20, drop_remainder=True)), r"^RobustModel.fit: the dataset gives no labels"),
    (one_by_eight, lambda m: m.fit(FEATURES, CLASSES + 8, batch_size=20),
     r"^RobustModel.fit: y holds the label 10, outside 0 \.\. 2, the classes of "),
    (one_by_eight, lambda m: m.fit(FEATURES, CLASSES - 1, batch_size=20),
     r"^RobustModel.fit: y holds the label -1, outside 0 \.\. 2"),
    (one_by_eight, lambda m: m.fit(tf.data.Dataset.from_tensor_slices(
        (FEATURES, CLASSES + 1)).batch(20, drop_remainder=True)),
     r"^RobustModel.fit: a batch holds a label outside 0 \.\. 2, the classes of "),
    (one_by_eight, lambda m: m.fit([FEATURES, FEATURES], CLASSES, batch_size=20),
     r"^RobustModel.fit: x is a list of 2 inputs; the per-example gradients take a model of "
     r"one input"),
    (one_by_eight, lambda m: m.fit(tf.data.Dataset.from_tensor_slices(
        ((FEATURES, FEATURES), CLASSES)).batch(20, drop_remainder=True)),
     r"^RobustModel.fit: the dataset's inputs are a tuple, not one tensor"),
    (one_by_eight, lambda m: m.save("m.h5"), r"^RobustModel.save: m.h5: the legacy HDF5 format "
     r"cannot hold a RobustModel \(it would not load\); save to a .keras file$"),
])
def test_what_the_python_face_cannot_take_is_refused_in_one_sentence(make, fit, message):
    """Each ends in one ValueError in Python's terms (the argument, not a flag)
    before or instead of a graph error deep in TensorFlow."""
    with pytest.raises(ValueError, match=message):
        model = RobustModel(make(), Winsorized(c=1))
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        fit(model)


@pytest.mark.parametrize("jit", [True, False], ids=["XLA", "no XLA"])
def test_a_datasets_bad_labels_are_refused_with_or_without_xla(jit):
    """XLA drops the in-graph assertion: a compiled step counts the labels
    outside the classes instead, moves no weight, and fit refuses the batch."""
    net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    model = RobustModel(net, Winsorized(c=1))
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
    before = [w.numpy().copy() for w in net.weights]
    bad = tf.data.Dataset.from_tensor_slices((FEATURES, CLASSES + 1)).batch(20, drop_remainder=True)
    with pytest.raises(ValueError, match=r"^RobustModel.fit: a batch holds a label outside "
                                         r"0 \.\. 2, the classes of "):
        model.fit(bad, verbose=0)
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, net.weights))
    good = tf.data.Dataset.from_tensor_slices((FEATURES, CLASSES)).batch(20, drop_remainder=True)
    model.fit(good, verbose=0)
    assert not all(np.array_equal(b, w.numpy()) for b, w in zip(before, net.weights))


def test_a_step_under_a_strategy_that_always_compiles_counts_bad_labels(monkeypatch):
    """TPUStrategy compiles every step with XLA, jit_compile or not, and XLA
    drops the assertion (here: a step compiled as TPUStrategy would, of a model
    compiled without jit_compile, under a strategy standing for TPUStrategy).
    The step counts the labels outside the classes and moves no weight."""
    from cg_tf.training import robust_model
    net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    model = RobustModel(net, Winsorized(c=1))
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    bad = (tf.constant(FEATURES[:20]), tf.constant(CLASSES[:20] + 1))
    monkeypatch.setattr(robust_model, "ALWAYS_COMPILED", (type(tf.distribute.get_strategy()),))
    before = [w.numpy().copy() for w in net.weights]
    logs = tf.function(model.train_step, jit_compile=True)(bad)
    assert logs["loss"] == robust_model.LABELS_OUTSIDE_LOSS
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, net.weights))


def test_xla_reports_the_same_epoch_means():
    """The XLA step's label count adds no logs key (Keras would then report
    each epoch's last batch instead of its mean)."""
    history = {}
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        model = RobustModel(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]),
                            Winsorized(c=1))
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
        history[jit] = model.fit(tf.data.Dataset.from_tensor_slices((FEATURES, CLASSES)).batch(
            10, drop_remainder=True), epochs=2, verbose=0).history
    assert sorted(history[True]) == sorted(history[False]) == ["accuracy", "loss"]
    for key in history[False]:
        np.testing.assert_allclose(history[True][key], history[False][key], rtol=1e-5)


def test_a_whole_float_parameter_trains_as_its_integer():
    model = RobustModel(one_by_eight(), Winsorized(4.0))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(FEATURES, CLASSES, batch_size=20, verbose=0)
    assert model.aggregator == Winsorized(4)


@pytest.mark.parametrize("kwargs, message", [
    ({"per_example_chunk": 0}, r"^per_example_chunk must be positive, got 0$"),
    ({"bn_mode": "magic"}, r"^bn_mode must be one of .*, got 'magic'$"),
])
def test_robust_models_arguments_are_named_as_python_names_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RobustModel(one_by_eight(), Winsorized(c=1), **kwargs)


def test_the_package_lists_its_public_face():
    """dir(cg_tf) shows what `from cg_tf import ...` gives (tab completion),
    though each name is imported on first use."""
    import cg_tf
    listed = set(dir(cg_tf))
    assert set(cg_tf.__all__) <= listed and "importlib" not in listed
    assert {"RobustModel", "Winsorized", "MemorizationCallback", "quiet"} <= listed
    assert all(getattr(cg_tf, n) is not None for n in cg_tf.__all__)


def test_a_refused_momentum_says_what_to_set():
    model = RobustModel(net(), RM3())
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    with pytest.raises(ValueError, match=r"refuses Adam's beta_1=0.9: the papers found momentum "
                                         r"unstable with it; set it to 0 \(train without "
                                         r"momentum\)"):
        model.fit(*data(0, 4 * B), batch_size=B, verbose=0)
