"""NumPy references of the order statistics, by sorting: what the tests and the
tools check the tiles, the train step and the gradient probe against.

For per-example values g [n, ...] and thresholds at two ranks (0 the
smallest), each `*_parts` gives every example's part of the aggregate: the
parts sum to it, and the probe's f_p splits it so. A value at a threshold
counts as kept, so with ties at a threshold the trimmed parts' sum is not
exactly the trimmed mean, which `trimmed` gives.
"""

import numpy as np


def thresholds(g: np.ndarray, ranks: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The order statistics of g along axis 0 at the two ranks."""
    s = np.sort(g, axis=0)
    return s[ranks[0]], s[ranks[1]]


def symmetric(n: int, c: int) -> tuple[int, int]:
    """The ranks that cut c values per side of n."""
    return c, n - 1 - c


def winsorized_parts(g: np.ndarray, ranks: tuple[int, int]) -> np.ndarray:
    """Each value clipped to the thresholds, over n."""
    lo, hi = thresholds(g, ranks)
    return np.clip(g, lo, hi) / len(g)


def trimmed_parts(g: np.ndarray, ranks: tuple[int, int]) -> np.ndarray:
    """Each value between the thresholds, over the number of ranks from lo's to hi's."""
    lo, hi = thresholds(g, ranks)
    return np.where((g >= lo) & (g <= hi), g, 0) / (ranks[1] - ranks[0] + 1)


def winsorized(g: np.ndarray, c: int) -> np.ndarray:
    """Per coordinate, the mean with the c largest and c smallest values clipped."""
    return winsorized_parts(g, symmetric(len(g), c)).sum(0)


def trimmed(g: np.ndarray, c: int) -> np.ndarray:
    """Per coordinate, the mean of the n - 2c middle values."""
    return np.sort(g, axis=0)[c:len(g) - c].mean(axis=0)
