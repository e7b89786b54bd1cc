"""tools.zero_updates: units and classes that winsorizing gives exactly zero,
its counts on hand-made activations and labels, its expectations against
enumeration, and the claim itself against the project's Winsorized aggregator."""

import itertools
import types

import numpy as np
import pytest
import tensorflow as tf

from tools import zero_updates as zu


def test_active_counts_and_their_shares():
    # 4 examples x 5 units: unit 0 never active (dead), unit 1 on one example,
    # unit 2 on two, unit 3 on all, unit 4 on three (0 is not active).
    h = np.array([[0, 1.0, 2.0, 1.0, 0.0],
                  [0, 0.0, 0.5, 2.0, 3.0],
                  [0, 0.0, 0.0, 1.0, 1.0],
                  [0, 0.0, 0.0, 4.0, 1.0]])
    counts = zu.active_counts(h)
    assert counts.tolist() == [0, 1, 2, 4, 3]
    # Two batches: the second with every unit active on all 4 examples.
    both = np.stack([counts, [4, 4, 4, 4, 4]])
    assert zu.shares(both, 1) == pytest.approx(
        {"share_at_most_c": 0.2, "share_none": 0.1, "share_rare": 0.1, "per_batch": 1.0,
         "batches_with_any": 0.5})
    assert zu.shares(both, 2) == pytest.approx(
        {"share_at_most_c": 0.3, "share_none": 0.1, "share_rare": 0.2, "per_batch": 1.5,
         "batches_with_any": 0.5})


def test_class_counts_and_their_shares():
    labels = np.array([[0, 0, 1, 1, 1, 2], [0, 1, 2, 0, 1, 2]])
    counts = zu.class_counts(labels, 4)
    assert counts.tolist() == [[2, 3, 1, 0], [2, 2, 2, 0]]
    assert zu.shares(counts, 1) == pytest.approx(
        {"share_at_most_c": 3 / 8, "share_none": 2 / 8, "share_rare": 1 / 8, "per_batch": 1.5,
         "batches_with_any": 1.0})
    assert zu.shares(counts[:, :3], 1)["batches_with_any"] == 0.5


@pytest.mark.parametrize("c", [0, 1, 2])
def test_expectations_match_enumeration(c):
    # With replacement: every sequence of n draws over k equally likely classes.
    n, k = 6, 3
    seqs = np.array(list(itertools.product(range(k), repeat=n)))
    counts = zu.class_counts(seqs, k)
    assert zu.binomial_at_most(n, 1 / k, c) == pytest.approx((counts[:, 0] <= c).mean())
    assert zu.none_at_most_multinomial(n, k, c) == pytest.approx(
        (counts.min(1) > c).mean())
    # Without replacement: every subset of n of a population of classes sized 4, 3, 2.
    sizes, n = [4, 3, 2], 5
    population = np.repeat(np.arange(3), sizes)
    subsets = np.array([population[list(s)] for s in itertools.combinations(range(9), n)])
    counts = zu.class_counts(subsets, 3)
    for j, size in enumerate(sizes):
        assert zu.hypergeometric_at_most(n, size, 9, c) == pytest.approx(
            (counts[:, j] <= c).mean())
    assert zu.none_at_most_hypergeometric(n, sizes, c) == pytest.approx(
        (counts.min(1) > c).mean())


def test_expectations_of_the_study_batch():
    e = zu.expectations(100, [6000] * 10, 8)
    # 10 classes of 6,000 of 60,000, batches of 100: close to Binomial(100, 0.1).
    assert e["expected_share_binomial"] == pytest.approx(0.3209, abs=1e-4)
    assert e["expected_share_hypergeometric"] == pytest.approx(
        e["expected_share_binomial"], rel=0.01)
    assert 0 < e["expected_batches_with_any_binomial"] < 10 * e["expected_share_binomial"]
    assert e["expected_batches_with_any_hypergeometric"] == pytest.approx(
        e["expected_batches_with_any_binomial"], rel=0.02)


def test_the_check_of_updates():
    kernel = np.array([[0.0, 1.0, 0.0], [0.0, -2.0, 0.0]])  # [in 2, units 3]
    bias = np.array([0.0, 0.5, 0.0])
    next_kernel = np.array([[0.0, 0.0], [7.0, 1.0], [0.0, -3.0]])  # [units 3, out 2]
    assert zu.zero_units(kernel, bias).tolist() == [True, False, True]
    assert zu.unit_update_max(kernel, bias, next_kernel, np.array([True, False, False])) == 0
    assert zu.unit_update_max(kernel, bias, next_kernel, np.array([False, False, True])) == 3
    assert zu.unit_update_max(kernel, bias, next_kernel, np.array([False] * 3)) == 0
    check = zu.class_check(next_kernel, np.array([0.2, -0.1]), np.array([-0.3, 0.1]),
                           np.array([True, False]))
    assert check == {"check_min_bias": 0.2, "check_min_kernel": 0.0, "check_mean_negative": 1}
    assert zu.class_check(next_kernel, np.zeros(2), np.zeros(2),
                          np.array([False, False]))["check_min_bias"] == ""


def test_checkpoint_steps_need_an_index_and_data(tmp_path):
    for name in ("ckpt-9.index", "ckpt-9.data-00000-of-00001", "ckpt-10.index",
                 "ckpt-10.data-00000-of-00001", "ckpt-11.index", "checkpoint"):
        (tmp_path / name).write_text("")
    assert zu.checkpoint_steps(str(tmp_path)) == [10, 9]  # 11 has no data yet
    into = tmp_path / "copy"
    into.mkdir()
    prefix = zu.copy_checkpoint(str(tmp_path), 10, str(into))
    assert prefix == str(into / "ckpt-10")
    assert sorted(p.name for p in into.iterdir()) == ["ckpt-10.data-00000-of-00001",
                                                      "ckpt-10.index"]


@pytest.mark.parametrize("c", [1, 2])
def test_at_most_c_nonzero_values_winsorize_to_exactly_zero(c):
    """The claim on per-example values alone, through the aggregator's own paths
    (a small variable side by side with the others, a large one by its own
    tiles): at most c nonzero values of a coordinate, of one sign or of both,
    give exactly 0."""
    from cg_tf.robust import tiled
    from cg_tf.robust.aggregators import Winsorized
    from cg_tf.robust.layer_rules import Outer, Stacked
    rng = np.random.default_rng(c)
    b = 12
    g = np.zeros((b, 4, 6), np.float32)
    for j in range(6):  # column j: c nonzero values, all > 0, all < 0, or mixed
        rows = rng.choice(b, c, replace=False)
        signs = {0: np.ones(c), 1: -np.ones(c)}.get(j % 3, rng.choice([-1.0, 1.0], c))
        g[rows, :3, j] = signs[:, None] * rng.uniform(0.5, 2.0, (c, 3))
    g[:, 3, :] = rng.normal(size=(b, 6))  # a row of dense values: not zero
    stat = Winsorized(c)
    small = tiled.aggregate([Stacked(tf.constant(g))], stat, [tf.zeros([4, 6])])[0].numpy()
    assert (small[:3] == 0).all() and (small[3] != 0).all()
    # A Dense kernel by tiles (past tiled.SMALL coordinates): example i's gradient
    # x_i (outer) d_i with d_i nonzero on at most c examples for output units 0..9.
    x = rng.uniform(0, 1, (b, 1, 80)).astype(np.float32)
    d = rng.normal(size=(b, 1, 60)).astype(np.float32)
    for o in range(10):
        d[np.setdiff1d(np.arange(b), rng.choice(b, c, replace=False)), 0, o] = 0
    d[:, 0, :2] = np.abs(d[:, 0, :2])  # one sign
    values = Outer(tf.constant(x), tf.constant(d))
    big = tiled.aggregate([values], stat, [tf.zeros([80, 60])])[0].numpy()
    assert big.shape == (80, 60) and 80 * 60 > tiled.SMALL
    assert (big[:, :10] == 0).all() and (big[:, 10:] != 0).all()


def test_a_unit_active_on_at_most_c_examples_and_a_rare_class_in_a_net():
    """On a tiny net through RobustModel's winsorized update: a unit active on
    exactly c examples gets exactly zero on its incoming and outgoing weights
    and bias (the mean moves them), and a class of at most c examples gets a
    positive bias gradient and no negative kernel entry."""
    import keras
    c, b = 2, 12
    keras.utils.set_random_seed(0)
    reader = types.SimpleNamespace(image_shape=(2, 2, 1), num_classes=3)
    study = zu.Weights(reader, {"model": "fc", "fc_widths": [6, 5], "init": "authors"})
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (b, 2, 2, 1)).astype(np.float32)
    kernel, bias = (v.numpy() for v in study.net.trainable_variables[:2])
    kernel[:, 0], kernel[0, 0] = 0.0, 1.0  # unit 0 of dense_0 sees the first pixel
    bias[0] = -np.sort(x[:, 0, 0, 0])[b - c - 1]  # and fires on its c largest values
    study.net.trainable_variables[0].assign(kernel)
    study.net.trainable_variables[1].assign(bias)
    y = np.array([0, 1] * 5 + [2, 2][:c], np.int32)  # class 2: c examples
    counts = study.counts(x)
    assert counts[0][0] == c
    checks = study.check_units(tf.constant(x), tf.constant(y), c)
    first = checks[0]
    assert first["check_predicted"] >= 1 and first["check_rare"] >= 1
    assert first["check_max_abs"] == 0.0  # exactly
    assert first["check_mean_nonzero"] >= 1  # the mean moves it
    assert first["check_zero_units"] >= first["check_predicted"]
    classes = study.check_classes(tf.constant(x), tf.constant(y), c)
    assert classes["check_predicted"] == 1
    assert classes["check_min_bias"] > 0 and classes["check_min_kernel"] >= 0



@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
    """A short winsorized:2 run of the trainer (seed 1), its starting norms
    and its final weights."""
    from cg_tf.data.reader import InputOptions
    from cg_tf.robust.aggregators import Winsorized
    from cg_tf.training.trainer import TrainConfig, Trainer
    run = tmp_path_factory.mktemp("runs") / "winsorized_c2_seed1"
    trainer = Trainer(TrainConfig(data_dir=digits_dir, model_dir=str(run), fc_widths=(16, 16),
                                  steps=10, batch_size=50, seed=1, aggregator=Winsorized(2),
                                  input=InputOptions(eval_sample_size=50)))
    start = trainer.monitor.health.start.numpy().copy()
    trainer.run()
    return types.SimpleNamespace(run=run, start=start, reader=trainer.reader, weights=[
        v.numpy() for v in trainer.model.net.trainable_variables])


def test_a_run_restores_and_its_initialization_is_rebuilt(trained):
    """The trainer's checkpoint restores into the tool's net (the weights the
    trainer ended with), and the rebuilt initialization has the run's
    starting norms."""
    study = zu.Weights(trained.reader, zu.read_config(str(trained.run)))
    assert zu.checkpoint_steps(str(trained.run / "checkpoints")) == [10]
    step, norms = study.restore(str(trained.run / "checkpoints" / "ckpt-10"))
    assert step == 10
    for mine, theirs in zip(study.net.trainable_variables, trained.weights):
        np.testing.assert_array_equal(mine.numpy(), theirs)
    np.testing.assert_allclose(norms, trained.start)
    np.testing.assert_allclose(study.set_initial(1), trained.start, rtol=1e-6)
    assert not np.array_equal(study.net.trainable_variables[0].numpy(), trained.weights[0])


def test_the_command_line_end_to_end(digits_dir, trained, tmp_path):
    import csv

    from conftest import run_main
    out = tmp_path / "zero_updates.csv"
    done = run_main("tools.zero_updates", f"--data_dir={digits_dir}", f"--runs={trained.run}",
                    f"--out={out}", "--batches=2", "--cs=1,2", "--label_steps=10")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    # init and the run: 2 hidden layers and classes x 2 c; the labels' rows: 2 c.
    assert len(rows) == 2 * 3 * 2 + 2
    assert {r["setting"] for r in rows} == {"init", "winsorized_c2", "labels"}
    assert {r["step"] for r in rows if r["setting"] == "winsorized_c2"} == {"10"}
    for r in rows:
        if r["check_max_abs"]:
            assert float(r["check_max_abs"]) == 0.0
    assert "check:" in done.stdout
