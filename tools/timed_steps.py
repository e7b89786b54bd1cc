"""The timed models and their train steps, shared by the timing tools
(tools.benchmark, tools.replica_parts; tools.collective_bytes builds
the same nets)."""

import time

import numpy as np

# model -> (cg_tf model, widths, input shape, global batch, per-example chunk, timed rounds)
SETUPS = {
    "fc": ("fc", (2048,), (28, 28, 1), 100, None, 20),
    "fc3": ("fc", (256, 256, 256), (28, 28, 1), 100, None, 20),
    "small_cnn": ("small_cnn", (), (28, 28, 1), 128, None, 10),
    "cifar_resnet18": ("cifar_resnet18", (), (32, 32, 3), 128, 16, 3),
    # The ImageNet net at ImageNet's input (10 classes: the head is 0.04% of it).
    "resnet18": ("resnet18", (), (224, 224, 3), 32, 4, 2),
}
LABELS = {"fc": "fc 784-2048-10", "fc3": "fc 784-256-256-256-10"}


def strategy_and_batch(name: str, batch: int, replicas: int):
    """The strategy (MirroredStrategy over `replicas` logical CPUs, which must
    exist, or the default one) and one random global batch of `name`'s inputs,
    distributed over it."""
    import tensorflow as tf

    shape = SETUPS[name][2]
    rng = np.random.default_rng(0)
    data = {"image": tf.constant(rng.random((batch, *shape), np.float32)),
            "label": tf.constant(rng.integers(0, 10, batch).astype(np.int32))}
    if replicas == 1:
        return tf.distribute.get_strategy(), data
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    return strategy, next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(data))))


def build_net(name: str, classes: int = 10):
    """`name`'s net (SETUPS) with `classes` outputs."""
    from cg_tf.training import models
    model_name, widths, shape = SETUPS[name][:3]
    return models.build_model(model_name, shape, classes, widths or (2048,))


def train_step(name: str, aggregator, strategy, chunk: int | None, compiled: bool = False):
    """A function of a batch running one RobustModel step of `name` (seed-0
    weights) with `aggregator` under `strategy`, returning the loss."""
    import keras
    import tensorflow as tf

    from cg_tf.training.robust_model import RobustModel

    keras.utils.set_random_seed(0)
    with strategy.scope():
        net = build_net(name)
        model = RobustModel(net, aggregator, per_example_chunk=chunk)
        model.compile(optimizer=keras.optimizers.SGD(0.01))
    replica_step = tf.function(model.train_step, jit_compile=compiled)
    return tf.function(lambda b: strategy.experimental_local_results(
        strategy.run(replica_step, args=(b,))["loss"])[0])


def one_step(step, data) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    start, cpu = time.perf_counter(), time.process_time()
    float(step(data))
    return time.perf_counter() - start, time.process_time() - cpu


def warm_up(steps, data) -> None:
    """Runs each step once, untimed: a step function run for the first time
    makes those run before it compile their XLA computations once more (3 s
    on fc3), so a timing tool runs every step once before it times any."""
    for step in steps:
        one_step(step, data)
