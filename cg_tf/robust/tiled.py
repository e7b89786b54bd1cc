"""Order statistics of per-example values (winsorized and trimmed means, the
median, any `Statistic`), tile by tile.

The coordinates of a variable are processed in tiles small enough to stay in
cache; inside a tile the per-example values are formed on the spot, never
stored for the whole variable (a Dense tile is input column x output
gradient, formed again by each pass, fused into it; a convolution tile is a
matmul over positions, formed once per tile for both passes), and per
coordinate:

  lo, hi = x_(a+1), x_(b+1)          the statistic's two ranks a <= b, exact with ties
  s      = sum_i clip(v_i, lo, hi)   the outliers never enter a sum
  aggregate = stat.from_thresholds(s, lo, hi, (a, b), n)

(winsorized s / n, trimmed (s - c (lo + hi)) / (n - 2c) with a = c, b = n-1-c;
the median (lo + hi) / 2, without s). The statistic object (`Statistic`) says
which ranks and what it makes of them: this module knows none by name.

Thresholds near the ends stream the n values through running top-r and
bottom-r lists kept with max/min only (2r operations per value); others
(larger c, the median) go through a selection network (the comparators of
Batcher's odd-even merge sort that the wanted ranks depend on, about
n log2(n)^2 / 4). Both are unrolled and fused by XLA into one loop per tile;
each variable's aggregate is one XLA computation, whatever the outer step is
compiled with. Small variables (biases, normalization scales) and
batches too large for the network to compile quickly are sorted along the
batch instead (their stacked values in memory).
"""

import functools
from typing import Protocol

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from cg_tf.robust.layer_rules import Outer, PerExample, Stacked

TILE = 32768           # coordinates per tile
# The running top-r list is unrolled over the n examples: its compile time grows
# with r and n. r <= 9 covers the papers' c in {0, 1, 2, 4, 8}.
CHAIN_MAX_R, CHAIN_BUDGET = 9, 2048
# Larger c and the median go through a selection network (about n log2(n)^2 / 4
# comparators); 3839 is the network for n = 256.
NETWORK_BUDGET = 3839
# A variable of at most this many coordinates is aggregated by sorting its
# stacked values: cheaper than compiling a loop of tiles for it.
SMALL = 4096


class Statistic(Protocol):
    """What the tiles need of an order statistic (the aggregators of
    `aggregators.OrderStatistic` are ones; frozen, so hashable)."""

    uses_sum: bool  # whether from_thresholds needs the clipped sum

    def ranks(self, n: int) -> tuple[int, int]:
        """The ranks (0 is the smallest) of the low and high thresholds among n values."""

    def from_thresholds(self, total: tf.Tensor | None, lo: tf.Tensor, hi: tf.Tensor,
                        ranks: tuple[int, int], n: int) -> tf.Tensor:
        """The aggregate of n values given the thresholds at `ranks` and the sum
        of the values clipped to them (None unless `uses_sum`)."""


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


def _formed_by_matmul(values: PerExample) -> bool:
    """Whether a tile's values come out of a matmul over positions (a convolution),
    which XLA materializes, rather than from a product it fuses into each use."""
    return isinstance(values, Outer) and values.x.shape[1] > 1


def _tile(values: PerExample, start, size: int) -> list[tf.Tensor]:
    """Per-example values of rows [start, start + size), one [size, columns]
    tensor per example (formed per example: XLA fuses each into its consumers)."""
    n = values.count
    if isinstance(values, Outer):
        x = tf.slice(values.x, [0, 0, start], [n, values.x.shape[1], size])
        if _formed_by_matmul(values):
            return tf.unstack(tf.einsum("bti,bto->bio", x, values.d))
        return [x[i, 0, :, None] * values.d[i, 0, None, :] for i in range(n)]
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


@functools.lru_cache(maxsize=None)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort on n wires, as (low, high) comparators in order.
    For n not a power of two it is the network of the next power of two with
    the wires past n held at +inf, whose comparators then never swap."""
    pairs, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


@functools.lru_cache(maxsize=None)
def selection_network(n: int, ranks: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The comparators of `sorting_network(n)` that the wires `ranks` depend on."""
    live, kept = set(ranks), []
    for low, high in reversed(sorting_network(n)):
        if low in live or high in live:
            kept.append((low, high))
            live |= {low, high}
    return tuple(reversed(kept))


def ranked(rows: list[tf.Tensor], ranks: tuple[int, ...]) -> list[tf.Tensor]:
    """The order statistics of the rows (rank 0 is the smallest), elementwise,
    through a selection network: min/max only, exact with ties."""
    wires = list(rows)
    for low, high in selection_network(len(rows), ranks):
        wires[low], wires[high] = (tf.minimum(wires[low], wires[high]),
                                   tf.maximum(wires[low], wires[high]))
    return [wires[r] for r in ranks]


def _chain_length(ranks: tuple[int, int], n: int) -> int:
    """The length of the running lists that give both thresholds."""
    return max(ranks[0] + 1, n - ranks[1])


def _chains(ranks: tuple[int, int], n: int) -> bool:
    """Whether the thresholds come from running lists (cheaper than the network
    near the ends; compile time grows with length * n)."""
    r = _chain_length(ranks, n)
    return r <= CHAIN_MAX_R and r * n <= CHAIN_BUDGET


def fits_tiles(ranks: tuple[int, int], n: int) -> bool:
    """Whether the unrolled order statistics stay small enough to compile quickly."""
    return _chains(ranks, n) or len(sorting_network(n)) <= NETWORK_BUDGET


def thresholds(rows: list[tf.Tensor], ranks: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
    """The order statistics of the n per-example rows at the two ranks, elementwise."""
    n = len(rows)
    if _chains(ranks, n):
        return -largest([-x for x in rows], ranks[0] + 1), largest(rows, n - ranks[1])
    lo, hi = ranked(rows, ranks)
    return lo, hi


def reduced(rows: list[tf.Tensor], lo: tf.Tensor, hi: tf.Tensor, stat: Statistic
            ) -> tf.Tensor:
    """The statistic of the n per-example rows given its thresholds; one output,
    so XLA fuses what it is made of once (two outputs would each recompute the
    shared comparators)."""
    n = len(rows)
    # Unrolled over examples: one elementwise fusion with the values formed inside.
    total = tf.add_n([tf.clip_by_value(x, lo, hi) for x in rows]) if stat.uses_sum else None
    return stat.from_thresholds(total, lo, hi, stat.ranks(n), n)


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


def _tiling(rows: int, cols: int) -> tuple[int, int]:
    """(tiles, rows per tile): at most TILE coordinates per tile, the rows split
    evenly (576 rows padded to tiles of 512 almost doubled the work), and two
    tiles at least: XLA inlines a loop of one trip, and the two threshold chains
    of an inlined Dense tile then took 5 minutes to compile and 20 s to run
    (a 512x10 kernel at n = 128; 7 s and 3 ms as two tiles)."""
    tiles = max(min(rows, 2), -(-rows // max(1, min(rows, TILE // max(cols, 1)))))
    return tiles, -(-rows // tiles)


def robust_variable(values: PerExample, stat: Statistic) -> tf.Tensor:
    """The statistic of one variable's per-example values, [rows, columns]: in one
    pass over tiles when it needs no clipped sum, or when forming a tile's
    values is a matmul (both steps then use the values formed once); else in a
    pass for the thresholds, then one for the clipped sums."""
    rows, cols = _layout(values)
    tiles, size = _tiling(rows, cols)
    values = _padded(values, tiles * size)
    tile = lambda i: _tile(values, i * size, size)  # noqa: E731
    ranks = stat.ranks(values.count)
    if not stat.uses_sum or _formed_by_matmul(values):
        def one_pass(i):
            x = tile(i)
            lo, hi = thresholds(x, ranks)
            if stat.uses_sum:
                lo, hi = xla.optimization_barrier(lo, hi)
            return [reduced(x, lo, hi, stat)]
        return _over_tiles(tiles, one_pass, 1)[0][:rows]
    # The barrier keeps XLA from fusing the thresholds into the clipped sums (which
    # would recompute them for every example) when a one-tile loop is unrolled.
    lo, hi = xla.optimization_barrier(*_over_tiles(tiles, lambda i: thresholds(tile(i), ranks), 2))
    cut_lo = lambda i: tf.slice(lo, [i * size, 0], [size, cols])  # noqa: E731
    cut_hi = lambda i: tf.slice(hi, [i * size, 0], [size, cols])  # noqa: E731
    out, = _over_tiles(tiles, lambda i: [reduced(tile(i), cut_lo(i), cut_hi(i), stat)], 1)
    return out[:rows]


@functools.lru_cache(maxsize=None)
def _compiled(signature) -> tf.types.experimental.PolymorphicFunction:
    """The XLA-compiled `robust_variable` for one signature (value type and shapes,
    statistic). One computation per variable compiles much faster than one for
    the whole model, and variables of one shape share it (a ResNet's repeated
    blocks compile once); a function per signature is traced once."""
    stat = signature[-1]
    return tf.function(lambda values: robust_variable(values, stat), jit_compile=True)


def _signature(values: PerExample, stat: Statistic) -> tuple:
    return type(values).__name__, tuple(tuple(t.shape) for t in values), stat


def _size(values: PerExample) -> int:
    rows, cols = _layout(values)
    return rows * cols


def sorted_along_batch(x: tf.Tensor, stat: Statistic) -> tf.Tensor:
    """The statistic of stacked values x [n, ...] by a sort along the batch."""
    n = x.shape[0]
    ranks = stat.ranks(n)
    s = tf.sort(x, axis=0)
    lo, hi = s[ranks[0]], s[ranks[1]]
    total = tf.reduce_sum(tf.clip_by_value(x, lo, hi), 0) if stat.uses_sum else None
    return stat.from_thresholds(total, lo, hi, ranks, n)


def aggregate(values: list[PerExample], stat: Statistic, variables: list) -> list[tf.Tensor]:
    """The statistic of each variable's per-example values, shaped like the
    variables: an XLA computation by tiles per variable, or (small variables;
    a batch too large for the network) a sort of the stacked values along the
    batch."""
    n = values[0].count
    tiled = [i for i, v in enumerate(values)
             if fits_tiles(stat.ranks(n), n) and _size(v) > SMALL]
    grads = {i: _compiled(_signature(values[i], stat))(values[i]) for i in tiled}
    rest = [i for i in range(len(values)) if i not in grads]
    if rest:
        # One sort for all of them: their stacked values side by side.
        stacked = [tf.reshape(values[i].stacked(), [n, -1]) for i in rest]
        flat = sorted_along_batch(tf.concat(stacked, 1), stat)
        grads.update(zip(rest, tf.split(flat, [s.shape[1] for s in stacked])))
    return [tf.reshape(grads[i], v.shape) for i, v in enumerate(variables)]
