"""The network's health: layer norms and their growth, the logits' spread,
dead units, the drift warning; written by a run and kept across a resume."""

import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from cg_tf.data.reader import InputOptions
from cg_tf.measure import health, report, tags
from cg_tf.training import models
from cg_tf.training.trainer import TrainConfig, Trainer


def test_dead_fraction_counts_units_silent_on_every_example_and_position():
    a = np.ones((4, 3, 3, 5))
    a[..., 1] = 0  # silent everywhere
    a[..., 3] = -1
    a[:, 0, 0, 4] = -2  # fires elsewhere
    assert health.dead_fraction(a) == pytest.approx(2 / 5)
    assert health.dead_fraction(np.array([[0.0, 1.0], [0.0, -1.0]])) == 0.5


def test_health_measures_norms_growth_logits_and_dead_units(caplog):
    keras.utils.set_random_seed(0)
    net = models.fc((8, 8, 1), 10, (16, 8))
    sample = tf.random.uniform([50, 8, 8, 1])
    h = health.Health(net, sample, warn_growth=20)
    start = {l.name: np.sqrt(sum(np.sum(w.numpy() ** 2) for w in l.trainable_weights))
             for l in net.layers if l.trainable_weights}
    values = h.measure(1)
    for layer, norm in start.items():
        assert values[tags.weight_norm_tag(layer)] == pytest.approx(norm, rel=1e-5)
    assert values[tags.MAX_WEIGHT_GROWTH] == pytest.approx(1)
    logits = net(sample).numpy()
    assert values[tags.LOGITS_STD] == pytest.approx(logits.std(), rel=1e-5)
    # Kill every unit of dense_1 but two: a bias far below zero.
    layer = net.get_layer("dense_1")
    layer.bias.assign(np.r_[[0.0, 0.0], np.full(6, -10.0)])
    values = h.measure(2)
    assert values[tags.dead_units_tag("dense_1")] >= 6 / 8
    assert values[tags.DEAD_UNITS] == pytest.approx(
        (16 * values[tags.dead_units_tag("dense_0")] + 8 * values[tags.dead_units_tag("dense_1")])
        / 24)
    assert not caplog.records
    # The output layer grows 30-fold: one warning naming it, however often measured.
    logits_layer = net.get_layer("logits")
    for w in logits_layer.trainable_weights:
        w.assign(w * 30)
    with caplog.at_level(logging.WARNING):
        values = h.measure(3)
        h.measure(4)
    assert values[tags.MAX_WEIGHT_GROWTH] == pytest.approx(30, rel=1e-4)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("step 3: the weights of layer logits have grown to 30.0x")
    summary = h.summary(4)
    assert summary["weight_growth"]["logits"] == pytest.approx(30, rel=1e-4)
    assert set(summary) == {"weight_norm", "weight_growth", "logits_std", "dead_units"}


def test_a_run_writes_its_health_and_keeps_its_start_on_resume(digits_dir, tmp_path):
    cfg = TrainConfig(data_dir=digits_dir, model_dir=str(tmp_path), fc_widths=(16,), steps=20,
                      input=InputOptions(eval_sample_size=50), checkpoint_every=10,
                      learning_rate=0.5)
    trainer = Trainer(cfg)
    start = trainer.monitor.health.start.numpy().copy()
    summary = trainer.run()
    assert set(summary["health"]["weight_growth"]) == {"dense_0", "logits"}
    assert 0 <= summary["health"]["dead_units"] <= 1
    (run,) = report.load_runs(str(tmp_path))
    for tag in (tags.MAX_WEIGHT_GROWTH, tags.LOGITS_STD, tags.DEAD_UNITS,
                tags.weight_norm_tag("logits"), tags.dead_units_tag("dense_0")):
        assert [s for s, _ in run.scalars[tag]][-1] == 20, tag
    # A new trainer on the finished run's checkpoint restores the start norms.
    again = Trainer(cfg)
    again.restore()
    np.testing.assert_allclose(again.monitor.health.start.numpy(), start)
    assert os.path.exists(tmp_path / "summary.json")


def test_the_warning_threshold_is_not_part_of_what_a_run_computes(tmp_path):
    """A run resumed (or a sweep reported) with another --warn_growth is the same run."""
    import dataclasses

    from cg_tf.measure.monitor import MonitorConfig
    from cg_tf.training.trainer import run_params
    cfg = TrainConfig(data_dir="d", model_dir=str(tmp_path))
    other = dataclasses.replace(cfg, monitor=MonitorConfig(warn_growth=5))
    assert run_params(cfg) == run_params(other)
    assert "warn_growth" not in run_params(cfg)["monitor"]
    assert run_params(cfg)["monitor"]["eval_every"] is None  # the rest stays


def test_the_tab_shows_a_run_that_drifts(digits_dir, tmp_path, caplog):
    """Winsorized SGD (c = 4, lr 0.5) on the digits drifts within 600 steps:
    its output layer grows some 15-fold where plain SGD's barely moves. The
    run warns, its summary says so, and the tab's route serves the curve."""
    import json

    from conftest import plugin_client

    from cg_tf.measure.monitor import MonitorConfig
    from cg_tf.robust.aggregators import Mean, Winsorized
    summaries = {}
    for name, aggregator in (("winsorized", Winsorized(c=4)), ("mean", Mean())):
        cfg = TrainConfig(data_dir=digits_dir, model_dir=str(tmp_path / name), fc_widths=(64,),
                          steps=600, batch_size=50, learning_rate=0.5, aggregator=aggregator,
                          input=InputOptions(eval_sample_size=100),
                          monitor=MonitorConfig(eval_every=100, warn_growth=5))
        with caplog.at_level(logging.WARNING):
            summaries[name] = Trainer(cfg).run()
        warned = [r.getMessage() for r in caplog.records if "have grown to" in r.getMessage()]
        assert bool(warned) == (name == "winsorized"), warned
        caplog.clear()
    assert summaries["winsorized"]["health"]["weight_growth"]["logits"] > 8
    assert summaries["mean"]["health"]["weight_growth"]["logits"] < 3
    client = plugin_client(tmp_path)
    response = client.get(f"/data/plugin/memorization/scalars?tag={tags.MAX_WEIGHT_GROWTH}")
    assert response.status_code == 200
    curves = {run: [v for _, v in points] for run, points in json.loads(response.get_data()).items()}
    assert curves["winsorized"][-1] > 8 and curves["winsorized"][-1] > 2 * curves["winsorized"][3]
    assert max(curves["mean"]) < 3
