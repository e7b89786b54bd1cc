"""Winsorized mean, trimmed mean and median of per-example values, tile by tile.

The coordinates of a variable are processed in tiles small enough to stay in
cache; inside a tile the per-example values are formed on the spot (an Outer
tile is input column x output gradient: never stored for the whole variable),
and per coordinate:

  lo, hi = x_(c+1), x_(n-c)                     exact order statistics (ties included)
  s      = sum_i clip(v_i, lo, hi)              the outliers never enter a sum
  winsorized = s / n,  trimmed = (s - c (lo + hi)) / (n - 2c),  median = (lo + hi) / 2

The r-th largest value (r = c + 1) streams the n values through a running
top-r list kept with max/min only, fused by XLA into one loop per tile (2r
operations per value). The whole computation is one XLA cluster
(`aggregate`), whatever the outer step is compiled with. Where r * n is too
large for the unrolled list to compile quickly (the median of a large batch,
c > 8), the stacked per-example values are sorted along the batch instead (B x P
values in memory).
"""

import numpy as np
import tensorflow as tf

from cg_tf import aggregators as agg
from cg_tf.layer_rules import Outer, PerExample, Stacked

KINDS = ("winsorized", "trimmed", "median")
TILE = 32768           # coordinates per tile
# The running top-r list is unrolled over the n examples: its compile time grows
# with r and n. r <= 9 covers the papers' c in {0, 1, 2, 4, 8}.
CHAIN_MAX_R, CHAIN_BUDGET = 9, 2048


# -- tiles ------------------------------------------------------------------------


def _layout(values: PerExample) -> tuple[int, int]:
    """(rows, columns) of the 2-D view that tiles cut along its rows."""
    if isinstance(values, Outer):
        return values.x.shape[2], values.d.shape[2]
    shape = values.g.shape[1:]
    return (shape[0], int(np.prod(shape[1:]))) if len(shape) > 1 else (1, int(np.prod(shape)))


def _padded(values: PerExample, rows: int) -> PerExample:
    """The values with zero rows added up to `rows`."""
    have = _layout(values)[0]
    if have == rows:
        return values
    if isinstance(values, Outer):
        return Outer(tf.pad(values.x, [[0, 0], [0, 0], [0, rows - have]]), values.d)
    g = tf.reshape(values.g, [values.count, have, -1])
    return Stacked(tf.pad(g, [[0, 0], [0, rows - have], [0, 0]]))


def _tile(values: PerExample, start, size: int) -> list[tf.Tensor]:
    """Per-example values of rows [start, start + size), one [size, columns]
    tensor per example (formed per example: XLA fuses each into its consumers)."""
    n = values.count
    if isinstance(values, Outer):
        x = tf.slice(values.x, [0, 0, start], [n, values.x.shape[1], size])
        if x.shape[1] == 1:
            return [x[i, 0, :, None] * values.d[i, 0, None, :] for i in range(n)]
        return tf.unstack(tf.einsum("bti,bto->bio", x, values.d))
    g = tf.reshape(values.g, [n, _layout(values)[0], -1])
    return tf.unstack(tf.slice(g, [0, start, 0], [n, size, g.shape[2]]))


# -- order statistics of a tile ------------------------------------------------------


def largest(rows: list[tf.Tensor], r: int) -> tf.Tensor:
    """The r-th largest of the n rows, elementwise (1 <= r <= n), exact with ties:
    a running top-r list, t_j <- max(t_j, min(t_{j-1}, v))."""
    neg = tf.fill(tf.shape(rows[0]), tf.constant(-np.inf, rows[0].dtype))
    top = [rows[0]] + [neg] * (r - 1)
    for x in rows[1:]:
        top = [tf.maximum(top[0], x)] + [tf.maximum(top[j], tf.minimum(top[j - 1], x))
                                         for j in range(1, r)]
    return top[r - 1]


def fits_tiles(kind: str, c: int, n: int) -> bool:
    """Whether the running lists stay small enough to compile quickly."""
    r = cut(kind, c, n) + 1
    return r <= CHAIN_MAX_R and r * n <= CHAIN_BUDGET


def cut(kind: str, c: int, n: int) -> int:
    """Values cut per side: c, or (n - 1) // 2 for the median."""
    return (n - 1) // 2 if kind == "median" else c


def thresholds(rows: list[tf.Tensor], kind: str, c: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(x_(c+1), x_(n-c)) of the n per-example rows, elementwise."""
    n = len(rows)
    c = cut(kind, c, n)
    hi = largest(rows, c + 1)
    lo = hi if kind == "median" and n % 2 else -largest([-x for x in rows], c + 1)
    return lo, hi


def clipped_mean(rows: list[tf.Tensor], lo: tf.Tensor, hi: tf.Tensor, kind: str,
                 c: int) -> tf.Tensor:
    """The winsorized or trimmed mean of the n per-example rows given the thresholds."""
    n = len(rows)
    # Unrolled over examples: one elementwise fusion with the values formed inside.
    s = tf.add_n([tf.clip_by_value(x, lo, hi) for x in rows])
    if kind == "winsorized":
        return s / n
    return (s - c * (lo + hi)) / (n - 2 * c)


# -- whole variables ------------------------------------------------------------------


def _over_tiles(tiles: int, fn, outputs: int) -> list[tf.Tensor]:
    """fn(i) -> `outputs` tensors [size, columns] for tile i, concatenated over tiles.
    A loop also keeps XLA from fusing one pass into the next (which would
    recompute the thresholds for every example)."""
    def body(i, arrays):
        return i + 1, [a.write(i, t) for a, t in zip(arrays, fn(i))]

    arrays = [tf.TensorArray(tf.float32, tiles) for _ in range(outputs)]
    return [a.concat() for a in tf.while_loop(lambda i, _: i < tiles, body,
                                              (tf.constant(0), arrays))[1]]


def robust_variable(values: PerExample, kind: str, c: int) -> tf.Tensor:
    """The aggregate of one variable's per-example values, [rows, columns]: a
    pass over tiles for the thresholds, then one for the clipped sums."""
    rows, cols = _layout(values)
    size = max(1, min(rows, TILE // max(cols, 1)))
    tiles = -(-rows // size)
    values = _padded(values, tiles * size)
    tile = lambda i: _tile(values, i * size, size)  # noqa: E731
    lo, hi = _over_tiles(tiles, lambda i: thresholds(tile(i), kind, c), 2)
    if kind == "median":
        out = (lo + hi) / 2
    else:
        cut_lo = lambda i: tf.slice(lo, [i * size, 0], [size, cols])  # noqa: E731
        cut_hi = lambda i: tf.slice(hi, [i * size, 0], [size, cols])  # noqa: E731
        out, = _over_tiles(tiles, lambda i: [clipped_mean(tile(i), cut_lo(i), cut_hi(i),
                                                          kind, c)], 1)
    return out[:rows]


def _aggregate(values: list, kind: str, c: int) -> list[tf.Tensor]:
    return [robust_variable(v, kind, c) for v in values]


_compiled = tf.function(_aggregate, jit_compile=True)


_SORTED = {"winsorized": agg.winsorized_mean, "trimmed": agg.trimmed_mean,
           "median": lambda x, c: agg.median(x)}


def aggregate(values: list[PerExample], kind: str, c: int, variables: list) -> list[tf.Tensor]:
    """The aggregate (`kind` in KINDS, c values cut per side) of each variable's
    per-example values, shaped like the variables: one XLA computation by
    tiles, or (median, large c) a sort of the stacked values along the batch."""
    if kind not in KINDS:
        raise ValueError(f"tiled aggregation of {kind!r}: one of {', '.join(KINDS)}")
    if fits_tiles(kind, c, values[0].count):
        grads = _compiled(values, kind, c)
    else:
        grads = [_SORTED[kind](v.stacked(), c) for v in values]
    return [tf.reshape(g, v.shape) for g, v in zip(grads, variables)]
