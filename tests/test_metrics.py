"""The metric math against hand-computed values."""

import numpy as np
import pytest

from cg_tf.measure import metrics


def test_eval_schedule_is_log_spaced_then_every_epoch():
    assert metrics.eval_schedule(50, 10) == [1, 2, 4, 8, 10, 20, 30, 40, 50]
    assert metrics.eval_schedule(25, 10) == [1, 2, 4, 8, 10, 20, 25]
    assert metrics.eval_schedule(25, 10, every=5, log_spaced=False) == [5, 10, 15, 20, 25]
    assert metrics.eval_schedule(3, 10) == [1, 2, 3]


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
    first = np.full(4, metrics.NOT_LEARNED)
    stayed = np.zeros(4, bool)
    first, stayed = metrics.update_learning_events(first, stayed, [1, 0, 1, 0], step=5)
    np.testing.assert_array_equal(first, [5, -1, 5, -1])
    np.testing.assert_array_equal(stayed, [1, 0, 1, 0])
    first, stayed = metrics.update_learning_events(first, stayed, [1, 1, 0, 0], step=9)
    np.testing.assert_array_equal(first, [5, 9, 5, -1])
    np.testing.assert_array_equal(stayed, [1, 1, 0, 0])
    # Relearning keeps the first step, and the example did not stay learned.
    first, stayed = metrics.update_learning_events(first, stayed, [1, 1, 1, 0], step=12)
    np.testing.assert_array_equal(first, [5, 9, 5, -1])
    np.testing.assert_array_equal(stayed, [1, 1, 0, 0])
