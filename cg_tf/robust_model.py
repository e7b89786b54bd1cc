"""The robust train step: a keras.Model whose update aggregates gradients.

Aggregators (DESIGN.md section 4), over the examples of the *global* batch:
  mean                  the ordinary batch gradient
  winsorized, trimmed   per-example gradients summarized per chunk and per replica
                        by aggregators.OrderStats and merged exactly
  median                per-example gradients gathered from all replicas
  median_of_means       k group gradients (ordinary backward passes of B/k examples)
  rm3, ra3              median / mean of this step's batch gradient and the two
                        before (ring buffer in checkpointed variables); no update
                        on the first two steps, as in the authors' code
Every aggregator yields the same global value on every replica; it is divided
by the replica count because Keras' optimizer.apply sums across replicas.
Weight decay (L2, coupled) is added to the aggregated gradient; for rm3/ra3 to
each step's gradient before the median, as in the authors' code (for the
per-example aggregators adding it before or after is the same).
"""

import dataclasses

import keras
import tensorflow as tf

from cg_tf import aggregators as agg
from cg_tf.gradients import BN_MODES, GradientSource, example_losses

AGGREGATORS = ("mean", "winsorized", "trimmed", "median", "median_of_means", "rm3", "ra3")
NO_MOMENTUM = ("median_of_means", "rm3", "ra3")


@dataclasses.dataclass(frozen=True)
class AggregatorConfig:
    name: str = "mean"
    c: int = 0
    groups: int = 3
    chunk: int | None = None
    bn_mode: str = "batch_stats"
    weight_decay: float = 0.0

    def check(self, global_batch: int, num_replicas: int, momentum: float = 0.0) -> None:
        """Raises ValueError, naming the flag, for a configuration that cannot run."""
        if self.name not in AGGREGATORS:
            raise ValueError(f"--aggregator must be one of {', '.join(AGGREGATORS)}, "
                             f"got {self.name!r}")
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"--bn_mode must be one of {', '.join(BN_MODES)}")
        if global_batch % num_replicas:
            raise ValueError(f"--batch_size={global_batch} is not divisible by the "
                             f"{num_replicas} replicas")
        flag = {"winsorized": "--winsorize_c", "trimmed": "--trim_c"}.get(self.name)
        if flag and not 0 <= 2 * self.c < global_batch:
            raise ValueError(f"{flag}={self.c}: need 0 <= 2c < --batch_size={global_batch}")
        if self.name == "median_of_means" and (self.groups < 1 or global_batch % self.groups):
            raise ValueError(f"--mom_groups={self.groups} does not divide "
                             f"--batch_size={global_batch}")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"--per_example_chunk must be positive, got {self.chunk}")
        if self.name in NO_MOMENTUM and momentum:
            raise ValueError(f"--aggregator={self.name} refuses --momentum={momentum}: the "
                             "papers found momentum unstable with it; use --momentum=0")


class RobustModel(keras.Model):
    """Wraps a network; `fit`/`make_train_function` run the robust update."""

    def __init__(self, net: keras.Model, config: AggregatorConfig, global_batch_size: int,
                 **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.config = config
        self.global_batch_size = global_batch_size
        self.source = GradientSource(net, config.bn_mode)
        if config.name in ("rm3", "ra3"):
            # Gradients of the two previous steps, and how many steps were seen.
            self.history = [[self.add_weight(shape=v.shape, initializer="zeros", trainable=False,
                                             aggregation="only_first_replica",
                                             name=f"history{i}_{j}")
                             for j, v in enumerate(net.trainable_variables)] for i in range(2)]
            self.history_count = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                                 trainable=False,
                                                 aggregation="only_first_replica",
                                                 name="history_count")

    def call(self, x, training=False):
        return self.net(x, training=training)

    # -- aggregation --------------------------------------------------------

    def _global_mean_gradient(self, x, y, ctx):
        g, losses, logits = self.source.summed(x, y)
        return [s / self.global_batch_size for s in ctx.all_reduce("sum", g)], losses, logits

    def _order_stats_gradient(self, x, y, ctx):
        c, k = self.config.c, self.config.c + 1
        stats, losses, logits = None, [], []
        for grads, loss, logit in self.source.per_example(x, y, self.config.chunk, ctx):
            part = [agg.order_stats(g, k) for g in grads]
            stats = part if stats is None else [agg.merge([s, p], k) for s, p in zip(stats, part)]
            losses.append(loss)
            logits.append(logit)
        if ctx.num_replicas_in_sync > 1:
            stats = [agg.merge([agg.OrderStats(ctx.all_gather(s.top, 0),
                                               ctx.all_gather(s.bottom, 0),
                                               ctx.all_reduce("sum", s.rest),
                                               s.count * ctx.num_replicas_in_sync)], k)
                     for s in stats]
        final = agg.winsorized_from_stats if self.config.name == "winsorized" else \
            agg.trimmed_from_stats
        return [final(s, c) for s in stats], tf.concat(losses, 0), tf.concat(logits, 0)

    def _median_gradient(self, x, y, ctx):
        chunks = list(self.source.per_example(x, y, self.config.chunk, ctx))
        stacked = [tf.concat(parts, 0) for parts in zip(*(g for g, _, _ in chunks))]
        if ctx.num_replicas_in_sync > 1:
            stacked = [ctx.all_gather(s, 0) for s in stacked]
        return ([agg.median(s) for s in stacked], tf.concat([l for _, l, _ in chunks], 0),
                tf.concat([z for _, _, z in chunks], 0))

    def _median_of_means_gradient(self, x, y, ctx):
        """Each replica sums the gradients of its part of each global group (an
        ordinary backward pass per part); the sums are all-reduced."""
        k, b = self.config.groups, x.shape[0]
        size = self.global_batch_size // k
        r = tf.get_static_value(ctx.replica_id_in_sync_group)
        if r is None and ctx.num_replicas_in_sync > 1:
            raise ValueError("median_of_means needs a static replica id (one device or "
                             "MirroredStrategy)")
        r = r or 0
        sums, losses, logits = [], [], []
        for j in range(k):
            lo, hi = max(j * size - r * b, 0), min((j + 1) * size - r * b, b)
            if hi > lo:
                g, loss, logit = self.source.summed(x[lo:hi], y[lo:hi])
                losses.append(loss)
                logits.append(logit)
            else:
                g = [tf.zeros_like(v) for v in self.source.variables]
            sums.append(g)
        group_sums = ctx.all_reduce("sum", [tf.stack(parts) for parts in zip(*sums)])
        return ([agg.median(s / size) for s in group_sums], tf.concat(losses, 0),
                tf.concat(logits, 0))

    def _temporal(self, grads):
        """RM3 / RA3 over this step's gradient and the two stored ones."""
        older, oldest = self.history
        ready = self.history_count >= 2
        combine = (agg.median3 if self.config.name == "rm3"
                   else lambda a, b, c: (a + b + c) / 3)
        out = []
        for g, h1, h2 in zip(grads, older, oldest):
            combined = combine(g, tf.convert_to_tensor(h1), tf.convert_to_tensor(h2))
            out.append(tf.where(ready, combined, tf.zeros_like(g)))
            h2.assign(h1)
            h1.assign(g)
        self.history_count.assign_add(1)
        return out

    def aggregated_gradient(self, x, y):
        """The global aggregated gradient (same on every replica), losses, logits."""
        ctx = tf.distribute.get_replica_context()
        name = self.config.name
        if name in ("mean", "rm3", "ra3"):
            grads, losses, logits = self._global_mean_gradient(x, y, ctx)
        elif name in ("winsorized", "trimmed"):
            grads, losses, logits = self._order_stats_gradient(x, y, ctx)
        elif name == "median":
            grads, losses, logits = self._median_gradient(x, y, ctx)
        else:
            grads, losses, logits = self._median_of_means_gradient(x, y, ctx)
        if self.config.weight_decay:
            grads = [g + self.config.weight_decay * tf.convert_to_tensor(v)
                     for g, v in zip(grads, self.source.variables)]
        if name in ("rm3", "ra3"):
            grads = self._temporal(grads)
        return grads, losses, logits

    def train_step(self, data):
        x, y = data["image"], data["label"]
        ctx = tf.distribute.get_replica_context()
        grads, losses, logits = self.aggregated_gradient(x, y)
        replicas = ctx.num_replicas_in_sync
        self.optimizer.apply([g / replicas for g in grads], self.net.trainable_variables)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                   tf.cast(y, tf.int32)), tf.float32)
        total_loss, total_correct = ctx.all_reduce(
            "sum", [tf.reduce_sum(losses), tf.reduce_sum(correct)])
        return {"loss": total_loss / self.global_batch_size,
                "accuracy": total_correct / self.global_batch_size}

    def test_step(self, data):
        logits = self.net(data["image"], training=False)
        losses = example_losses(data["label"], logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                   tf.cast(data["label"], tf.int32)), tf.float32)
        return {"loss": tf.reduce_mean(losses), "accuracy": tf.reduce_mean(correct)}
