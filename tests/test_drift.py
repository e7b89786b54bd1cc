"""tools.drift: the bias of a robust aggregate against the mean gradient,
measured along a short run, and its independent check of the applied update."""

import csv
import os

import numpy as np
import pytest
from conftest import np_trimmed, np_winsorized, run_main

from tools import drift


def test_bias_of_an_aggregate():
    rng = np.random.default_rng(0)
    mean, weights = rng.normal(size=50), rng.normal(size=50)
    radial = -mean @ weights / np.linalg.norm(weights)
    assert drift.bias(mean, mean, weights) == pytest.approx(
        {"cosine": 1, "excess": 0, "norm_mean": np.linalg.norm(mean),
         "norm_robust": np.linalg.norm(mean), "radial_robust": radial, "radial_mean": radial})
    assert drift.bias(2 * mean, mean, weights)["excess"] == pytest.approx(1)
    assert drift.bias(-mean, mean, weights)["cosine"] == pytest.approx(-1)
    # A step against the weights' own direction grows them: radial > 0.
    assert drift.bias(-weights, mean, weights)["radial_robust"] == pytest.approx(
        np.linalg.norm(weights))
    g = rng.standard_t(2, size=(100, 30))
    np.testing.assert_allclose(drift.np_winsorized(g, 4).sum(0), np_winsorized(g, 4))
    np.testing.assert_allclose(drift.np_trimmed(g, 4).sum(0), np_trimmed(g, 4))


def test_a_panel_of_a_prefix_averages_its_series():
    series = {"dead/dense_0": [(0, 0.0), (10, 0.2)], "dead/dense_1": [(0, 0.5), (10, 0.4)],
              "accuracy/test": [(0, 0.1)]}
    assert drift.panel_series(series, "accuracy/test") == [(0, 0.1)]
    steps, values = zip(*drift.panel_series(series, "dead/"))
    assert steps == (0, 10) and values == pytest.approx((0.25, 0.3))
    assert drift.panel_series(series, "cosine/") == []


def rows(folder):
    with open(os.path.join(folder, "drift.csv")) as f:
        out = {}
        for r in csv.DictReader(f):
            out.setdefault(r["name"], {})[int(r["step"])] = float(r["value"])
    return out


def test_drift_measures_along_a_run_and_checks_the_update(digits_dir, tmp_path):
    common = [f"--data_dir={digits_dir}", "--fc_widths=32,32", "--steps=20",
              "--measure_every=10", "--batches=3", "--batch_size=50"]
    robust = tmp_path / "winsorized"
    # Winsorized except the output layer: the check covers both kinds of layer.
    done = run_main("tools.drift", *common, f"--output_dir={robust}",
                    "--aggregator=winsorized:4@hidden", "--check_steps=5", "--decompose_batches=3")
    assert done.returncode == 0, done.stderr[-3000:]
    measured = rows(robust)
    assert measured["check/max_relative_error"][5] < 1e-4
    for name in ("cosine/dense_0", "excess/logits", "weight_norm/logits", "dead/dense_1",
                 "radial_robust/logits", "radial_mean/dense_0",
                 "accuracy/test", "accuracy/pristine", "accuracy/corrupt", "logits_std"):
        assert sorted(measured[name]) == [0, 10, 20], name
    assert measured["excess/dense_0"][10] > 1e-3  # winsorized: not the mean
    assert all(0 <= v <= 1 for v in measured["dead/dense_1"].values())
    # The groups' radial parts add up to the whole (all 3 batches decomposed).
    for kind in ("mean", "robust"):
        for layer in ("dense_0", "logits"):
            parts = [measured[f"radial_{kind}_part/{g}/{layer}"][10] for g in ("pristine",
                                                                                "corrupt")]
            assert sum(parts) == pytest.approx(measured[f"radial_{kind}/{layer}"][10],
                                               rel=1e-3, abs=1e-6)
    figure = tmp_path / "drift.png"
    drift.plot([str(robust)], str(figure))
    assert figure.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "drift.pdf").exists()


def test_the_mean_against_itself_has_no_bias(digits_dir):
    from cg_tf.data.reader import Reader
    from cg_tf.robust.aggregators import Mean
    reader = Reader.open(digits_dir, 50)
    study = drift.Study(reader, Mean(), (32, 32), "authors", 0.1)
    batches = [(b["image"], b["label"], b["is_corrupt"].numpy().astype(bool))
               for b in reader.train_epoch(0).take(2)]
    x, y, _ = batches[0]
    samples = {"pristine": (x.numpy(), y.numpy())}
    measured = study.measure(batches, samples, decompose=1)
    for layer in ("dense_0", "dense_1", "logits"):
        assert measured[f"cosine/{layer}"] == pytest.approx(1, abs=1e-5)
        assert measured[f"excess/{layer}"] < 1e-5
        # The mean's per-example parts are its shares: kept and whole agree.
        for group in ("pristine", "corrupt"):
            assert measured[f"radial_robust_part/{group}/{layer}"] == pytest.approx(
                measured[f"radial_mean_part/{group}/{layer}"], rel=1e-4, abs=1e-7)

