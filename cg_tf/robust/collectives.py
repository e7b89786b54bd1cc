"""The train step's cross-replica sums and exchanges, and the per-replica tally
they carry."""

import zlib

import tensorflow as tf

from cg_tf import keras_internals


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


# The all-to-all's communicator group keys lie in [EXCHANGE_GROUP_KEY,
# EXCHANGE_GROUP_KEY + 2^20): far above the keys tf.distribute's strategies count
# up from 1.
EXCHANGE_GROUP_KEY = 0x3C6F0000


def exchange_group_key(replicas: int, shape: tuple[int, ...]) -> int:
    """The communicator's group key of an all-to-all of `shape` among `replicas`.
    A communicator's collective is instance 0 of its group, and TensorFlow keeps
    an instance's shape for the life of the process: a group key per shape lets
    another model (another shape) exchange in the same process."""
    return EXCHANGE_GROUP_KEY + zlib.crc32(repr((replicas, shape)).encode()) % 2 ** 20


class Collectives:
    """The step's cross-replica sums and exchanges, chained by control dependencies.

    Collectives that do not depend on each other may start in different orders
    on different replicas, and then pair up wrongly; chaining them makes every
    replica issue them in one order.

    `exchange` is an all-to-all: TensorFlow's collective op on a communicator,
    which runs among the replicas of one process (MirroredStrategy, on CPUs
    or GPUs). Where it cannot, `can_exchange` is False and the callers gather
    instead: a step XLA compiles whole (jit_compile, any step under
    TPUStrategy) cannot hold the op, and across workers (MultiWorkerMirrored)
    TensorFlow 2.21 loses the other workers' ranks when it forms the
    communicator's group ("Only part of the group members have user given
    rank specified. Received ranks: 0,-1").
    """

    def __init__(self, ctx, exchange: bool = True):
        self.ctx = ctx
        self.replicas = ctx.num_replicas_in_sync
        self.can_exchange = self.replicas > 1 and exchange
        self._last = []

    @classmethod
    def current(cls, compiled: bool = False) -> "Collectives":
        """The collectives of the replica context the caller runs in, in a step
        XLA compiles whole or not (`compiled`)."""
        spans_workers = keras_internals.in_multi_worker_mode(tf.distribute.get_strategy())
        return cls(tf.distribute.get_replica_context(), exchange=not (compiled or spans_workers))

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
        if self.replicas == 1 or not values:
            return list(values)
        out = self.ctx.all_reduce("sum", self.after(values))
        self._last = out
        return out

    def gather(self, xs: list[tf.Tensor]) -> list[tf.Tensor]:
        """Each x of all replicas, concatenated along axis 0 in replica order (an
        all-reduce of buffers in which each replica fills its own slot)."""
        n = self.replicas
        if n == 1 or not xs:
            return list(xs)
        mine = tf.equal(tf.range(n), self.replica_id)
        placed = [tf.where(tf.reshape(mine, [n] + [1] * x.shape.rank), x[None],
                           tf.zeros_like(x[None])) for x in xs]
        return [tf.reshape(g, [n * x.shape[0], *x.shape[1:]])
                for g, x in zip(self.sum(placed), xs)]

    def exchange(self, xs: list[tf.Tensor]) -> list[tf.Tensor]:
        """Per x ([replicas, ...], all of one dtype), what the replicas sent this one:
        x[j] goes to replica j, and slot j of the result came from replica j.
        One all-to-all for all of them; a replica sends (replicas - 1) /
        replicas of its x. Its communicator lives for the call: created (every
        replica waits for the others there) and destroyed around it, so the
        next step can create it again."""
        n = self.replicas
        if not xs:
            return []
        if not self.can_exchange:
            raise ValueError("an all-to-all needs several replicas in one process and a "
                             "step that XLA does not compile whole")
        flat = [tf.reshape(x, [n, -1]) for x in xs]
        with tf.control_dependencies(self._last):
            joined = tf.concat(flat, 1)
            communicator = tf.raw_ops.CollectiveInitializeCommunicator(
                group_key=exchange_group_key(n, tuple(joined.shape)), rank=self.replica_id,
                group_size=n, communication_hint="auto", timeout_seconds=0)
        received = tf.raw_ops.CollectiveAllToAllV3(
            communicator=communicator, input=joined, group_assignment=[], timeout_seconds=0)
        with tf.control_dependencies([received]):
            closed = tf.raw_ops.DestroyResourceOp(resource=communicator)
        with tf.control_dependencies([closed]):
            received = tf.identity(received)
        self._last = [received]
        parts = tf.split(received, [f.shape[1] for f in flat], 1)
        return [tf.reshape(p, x.shape) for p, x in zip(parts, xs)]
