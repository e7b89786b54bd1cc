"""Step time of each aggregator relative to plain SGD, on the same model and batch.

  python -m tools.benchmark [--models=fc,fc3,small_cnn,cifar_resnet18,resnet18] [--json PATH]
  python -m tools.benchmark --models=fc --replicas=1,2,4 --nojit   # division of work
  python -m tools.benchmark --models=fc3 --batches=100,200,400,800  # batch scaling

Each model runs in its own process, which times plain SGD and every aggregator
on one fixed batch, with and without `jit_compile`, in interleaved rounds
(median over rounds after warm-up), so ratios are measured side by side on a
busy machine (the ratio of both columns is to plain SGD without XLA). With
--memory, each (model, aggregator) also runs alone in a process of its own,
for the memory a step takes: the largest growth of the process's resident
memory over its first three steps (without XLA), from before the first (the
model and its state built; so it includes what tracing and compiling take).
Alone, because TensorFlow's allocator keeps what a step freed for the next:
in a process that ran other steps before, a step reuses their memory and
seems to take none.

A loaded machine slows the plain step more than a robust one and flatters the
ratios: the table records the 1-minute load average before and after each
model and warns when either is above LOAD_WARNING (quiet: nothing else running).
Each step's CPU seconds (the process's, all threads) are recorded beside its
wall time: another process's load distorts them less.

--replicas splits the CPU into that many logical devices and runs the step
under MirroredStrategy over them (without XLA, which cannot span them), the
batch the global one: the robust part of a step (an aggregator's CPU seconds
minus plain SGD's at the same replicas) then shows how its work divides.
--batches times each batch size (global) in place of the model's own.
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
from cg_tf.robust import names
from tools.timed_steps import (LABELS, SETUPS, one_step, strategy_and_batch, train_step,
                                warm_up)

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
_MEMORY = flags.DEFINE_bool("memory", False, "Also measure each step's memory, each (model, "
                             "aggregator) alone in a process of its own.")
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False, "Internal: with --one_model, measure "
                                 "the memory of its one aggregator's step.")
_REPLICAS = flags.DEFINE_list("replicas", ["1"], "Replica counts (logical CPU devices) to time "
                              "each model on, one process each.")
_BATCHES = flags.DEFINE_list("batches", [], "Global batch sizes to time each model at, one "
                             "process each (default: the model's own).")

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


def time_model(name: str, aggregators: list[str], steps: int, jit: bool, replicas: int = 1,
               batch: int | None = None, memory_only: bool = False) -> list[dict]:
    """Builds every (aggregator, XLA or not) step and warms it up (tracing,
    compiling: the first step's seconds are recorded); then times them in
    rounds, one step of each per round, so that a change in the machine's load
    falls on all of them alike. Each time is the median over rounds. With
    `replicas` > 1 the step runs under MirroredStrategy over as many logical
    CPUs (which must exist). `memory_only`: the first aggregator's row with
    only the memory of its first three steps (`PeakMemory`)."""
    from cg_tf.robust import aggregators as registry

    own_batch, chunk, default_steps = SETUPS[name][3:]
    batch = batch or own_batch
    steps = steps or default_steps
    strategy, data = strategy_and_batch(name, batch, replicas)
    rows, timed = [], []
    for spec in aggregators:
        agg = registry.parse(spec, "--aggregators")
        row = {"model": LABELS.get(name, name), "batch": batch, "replicas": replicas,
               "aggregator": agg.name, "detail": f"{agg.parameter}={agg.value}"
               if agg.parameter else "",
               "chunk": chunk if isinstance(agg, registry.OrderStatistic) else None,
               "step_seconds": [], "jit_step_seconds": [], "cpu_seconds": [],
               "jit_cpu_seconds": []}
        for compiled in (False, True) if jit and replicas == 1 else (False,):
            step = train_step(name, agg, strategy, row["chunk"], compiled)
            prefix = "jit_" if compiled else ""
            if memory_only:
                with PeakMemory() as memory:
                    for _ in range(3):
                        one_step(step, data)
                return [{**row, "peak_mb": memory.peak / 2**20}]
            row[f"{prefix}first_step_seconds"] = one_step(step, data)[0]
            one_step(step, data)
            timed.append((row[f"{prefix}step_seconds"], row[f"{prefix}cpu_seconds"], step))
        rows.append(row)
        print(f"  {name} {spec} batch {batch} on {replicas} replica(s): ready", file=sys.stderr,
              flush=True)
    warm_up([step for *_, step in timed], data)
    for _ in range(steps):
        for wall, cpu, step in timed:
            w, c = one_step(step, data)
            wall.append(w)
            cpu.append(c)
    for row in rows:
        for key in ("step_seconds", "jit_step_seconds", "cpu_seconds", "jit_cpu_seconds"):
            if row[key]:
                row[key] = float(np.median(row[key]))
            else:
                del row[key]
    return rows


def _same_run(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("model", "batch", "replicas"))


def table(rows: list[dict]) -> str:
    """The timings as a text table (and each row's ratios added to it): per
    (model, batch, replicas), each aggregator's step against plain SGD's, in
    wall time and CPU seconds, its robust part (CPU seconds beyond plain
    SGD's), the first step (tracing and compiling), the peak memory of a step."""
    lines = [f"{'model':<22}{'batch':>6}{'repl':>5}  {'aggregator':<20}{'step ms':>9}{'x SGD':>7}"
             f"{'CPU ms':>9}{'robust CPU ms':>14}{'XLA ms':>9}{'x SGD':>7}{'first s':>8}"
             f"{'peak MB':>9}"]
    for r in rows:
        base = next(x for x in rows if _same_run(x, r) and x["aggregator"] == "mean")
        r["ratio_to_sgd"] = r["step_seconds"] / base["step_seconds"]
        r["robust_cpu_seconds"] = r["cpu_seconds"] - base["cpu_seconds"]
        label = f"{names.label({'name': r['aggregator']})} {r['detail']}".strip()
        if r["chunk"]:
            label += f" chunk={r['chunk']}"
        xla = " " * 16
        if "jit_step_seconds" in r:
            r["jit_ratio_to_sgd"] = r["jit_step_seconds"] / base["step_seconds"]
            xla = f"{r['jit_step_seconds'] * 1000:>9.1f}{r['jit_ratio_to_sgd']:>7.1f}"
        lines.append(f"{r['model']:<22}{r['batch']:>6}{r['replicas']:>5}  {label:<20}"
                     f"{r['step_seconds'] * 1000:>9.1f}{r['ratio_to_sgd']:>7.1f}"
                     f"{r['cpu_seconds'] * 1000:>9.1f}{r['robust_cpu_seconds'] * 1000:>14.1f}"
                     f"{xla}{r['first_step_seconds']:>8.1f}"
                     f"{'-' if r.get('peak_mb') is None else format(r['peak_mb'], '.0f'):>9}")
    return "\n".join(lines)


def _child(name: str, aggregators: list[str], replicas: int, batch: int | None,
           *extra: str) -> list[dict]:
    """The rows of `time_model` run in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-m", "tools.benchmark", f"--one_model={name}",
         f"--aggregators={','.join(aggregators)}", f"--steps={_STEPS.value}",
         f"--jit={_JIT.value}", f"--replicas={replicas}", f"--batches={batch or ''}", *extra],
        stdout=subprocess.PIPE, text=True, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(_):
    if _ONE.value:
        replicas, batch = int(_REPLICAS.value[0]), int(_BATCHES.value[0]) \
            if _BATCHES.value else None
        if replicas > 1:
            from cg_tf.training.strategies import split_cpu
            split_cpu(replicas)
        print(json.dumps(time_model(_ONE.value, _AGGREGATORS.value, _STEPS.value, _JIT.value,
                                    replicas, batch, _MEMORY_ONLY.value)))
        return
    from cg_tf.robust import aggregators
    try:
        for spec in _AGGREGATORS.value:
            aggregators.parse(spec, "--aggregators")
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        replica_counts = [int(r) for r in _REPLICAS.value]
        batches = [int(b) for b in _BATCHES.value] or [None]
    except ValueError:
        raise app.UsageError("--replicas and --batches take integers") from None
    rows, warnings = [], []
    for name in _MODELS.value:
        if name not in SETUPS:
            raise app.UsageError(f"--models: unknown model {name!r} (one of {', '.join(SETUPS)})")
    for name in _MODELS.value:
        for replicas in replica_counts:
            for batch in batches:
                print(f"timing {name} ...", file=sys.stderr, flush=True)
                before = os.getloadavg()[0]
                timed = _child(name, _AGGREGATORS.value, replicas, batch)
                after = os.getloadavg()[0]
                for r, spec in zip(timed, _AGGREGATORS.value):
                    r["peak_mb"] = _child(name, [spec], replicas, batch, "--memory_only")[0][
                        "peak_mb"] if _MEMORY.value else None
                rows += [{**r, "load_before": before, "load_after": after} for r in timed]
                warnings += [w for w in [load_warning(name, before, after)] if w]
    print(table(rows))
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
