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

Thresholds near the ends stream the n values through a running list of the
r largest (or smallest) kept with max/min only (2r operations per value), a
block of examples at a time (a loop over blocks past one block, so compile
time does not grow with the batch); others (larger c, the median) go through
a selection network (the comparators of Batcher's odd-even merge sort that the
wanted ranks depend on, about n log2(n)^2 / 4), or, past the network's size,
through running lists up to r = CHAIN_MAX_R, or by bisection on the values'
bit patterns (32 counting passes, any ranks, any batch). Each is fused by XLA
into loops per tile; each variable's aggregate is one XLA computation,
whatever the outer step is compiled with. Under a strategy each replica
computes a block of the rows of every tiled variable (`robust_share`), which
one cross-replica sum assembles. Small variables (biases, normalization
scales) go side by side into one more such computation (`side_by_side`).

A replica gets the rows of its share for the whole global batch
(`aggregate_batch`) by whichever of two collectives sends fewer bytes, per
variable (`exchanges`): the replicas gather every example's factors (a Dense
layer's input and output gradient, a convolution's input), each then forming
its rows' values; or each forms its own examples' values and sends every
other replica that replica's rows (an all-to-all). The first is smaller where
the values are outer products of long factors (Dense kernels), the second
where a value is smaller than what it is made of (a convolution near the
input, whose output gradient is larger than its kernel; biases).
"""

import functools
from typing import NamedTuple, Protocol

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from cg_tf.robust import layer_rules
from cg_tf.robust.collectives import Collectives
from cg_tf.robust.layer_rules import Outer, Patches, PerExample, Stacked, Unexpanded, expanded

TILE = 32768           # coordinates per tile
# The running lists take thresholds up to r = CHAIN_MAX_R from either end when
# no selection network fits the batch, and up to r = CHAIN_PREFERRED_R (the
# papers' c in {0, 1, 2, 4, 8}) always. A list is unrolled over a block of at
# most CHAIN_BLOCK examples per loop trip, r x block <= CHAIN_BUDGET: XLA:CPU's
# fusion emitter splits a fusion of more than 2,000 operations into functions
# that compute again what they share (a Dense tile at r = 5 over 200
# examples: 11 s a call, against 3 ms over two blocks of 100). A loop trip
# emits its r list entries as one fusion (`together`).
CHAIN_PREFERRED_R, CHAIN_MAX_R, CHAIN_BUDGET, CHAIN_BLOCK = 9, 32, 1024, 128
# Examples whose clipped values are summed per loop trip.
SUM_BLOCK = 128
# Examples per loop trip of the gradient probe's sums, which emit about 25
# operations an example (eight running sums): 32 x 25 = 800 stays well within
# the fusion emitter's 2,000 operations. The probe of a 784 x 256 kernel at
# 100 examples compiles and runs in 5 s in four trips of 25 (6 s in two of 50)
# and took more than 20 minutes in one trip of 100.
PROBE_BLOCK = 32
# Larger c and the median go through a selection network (about n log2(n)^2 / 4
# comparators) up to 160 examples (2257 comparators: the median of a Dense tile
# compiles in 8 s; over 200 examples, 18 s, and over 256, more than 10
# minutes); past that, by bisection.
NETWORK_BUDGET = 2257
# Variables of at most this many coordinates are aggregated together, their
# stacked values side by side in rows of SMALL_COLUMNS: cheaper than compiling
# a loop of tiles for each (a ResNet has dozens of biases and BN scales).
SMALL, SMALL_COLUMNS = 4096, 128


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

    def kept(self, g: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor) -> tf.Tensor:
        """What remains of values g given the thresholds (for the gradient probe)."""


# -- tiles ------------------------------------------------------------------------


def layout(values: PerExample) -> tuple[int, int]:
    """(rows, columns) of the 2-D view that tiles cut along its rows."""
    if isinstance(values, Outer):
        return values.x.shape[2], values.d.shape[2]
    if isinstance(values, Patches):
        return values.idx.shape[1], values.d.shape[2]
    shape = values.g.shape[1:]
    return (shape[0], int(np.prod(shape[1:]))) if len(shape) > 1 else (1, int(np.prod(shape)))


def _padded(values: PerExample, rows: int) -> PerExample:
    """The values with zero rows added up to `rows`."""
    have = layout(values)[0]
    if have == rows:
        return values
    if isinstance(values, Outer):
        return Outer(tf.pad(values.x, [[0, 0], [0, 0], [0, rows - have]]), values.d)
    if isinstance(values, Patches):  # the added rows read the zero
        return Patches(values.x, values.d, tf.pad(values.idx, [[0, 0], [0, rows - have]]))
    g = tf.reshape(values.g, [values.count, have, -1])
    return Stacked(tf.pad(g, [[0, 0], [0, rows - have], [0, 0]]))


def _formed_by_matmul(values: PerExample) -> bool:
    """Whether a tile's values come out of a matmul over positions (a convolution),
    which XLA materializes, rather than from a product it fuses into each use."""
    return isinstance(values, Patches) or isinstance(values, Outer) and values.x.shape[1] > 1


class Examples:
    """The per-example values of one tile (rows [start, start + size) of the 2-D
    view), read a block of examples at a time: a block is `count` [size, columns]
    tensors, formed where they are used (XLA fuses a Dense product into its
    consumers). A convolution's tile is formed once, by a matmul over positions
    for all examples, and blocks are read from it."""

    def __init__(self, values: PerExample, start, size: int):
        self.count = values.count
        if _formed_by_matmul(values):
            tile = _rows(values, start, size)
            tile = tile.outer() if isinstance(tile, Patches) else tile
            values, start = Stacked(tf.einsum("bti,bto->bio", tile.x, tile.d)), 0
        self.values, self.start, self.size = values, start, size
        self.columns = layout(values)[1]

    def block(self, first, count: int) -> list[tf.Tensor]:
        """The values of examples [first, first + count) (`first` may be a tensor)."""
        v, start, size = self.values, self.start, self.size
        if isinstance(v, Outer):
            x = tf.slice(v.x, [first, 0, start], [count, 1, size])
            d = tf.slice(v.d, [first, 0, 0], [count, 1, self.columns])
            return [x[i, 0, :, None] * d[i, 0, None, :] for i in range(count)]
        g = tf.reshape(v.g, [self.count, -1, self.columns])
        return tf.unstack(tf.slice(g, [first, start, 0], [count, size, self.columns]))

    def fold(self, step, state: list[tf.Tensor], block: int, first: bool = False
             ) -> list[tf.Tensor]:
        """`state` after `step(state, rows)` over the examples in order, `block`
        rows at a time: a loop over the whole blocks (so what XLA unrolls, and
        its compile time, does not grow with the batch), the rest after it.
        (`rows` are a block's examples, one [size, columns] tensor each.) With
        `first`, `step(state, rows, index of the block's first example)`."""
        whole, rest = divmod(self.count, block)
        at = (lambda s, start, count: step(s, self.block(start, count), start)) if first else (
            lambda s, start, count: step(s, self.block(start, count)))
        if whole > 1:
            def body(k, *state):
                return (k + 1, *together(at(list(state), k * block, block)))
            state = list(tf.while_loop(lambda k, *_: k < whole, body,
                                       (tf.constant(0), *state))[1:])
        elif whole == 1:
            state = at(state, 0, block)
        return at(state, whole * block, rest) if rest else state


def together(tensors: list[tf.Tensor]) -> list[tf.Tensor]:
    """The tensors, computed by XLA as one fusion with an output for each, which
    computes what they share once. XLA:CPU otherwise makes a fusion per output,
    each computing again all it depends on: a running list of r entries cost
    about (r + 1) / 2 times its work when a loop carried it. A reduction with
    an operand per tensor is one fusion whatever its operands; each tensor is
    broadcast along a new axis of two and reduced by max, which gives it back
    exactly (one axis would be simplified away, and a padding row would be
    computed as if it were one more example)."""
    if len(tensors) < 2:
        return tensors
    lowest = [tf.constant(-np.inf if t.dtype.is_floating else t.dtype.min, t.dtype)
              for t in tensors]
    k = len(tensors)
    reducer = tf.function(lambda *a: [tf.maximum(x, y) for x, y in zip(a[:k], a[k:])],
                          input_signature=[tf.TensorSpec([], t.dtype) for t in tensors] * 2)
    return xla.variadic_reduce([tf.broadcast_to(t, [2, *t.shape]) for t in tensors],
                               lowest, [0], reducer.get_concrete_function())


# -- order statistics of a tile ------------------------------------------------------


def fold_largest(top: list[tf.Tensor], rows: list[tf.Tensor]) -> list[tf.Tensor]:
    """The running list of the r largest values (top[0] the largest), elementwise,
    after the rows: t_j <- max(t_j, min(t_{j-1}, v)), exact with ties."""
    for x in rows:
        top = [tf.maximum(top[0], x)] + [tf.maximum(top[j], tf.minimum(top[j - 1], x))
                                         for j in range(1, len(top))]
    return top


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


def _network(n: int) -> bool:
    """Whether n wires make a selection network that compiles quickly."""
    return len(sorting_network(n)) <= NETWORK_BUDGET


def _chains(ranks: tuple[int, int], n: int) -> bool:
    """Whether the thresholds come from running lists: near the ends (cheaper
    than a network there), or where no network fits the batch and the lists
    stay short enough (their cost per value grows with their length)."""
    r = _chain_length(ranks, n)
    return r <= CHAIN_PREFERRED_R or r <= CHAIN_MAX_R and not _network(n)


def balanced_block(n: int, most: int) -> int:
    """The block of examples per loop trip: at most `most`, the n examples cut
    into as few blocks as that allows, of equal sizes (a remainder of a block
    is unrolled after the loop, and a loop of one trip is inlined whole)."""
    return n // -(-n // max(1, most))


def chain_block(length: int, n: int) -> int:
    """Examples unrolled per loop trip of a running list of `length` entries:
    XLA's compile time grows with length x block, the loop's overhead shrinks
    with the block."""
    return balanced_block(n, min(CHAIN_BLOCK, CHAIN_BUDGET // length))


def _key(bits: tf.Tensor) -> tf.Tensor:
    """The int32 bit pattern of a float32 made to order as the floats do (its
    magnitude bits flipped when negative; -0.0 just below +0.0); its own
    inverse."""
    return tf.bitwise.bitwise_xor(bits, tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(bits, 31), tf.constant(0x7FFFFFFF, tf.int32)))


SIGN = tf.int32.min  # flips a key between signed and unsigned order


def bisected(tile: Examples, ranks: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
    """The order statistics of the tile's n per-example values at the two ranks,
    elementwise, for any ranks and batch: each found bit by bit, from the top,
    in 32 passes over the examples. At each pass a rank's answer a (the
    ordered bit pattern `_key`, read as unsigned) gets the next bit when at
    most `rank` values lie below a with that bit set. A pass counts them a
    block of examples at a time, for both ranks at once (once for equal
    ranks), comparing the values' keys (as integers: a comparison of floats
    would take denormals for zeros, as XLA:CPU does). A coordinate with a NaN
    among its values gets NaN. (The lists and the network need not: XLA:CPU's
    min and max do not propagate a NaN. A NaN gradient usually comes with a
    loss that is not finite, which stops a run: StopOnNonFiniteLoss.)"""
    n = tile.count
    wanted = sorted(set(ranks))

    def one_bit(bit, *found):
        trial = [tf.bitwise.bitwise_or(f, tf.bitwise.left_shift(1, bit)) for f in found]
        bounds = [tf.bitwise.bitwise_xor(t, SIGN) for t in trial]

        def count(state, rows):
            keys = [_key(tf.bitcast(x, tf.int32)) for x in rows]
            return [tf.add_n([c, *(tf.cast(k < b, tf.int32) for k in keys)])
                    for c, b in zip(state, bounds)]

        zeros = tf.zeros([tile.size, tile.columns], tf.int32)
        below = together(tile.fold(count, [zeros] * len(wanted), balanced_block(n, SUM_BLOCK)))
        return (bit - 1, *(tf.where(c <= r, t, f)
                           for c, r, t, f in zip(below, wanted, trial, found)))

    start = [tf.zeros([tile.size, tile.columns], tf.int32)] * len(wanted)
    found = tf.while_loop(lambda bit, *_: bit >= 0, one_bit, (tf.constant(31), *start))[1:]
    nans, = tile.fold(lambda state, rows: [tf.add_n(
        [state[0], *(tf.cast(tf.math.is_nan(x), tf.int32) for x in rows)])],
        [tf.zeros([tile.size, tile.columns], tf.int32)], balanced_block(n, SUM_BLOCK))
    value = {r: tf.where(nans > 0, np.float32(np.nan),
                         tf.bitcast(_key(tf.bitwise.bitwise_xor(f, SIGN)), tf.float32))
             for r, f in zip(wanted, found)}
    return value[ranks[0]], value[ranks[1]]


def _kth_largest(tile: Examples, k: int, negated: bool) -> tf.Tensor:
    """The k-th largest of the tile's n per-example values (of their negatives if
    `negated`), elementwise: a running list of the k largest, folded over
    blocks of examples."""
    lowest = tf.fill([tile.size, tile.columns], tf.constant(-np.inf, tf.float32))
    sign = (lambda x: -x) if negated else (lambda x: x)  # noqa: E731
    top = tile.fold(lambda top, rows: fold_largest(top, [sign(x) for x in rows]),
                    [lowest] * k, chain_block(k, tile.count))
    return top[-1]


def thresholds(tile: Examples, ranks: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
    """The order statistics of the tile's n per-example values at the two ranks,
    elementwise: running lists of the largest and of the smallest, each folded
    over blocks of examples; or a selection network over all of them; or,
    past the network's size, by bisection on their bit patterns."""
    n = tile.count
    if _chains(ranks, n):
        # List lengths: lo's rank from the bottom, hi's from the top.
        return -_kth_largest(tile, ranks[0] + 1, True), _kth_largest(tile, n - ranks[1], False)
    if _network(n):
        lo, hi = ranked(tile.block(0, n), ranks)
        return lo, hi
    return bisected(tile, ranks)


def reduced(tile: Examples, lo: tf.Tensor, hi: tf.Tensor, stat: Statistic) -> tf.Tensor:
    """The statistic of the tile's n per-example values given its thresholds; one
    output, so XLA fuses what it is made of once (two outputs would each
    recompute the shared comparators). The clipped values are summed a block
    of examples at a time, each block one elementwise fusion."""
    n = tile.count
    total = None
    if stat.uses_sum:
        total, = tile.fold(lambda state, rows: [tf.add_n(
            [state[0], *(tf.clip_by_value(x, lo, hi) for x in rows)])],
            [tf.zeros_like(lo)], balanced_block(n, SUM_BLOCK))
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
    rows, cols = layout(values)
    tiles, size = _tiling(rows, cols)
    values = _padded(values, tiles * size)
    tile = lambda i: Examples(values, i * size, size)  # noqa: E731
    ranks = stat.ranks(values.count)
    if not stat.uses_sum or _formed_by_matmul(values):
        def one_pass(i):
            examples = tile(i)
            lo, hi = thresholds(examples, ranks)
            if stat.uses_sum:
                lo, hi = xla.optimization_barrier(lo, hi)
            return [reduced(examples, lo, hi, stat)]
        return _over_tiles(tiles, one_pass, 1)[0][:rows]
    # The barrier keeps XLA from fusing the thresholds into the clipped sums (which
    # would recompute them for every example) when a one-tile loop is unrolled.
    lo, hi = xla.optimization_barrier(*_over_tiles(tiles, lambda i: thresholds(tile(i), ranks), 2))
    cut_lo = lambda i: tf.slice(lo, [i * size, 0], [size, cols])  # noqa: E731
    cut_hi = lambda i: tf.slice(hi, [i * size, 0], [size, cols])  # noqa: E731
    out, = _over_tiles(tiles, lambda i: [reduced(tile(i), cut_lo(i), cut_hi(i), stat)], 1)
    return out[:rows]


def probe_variable(values: PerExample, stat: Statistic, ranks: tuple[int, int],
                   pristine: tf.Tensor) -> list[tf.Tensor]:
    """What the gradient probe measures of one variable's n per-example values,
    tile by tile: the thresholds at `ranks` found as the step finds them, then,
    from the same tile (formed once), the sums that need them, so that each
    threshold is exactly one of the values summed. Returns lo, hi, the sum of
    the values clipped to them and the sum of the pristine examples' kept
    parts (`stat.kept`), each [rows, columns]; and [3, 2] (float64): the values
    beyond the thresholds, the L1 mass the cut removed and the L1 mass in all,
    of the pristine examples (`pristine`, [n], 1 or 0 per example) and of the
    others."""
    rows, cols = layout(values)
    tiles, size = _tiling(rows, cols)
    values = _padded(values, tiles * size)

    def tile_parts(i):
        examples = Examples(values, i * size, size)
        # The barrier keeps XLA from fusing the thresholds into every example's sums.
        lo, hi = xla.optimization_barrier(*thresholds(examples, ranks))

        def step(state, examples_block, first):
            clipped, kept_p, *groups = state
            for j, g in enumerate(examples_block):
                p = pristine[first + j]
                kept = stat.kept(g, lo, hi)
                clipped = clipped + tf.clip_by_value(g, lo, hi)
                kept_p = kept_p + p * kept
                measures = [tf.cast((g < lo) | (g > hi), tf.float32), tf.abs(g - kept),
                            tf.abs(g)]
                groups = [a + w * m for a, (w, m) in zip(
                    groups, [(w, m) for m in measures for w in (p, 1 - p)])]
            return [clipped, kept_p, *groups]

        zeros = tf.zeros([size, cols])
        return [lo, hi, *examples.fold(step, [zeros] * 8, balanced_block(values.count, PROBE_BLOCK),
                                       first=True)]

    lo, hi, clipped, kept_p, *groups = _over_tiles(tiles, tile_parts, 10)
    totals = tf.reshape(tf.stack([tf.reduce_sum(tf.cast(g, tf.float64)) for g in groups]), [3, 2])
    return [lo[:rows], hi[:rows], clipped[:rows], kept_p[:rows], totals]


def _rows(values: PerExample, start, count: int) -> PerExample:
    """The values of rows [start, start + count) of the 2-D view (`start` may be
    a tensor)."""
    if isinstance(values, Outer):
        x = values.x
        return Outer(tf.slice(x, [0, 0, start], [values.count, x.shape[1], count]), values.d)
    if isinstance(values, Patches):
        return values.rows(start, count)
    rows, cols = layout(values)
    g = tf.reshape(values.g, [values.count, rows, cols])
    return Stacked(tf.slice(g, [0, start, 0], [values.count, count, cols]))


def share_rows(rows: int, replicas: int) -> int:
    """The rows of each replica's share of `rows`: ceil(rows / replicas) (the
    last shares take the zero rows that pad `rows` to replicas equal ones)."""
    return -(-rows // replicas)


def _placed(part: tf.Tensor, replica: tf.Tensor, replicas: int, rows: int) -> tf.Tensor:
    """A replica's block of rows ([ceil(rows / replicas), columns]) in place
    among zeros: the first `rows` of its replicas blocks."""
    share, cols = share_rows(rows, replicas), part.shape[1]
    placed = xla.dynamic_update_slice(tf.zeros([share * replicas, cols], part.dtype), part,
                                      [replica * share, 0])
    return placed[:rows]


def robust_share(values: PerExample, stat: Statistic, replica: tf.Tensor, replicas: int
                 ) -> tf.Tensor:
    """Replica `replica`'s share of the statistic of one variable, [rows,
    columns]: its block of ceil(rows / replicas) rows computed, zeros
    elsewhere, so that the shares of all replicas sum to `robust_variable`'s
    value and each computes a 1 / replicas part of it (one replica: the
    value, without placing it)."""
    if replicas == 1:
        return robust_variable(values, stat)
    rows, cols = layout(values)
    share = share_rows(rows, replicas)
    part = robust_variable(_rows(_padded(values, share * replicas), replica * share, share), stat)
    return _placed(part, replica, replicas, rows)


def exchanges(coordinates: int, factors: int, replicas: int) -> bool:
    """Whether a replica sends fewer bytes forming its examples' values of
    `coordinates` (padded to the replicas' equal shares) and sending each other
    replica its rows (an all-to-all: (R - 1) / R of b x P floats, b = B / R
    examples) than gathering the `factors` floats per example the values are
    made of (an all-reduce of B x F floats, of which each replica sends 2 (R -
    1) / R in a ring): P < 2 R F."""
    return coordinates < 2 * replicas * factors


def rows_by_replica(values: PerExample, replicas: int) -> tf.Tensor:
    """[replicas, n, share, columns]: the n examples' values in the 2-D view,
    zero-padded to share x replicas rows, block j the rows of replica j."""
    rows, cols = layout(values)
    share = share_rows(rows, replicas)
    g = tf.reshape(values.stacked(), [values.count, rows, cols])
    g = tf.pad(g, [[0, 0], [0, share * replicas - rows], [0, 0]])
    return tf.transpose(tf.reshape(g, [values.count, replicas, share, cols]), [1, 0, 2, 3])


def exchanged_share(received: tf.Tensor, stat: Statistic, replica: tf.Tensor, replicas: int,
                    rows: int) -> tf.Tensor:
    """Like `robust_share`, from what the all-to-all brought this replica
    (`rows_by_replica`'s block of every replica: [replicas, b, share, columns],
    its rows of the global batch's values in replica order)."""
    _, b, share, cols = received.shape
    part = robust_variable(Stacked(tf.reshape(received, [replicas * b, share, cols])), stat)
    return _placed(part, replica, replicas, rows)


@functools.lru_cache(maxsize=None)
def _compiled(signature, replicas: int) -> tf.types.experimental.PolymorphicFunction:
    """The XLA-compiled `robust_share` of `replicas` for one signature (value
    type and shapes, statistic). One computation per variable compiles much
    faster than one for the whole model, and variables of one shape share it (a
    ResNet's repeated blocks compile once); a function per signature is traced once."""
    stat = signature[-1]
    return tf.function(lambda values, replica: robust_share(values, stat, replica, replicas),
                       jit_compile=True)


@functools.lru_cache(maxsize=None)
def _compiled_exchanged(signature, replicas: int) -> tf.types.experimental.PolymorphicFunction:
    """The XLA-compiled `exchanged_share` for one signature ((statistic, rows) last)."""
    stat, rows = signature[-1]
    return tf.function(lambda received, replica: exchanged_share(received, stat, replica,
                                                                 replicas, rows),
                       jit_compile=True)


@functools.lru_cache(maxsize=None)
def _compiled_probe(signature) -> tf.types.experimental.PolymorphicFunction:
    """The XLA-compiled `probe_variable` for one signature ((statistic, ranks) last)."""
    stat, ranks = signature[-1]
    return tf.function(lambda values, pristine: probe_variable(values, stat, ranks, pristine),
                       jit_compile=True)


def _signature(values: PerExample, what) -> tuple:
    """What a compiled computation is made for: the values' type and shapes, and
    `what` it computes (the step's statistic, or the probe's statistic and ranks)."""
    return type(values).__name__, tuple(tuple(t.shape) for t in values), what


def _size(values: PerExample | Unexpanded) -> int:
    rows, cols = layout(expanded(values))
    return rows * cols


def _side_by_side_rows(coordinates: int, replicas: int) -> int:
    """The rows of SMALL_COLUMNS that `side_by_side` makes of `coordinates`."""
    return max(-(-coordinates // SMALL_COLUMNS), 2 * replicas)


def side_by_side(values: list[PerExample | Unexpanded], replicas: int) -> Stacked:
    """Several variables' stacked values side by side, zero-padded to rows of
    SMALL_COLUMNS: one variable's values [n, rows, SMALL_COLUMNS], with at least
    two rows per replica (each replica's share then makes two tiles, `_tiling`)."""
    n = values[0].count
    flat = tf.concat([tf.reshape(expanded(v).stacked(), [n, -1]) for v in values], 1)
    rows = _side_by_side_rows(flat.shape[1], replicas)
    flat = tf.pad(flat, [[0, 0], [0, rows * SMALL_COLUMNS - flat.shape[1]]])
    return Stacked(tf.reshape(flat, [n, rows, SMALL_COLUMNS]))


class Computation(NamedTuple):
    """The variables (indices) one computation aggregates: a large one alone,
    or the small ones side by side."""

    members: list[int]
    side_by_side: bool

    def part(self, values: list, replicas: int) -> PerExample | Unexpanded:
        """Its values, from every variable's `values`."""
        members = [values[i] for i in self.members]
        return side_by_side(members, replicas) if self.side_by_side else members[0]

    def layout(self, values: list, replicas: int) -> tuple[int, int]:
        """The (rows, columns) of its values' 2-D view, without forming them."""
        if self.side_by_side:
            total = sum(_size(values[i]) for i in self.members)
            return _side_by_side_rows(total, replicas), SMALL_COLUMNS
        return layout(expanded(values[self.members[0]]))

    def coordinates(self, values: list, replicas: int) -> int:
        """Its coordinates, padded to `replicas` equal shares of rows."""
        rows, cols = self.layout(values, replicas)
        return share_rows(rows, replicas) * replicas * cols

    def factors(self, values: list) -> int:
        """The floats per example a gather of its values moves."""
        return sum(layer_rules.floats_per_example(values[i]) for i in self.members)

    def exchanged(self, values: list, replicas: int) -> bool:
        """Whether its rows go by the all-to-all (`exchanges`) among `replicas`."""
        return exchanges(self.coordinates(values, replicas), self.factors(values), replicas)


def computations(values: list[PerExample | Unexpanded]) -> list[Computation]:
    """Each large variable's computation, then (if any) the small ones'."""
    small = [i for i, v in enumerate(values) if _size(v) <= SMALL]
    return [Computation([i], False) for i in range(len(values)) if i not in small] + (
        [Computation(small, True)] if small else [])


def _grouped(values: list[PerExample | Unexpanded], replicas: int
             ) -> tuple[list[PerExample | Unexpanded], list[int]]:
    """The values as computations go, and the indices of the small ones."""
    plan = computations(values)
    return [c.part(values, replicas) for c in plan], _small(plan)


def _small(plan: list[Computation]) -> list[int]:
    """The indices of the variables that go side by side."""
    return plan[-1].members if plan and plan[-1].side_by_side else []


def _ungrouped(results: list[tf.Tensor], small: list[int], variables: list) -> list[tf.Tensor]:
    """Per variable, shaped like it, from one result per computation of `_grouped`."""
    large = [i for i in range(len(variables)) if i not in small]
    out = dict(zip(large, results))
    if small:
        sizes = [int(np.prod(variables[i].shape)) for i in small]
        out.update(zip(small, tf.split(tf.reshape(results[-1], [-1])[:sum(sizes)], sizes)))
    return [tf.reshape(out[i], v.shape) for i, v in enumerate(variables)]


def aggregate(values: list[PerExample], stat: Statistic, variables: list,
              sync: Collectives | None = None) -> list[tf.Tensor]:
    """The statistic of each variable's per-example values (every replica's
    `values` those of the whole global batch), shaped like the variables: an
    XLA computation by tiles per variable, and one for all small variables
    side by side. Under `sync` each replica computes and returns its share of
    the rows (`robust_share`, zeros elsewhere): the shares of all replicas sum
    to the statistic, and the optimizer's all-reduce is what adds them."""
    replicas = sync.replicas if sync else 1
    replica = sync.replica_id if sync else tf.constant(0)
    parts, small = _grouped(values, replicas)
    shares = [share_of_whole(p, stat, replicas, replica) for p in parts]
    return _ungrouped(shares, small, variables)


def share_of_whole(values: PerExample, stat: Statistic, replicas: int, replica: tf.Tensor
                   ) -> tf.Tensor:
    """`robust_share` of one computation's values of the global batch, compiled."""
    return _compiled(_signature(values, stat), replicas)(values, replica)


def share_of_received(received: tf.Tensor, rows: int, stat: Statistic, replicas: int,
                      replica: tf.Tensor) -> tf.Tensor:
    """`exchanged_share` of what one computation's all-to-all brought, compiled."""
    return _compiled_exchanged((tuple(received.shape), (stat, rows)), replicas)(received, replica)


def aggregate_batch(values: list[PerExample | Unexpanded], stat: Statistic, variables: list,
                    sync: Collectives) -> list[tf.Tensor]:
    """Like `aggregate`, over the global batch of which each replica holds its
    own examples' `values`: per computation (a large variable, or the small
    ones side by side), the replicas gather the factors or exchange rows,
    whichever sends fewer bytes (`exchanges`), and each computes its share."""
    replicas, replica = sync.replicas, sync.replica_id
    plan = computations(values)
    routes = [sync.can_exchange and c.exchanged(values, replicas) for c in plan]
    ids = [i for c, e in zip(plan, routes) if not e for i in c.members]
    whole = dict(zip(ids, layer_rules.gathered([values[i] for i in ids], sync)))
    received = iter(sync.exchange([rows_by_replica(expanded(c.part(values, replicas)), replicas)
                                   for c, e in zip(plan, routes) if e]))
    shares = [share_of_received(next(received), c.layout(values, replicas)[0], stat, replicas,
                                replica)
              if e else share_of_whole(c.part(whole, replicas), stat, replicas, replica)
              for c, e in zip(plan, routes)]
    return _ungrouped(shares, _small(plan), variables)


def probe(values: list[PerExample], stat: Statistic, ranks: tuple[int, int],
          pristine: tf.Tensor, variables: list) -> tuple[list[list[tf.Tensor]], tf.Tensor]:
    """`probe_variable` of every variable, in the computations the step makes
    (small variables side by side): per variable [lo, hi, clipped sum, pristine
    kept sum] shaped like it, and the [3, 2] counts and masses of all (float64)."""
    parts, small = _grouped(values, 1)
    found = [_compiled_probe(_signature(p, (stat, ranks)))(p, pristine) for p in parts]
    per_variable = [_ungrouped([f[k] for f in found], small, variables) for k in range(4)]
    totals = tf.add_n([f[4] for f in found]) if found else tf.zeros([3, 2], tf.float64)
    return [list(v) for v in zip(*per_variable)], totals
