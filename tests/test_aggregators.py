"""Each aggregator against a NumPy reference on random tensors, ties included."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import np_trimmed, np_winsorized

from cg_tf.robust import reference, tiled
from cg_tf.robust.aggregators import Median, MedianOfMeans, Trimmed, Winsorized, median3
from cg_tf.robust.layer_rules import Stacked


def random_gradients(kind, b, rng, shape=(7, 3)):
    """Normal values, or small integers and zeros: ties everywhere, as ReLU nets give."""
    if kind == "ties":
        return rng.integers(-2, 3, (b, *shape)).astype(np.float32)
    if kind == "zeros":
        x = rng.normal(size=(b, *shape)).astype(np.float32)
        x[rng.random(x.shape) < 0.7] = 0.0
        return x
    return rng.normal(size=(b, *shape)).astype(np.float32)


KINDS = ("normal", "ties", "zeros")
CASES = [(b, c) for b in (3, 5, 6, 10) for c in range(0, (b - 1) // 2 + 1)] + [
    (33, c) for c in (0, 1, 4, 16)] + [(40, 17)]


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("b,c", CASES)
def test_small_variables_side_by_side(b, c):
    """Small variables (biases, normalization scales) go side by side into one
    tiled computation, the last row padded: one of each kind of values, and one
    of another shape."""
    rng = np.random.default_rng(b * 10 + c)
    xs = [random_gradients(kind, b, rng) for kind in KINDS] + [rng.normal(size=(b, 5))]
    values = [Stacked(tf.constant(x, tf.float32)) for x in xs]
    variables = [tf.zeros(x.shape[1:]) for x in xs]
    for stat, ref in [(Winsorized(c), lambda x: np_winsorized(x, c)),
                      (Trimmed(c), lambda x: np_trimmed(x, c)),
                      (Median(), lambda x: np.median(x, axis=0))]:
        for got, x in zip(tiled.aggregate(values, stat, variables), xs):
            close(got, ref(x))


def test_the_references_parts_sum_to_their_aggregate():
    """Without ties, each example's parts of the winsorized and trimmed means
    (what the probe splits the update into) sum to the aggregate."""
    g = np.random.default_rng(2).standard_t(2, size=(50, 7))
    ranks = reference.symmetric(50, 3)
    np.testing.assert_allclose(reference.winsorized_parts(g, ranks).sum(0),
                               np.mean(np.clip(g, *np.sort(g, 0)[[3, 46]]), 0))
    np.testing.assert_allclose(reference.trimmed_parts(g, ranks).sum(0), np_trimmed(g, 3))


def test_median3():
    rng = np.random.default_rng(5)
    a, b, c = (rng.integers(-2, 3, (40,)).astype(np.float32) for _ in range(3))
    close(median3(*map(tf.constant, (a, b, c))), np.median(np.stack([a, b, c]), axis=0))


@pytest.mark.parametrize("make, message", [
    (lambda: Winsorized(4.5), r"Winsorized\(c=4.5\): c must be a whole number of 0 or more"),
    (lambda: Trimmed(c=-1), r"Trimmed\(c=-1\): c must be"),
    (lambda: MedianOfMeans(k="3"), r"MedianOfMeans\(k='3'\): k must be"),
    (lambda: Winsorized(True), r"Winsorized\(c=True\): c must be"),
])
def test_an_aggregators_parameter_must_be_a_whole_number(make, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        make()
    assert Winsorized(np.int64(4)) == Winsorized(4) and type(Winsorized(np.int64(4)).c) is int
    assert Winsorized(4.0) == Winsorized(4) and Winsorized(4.0).spec == "winsorized:4"
