"""Robust aggregation of gradients, coordinate-wise (DESIGN.md section 4).

Two forms of each per-example aggregator:

* reference functions of the stacked gradients `x` of shape [B, ...] (sorting
  along the batch axis), used for median and median of means, and by the tests;
* for winsorized and trimmed means, an exact *mergeable* summary of the batch,
  `OrderStats`: per coordinate the k = c+1 largest values, the k smallest of the
  rest, and the sum of everything else. Summaries of chunks or replicas merge
  into the summary of their union, exactly and with ties, using only
  elementwise max/min, so the global result needs no gather of per-example
  gradients and does not depend on chunk size or replica count. Outliers never
  enter a sum, so removing them loses no precision.
"""

from typing import NamedTuple

import tensorflow as tf

# -- reference functions of stacked gradients ----------------------------------


def mean(x: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(x, axis=0)


def _sorted(x: tf.Tensor) -> tf.Tensor:
    return tf.sort(x, axis=0)


def winsorized_mean(x: tf.Tensor, c: int) -> tf.Tensor:
    """(1/B) sum_i clip(x_i, x_(c+1), x_(B-c)): exactly c values clipped per side."""
    b = x.shape[0]
    s = _sorted(x)
    return tf.reduce_mean(tf.clip_by_value(x, s[c], s[b - 1 - c]), axis=0)


def trimmed_mean(x: tf.Tensor, c: int) -> tf.Tensor:
    """The mean of the B - 2c middle values."""
    b = x.shape[0]
    return tf.reduce_mean(_sorted(x)[c:b - c], axis=0)


def median(x: tf.Tensor) -> tf.Tensor:
    """The coordinate-wise median (the mean of the two middle values for even B)."""
    b = x.shape[0]
    s = _sorted(x)
    return (s[(b - 1) // 2] + s[b // 2]) / 2


def median_of_means(x: tf.Tensor, k: int) -> tf.Tensor:
    """Splits the batch into k equal consecutive groups; median of the group means."""
    b = x.shape[0]
    if b % k:
        raise ValueError(f"median_of_means: {k} groups do not divide the batch of {b}")
    return median(tf.reduce_mean(tf.reshape(x, [k, b // k, *x.shape[1:]]), axis=1))


def median3(a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
    """Elementwise median of three tensors."""
    return tf.maximum(tf.minimum(a, b), tf.minimum(tf.maximum(a, b), c))


# -- the mergeable summary for winsorized and trimmed means ---------------------


class OrderStats(NamedTuple):
    """Exact summary of a multiset of values per coordinate (a nest of tensors,
    so it can be the state of a tf.while_loop; the count is kept by the caller).

    top:    [k, ...] the k largest values, descending (-inf pads if fewer)
    bottom: [k, ...] the k smallest of the others, ascending (+inf pads)
    rest:   [...]    the sum of all the remaining values
    """

    top: tf.Tensor
    bottom: tf.Tensor
    rest: tf.Tensor


def empty_stats(shape, k: int, dtype=tf.float32) -> OrderStats:
    """The summary of no values."""
    inf = float("inf")
    return OrderStats(tf.fill([k, *shape], tf.constant(-inf, dtype)),
                      tf.fill([k, *shape], tf.constant(inf, dtype)), tf.zeros(shape, dtype))


def _take_largest(values: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The k largest values along axis 0 (descending), and `values` with exactly
    those entries (one occurrence each, so ties are kept) replaced by -inf."""
    n = values.shape[0]
    rank = tf.reshape(tf.range(n, dtype=tf.int64), [n] + [1] * (values.shape.rank - 1))
    taken = []
    for _ in range(k):
        taken.append(tf.reduce_max(values, axis=0))
        first = tf.math.argmax(values, axis=0)
        values = tf.where(tf.equal(rank, first), tf.constant(-float("inf"), values.dtype), values)
    return tf.stack(taken), values


def _pad_to(values: tf.Tensor, n: int, pad: float) -> tf.Tensor:
    missing = n - values.shape[0]
    if missing <= 0:
        return values
    return tf.concat([values, tf.fill([missing, *values.shape[1:]], tf.cast(pad, values.dtype))], 0)


def _summarize(candidates: tf.Tensor, k: int, rest: tf.Tensor) -> OrderStats:
    """Selects top and bottom from candidate values (±inf entries are empty)."""
    inf = tf.constant(float("inf"), candidates.dtype)
    candidates = tf.where(tf.math.is_inf(candidates), -inf, candidates)
    top, others = _take_largest(_pad_to(candidates, k, -float("inf")), k)
    others = tf.where(tf.math.is_inf(others), inf, others)  # Empty slots stay empty.
    neg_bottom, remaining = _take_largest(-_pad_to(others, k, float("inf")), k)
    remaining = tf.where(tf.math.is_inf(remaining), tf.zeros_like(remaining), -remaining)
    return OrderStats(top, -neg_bottom, rest + tf.reduce_sum(remaining, axis=0))


def order_stats(x: tf.Tensor, k: int) -> OrderStats:
    """The summary of stacked finite values x [n, ...] with k = c + 1.

    One sort along the batch axis when there are at least 2k values (cheaper
    than k selection passes unless k is tiny); selection otherwise.
    """
    n = x.shape[0]
    if n < 2 * k or k <= 3:
        return _summarize(x, k, tf.zeros(x.shape[1:], x.dtype))
    s = tf.sort(x, axis=0, direction="DESCENDING")
    return OrderStats(s[:k], tf.reverse(s[n - k:], [0]), tf.reduce_sum(s[k:n - k], axis=0))


def merge(parts: list[OrderStats], k: int) -> OrderStats:
    """The summary (with k = c + 1) of the union of the summarized multisets;
    a part's lists may be longer than k (e.g. gathered from several replicas)."""
    candidates = tf.concat([t for p in parts for t in (p.top, p.bottom)], axis=0)
    return _summarize(candidates, k, tf.add_n([p.rest for p in parts]))


def _middle(s: OrderStats, c: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """x_(B-c), x_(c+1), and the sum of the values strictly between the c+1
    extremes on each side (for B = 2c + 1 both thresholds are the median)."""
    hi = s.top[c]
    lower_empty = tf.math.is_inf(s.bottom[c])
    lo = tf.where(lower_empty, hi, s.bottom[c])
    inner = s.rest + tf.where(lower_empty, tf.zeros_like(hi), lo)
    return hi, lo, inner


def winsorized_from_stats(s: OrderStats, c: int, count: int) -> tf.Tensor:
    """The winsorized mean of the `count` values `s` summarizes."""
    hi, lo, inner = _middle(s, c)
    # c values clipped to hi plus hi itself; c values clipped to lo; inner holds lo.
    return ((c + 1) * hi + c * lo + inner) / count


def trimmed_from_stats(s: OrderStats, c: int, count: int) -> tf.Tensor:
    """The trimmed mean of the `count` values `s` summarizes."""
    hi, _, inner = _middle(s, c)
    return (hi + inner) / (count - 2 * c)
