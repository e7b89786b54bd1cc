"""The order statistics of one Dense tile's per-example values, timed alone: what
the tiles (cg_tf.robust.tiled.thresholds) cost per call at each batch, against
XLA's sort and TopK along the batch, checked against NumPy.

  python -m tools.benchmark_tile --ways=tiles,sort --c=4 --batches=100,200,400,800
  python -m tools.benchmark_tile --ways=tiles --median --batches=100,400,800

A tile is 256 input columns x 128 output gradients (32,768 coordinates), its
values formed on the spot from random factors, as a Dense layer's are. Each
way is compiled by XLA; the table gives CPU ms per call (the process's, all
threads; median of --calls) and the first call's seconds (tracing and
compiling). Run it pinned to one core (`taskset -c 0`) for a number per core.
"""

import time

import numpy as np
from absl import app, flags

from cg_tf import common_flags

_WAYS = flags.DEFINE_list("ways", ["tiles"], "tiles (the package's), sort, topk.")
_C = flags.DEFINE_integer("c", 4, "The thresholds' rank from each end.")
_MEDIAN = flags.DEFINE_bool("median", False, "The two middle ranks instead of c's.")
_BATCHES = flags.DEFINE_list("batches", ["100", "200", "400", "800"], "Examples per tile.")
_CALLS = flags.DEFINE_integer("calls", 20, "Timed calls per way and batch.")
ROWS, COLS = 256, 128


def ways():
    import tensorflow as tf

    from cg_tf.robust import tiled
    from cg_tf.robust.layer_rules import Outer

    def formed(x, d):
        return x[:, 0, :, None] * d[:, 0, None, :]

    def sort(x, d, ranks):
        s = tf.sort(formed(x, d), axis=0)
        return s[ranks[0]], s[ranks[1]]

    def topk(x, d, ranks):
        n = x.shape[0]
        v = tf.transpose(tf.reshape(formed(x, d), [n, -1]))
        hi = tf.math.top_k(v, n - ranks[1]).values[:, -1]
        lo = -tf.math.top_k(-v, ranks[0] + 1).values[:, -1]
        return tf.reshape(lo, [ROWS, COLS]), tf.reshape(hi, [ROWS, COLS])

    return {"tiles": lambda x, d, ranks: tiled.thresholds(tiled.Examples(Outer(x, d), 0, ROWS),
                                                           ranks),
            "sort": sort, "topk": topk}


def main(_):
    import tensorflow as tf
    known = ways()
    for way in _WAYS.value:
        if way not in known:
            raise app.UsageError(f"--ways: unknown way {way!r} (one of {', '.join(known)})")
    print(f"{'way':<8}{'batch':>6}  {'ranks':<12}{'CPU ms':>9}{'first s':>9}  exact")
    for way in _WAYS.value:
        for n in (int(b) for b in _BATCHES.value):
            rng = np.random.default_rng(n)
            x = tf.constant(rng.normal(size=(n, 1, ROWS)).astype(np.float32))
            d = tf.constant(rng.normal(size=(n, 1, COLS)).astype(np.float32))
            ranks = ((n - 1) // 2, n // 2) if _MEDIAN.value else (_C.value, n - 1 - _C.value)
            f = tf.function(lambda x, d, w=known[way], r=ranks: w(x, d, r), jit_compile=True)
            start = time.perf_counter()
            lo, hi = f(x, d)
            first = time.perf_counter() - start
            want = np.sort(x.numpy()[:, 0, :, None] * d.numpy()[:, 0, None, :], axis=0)
            exact = np.array_equal(lo, want[ranks[0]]) and np.array_equal(hi, want[ranks[1]])
            cpu = []
            for _ in range(_CALLS.value):
                start = time.process_time()
                f(x, d)[0].numpy()
                cpu.append(time.process_time() - start)
            print(f"{way:<8}{n:>6}  {str(ranks):<12}{1000 * np.median(cpu):>9.2f}{first:>9.1f}"
                  f"  {exact}", flush=True)


if __name__ == "__main__":
    common_flags.run(main)
