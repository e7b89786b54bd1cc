"""Step time of each aggregator relative to plain SGD, on the same model and batch.

  python -m tools.benchmark [--models=fc,fc3,small_cnn,cifar_resnet18] [--json PATH]

Each model runs in its own process, which times plain SGD and every aggregator
on one fixed batch (median over steps after warm-up), with and without
`jit_compile`, so ratios are measured side by side on a busy machine (the
ratio of both columns is to plain SGD without XLA). Peak memory is the largest
growth of the process's resident memory while the aggregator's steps run
(without XLA).
"""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

_MODELS = flags.DEFINE_list("models", ["fc", "fc3", "small_cnn", "cifar_resnet18"],
                            "Models to time.")
_AGGREGATORS = flags.DEFINE_list(
    "aggregators", ["mean", "winsorized", "trimmed", "median", "median_of_means", "rm3", "ra3"],
    "Aggregators to time (mean is plain SGD, the reference).")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed steps per aggregator (0: a per-model default).")
_JSON = flags.DEFINE_string("json", None, "Write the results here too.")
_JIT = flags.DEFINE_bool("jit", True, "Also time each aggregator with jit_compile=True.")
_ONE = flags.DEFINE_string("one_model", None, "Internal: time this model in this process.")

# model -> (cg_tf model, widths, input shape, global batch, per-example chunk, timed steps)
SETUPS = {
    "fc": ("fc", (2048,), (28, 28, 1), 100, None, 20),
    "fc3": ("fc", (256, 256, 256), (28, 28, 1), 100, None, 20),
    "small_cnn": ("small_cnn", (), (28, 28, 1), 128, None, 5),
    "cifar_resnet18": ("cifar_resnet18", (), (32, 32, 3), 128, 16, 2),
}
LABELS = {"fc": "fc 784-2048-10", "fc3": "fc 784-256-256-256-10"}


class PeakMemory:
    """Samples resident memory in a thread; `peak` is the growth over the start."""

    def __init__(self):
        import psutil
        self.process = psutil.Process()

    def __enter__(self):
        self.start = self.peak_rss = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = self.peak_rss - self.start


def _seconds(step, data, steps: int) -> float:
    float(step(data)["loss"])  # Trace and warm up.
    float(step(data)["loss"])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        float(step(data)["loss"])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_model(name: str, aggregators: list[str], steps: int, jit: bool) -> list[dict]:
    import keras
    import tensorflow as tf

    from cg_tf import models
    from cg_tf.robust_model import AggregatorConfig, RobustModel

    model_name, widths, shape, batch, chunk, default_steps = SETUPS[name]
    steps = steps or default_steps
    rng = np.random.default_rng(0)
    data = {"image": tf.constant(rng.random((batch, *shape), np.float32)),
            "label": tf.constant(rng.integers(0, 10, batch).astype(np.int32))}
    rows = []
    for agg in aggregators:
        groups = 4 if batch % 3 else 3  # M3 needs 3 | batch; 128 takes 4 groups.
        row = {"model": LABELS.get(name, name), "batch": batch, "aggregator": agg,
               "detail": {"winsorized": "c=4", "trimmed": "c=4",
                          "median_of_means": f"k={groups}"}.get(agg, ""),
               "chunk": chunk if agg in ("winsorized", "trimmed", "median") else None}
        for compiled in (False, True) if jit else (False,):
            keras.utils.set_random_seed(0)
            net = models.build_model(model_name, shape, 10, widths or (2048,))
            model = RobustModel(net, AggregatorConfig(agg, c=4, groups=groups, chunk=chunk), batch)
            model.compile(optimizer=keras.optimizers.SGD(0.01))
            step = tf.function(model.train_step, jit_compile=compiled)
            if compiled:
                row["jit_step_seconds"] = _seconds(step, data, steps)
            else:
                with PeakMemory() as memory:
                    row["step_seconds"] = _seconds(step, data, steps)
                row["peak_mb"] = memory.peak / 2**20
        rows.append(row)
        print(f"  {name} {agg}: {row['step_seconds'] * 1000:.1f} ms"
              + (f", XLA {row['jit_step_seconds'] * 1000:.1f} ms" if jit else ""),
              file=sys.stderr, flush=True)
    return rows


def main(_):
    if _ONE.value:
        print(json.dumps(time_model(_ONE.value, _AGGREGATORS.value, _STEPS.value, _JIT.value)))
        return
    rows = []
    for name in _MODELS.value:
        if name not in SETUPS:
            raise app.UsageError(f"--models: unknown model {name!r} (one of {', '.join(SETUPS)})")
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, "-m", "tools.benchmark", f"--one_model={name}",
             f"--aggregators={','.join(_AGGREGATORS.value)}", f"--steps={_STEPS.value}",
             f"--jit={_JIT.value}"],
            stdout=subprocess.PIPE, text=True, check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'model':<22}{'batch':>6}  {'aggregator':<22}{'step ms':>9}{'x SGD':>8}"
          f"{'XLA ms':>9}{'x SGD':>8}{'peak MB':>9}")
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["aggregator"] == "mean")
        r["ratio_to_sgd"] = r["step_seconds"] / base["step_seconds"]
        label = f"{r['aggregator']} {r['detail']}".strip()
        if r["chunk"]:
            label += f" chunk={r['chunk']}"
        xla = ""
        if "jit_step_seconds" in r:
            r["jit_ratio_to_sgd"] = r["jit_step_seconds"] / base["step_seconds"]
            xla = f"{r['jit_step_seconds'] * 1000:>9.1f}{r['jit_ratio_to_sgd']:>8.1f}"
        print(f"{r['model']:<22}{r['batch']:>6}  {label:<22}{r['step_seconds'] * 1000:>9.1f}"
              f"{r['ratio_to_sgd']:>8.1f}{xla or ' ' * 17}{r['peak_mb']:>9.0f}")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
