"""Winsorized mean, trimmed mean and median of per-example values, tile by tile.

The coordinates of a variable are processed in tiles small enough to stay in
cache; inside a tile the per-example values are formed on the spot, never
stored for the whole variable (a Dense tile is input column x output
gradient, formed again by each pass, fused into it; a convolution tile is a
matmul over positions, formed once per tile for both passes), and per
coordinate:

  lo, hi = x_(c+1), x_(n-c)                     exact order statistics (ties included)
  s      = sum_i clip(v_i, lo, hi)              the outliers never enter a sum
  winsorized = s / n,  trimmed = (s - c (lo + hi)) / (n - 2c),  median = (lo + hi) / 2

For small c the thresholds stream the n values through running top-(c+1)
and bottom-(c+1) lists kept with max/min only (2(c+1) operations per value);
for larger c and the median, through a selection network (the comparators of
Batcher's odd-even merge sort that the wanted ranks depend on, about
n log2(n)^2 / 4). Both are unrolled and fused by XLA into one loop per tile;
each variable's aggregate is one XLA computation, whatever the outer step is
compiled with. Small variables (biases, normalization scales) and
batches too large for the network to compile quickly are sorted along the
batch instead (their stacked values in memory).
"""

import functools

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from cg_tf.robust import order_stats as agg
from cg_tf.robust.layer_rules import Outer, PerExample, Stacked

KINDS = ("winsorized", "trimmed", "median")
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


def _chains(c: int, n: int) -> bool:
    """Whether the thresholds come from running lists (cheaper than the network
    for small c; compile time grows with r * n)."""
    return c + 1 <= CHAIN_MAX_R and (c + 1) * n <= CHAIN_BUDGET


def fits_tiles(kind: str, c: int, n: int) -> bool:
    """Whether the unrolled order statistics stay small enough to compile quickly."""
    return (kind != "median" and _chains(c, n)) or len(sorting_network(n)) <= NETWORK_BUDGET


def thresholds(rows: list[tf.Tensor], c: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(x_(c+1), x_(n-c)) of the n per-example rows, elementwise."""
    n = len(rows)
    if _chains(c, n):
        return -largest([-x for x in rows], c + 1), largest(rows, c + 1)
    lo, hi = ranked(rows, (c, n - 1 - c))
    return lo, hi


def median(rows: list[tf.Tensor]) -> tf.Tensor:
    """The median of the n rows, elementwise: one output, so XLA fuses the
    network once (two outputs would each recompute the shared comparators)."""
    n = len(rows)
    return tf.add_n(ranked(rows, tuple(sorted({(n - 1) // 2, n // 2})))) * (
        1.0 if n % 2 else 0.5)


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


def _tiling(rows: int, cols: int) -> tuple[int, int]:
    """(tiles, rows per tile): at most TILE coordinates per tile, the rows split
    evenly (576 rows padded to tiles of 512 almost doubled the work), and two
    tiles at least: XLA inlines a loop of one trip, and the two threshold chains
    of an inlined Dense tile then took 5 minutes to compile and 20 s to run
    (a 512x10 kernel at n = 128; 7 s and 3 ms as two tiles)."""
    tiles = max(min(rows, 2), -(-rows // max(1, min(rows, TILE // max(cols, 1)))))
    return tiles, -(-rows // tiles)


def robust_variable(values: PerExample, kind: str, c: int) -> tf.Tensor:
    """The aggregate of one variable's per-example values, [rows, columns]: the
    median in one pass over tiles; the winsorized and trimmed means in a pass
    for the thresholds, then one for the clipped sums, except when forming a
    tile's values is a matmul: then both use the values formed once."""
    rows, cols = _layout(values)
    tiles, size = _tiling(rows, cols)
    values = _padded(values, tiles * size)
    tile = lambda i: _tile(values, i * size, size)  # noqa: E731
    if kind == "median":
        return _over_tiles(tiles, lambda i: [median(tile(i))], 1)[0][:rows]
    if _formed_by_matmul(values):
        def one_pass(i):
            x = tile(i)
            lo, hi = xla.optimization_barrier(*thresholds(x, c))
            return [clipped_mean(x, lo, hi, kind, c)]
        return _over_tiles(tiles, one_pass, 1)[0][:rows]
    # The barrier keeps XLA from fusing the thresholds into the clipped sums (which
    # would recompute them for every example) when a one-tile loop is unrolled.
    lo, hi = xla.optimization_barrier(*_over_tiles(tiles, lambda i: thresholds(tile(i), c), 2))
    cut_lo = lambda i: tf.slice(lo, [i * size, 0], [size, cols])  # noqa: E731
    cut_hi = lambda i: tf.slice(hi, [i * size, 0], [size, cols])  # noqa: E731
    out, = _over_tiles(tiles, lambda i: [clipped_mean(tile(i), cut_lo(i), cut_hi(i), kind, c)], 1)
    return out[:rows]


@functools.lru_cache(maxsize=None)
def _compiled(signature) -> tf.types.experimental.PolymorphicFunction:
    """The XLA-compiled `robust_variable` for one signature (value type and shapes,
    kind, c). One computation per variable compiles much faster than one for
    the whole model, and variables of one shape share it (a ResNet's repeated
    blocks compile once); a function per signature is traced once."""
    return tf.function(robust_variable, jit_compile=True)


def _signature(values: PerExample, kind: str, c: int) -> tuple:
    return type(values).__name__, tuple(tuple(t.shape) for t in values), kind, c


_SORTED = {"winsorized": agg.winsorized_mean, "trimmed": agg.trimmed_mean,
           "median": lambda x, c: agg.median(x)}


def _size(values: PerExample) -> int:
    rows, cols = _layout(values)
    return rows * cols


def aggregate(values: list[PerExample], kind: str, c: int, variables: list) -> list[tf.Tensor]:
    """The aggregate (`kind` in KINDS, c values cut per side) of each variable's
    per-example values, shaped like the variables: an XLA computation by tiles
    per variable, or (small variables; a batch too large for the network) a
    sort of the stacked values along the batch."""
    if kind not in KINDS:
        raise ValueError(f"tiled aggregation of {kind!r}: one of {', '.join(KINDS)}")
    n = values[0].count
    tiled = [i for i, v in enumerate(values) if fits_tiles(kind, c, n) and _size(v) > SMALL]
    grads = {i: _compiled(_signature(values[i], kind, c))(values[i], kind, c) for i in tiled}
    rest = [i for i in range(len(values)) if i not in grads]
    if rest:
        # One sort for all of them: their stacked values side by side.
        stacked = [tf.reshape(values[i].stacked(), [n, -1]) for i in rest]
        flat = _SORTED[kind](tf.concat(stacked, 1), c)
        grads.update(zip(rest, tf.split(flat, [s.shape[1] for s in stacked])))
    return [tf.reshape(grads[i], v.shape) for i, v in enumerate(variables)]
