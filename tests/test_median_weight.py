"""tools.median_weight: the weight a median of three gives one example's share of
one of the three, against a brute-force loop, its first-order value 1/3, and a
short run on the digits."""

import csv

import numpy as np
from conftest import run_main

from tools import median_weight


def test_median_weights_against_a_loop():
    rng = np.random.default_rng(0)
    means, shares = rng.normal(size=(3, 40)), rng.normal(size=(6, 40))
    shares[2] = 0
    got = median_weight.median_weights(means, shares)
    for i, d in enumerate(shares):
        moved = np.median(means, 0) - np.median(np.stack([means[0] - d, means[1], means[2]]), 0)
        assert np.isclose(got[i], moved @ d / (d @ d) if d.any() else 0.0)
    assert got[2] == 0


def test_a_small_share_weighs_a_third_and_a_large_one_less():
    """To first order the median follows the first mean on the third of the
    coordinates where it is the middle one; a share large against the spread of
    the three means moves it less."""
    rng = np.random.default_rng(1)
    means, direction = rng.normal(size=(3, 200_000)), rng.normal(size=(1, 200_000))
    small = median_weight.median_weights(means, 1e-4 * direction)[0]
    large = median_weight.median_weights(means, 3 * direction)[0]
    assert abs(small - 1 / 3) < 0.01 and large < 0.2


def test_a_short_run_writes_a_weight_per_batch_size_and_group(digits_dir, tmp_path):
    done = run_main("tools.median_weight", f"--data_dir={digits_dir}",
                    f"--output_dir={tmp_path}", "--model=fc", "--epochs=1",
                    "--measure_epochs=0,1", "--batch_sizes=16,32", "--triples=2",
                    "--train_batch=32")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "median_weight.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["epoch"], r["batch"], r["group"]) for r in rows} == {
        (e, b, g) for e in ("0", "1") for b in ("16", "32") for g in ("pristine", "corrupt")
    }, rows
    assert all(0 <= float(r["weight"]) <= 1 for r in rows)
    assert (tmp_path / "median_weight.png").exists() and (tmp_path / "median_weight.pdf").exists()
