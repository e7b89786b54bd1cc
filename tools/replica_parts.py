"""Where a robust step's work goes at several replicas: the step timed whole,
then with one of its parts taken out at a time.

  python -m tools.replica_parts --model=small_cnn --replicas=4 [--aggregator=winsorized:4]
      [--rounds=8] [--json PATH]

The robust part of a step (its CPU ms minus plain SGD's, same model, batch
and replicas) is timed for each variant, in interleaved rounds (median):

  whole          the step as it runs;
  no collective  the replicas' collectives of per-example values without
                 crossing replicas: the factors' gather without its all-reduce
                 (each replica's own factors copied in the other replicas'
                 places) and the all-to-all of rows without its exchange (each
                 replica keeps what it would send);
  no statistics  the order statistics (each computation's share,
                 tiled.share_of_whole and share_of_received) replaced by zeros;
  neither        both taken out: what is left is the recording forward and
                 backward and forming the values the replicas exchange or
                 gather (a convolution's patches taken).

The variants change the update, so they time; they train nothing. Each is
traced with its part replaced (the replacement acts only while tracing).
"""

import contextlib
import json

import numpy as np
from absl import flags

from cg_tf import common_flags
from tools.timed_steps import SETUPS, one_step, strategy_and_batch, train_step, warm_up

FLAGS = flags.FLAGS
VARIANTS = ("whole", "no collective", "no statistics", "neither")


@contextlib.contextmanager
def without(part: str):
    """While tracing, the step with `part` ("collective", "statistics") taken out."""
    from cg_tf.robust import collectives, tiled
    import tensorflow as tf

    if part == "collective":
        def local(self, xs):
            return ([tf.concat([x] * self.replicas, 0) for x in xs] if self.replicas > 1
                    else list(xs))
        replacements = [(collectives.Collectives, "gather", local),
                        (collectives.Collectives, "exchange", lambda self, xs: list(xs))]
    else:
        # zeros that still depend on the values, so that nothing before is pruned
        def zero_whole(values, stat, replicas, replica):
            return (tf.zeros(tiled.layout(values))
                    + 0 * tf.reduce_sum(tf.nest.flatten(values)[0][:1]))

        def zero_received(received, rows, stat, replicas, replica):
            return tf.zeros([rows, received.shape[-1]]) + 0 * tf.reduce_sum(received[:1])
        replacements = [(tiled, "share_of_whole", zero_whole),
                        (tiled, "share_of_received", zero_received)]
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in replacements]
    for owner, name, replacement in replacements:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def parts_of(variant: str) -> list[str]:
    return {"whole": [], "no collective": ["collective"], "no statistics": ["statistics"],
            "neither": ["collective", "statistics"]}[variant]


def time_variants(model: str, aggregator: str, replicas: int, rounds: int) -> dict:
    """CPU and wall ms a step (medians over rounds) of plain SGD and of each variant."""
    from cg_tf.robust import aggregators as registry

    strategy, data = strategy_and_batch(model, SETUPS[model][3], replicas)
    chunk = SETUPS[model][4]
    steps = {}
    for variant, spec in [("plain SGD", "mean")] + [(v, aggregator) for v in VARIANTS]:
        step = train_step(model, registry.parse(spec, "--aggregator"), strategy, chunk)
        with contextlib.ExitStack() as stack:
            for part in parts_of(variant) if variant != "plain SGD" else []:
                stack.enter_context(without(part))
            one_step(step, data)  # traced here, with the parts replaced
        steps[variant] = step
    warm_up(steps.values(), data)
    times = {v: ([], []) for v in steps}
    for _ in range(rounds):
        for variant, step in steps.items():
            wall, cpu = one_step(step, data)
            times[variant][0].append(wall)
            times[variant][1].append(cpu)
    return {v: {"wall_ms": 1e3 * float(np.median(w)), "cpu_ms": 1e3 * float(np.median(c))}
            for v, (w, c) in times.items()}


def define_flags() -> None:
    flags.DEFINE_enum("model", "small_cnn", list(SETUPS), "Model (tools.benchmark's setups).")
    flags.DEFINE_integer("replicas", 4, "Replicas (logical CPU devices).", lower_bound=1)
    flags.DEFINE_string("aggregator", "winsorized:4", "A per-example aggregator.")
    flags.DEFINE_integer("rounds", 8, "Timed rounds.", lower_bound=1)
    flags.DEFINE_string("json", None, "Write the rows here too.")


def main(argv):
    del argv
    from cg_tf.training.strategies import split_cpu
    split_cpu(FLAGS.replicas)
    times = time_variants(FLAGS.model, FLAGS.aggregator, FLAGS.replicas, FLAGS.rounds)
    plain = times["plain SGD"]["cpu_ms"]
    rows = [{"model": FLAGS.model, "replicas": FLAGS.replicas, "aggregator": FLAGS.aggregator,
             "variant": v, **t, "robust_cpu_ms": t["cpu_ms"] - plain} for v, t in times.items()]
    print(f"{FLAGS.model}, {FLAGS.aggregator}, {FLAGS.replicas} replicas: CPU ms a step "
          "(robust part: minus plain SGD's)")
    for r in rows:
        print(f"  {r['variant']:<14} {r['cpu_ms']:8.1f}  robust part {r['robust_cpu_ms']:8.1f}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    define_flags()
    common_flags.run(main)
