"""Gradient measurements on a fixed probe sample, with the current weights.

From the per-example gradients g_i of the m probe examples (BatchNorm frozen
to its moving statistics, so measuring changes nothing):

* m-coherence ||sum g_i||^2 / sum ||g_i||^2 of the whole model and per layer;
* the update decomposition f_p = <g, g_p> / <g, g>, f_c = 1 - f_p, of the plain
  mean update (g_p = the pristine examples' part of the sum), and, for the
  aggregators that are sums of per-example contributions (winsorized: clipped
  values; trimmed and median: the kept values), of the robust update;
* for those aggregators, the fraction of coordinates clipped (or trimmed) and
  the share of gradient mass (L1) removed, for pristine vs corrupt examples.
  An aggregator's layer filter is followed: the layers it leaves to the mean
  enter the robust update with their mean and all their values kept, and
  count in neither the clipped coordinates nor the removed mass.

The thresholds are the exact per-coordinate order statistics of the probe
(order_stats.OrderStats); the per-example contributions need them, so the
aggregators with thresholds take a second pass over the probe. Ties at a
nonzero threshold count as kept (for trimmed means and the median a tied value
that the aggregator drops is attributed to no example). M3, RM3 and RA3 have
no per-example decomposition: their runs get coherence and the mean's f_p.
"""

import numpy as np
import tensorflow as tf

from cg_tf.measure import metrics, tags
from cg_tf.robust import order_stats
from cg_tf.robust.aggregators import Aggregator
from cg_tf.robust.gradients import DEFAULT_BN_MODE, GradientSource, chunk_size, example_losses


def layer_of(variable, net_name: str) -> str:
    """The layer a variable belongs to: its path without the model and variable names."""
    parts = variable.path.split("/")
    if len(parts) > 2 and parts[0] == net_name:
        parts = parts[1:]
    return "/".join(parts[:-1]) or parts[0]


class Probe:
    """Measures the probe sample `x, y, is_corrupt` for `net` trained with `aggregator`."""

    def __init__(self, net, aggregator: Aggregator, sample: dict[str, tf.Tensor],
                 batch_size: int, chunk: int | None = None, bn_mode: str = DEFAULT_BN_MODE,
                 loss=example_losses):
        self.x = tf.convert_to_tensor(sample["image"])
        self.y = tf.convert_to_tensor(sample["label"])
        self.pristine = 1.0 - tf.cast(sample["is_corrupt"], tf.float32)
        self.size = int(self.x.shape[0])
        self.aggregator = aggregator
        self.chunk = chunk if chunk and self.size % chunk == 0 else None
        self.source = GradientSource(net, bn_mode, loss)  # the loss the model trains with
        self.layers = sorted({layer_of(v, net.name) for v in self.source.variables})
        self._layer_index = [self.layers.index(layer_of(v, net.name))
                             for v in self.source.variables]
        # Values cut per side per coordinate on the probe, or None (no thresholds).
        self.cut = aggregator.probe_cut(self.size, batch_size)
        # The variables the aggregator's layer filter aggregates robustly; the
        # others' update is the mean, their values all kept.
        self.robust = aggregator.layers.robust(self.source.model)
        self._measure = tf.function(self._graph)

    def _chunk_pristine(self, i, m):
        return tf.reshape(self.pristine, [-1, m])[i]

    def _fold(self, init, step):
        m = chunk_size(self.chunk, self.size)
        return self.source.fold_per_example(
            self.x, self.y, self.chunk, None, init,
            lambda state, i, yc, grads, losses, logits: step(
                state, self._chunk_pristine(i, m), grads),
            frozen_bn=True)

    def _first_pass(self):
        """Sums of all and of the pristine gradients, per-layer sums of squared
        per-example norms, and the order statistics for the thresholds."""
        variables = self.source.variables
        k = None if self.cut is None else self.cut + 1

        def step(state, p, grads):
            total, pristine, norms, stats = state
            sq = [tf.reduce_sum(tf.square(g)) for g in grads]
            norms = norms + tf.math.unsorted_segment_sum(tf.stack(sq), self._layer_index,
                                                         len(self.layers))
            return ([t + tf.reduce_sum(g, 0) for t, g in zip(total, grads)],
                    [s + tf.tensordot(p, g, 1) for s, g in zip(pristine, grads)],
                    norms,
                    [order_stats.add(s, g) for s, g in zip(stats, grads)] if k else stats)

        zeros = [tf.zeros(v.shape) for v in variables]
        stats = [order_stats.empty_stats(v.shape, k) for v in variables] if k else []
        return self._fold((zeros, zeros, tf.zeros([len(self.layers)]), stats), step)

    def _second_pass(self, stats):
        """The pristine examples' contributions to the robust update, and per
        group (pristine, corrupt) the coordinates cut, the L1 mass removed and
        the L1 mass in all."""
        bounds = [order_stats.thresholds(s, self.cut) for s in stats]

        def step(state, p, grads):
            contrib_p, cut, removed, mass = state
            groups = tf.stack([p, 1.0 - p])  # [2, m]
            new_contrib = []
            for c_p, g, (lo, hi), robust in zip(contrib_p, grads, bounds, self.robust):
                if not robust:
                    new_contrib.append(c_p)
                    continue
                beyond = (g < lo) | (g > hi)
                kept = self.aggregator.kept(g, lo, hi)
                axes = list(range(1, g.shape.rank))
                per_example = tf.stack([tf.reduce_sum(tf.cast(beyond, tf.float32), axes),
                                        tf.reduce_sum(tf.abs(g - kept), axes),
                                        tf.reduce_sum(tf.abs(g), axes)])  # [3, m]
                sums = tf.linalg.matmul(per_example, groups, transpose_b=True)  # [3, 2]
                cut, removed, mass = cut + sums[0], removed + sums[1], mass + sums[2]
                new_contrib.append(c_p + tf.tensordot(p, kept, 1))
            return new_contrib, cut, removed, mass

        zeros2 = tf.zeros([2])
        init = ([tf.zeros(v.shape) for v in self.source.variables], zeros2, zeros2, zeros2)
        return self._fold(init, step)

    def _graph(self):
        total, pristine, norms, stats = self._first_pass()
        out = {"total": total, "pristine": pristine, "norms": norms,
               "layer_sum_sq": tf.math.unsorted_segment_sum(
                   tf.stack([tf.reduce_sum(tf.square(t)) for t in total]),
                   self._layer_index, len(self.layers))}
        if self.cut is not None:
            contrib_p, cut, removed, mass = self._second_pass(stats)
            kept = self.aggregator.kept_count(self.size, self.cut)
            # Per variable, the update and the pristine examples' part of it.
            update, share_p = [], []
            for s, t, p, c_p, robust in zip(stats, total, pristine, contrib_p, self.robust):
                update.append(self.aggregator.from_stats(s, self.cut, self.size) if robust
                              else t / self.size)
                share_p.append(c_p / kept if robust else p / self.size)
            out.update(update=update, share_p=share_p, cut=cut, removed=removed, mass=mass)
        return out

    def measure(self) -> dict[str, float]:
        """Scalar summaries (cg_tf.measure.tags names) for the current weights."""
        r = tf.nest.map_structure(lambda t: t.numpy(), self._measure())
        flat = lambda xs: np.concatenate([x.ravel() for x in xs])  # noqa: E731
        out = {tags.COHERENCE: metrics.m_coherence(r["layer_sum_sq"].sum(), r["norms"].sum())}
        for name, num, den in zip(self.layers, r["layer_sum_sq"], r["norms"]):
            out[tags.layer_coherence_tag(name)] = metrics.m_coherence(num, den)
        f_p = metrics.update_share(flat(r["total"]), flat(r["pristine"]))
        out[tags.update_share_tag("mean", "pristine")] = f_p
        out[tags.update_share_tag("mean", "corrupt")] = 1 - f_p
        if "update" in r:
            f_p = metrics.update_share(flat(r["update"]), flat(r["share_p"]))
            out[tags.update_share_tag("aggregate", "pristine")] = f_p
            out[tags.update_share_tag("aggregate", "corrupt")] = 1 - f_p
            n_p = float(tf.reduce_sum(self.pristine))
            counts = np.array([n_p, self.size - n_p])
            # Of the coordinates aggregated robustly (the mean cuts nothing).
            coords = sum(int(np.prod(v.shape)) for v, robust in zip(self.source.variables,
                                                                    self.robust) if robust)
            for i, group in enumerate(tags.GROUPS):
                if counts[i]:
                    out[tags.clipped_fraction_tag(group)] = r["cut"][i] / (counts[i] * coords)
                    out[tags.removed_mass_tag(group)] = (r["removed"][i] / r["mass"][i]
                                                         if r["mass"][i] else 0.0)
        return {k: float(v) for k, v in out.items()}
