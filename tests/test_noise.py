"""Noise assignment against its definition, and the stable hash."""

import collections

import numpy as np
import pytest
from conftest import expected_corrupt_fraction, noise_matrix

from cg_tf.data import hashing, noise

IDS = [f"ex-{i}" for i in range(20_000)]
C = 10


def labels_for(ids):
    return {eid: hashing.stable_randint(7, eid, "true", C) for eid in ids}


def binomial_ok(k, n, p, sigmas=4.0):
    return abs(k - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1


def test_stable_hash_is_stable_and_spread():
    assert hashing.stable_hash64(3, "a", "x") == hashing.stable_hash64(3, "a", "x")
    assert hashing.stable_hash64(3, "a", "x") != hashing.stable_hash64(4, "a", "x")
    assert hashing.stable_hash64(3, "a", "x") != hashing.stable_hash64(3, "a", "y")
    # A pinned value: the hash must never change, or every dataset changes.
    assert hashing.stable_hash64(0, "digits-0000", "select") == 15328180095561164721
    assert hashing.stable_hash64(0, b"digits-0000", "select") == 15328180095561164721
    u = np.array([hashing.stable_uniform(0, eid, "u") for eid in IDS])
    assert 0 <= u.min() and u.max() < 1
    counts, _ = np.histogram(u, bins=10, range=(0, 1))
    assert all(binomial_ok(c, len(IDS), 0.1) for c in counts)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 1.0])
def test_uniform_rate_and_matrix(rate):
    spec = noise.NoiseSpec("uniform", rate, seed=1)
    true = labels_for(IDS)
    noisy = {e: noise.pointwise_label(spec, e, y, C) for e, y in true.items()}
    changed = sum(noisy[e] != true[e] for e in IDS)
    assert binomial_ok(changed, len(IDS), rate * (C - 1) / C)
    assert expected_corrupt_fraction(spec, C) == pytest.approx(rate * (C - 1) / C)
    m = noise_matrix(((true[e], noisy[e]) for e in IDS), C)
    assert m.sum() == len(IDS)
    # Each off-diagonal cell holds about rate/C of its row.
    for i in range(C):
        row = m[i].sum()
        for j in range(C):
            if i != j:
                assert binomial_ok(m[i, j], row, rate / C)


def test_uniform_other_always_changes_selected():
    spec = noise.NoiseSpec("uniform_other", 0.3, seed=2)
    true = labels_for(IDS)
    selected = [e for e in IDS if noise.is_selected(spec, e)]
    assert binomial_ok(len(selected), len(IDS), 0.3)
    assert all(noise.pointwise_label(spec, e, true[e], C) != true[e] for e in selected)
    assert all(noise.pointwise_label(spec, e, true[e], C) == true[e]
               for e in IDS if not noise.is_selected(spec, e))
    targets = collections.Counter((noise.pointwise_label(spec, e, true[e], C) - true[e]) % C
                                  for e in selected)
    assert set(targets) == set(range(1, C))
    assert all(binomial_ok(n, len(selected), 1 / (C - 1)) for n in targets.values())


def test_permute_preserves_marginal_and_ignores_order():
    spec = noise.NoiseSpec("permute", 0.5, seed=3)
    true = labels_for(IDS)
    selected = [(e, true[e]) for e in IDS if noise.is_selected(spec, e)]
    new = noise.permuted_labels(spec, selected)
    assert set(new) == {e for e, _ in selected}
    assert collections.Counter(new.values()) == collections.Counter(y for _, y in selected)
    assert noise.permuted_labels(spec, list(reversed(selected))) == new
    changed = sum(new[e] != y for e, y in selected)
    counts = collections.Counter(true.values())
    assert binomial_ok(changed, len(IDS), expected_corrupt_fraction(spec, C, counts))


def test_seed_changes_choice():
    a = noise.NoiseSpec("uniform", 0.5, seed=0)
    b = noise.NoiseSpec("uniform", 0.5, seed=1)
    assert [noise.is_selected(a, e) for e in IDS[:200]] != [noise.is_selected(b, e) for e in IDS[:200]]


@pytest.mark.parametrize("mode,rate,msg", [("gaussian", 0.1, "noise_mode"),
                                           ("uniform", 1.5, "noise_rate"),
                                           ("uniform", -0.1, "noise_rate")])
def test_bad_spec(mode, rate, msg):
    with pytest.raises(ValueError, match=msg):
        noise.NoiseSpec(mode, rate)
