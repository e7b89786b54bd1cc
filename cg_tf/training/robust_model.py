"""The robust train step: a keras.Model whose update aggregates gradients.

Aggregators (the README's table), over the examples of the *global* batch:
  mean                  the ordinary batch gradient
  winsorized, trimmed,  per-example values factored by layer (layer_rules), the
  median                factors gathered from all replicas, aggregated tile by
                        tile in one XLA computation (tiled)
  median_of_means       k group gradients from the same factors (one forward and
                        backward), or k ordinary backward passes (models with
                        BatchNorm, whose groups keep their own statistics, and
                        models the layer rules cannot run)
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

from cg_tf.robust import order_stats as agg
from cg_tf.robust import tiled
from cg_tf.robust.gradients import BN_MODES, GradientSource
from cg_tf.robust.layer_rules import PerExample, Stacked

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
        if self.chunk and (global_batch // num_replicas) % self.chunk:
            raise ValueError(f"--per_example_chunk={self.chunk} does not divide the "
                             f"per-replica batch of {global_batch // num_replicas}")
        if self.name in NO_MOMENTUM and momentum:
            raise ValueError(f"--aggregator={self.name} refuses --momentum={momentum}: the "
                             "papers found momentum unstable with it; use --momentum=0")


def tally(labels: tf.Tensor, losses: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """[sum of losses, number of correct predictions] of some examples."""
    correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(labels, tf.int32))
    return tf.stack([tf.reduce_sum(losses), tf.reduce_sum(tf.cast(correct, tf.float32))])


class Collectives:
    """The step's cross-replica sums, chained by control dependencies.

    Collectives that do not depend on each other may start in different orders
    on different replicas, and then pair up wrongly; chaining them makes every
    replica issue them in one order.
    """

    def __init__(self, ctx):
        self.ctx = ctx
        self.replicas = ctx.num_replicas_in_sync
        self._last = []

    def after(self, values: list[tf.Tensor]) -> list[tf.Tensor]:
        """`values`, made to wait for the previous collective."""
        with tf.control_dependencies(self._last):
            return [tf.identity(v) for v in values]

    def sum(self, values: list[tf.Tensor]) -> list[tf.Tensor]:
        if self.replicas == 1:
            return list(values)
        out = self.ctx.all_reduce("sum", self.after(values))
        self._last = out
        return out

    def gather(self, xs: list[tf.Tensor]) -> list[tf.Tensor]:
        """Each x of all replicas, concatenated along axis 0 in replica order (an
        all-reduce of buffers in which each replica fills its own slot)."""
        n = self.replicas
        if n == 1:
            return list(xs)
        mine = tf.equal(tf.range(n), self.ctx.replica_id_in_sync_group)
        placed = [tf.where(tf.reshape(mine, [n] + [1] * x.shape.rank), x[None],
                           tf.zeros_like(x[None])) for x in xs]
        return [tf.reshape(g, [n * x.shape[0], *x.shape[1:]])
                for g, x in zip(self.sum(placed), xs)]


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
            # Gradients of the previous step and the one before, and the step count.
            # (Keras' own lists are invisible to tf.train.Checkpoint; tf.Module's are not.)
            self.history = tf.Module(name="history")
            self.history.previous = self._zeros_like_variables(net, "history_1")
            self.history.before = self._zeros_like_variables(net, "history_2")
            self.history_count = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                                 trainable=False,
                                                 aggregation="only_first_replica",
                                                 name="history_count")

    def _zeros_like_variables(self, net: keras.Model, name: str) -> list:
        return [self.add_weight(shape=v.shape, initializer="zeros", trainable=False,
                                aggregation="only_first_replica", name=f"{name}_{j}")
                for j, v in enumerate(net.trainable_variables)]

    def call(self, x, training=False):
        return self.net(x, training=training)

    # -- aggregation --------------------------------------------------------
    # Each path returns the global aggregated gradient and this replica's tally
    # [sum of losses, number correct].

    def _global_mean_gradient(self, x, y, sync):
        g, losses, logits = self.source.summed(x, y)
        return [s / self.global_batch_size for s in sync.sum(g)], tally(y, losses, logits)

    def _global_values(self, x, y, sync) -> tuple[list[PerExample], tf.Tensor]:
        """Per-example values of the global batch (replicas gather the factors,
        not the per-example gradients, in replica order), and this replica's tally."""
        values, losses, logits = self.source.per_example(x, y, self.config.chunk, sync)
        if sync.replicas > 1:
            values = tf.nest.pack_sequence_as(values, sync.gather(tf.nest.flatten(values)))
        return values, tally(y, losses, logits)

    def _per_example_gradient(self, x, y, sync):
        """Per-example values aggregated tile by tile."""
        values, counts = self._global_values(x, y, sync)
        return tiled.aggregate(values, self.config.name, self.config.c,
                               self.source.variables), counts

    def _median_of_means_gradient(self, x, y, sync):
        """The median of the k group means. When every layer with weights sees
        one position per example, the group gradients come from one forward and
        backward through the layer rules (a group's Dense gradient is one matmul
        of its rows). Otherwise k ordinary passes: with positions (convolutions)
        a group's gradient from patches costs more than a native backward (on
        small_cnn 1.33x SGD against 0.99x), and with BatchNorm each group keeps
        its own statistics, as the authors' consecutive mini-batches do."""
        if not self.source.factored or self.source.bn or self.source.positions:
            return self._median_of_means_by_passes(x, y, sync)
        k = self.config.groups
        values, counts = self._global_values(x, y, sync)
        # The k group sums as k examples: their median, by tiles, over the group size.
        medians = tiled.aggregate([v.groups(k) for v in values], "median", 0,
                                  self.source.variables)
        return [m / (self.global_batch_size // k) for m in medians], counts

    def _median_of_means_by_passes(self, x, y, sync):
        """Each replica sums the gradients of its part of each global group (an
        ordinary backward pass per part); the sums are all-reduced."""
        k, b = self.config.groups, x.shape[0]
        size = self.global_batch_size // k
        r = tf.get_static_value(sync.ctx.replica_id_in_sync_group)
        if r is None and sync.replicas > 1:
            raise ValueError("median_of_means needs a static replica id (one device or "
                             "MirroredStrategy)")
        r = r or 0
        sums, counts = [], tf.zeros([2])
        for j in range(k):
            lo, hi = max(j * size - r * b, 0), min((j + 1) * size - r * b, b)
            if hi > lo:
                g, losses, logits = self.source.summed(x[lo:hi], y[lo:hi])
                counts += tally(y[lo:hi], losses, logits)
            else:
                g = [tf.zeros_like(v) for v in self.source.variables]
            sums.append(g)
        group_sums = sync.sum([tf.stack(parts) for parts in zip(*sums)])
        medians = tiled.aggregate([Stacked(s) for s in group_sums], "median", 0,
                                  self.source.variables)
        return [m / size for m in medians], counts

    def _temporal(self, grads):
        """RM3 / RA3 over this step's gradient and the two stored ones."""
        older, oldest = self.history.previous, self.history.before
        ready = self.history_count >= 2
        combine = agg.median3_after_two if self.config.name == "rm3" else agg.mean3_after_two
        out = combine(grads, [tf.convert_to_tensor(h) for h in older],
                      [tf.convert_to_tensor(h) for h in oldest], ready)
        for g, h1, h2 in zip(grads, older, oldest):
            # Assigning a tensor shares its buffer: the shift copies nothing.
            h2.assign(h1)
            h1.assign(g)
        self.history_count.assign_add(1)
        return out

    def aggregated_gradient(self, x, y, sync: Collectives | None = None):
        """The global aggregated gradient (the same on every replica), and this
        replica's tally [sum of losses, number correct]."""
        sync = sync or Collectives(tf.distribute.get_replica_context())
        name = self.config.name
        if name in ("mean", "rm3", "ra3"):
            grads, counts = self._global_mean_gradient(x, y, sync)
        elif name in tiled.KINDS:
            grads, counts = self._per_example_gradient(x, y, sync)
        else:
            grads, counts = self._median_of_means_gradient(x, y, sync)
        if self.config.weight_decay:
            grads = [g + self.config.weight_decay * tf.convert_to_tensor(v)
                     for g, v in zip(grads, self.source.variables)]
        if name in ("rm3", "ra3"):
            grads = self._temporal(grads)
        return grads, counts

    def train_step(self, data):
        x, y = data["image"], data["label"]
        sync = Collectives(tf.distribute.get_replica_context())
        grads, counts = self.aggregated_gradient(x, y, sync)
        total_loss, total_correct = tf.unstack(sync.sum([counts])[0])
        # optimizer.apply sums over replicas: last in the chain of collectives.
        grads = sync.after([g / sync.replicas for g in grads])
        self.optimizer.apply(grads, self.net.trainable_variables)
        return {"loss": total_loss / self.global_batch_size,
                "accuracy": total_correct / self.global_batch_size}
