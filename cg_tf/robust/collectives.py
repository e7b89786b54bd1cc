"""The train step's cross-replica sums, and the per-replica tally they carry."""

import tensorflow as tf


def label_classes(labels: tf.Tensor, outputs_rank: int) -> tf.Tensor:
    """The class of each label: itself for integer class labels (shape [B] or
    [B, 1]), the argmax for one-hot or soft labels (the rank of the outputs)."""
    if labels.shape.rank == outputs_rank and labels.shape[-1] != 1:
        return tf.argmax(labels, -1, output_type=tf.int32)
    return tf.reshape(tf.cast(labels, tf.int32), [-1])


def tally(labels: tf.Tensor, losses: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """[sum of losses, number of correct predictions] of some examples, with
    integer class labels or one-hot (soft) ones."""
    correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                       label_classes(labels, logits.shape.rank))
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

    @classmethod
    def current(cls) -> "Collectives":
        """The collectives of the replica context the caller runs in."""
        return cls(tf.distribute.get_replica_context())

    @property
    def replica_id(self) -> tf.Tensor:
        """This replica's index, as a tensor: under TPUStrategy it is known only
        inside the compiled replica function, so nothing may need its value."""
        return tf.cast(self.ctx.replica_id_in_sync_group, tf.int32)

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
        mine = tf.equal(tf.range(n), self.replica_id)
        placed = [tf.where(tf.reshape(mine, [n] + [1] * x.shape.rank), x[None],
                           tf.zeros_like(x[None])) for x in xs]
        return [tf.reshape(g, [n * x.shape[0], *x.shape[1:]])
                for g, x in zip(self.sum(placed), xs)]
