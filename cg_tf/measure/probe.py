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

The thresholds are the exact per-coordinate order statistics of the probe at
the aggregator's ranks scaled to the probe (`probe_ranks`), found by the
step's own tiles from the per-example values of the step's own layer rules;
the same computation (`tiled.probe`) then sums, from the same values, what
each example keeps and what the cut removed. A value equal to a threshold
counts as kept: for trimmed means and the median, a tied value that the
aggregator drops is then credited to every example that holds it, so with
ties at a nonzero threshold the kept parts add up to more than the update.
M3, RM3 and RA3 have no per-example decomposition: their runs get coherence
and the mean's f_p.
"""

import numpy as np
import tensorflow as tf

from cg_tf.measure import metrics, tags
from cg_tf.robust import tiled
from cg_tf.robust.aggregators import Aggregator, OrderStatistic
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
        # The ranks of the thresholds on the probe, or None (no thresholds).
        self.ranks = (aggregator.probe_ranks(self.size, batch_size)
                      if isinstance(aggregator, OrderStatistic) else None)
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
        """Sums of all and of the pristine gradients, and per-layer sums of
        squared per-example norms."""
        def step(state, p, grads):
            total, pristine, norms = state
            sq = [tf.reduce_sum(tf.square(g)) for g in grads]
            norms = norms + tf.math.unsorted_segment_sum(tf.stack(sq), self._layer_index,
                                                         len(self.layers))
            return ([t + tf.reduce_sum(g, 0) for t, g in zip(total, grads)],
                    [s + tf.tensordot(p, g, 1) for s, g in zip(pristine, grads)],
                    norms)

        zeros = [tf.zeros(v.shape) for v in self.source.variables]
        return self._fold((zeros, zeros, tf.zeros([len(self.layers)])), step)

    def _robust_part(self):
        """Per variable the aggregator cuts, [lo, hi, clipped sum, pristine kept
        sum]; and per group (pristine, corrupt) the values cut, the L1 mass
        removed and the L1 mass in all: by the step's own tiles, from the values
        of the step's own layer rules."""
        values, _, _ = self.source.per_example(self.x, self.y, self.chunk, None, frozen_bn=True)
        variables = self.source.variables
        robust = [i for i, r in enumerate(self.robust) if r]
        per_variable, groups = tiled.probe([values[i] for i in robust], self.aggregator,
                                           self.ranks, self.pristine,
                                           [variables[i] for i in robust])
        return dict(zip(robust, per_variable)), groups

    def _graph(self):
        total, pristine, norms = self._first_pass()
        out = {"total": total, "pristine": pristine, "norms": norms,
               "layer_sum_sq": tf.math.unsorted_segment_sum(
                   tf.stack([tf.reduce_sum(tf.square(t)) for t in total]),
                   self._layer_index, len(self.layers))}
        if self.ranks is not None:
            robust, groups = self._robust_part()
            kept = self.aggregator.kept_count(self.ranks, self.size)
            # Per variable, the update and the pristine examples' part of it.
            update, share_p = [], []
            for i, (t, p) in enumerate(zip(total, pristine)):
                if i in robust:
                    lo, hi, clipped, kept_p = robust[i]
                    update.append(self.aggregator.from_thresholds(clipped, lo, hi, self.ranks,
                                                                  self.size))
                    share_p.append(kept_p / kept)
                else:
                    update.append(t / self.size)
                    share_p.append(p / self.size)
            out.update(update=update, share_p=share_p, cut=groups[0], removed=groups[1],
                       mass=groups[2])
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
