"""Step time of each aggregator relative to plain SGD, on the same model and batch.

  python -m tools.benchmark [--models=fc,fc3,small_cnn,cifar_resnet18] [--json PATH]

Each model runs in its own process, which times plain SGD and every aggregator
on one fixed batch, with and without `jit_compile`, in interleaved rounds
(median over rounds after warm-up), so ratios are measured side by side on a
busy machine (the ratio of both columns is to plain SGD without XLA). Peak
memory is what a step allocates: the largest growth of the process's resident
memory during two steps after warm-up (without XLA), over its live memory
before them (the model, its state and the compiled program).

A loaded machine slows the plain step more than a robust one and flatters the
ratios: the table records the 1-minute load average before and after each
model and warns when either is above LOAD_WARNING (quiet: nothing else running).
"""

import ctypes
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

from cg_tf import common_flags

_MODELS = flags.DEFINE_list("models", ["fc", "fc3", "small_cnn", "cifar_resnet18"],
                            "Models to time.")
_AGGREGATORS = flags.DEFINE_list(
    "aggregators", ["mean", "winsorized:4", "trimmed:4", "median", "median_of_means:4", "rm3",
                    "ra3"],
    "Aggregators to time, name or name:value (mean is plain SGD, the reference).")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed rounds (0: a per-model default).")
_JSON = flags.DEFINE_string("json", None, "Write the results here too.")
_JIT = flags.DEFINE_bool("jit", True, "Also time each aggregator with jit_compile=True.")
_ONE = flags.DEFINE_string("one_model", None, "Internal: time this model in this process.")

# model -> (cg_tf model, widths, input shape, global batch, per-example chunk, timed rounds)
SETUPS = {
    "fc": ("fc", (2048,), (28, 28, 1), 100, None, 20),
    "fc3": ("fc", (256, 256, 256), (28, 28, 1), 100, None, 20),
    "small_cnn": ("small_cnn", (), (28, 28, 1), 128, None, 10),
    "cifar_resnet18": ("cifar_resnet18", (), (32, 32, 3), 128, 16, 3),
}
LABELS = {"fc": "fc 784-2048-10", "fc3": "fc 784-256-256-256-10"}
# A 1-minute load average above this while timing means something else ran.
LOAD_WARNING = 1.0


def load_warning(model: str, before: float, after: float) -> str | None:
    """The warning for a model timed on a busy machine, or None."""
    if max(before, after) <= LOAD_WARNING:
        return None
    return (f"warning: {model} was timed at a load average of {before:.2f} before and "
            f"{after:.2f} after (above {LOAD_WARNING:g}): something else ran, and its "
            "ratios to plain SGD are flattered; time it again on a quiet machine")


def _release_freed_memory():
    """Hands freed heap memory back to the system (glibc), so that resident
    memory counts live memory, not what compiling left in malloc's arenas."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Samples resident memory in a thread while entered; `peak` is its largest
    growth over the live resident memory on entering."""

    def __init__(self):
        import psutil
        self.process = psutil.Process()

    def __enter__(self):
        _release_freed_memory()
        self.start = self.peak_rss = self.process.memory_info().rss
        self.sampling = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.sampling:
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.sampling = False
        self.thread.join()

    @property
    def peak(self) -> int:
        return self.peak_rss - self.start


def _one_step(step, data) -> float:
    start = time.perf_counter()
    float(step(data)["loss"])
    return time.perf_counter() - start


def time_model(name: str, aggregators: list[str], steps: int, jit: bool) -> list[dict]:
    """Builds every (aggregator, XLA or not) step, warms it up (tracing,
    compiling) and samples the memory of two more steps; then times them in
    rounds, one step of each per round, so that a change in the machine's load
    falls on all of them alike. Each time is the median over rounds."""
    import keras
    import tensorflow as tf

    from cg_tf.robust import aggregators as registry
    from cg_tf.training import models
    from cg_tf.training.robust_model import RobustModel

    model_name, widths, shape, batch, chunk, default_steps = SETUPS[name]
    steps = steps or default_steps
    rng = np.random.default_rng(0)
    data = {"image": tf.constant(rng.random((batch, *shape), np.float32)),
            "label": tf.constant(rng.integers(0, 10, batch).astype(np.int32))}
    rows, timed = [], []
    for spec in aggregators:
        agg = registry.parse(spec, "--aggregators")
        row = {"model": LABELS.get(name, name), "batch": batch, "aggregator": agg.name,
               "detail": f"{agg.parameter}={agg.value}" if agg.parameter else "",
               "chunk": chunk if isinstance(agg, registry.OrderStatistic) else None,
               "step_seconds": [], "jit_step_seconds": []}
        for compiled in (False, True) if jit else (False,):
            keras.utils.set_random_seed(0)
            net = models.build_model(model_name, shape, 10, widths or (2048,))
            model = RobustModel(net, agg, per_example_chunk=row["chunk"])
            model.compile(optimizer=keras.optimizers.SGD(0.01))
            step = tf.function(model.train_step, jit_compile=compiled)
            for _ in range(2):
                _one_step(step, data)
            if not compiled:
                with PeakMemory() as memory:
                    for _ in range(2):
                        _one_step(step, data)
                row["peak_mb"] = memory.peak / 2**20
            timed.append((row["jit_step_seconds" if compiled else "step_seconds"], step))
        rows.append(row)
        print(f"  {name} {spec}: ready", file=sys.stderr, flush=True)
    for _ in range(steps):
        for times, step in timed:
            times.append(_one_step(step, data))
    for row in rows:
        for key in ("step_seconds", "jit_step_seconds"):
            if row[key]:
                row[key] = float(np.median(row[key]))
            else:
                del row[key]
    return rows


def main(_):
    if _ONE.value:
        print(json.dumps(time_model(_ONE.value, _AGGREGATORS.value, _STEPS.value, _JIT.value)))
        return
    from cg_tf.robust import aggregators
    try:
        for spec in _AGGREGATORS.value:
            aggregators.parse(spec, "--aggregators")
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    rows, warnings = [], []
    for name in _MODELS.value:
        if name not in SETUPS:
            raise app.UsageError(f"--models: unknown model {name!r} (one of {', '.join(SETUPS)})")
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        before = os.getloadavg()[0]
        out = subprocess.run(
            [sys.executable, "-m", "tools.benchmark", f"--one_model={name}",
             f"--aggregators={','.join(_AGGREGATORS.value)}", f"--steps={_STEPS.value}",
             f"--jit={_JIT.value}"],
            stdout=subprocess.PIPE, text=True, check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        after = os.getloadavg()[0]
        rows += [{**r, "load_before": before, "load_after": after}
                 for r in json.loads(out.stdout.strip().splitlines()[-1])]
        warnings += [w for w in [load_warning(name, before, after)] if w]
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
    for name in dict.fromkeys(r["model"] for r in rows):
        r = next(x for x in rows if x["model"] == name)
        print(f"{name}: load average {r['load_before']:.2f} before, {r['load_after']:.2f} after")
    for w in warnings:
        print(w, file=sys.stderr)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    common_flags.run(main)
