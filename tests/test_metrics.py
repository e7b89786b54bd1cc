"""The metric math against hand-computed values."""

import numpy as np
import pytest

from cg_tf.measure import metrics


def test_eval_schedule_is_log_spaced_then_every_epoch():
    assert metrics.eval_schedule(50, 10) == [1, 2, 4, 8, 10, 20, 30, 40, 50]
    assert metrics.eval_schedule(25, 10) == [1, 2, 4, 8, 10, 20, 25]
    assert metrics.eval_schedule(25, 10, every=5, log_spaced=False) == [5, 10, 15, 20, 25]
    assert metrics.eval_schedule(3, 10) == [1, 2, 3]
    for total, spe, every, log_spaced in ((50, 10, None, True), (25, 10, 5, False),
                                          (3, 10, None, True), (700, 60, 64, True)):
        schedule = metrics.eval_schedule(total, spe, every, log_spaced)
        assert [s for s in range(-1, total + 3) if metrics.is_evaluation_step(
            s, total, spe, every, log_spaced)] == schedule
    # Lazily: a run of 10^9 steps costs nothing to ask.
    assert metrics.is_evaluation_step(10 ** 9, 10 ** 9, 600)


def test_adjusted_overfit():
    # eps = 0.5, C = 10, test 0.8: a model that only generalizes reaches
    # 0.05 + 0.4 = 0.45 on the noisy training labels.
    assert metrics.adjusted_overfit(0.60, 0.8, 0.5, 10) == pytest.approx(0.15)
    assert metrics.adjusted_overfit(0.45, 0.8, 0.5, 10) == pytest.approx(0.0)
    assert metrics.adjusted_overfit(0.9, 0.9, 0.0, 10) == pytest.approx(0.0)


def test_m_coherence():
    g = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # Orthogonal: ||(1, 1)||^2 / (1 + 1 + 0) = 1.
    assert metrics.m_coherence(np.sum(g.sum(0) ** 2), np.sum(g ** 2)) == 1.0
    same = np.array([[1.0, 2.0]] * 4)  # identical: m = 4
    assert metrics.m_coherence(np.sum(same.sum(0) ** 2), np.sum(same ** 2)) == 4.0
    opposite = np.array([[1.0, 2.0], [-1.0, -2.0]])  # cancel: 0
    assert metrics.m_coherence(np.sum(opposite.sum(0) ** 2), np.sum(opposite ** 2)) == 0.0
    assert np.isnan(metrics.m_coherence(0.0, 0.0))


def test_update_share():
    g_p, g_c = np.array([3.0, 0.0]), np.array([1.0, 2.0])
    g = g_p + g_c  # (4, 2): <g, g_p> = 12, <g, g> = 20
    assert metrics.update_share(g, g_p) == pytest.approx(0.6)
    assert metrics.update_share(g, g_c) == pytest.approx(0.4)
    # A part against the update counts negatively.
    assert metrics.update_share(np.array([1.0, 0.0]), np.array([-1.0, 5.0])) == -1.0


def test_learning_events():
    first = since = np.full(4, metrics.NOT_LEARNED)
    first, since = metrics.update_learning_events(first, since, [1, 0, 1, 0], step=5)
    np.testing.assert_array_equal(first, [5, -1, 5, -1])
    np.testing.assert_array_equal(since, [5, -1, 5, -1])
    first, since = metrics.update_learning_events(first, since, [1, 1, 0, 0], step=9)
    np.testing.assert_array_equal(first, [5, 9, 5, -1])
    np.testing.assert_array_equal(since, [5, 9, -1, -1])
    # Relearning keeps the first step, starts a new streak, and the example did
    # not stay learned.
    first, since = metrics.update_learning_events(first, since, [1, 1, 1, 0], step=12)
    np.testing.assert_array_equal(first, [5, 9, 5, -1])
    np.testing.assert_array_equal(since, [5, 9, 12, -1])
    np.testing.assert_array_equal(metrics.stayed_learned(first, since), [1, 1, 0, 0])
    first, since = metrics.update_learning_events(first, since, [0, 1, 1, 1], step=20)
    np.testing.assert_array_equal(since, [-1, 9, 12, 20])
    np.testing.assert_array_equal(metrics.stayed_learned(first, since), [0, 1, 0, 1])


def test_log_histogram_counts_every_step_on_log_spaced_buckets():
    rng = np.random.default_rng(0)
    steps = rng.integers(1, 1741, size=500)
    h = metrics.log_histogram(steps, np.arange(1, 1741), bins=20)  # every step evaluated
    assert h.shape == (20, 3)
    assert h[0, 0] == pytest.approx(1) and h[-1, 1] == pytest.approx(1740)
    np.testing.assert_allclose(h[1:, 0], h[:-1, 1])  # contiguous
    np.testing.assert_allclose(h[:, 1] / h[:, 0], 1740 ** (1 / 20))  # equal ratios
    assert h[:, 2].sum() == 500
    for left, right, count in h[:-1]:
        assert count == np.sum((steps >= left) & (steps < right))
    assert h[-1, 2] == np.sum(steps >= h[-1, 0])  # the last bucket holds its right edge
    # Nothing learned gives zero counts.
    assert metrics.log_histogram(np.zeros([0], int), [1, 2, 4])[:, 2].sum() == 0


def test_log_histogram_has_no_bucket_without_an_evaluation():
    # Evaluations at 1, 2, 4, 8, 16, then every 29 steps to 2,900: with 20 equal
    # log buckets, some between the early evaluations could never count anything.
    evaluated = metrics.eval_schedule(2900, 29)
    h = metrics.log_histogram(np.array(evaluated), evaluated, bins=20)
    assert 10 < len(h) < 20 and h[-1, 1] == pytest.approx(2900)
    np.testing.assert_allclose(h[1:, 0], h[:-1, 1])
    assert (h[:, 2] >= 1).all()  # each evaluation step counted once, in some bucket
    assert h[:, 2].sum() == len(evaluated)
    # Merged buckets keep the log-spaced edges (each a power of the ratio).
    exponents = np.log(h[1:, 0]) / np.log(2900 ** (1 / 20))
    np.testing.assert_allclose(exponents, np.round(exponents), atol=1e-9)
