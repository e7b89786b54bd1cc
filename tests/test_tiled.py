"""The tiled order statistics (cg_tf.robust.tiled) against NumPy: the sorting
network, running lists, selection networks and blocks, each replica's share of
the rows, small variables beside tiled ones."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from conftest import np_trimmed, np_winsorized

from cg_tf.robust import tiled
from cg_tf.robust.aggregators import Median, Trimmed, Winsorized
from cg_tf.robust.layer_rules import Outer, Stacked


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
# the network's budget (n > 160), running lists up to c = 31, then bisection.
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


def test_together_gives_its_tensors_back_exactly():
    """One fusion for several outputs changes no bit: signed zeros, infinities,
    denormals and the ends of int32."""
    floats = tf.constant([[-0.0, 0.0, np.inf, -np.inf, 1e-45, -3.5]], tf.float32)
    ints = tf.constant([[tf.int32.min, tf.int32.max, 0, -1, 7, 2]], tf.int32)
    got = tf.function(lambda a, b: tiled.together([a * 2, a - 1, a]) + tiled.together([b, b]),
                      jit_compile=True)(floats, ints)
    for g, want in zip(got, [floats * 2, floats - 1, floats, ints, ints]):
        assert g.numpy().tobytes() == want.numpy().tobytes()


@pytest.mark.parametrize("n", [5, 40, 300])
def test_bisection_finds_every_rank_among_extreme_values(n):
    """Order statistics by bisection on bit patterns, exact for any ranks: values
    spanning infinities, signed zeros, denormals, the largest floats and long
    runs of ties, in one block or a loop over blocks; NaN where a NaN is."""
    rng = np.random.default_rng(n)
    pool = np.array([-np.inf, np.inf, -0.0, 0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0, 2.5],
                    np.float32)
    v = np.where(rng.random((n, 6, 7)) < 0.5, rng.choice(pool, (n, 6, 7)),
                 rng.normal(size=(n, 6, 7)) * 10.0 ** rng.integers(-30, 30, (n, 6, 7)))
    v = v.astype(np.float32)
    v[rng.integers(n), 0, :3] = np.nan  # a NaN makes its coordinate's statistic NaN
    s = np.sort(v, axis=0)
    s[:, 0, :3] = np.nan
    for ranks in {(0, n - 1), (n // 3, n // 2), ((n - 1) // 2, n // 2), (n - 1, n - 1)}:
        tile = lambda g: tiled.Examples(Stacked(g), 0, 6)  # noqa: E731
        lo, hi = tf.function(lambda g: tiled.bisected(tile(g), ranks), jit_compile=True)(
            tf.constant(v))
        np.testing.assert_array_equal(lo, s[ranks[0]], err_msg=str(ranks))
        np.testing.assert_array_equal(hi, s[ranks[1]], err_msg=str(ranks))


def test_small_variables_go_side_by_side_beside_tiled_ones(monkeypatch):
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
