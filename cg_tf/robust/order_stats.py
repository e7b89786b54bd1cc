"""Order statistics of per-example values along the batch axis, per coordinate.

* `OrderStats`, an exact *mergeable* summary: per coordinate the k = c+1
  largest values, the k smallest of the rest, and the sum of everything else.
  Values stream in (`add`) through a bubble pass of elementwise max/min, exact
  with ties, with no sort or transpose; summaries of chunks merge into the
  summary of their union, so the result does not depend on the chunking. The
  gradient probe uses it for its thresholds. Outliers never enter a sum, so
  removing them loses no precision.
* `median3`, the elementwise median of three tensors (RM3).
"""

from typing import NamedTuple

import tensorflow as tf


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


def _insert(top: list, bottom: list, rest: tf.Tensor, v: tf.Tensor):
    """Inserts one value per coordinate into the summary kept as lists of k
    tensors; an infinite v is an empty slot and inserts nothing.

    A bubble pass of elementwise max/min: exact with ties, no sort, no transpose.
    The value pushed out of the top list goes on into the bottom list, and the
    one pushed out of that into the rest.
    """
    inf = tf.constant(float("inf"), v.dtype)
    v = tf.where(tf.equal(v, inf), -inf, v)
    new_top = []
    for t in top:
        new_top.append(tf.maximum(t, v))
        v = tf.minimum(t, v)
    v = tf.where(tf.math.is_inf(v), inf, v)
    new_bottom = []
    for b in bottom:
        new_bottom.append(tf.minimum(b, v))
        v = tf.maximum(b, v)
    return new_top, new_bottom, rest + tf.where(tf.math.is_inf(v), tf.zeros_like(v), v)


def add(s: OrderStats, values: tf.Tensor) -> OrderStats:
    """The summary `s` with every row of values [n, ...] inserted (infinite
    entries are empty slots); a tf.while_loop over rows keeps the graph small."""
    n = values.shape[0]
    state = (tf.unstack(s.top), tf.unstack(s.bottom), s.rest)
    if n <= 8:
        for i in range(n):
            state = _insert(*state, values[i])
    else:
        def body(i, top, bottom, rest):
            return (i + 1, *_insert(top, bottom, rest, values[i]))

        state = tf.while_loop(lambda i, *_: i < n, body, (tf.constant(0), *state))[1:]
    top, bottom, rest = state
    return OrderStats(tf.stack(top), tf.stack(bottom), rest)


def order_stats(x: tf.Tensor, k: int) -> OrderStats:
    """The summary of stacked finite values x [n, ...] with k = c + 1.

    Streams the n values through the running top and bottom lists (O(n k)
    elementwise operations); for large k one sort along the batch is cheaper.
    """
    n = x.shape[0]
    if k > 16 and n >= 2 * k:
        s = tf.sort(x, axis=0, direction="DESCENDING")
        return OrderStats(s[:k], tf.reverse(s[n - k:], [0]), tf.reduce_sum(s[k:n - k], axis=0))
    return add(empty_stats(x.shape[1:], k, x.dtype), x)


def merge(parts: list[OrderStats], k: int) -> OrderStats:
    """The summary (with k = c + 1) of the union of the summarized multisets;
    a part's lists may be longer than k (e.g. gathered from several replicas)."""
    empty = empty_stats(parts[0].rest.shape, k, parts[0].rest.dtype)
    start = OrderStats(empty.top, empty.bottom, tf.add_n([p.rest for p in parts]))
    return add(start, tf.concat([t for p in parts for t in (p.top, p.bottom)], axis=0))


def thresholds(s: OrderStats, c: int) -> tuple[tf.Tensor, tf.Tensor]:
    """x_(c+1) and x_(B-c) of the summarized values (for B = 2c + 1 both the median)."""
    hi = s.top[c]
    return tf.where(tf.math.is_inf(s.bottom[c]), hi, s.bottom[c]), hi


def clipped_sum(s: OrderStats, c: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The sum of the summarized values clipped to x_(c+1) and x_(B-c), and those
    two thresholds (low, high): what an order statistic is made of."""
    lo, hi = thresholds(s, c)
    # The values strictly between the c + 1 extremes of each side, and lo.
    inner = s.rest + tf.where(tf.math.is_inf(s.bottom[c]), tf.zeros_like(hi), lo)
    # c values clipped to hi plus hi itself; c values clipped to lo; inner holds lo.
    return (c + 1) * hi + c * lo + inner, lo, hi
