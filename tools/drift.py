"""Why a robust aggregate drifts: it against the mean gradient at fixed weights, along a run.

  python -m tools.drift --data_dir=DATA --output_dir=OUT [--aggregator=winsorized:4]
      [--fc_widths=256,256,256 --init=authors --learning_rate=0.1 --batch_size=100]
      [--steps=6000 --measure_every=500 --batches=30 --check_steps=300]
      [--decompose_batches=3]
  python -m tools.drift --plot OUT1,OUT2,... --out=FIGURE.png

Trains an fc net on a pipeline dataset with plain SGD and the trainer's update
(RobustModel's aggregate, its layer filter included:
`--aggregator=winsorized:4@hidden` keeps the output layer on the mean
gradient). Its training flags (TRAINING) are the trainer's, defaults included:
`python -m cg_tf.train`'s (winsorized:4, one hidden layer of 256, Keras'
initializer, lr 0.1, batch 100, 60 epochs unless --steps); the winsorization
study measured --fc_widths=256,256,256 --init=authors --steps=6000
(docs/results/winsorization_fashion_mnist). Every --measure_every steps, at the
weights of that step, it averages over --batches fixed training batches the
robust aggregate A (of every layer, whatever the filter) and the mean gradient
M of each batch, and records per layer

  cosine       cos(E[A], E[M]): 1 when the aggregate points where the mean does
  excess       ||E[A] - E[M]|| / ||E[M]||: the aggregate's bias, relative
  norm_mean    ||E[M]||, and norm_robust ||E[A]||
  weight_norm  the norm of the layer's kernel and bias
  radial_robust, radial_mean  -<E[A], W> / ||W|| and the same for M: how fast
               the expected step (per unit learning rate) grows the layer's
               norm (negative: shrinks it)
  radial_{mean,robust}_part/{pristine,corrupt}  (with --decompose_batches)
               the same split by the examples it comes from: each group's
               share of M, and its kept parts of A (their sums over the
               groups are radial_mean and radial_robust on those batches)
  dead         (hidden layers) the share of units that output 0 on every
               example of the pristine sample

and the accuracies on the pristine, corrupt and test samples and the standard
deviation of the logits. For the first --check_steps steps it also recomputes
the applied aggregate independently (per-example gradients from
tf.GradientTape.jacobian, the aggregator's NumPy reference over them) and
records the largest difference relative to the aggregate's largest value.
OUT/drift.csv holds one row per (step, name, value); OUT/config.json the flags
and the code that ran (package version, git commit and whether the tree was dirty).
--plot draws several OUT folders side by side.
"""

import json
import os
import sys

import numpy as np
from absl import app, flags

from cg_tf import common_flags, provenance
from cg_tf.robust import reference

FLAGS = flags.FLAGS

# The trainer's options this tool takes (cg_tf.train_defaults: the trainer's
# flags, checks and defaults); it trains --model=fc with plain SGD (no momentum).
TRAINING = ("data_dir", "aggregator", "fc_widths", "init", "learning_rate", "batch_size",
            "epochs", "steps", "eval_sample_size")


def define_flags() -> None:
    """The command line's flags (defined when it runs, so that importing the
    module's functions defines none)."""
    from cg_tf import train_defaults
    train_defaults.define(TRAINING, without_default=("data_dir",))
    for name in TRAINING:
        flags.declare_key_flag(name)  # listed in --help as this program's own
    flags.DEFINE_string("output_dir", None, "Where drift.csv and config.json go.")
    flags.DEFINE_integer("measure_every", 500, "Steps between measurements (and at step 0).")
    flags.DEFINE_integer("batches", 30, "Fixed training batches each measurement averages over.")
    flags.DEFINE_integer("check_steps", 0, "Steps whose aggregate is checked against NumPy.")
    flags.DEFINE_integer("decompose_batches", 0, "Measurement batches whose radial parts are "
                         "split by group (per-example gradients: costly).")
    flags.DEFINE_list("plot", [], "Draw these output folders instead of training.")
    flags.DEFINE_string("out", None, "The figure of --plot (PNG; a PDF beside it).")


# Per-example parts of an aggregate cutting c per side, by aggregator name.
NUMPY_PARTS = {
    "mean": lambda g, c: g / len(g),
    "winsorized": lambda g, c: reference.winsorized_parts(g, reference.symmetric(len(g), c)),
    "trimmed": lambda g, c: reference.trimmed_parts(g, reference.symmetric(len(g), c))}


def bias(robust: np.ndarray, mean: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """How an expected aggregate differs from the expected mean gradient, and
    how fast a descent step along each grows the weights' norm (flat vectors)."""
    norm_mean, norm_robust = np.linalg.norm(mean), np.linalg.norm(robust)
    unit = weights / max(np.linalg.norm(weights), 1e-30)
    return {"cosine": float(robust @ mean / max(norm_mean * norm_robust, 1e-30)),
            "excess": float(np.linalg.norm(robust - mean) / max(norm_mean, 1e-30)),
            "norm_mean": float(norm_mean), "norm_robust": float(norm_robust),
            "radial_robust": float(-robust @ unit), "radial_mean": float(-mean @ unit)}


class Study:
    """The net, its robust and mean update, and the measurements."""

    def __init__(self, reader, aggregator, widths, init, learning_rate):
        import dataclasses

        import keras
        import tensorflow as tf

        from cg_tf.measure.probe import layer_of
        from cg_tf.robust import layer_filter
        from cg_tf.robust.aggregators import Mean
        from cg_tf.training.models import build_model
        from cg_tf.training.robust_model import RobustModel
        self.tf = tf
        self.net = build_model("fc", reader.image_shape, reader.num_classes, widths, init)
        # The update is the trainer's (its layer filter included); A is measured on every layer.
        self.update = RobustModel(self.net, aggregator)
        self.robust = RobustModel(self.net, dataclasses.replace(aggregator,
                                                                layers=layer_filter.ALL))
        self.mean = RobustModel(self.net, Mean())
        self.aggregator = aggregator
        self.layers = [layer_of(v, self.net.name) for v in self.net.trainable_variables]
        self.use_mean = [not r for r in aggregator.layers.robust(self.net)]
        self.optimizer = keras.optimizers.SGD(learning_rate)
        self.optimizer.build(self.net.trainable_variables)
        self.hidden = keras.Model(self.net.input, [
            l.output for l in self.net.layers if l.name.startswith("dense_")])
        self.step = tf.function(self._step)
        self.both = tf.function(self._both)
        self.per_example = tf.function(self._per_example)

    def _both(self, x, y):
        robust, _ = self.robust.aggregated_gradient(x, y)
        mean, _ = self.mean.aggregated_gradient(x, y)
        return robust, mean

    def _step(self, x, y):
        update, _ = self.update.aggregated_gradient(x, y)
        self.optimizer.apply(update, self.net.trainable_variables)
        return update

    def _per_example(self, x, y):
        """Per-example gradients by a jacobian of the per-example losses
        (independent of the factored path the aggregators use)."""
        from cg_tf.robust.gradients import example_losses
        with self.tf.GradientTape() as tape:
            losses = example_losses(y, self.net(x, training=False))
        return tape.jacobian(losses, self.net.trainable_variables)

    def checked_step(self, x, y) -> float:
        """A training step whose update is compared with the NumPy reference of
        its aggregator over per-example gradients at the same weights; returns
        the largest difference relative to the reference's largest value."""
        parts = NUMPY_PARTS[self.aggregator.name]
        c = self.aggregator.value or 0
        per_example = self.per_example(x, y)
        applied = self.step(x, y)
        worst = 0.0
        for g, a, use_mean in zip(per_example, applied, self.use_mean):
            g = g.numpy().reshape(len(g), -1)
            want = g.mean(0) if use_mean else parts(g, c).sum(0)
            a = a.numpy().ravel()
            worst = max(worst, float(np.abs(a - want).max() / max(np.abs(want).max(), 1e-30)))
        return worst

    def _layer_weights(self, layer: str) -> np.ndarray:
        return np.concatenate([v.numpy().ravel() for v, l in zip(
            self.net.trainable_variables, self.layers) if l == layer])

    def radial_parts(self, batches) -> dict[str, float]:
        """Per layer and group (pristine, corrupt): the radial part (-<., W>/||W||)
        of the group's share of the mean gradient and of its kept parts of the
        robust aggregate, averaged over `batches` (which hold is_corrupt)."""
        parts = NUMPY_PARTS[self.aggregator.name]
        c = self.aggregator.value or 0
        out = {}
        for x, y, corrupt in batches:
            grads = self.per_example(x, y)
            groups = {"pristine": ~corrupt, "corrupt": corrupt}
            for layer in dict.fromkeys(self.layers):
                g = np.concatenate([d.numpy().reshape(len(d), -1) for d, l in zip(
                    grads, self.layers) if l == layer], axis=1)
                w = self._layer_weights(layer)
                unit = w / max(np.linalg.norm(w), 1e-30)
                radial = {"mean": -(g @ unit) / len(g), "robust": -(parts(g, c) @ unit)}
                for kind, values in radial.items():
                    for group, mask in groups.items():
                        key = f"radial_{kind}_part/{group}/{layer}"
                        out[key] = out.get(key, 0.0) + float(values[mask].sum()) / len(batches)
        return out

    def measure(self, batches, samples, decompose: int = 0) -> dict[str, float]:
        """At the current weights: per layer the aggregate's bias, weight norms
        and dead units (and on the first `decompose` batches, the radial parts
        by group); accuracies and the logits' spread."""
        from cg_tf.measure import health
        sums = None
        for x, y, _ in batches:
            robust, mean = self.both(x, y)
            flat = [np.concatenate([g.numpy().ravel() for g, l in zip(gs, self.layers)
                                    if l == layer]) for gs in (robust, mean)
                    for layer in dict.fromkeys(self.layers)]
            sums = flat if sums is None else [s + f for s, f in zip(sums, flat)]
        names = list(dict.fromkeys(self.layers))
        out = {}
        for i, layer in enumerate(names):
            weights = self._layer_weights(layer)
            stats = bias(sums[i] / len(batches), sums[len(names) + i] / len(batches), weights)
            out |= {f"{k}/{layer}": v for k, v in stats.items()}
            out[f"weight_norm/{layer}"] = float(np.linalg.norm(weights))
        for name, (x, y) in samples.items():
            logits = self.net(x, training=False).numpy()
            out[f"accuracy/{name}"] = float((logits.argmax(1) == y).mean())
            if name == "pristine":
                out["logits_std"] = float(logits.std())
                for layer, h in zip((n for n in names if n.startswith("dense_")),
                                    self.hidden(x, training=False)):
                    out[f"dead/{layer}"] = health.dead_fraction(h.numpy())
        if decompose:
            out |= self.radial_parts(batches[:decompose])
        return out


def _sample(dataset, n: int):
    """The first n (images, labels) of a batched subset; None if it is empty
    (a clean dataset has no corrupt examples)."""
    xs, ys = [], []
    for batch in dataset:
        xs.append(batch["image"].numpy())
        ys.append(batch["label"].numpy())
    return (np.concatenate(xs)[:n], np.concatenate(ys)[:n]) if xs else None


def train_and_measure(output_dir: str) -> None:
    import keras

    from cg_tf import train_defaults
    from cg_tf.data.reader import Reader
    from cg_tf.storage import files
    try:  # the trainer's checks of its flags (no run directory: the tool writes none)
        config = train_defaults.config_from_flags(TRAINING, model_dir="")
    except ValueError as e:
        sys.exit(f"error: {e}")
    aggregator = config.aggregator
    if aggregator.name not in NUMPY_PARTS and (FLAGS.check_steps or FLAGS.decompose_batches):
        raise ValueError(f"--check_steps and --decompose_batches: no NumPy reference of "
                         f"{aggregator.name} (one of {', '.join(NUMPY_PARTS)})")
    keras.utils.set_random_seed(0)
    reader = Reader.open(config.data_dir, config.batch_size)
    steps = config.steps or config.epochs * reader.steps_per_epoch
    study = Study(reader, aggregator, config.fc_widths, config.init, config.learning_rate)
    # Fixed measurement batches: the first of an epoch far beyond the run.
    fixed = [(b["image"], b["label"], b["is_corrupt"].numpy().astype(bool))
             for b in reader.train_epoch(10 ** 6).take(FLAGS.batches)]
    sample_size = config.input.eval_sample_size
    eval_sets = reader.eval_subsets(sample_size)
    samples = {k: _sample(eval_sets[k], sample_size)
               for k in ("pristine", "corrupt", "test") if k in eval_sets}
    samples = {k: v for k, v in samples.items() if v is not None}
    rows = []
    files.write_json(os.path.join(output_dir, "config.json"), {
        k: FLAGS[k].value for k in ("data_dir", "aggregator", "fc_widths", "init",
                                    "learning_rate", "batch_size")}
        | {"steps": steps}
        | {k: FLAGS[k].value for k in ("measure_every", "batches", "check_steps",
                                       "decompose_batches")}
        | {"source": reader.info.source, "noise": reader.info.noise,
           "provenance": provenance.provenance()})
    worst = 0.0
    batches = iter(reader.train_dataset(0, steps))
    for step in range(steps + 1):
        if step % FLAGS.measure_every == 0 or step == steps:
            values = study.measure(fixed, samples, FLAGS.decompose_batches)
            rows += [{"step": step, "name": k, "value": v} for k, v in values.items()]
            print(f"step {step}: test {values.get('accuracy/test', float('nan')):.3f}, "
                  f"pristine {values['accuracy/pristine']:.3f}, cosine/logits "
                  f"{values['cosine/logits']:.3f}, weight_norm/logits "
                  f"{values['weight_norm/logits']:.1f}", flush=True)
            _write_rows(os.path.join(output_dir, "drift.csv"), rows)
        if step == steps:
            break
        x, y = (batch := next(batches))["image"], batch["label"]
        if step >= FLAGS.check_steps:
            study.step(x, y)
        else:
            worst = max(worst, study.checked_step(x, y))
            if step + 1 == FLAGS.check_steps:
                rows.append({"step": step + 1, "name": "check/max_relative_error",
                             "value": worst})
                print(f"steps 1-{step + 1}: the applied aggregate differs from the NumPy "
                      f"reference by at most {worst:.2e} of its largest value", flush=True)
    _write_rows(os.path.join(output_dir, "drift.csv"), rows)


def _write_rows(path: str, rows: list[dict]) -> None:
    from cg_tf.measure import report
    report.write_table(path, rows, ["step", "name", "value"])


def read(output_dir: str) -> tuple[dict, dict[str, list[tuple[int, float]]]]:
    """A drift folder's config and its series by name."""
    import csv
    with open(os.path.join(output_dir, "config.json")) as f:
        config = json.load(f)
    series = {}
    with open(os.path.join(output_dir, "drift.csv")) as f:
        for row in csv.DictReader(f):
            series.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    return config, series


# The panels of --plot: (title, the series' name prefix, y axis).
PANELS = (("test accuracy", "accuracy/test", "linear"),
          ("weight norm, output layer", "weight_norm/logits", "log"),
          ("-<E[A], W>/||W||, output layer\n(norm growth per unit lr)", "radial_robust/logits",
           "linear"),
          ("cos(E[A], E[M]), output layer", "cosine/logits", "linear"),
          ("std of the logits", "logits_std", "log"),
          ("dead units, mean over hidden layers", "dead/", "linear"))


def panel_series(series: dict[str, list[tuple[int, float]]], name: str
                 ) -> list[tuple[int, float]]:
    """The series `name`, or (a prefix such as "dead/") the mean at each step
    of the series it begins."""
    if name in series:
        return series[name]
    group = [dict(v) for k, v in series.items() if k.startswith(name)]
    steps = sorted(set.intersection(*(set(g) for g in group))) if group else []
    return [(s, float(np.mean([g[s] for g in group]))) for s in steps]


def label(config: dict) -> str:
    mean = config.get("mean_layers") or []  # folders written before the aggregator's @layers
    rate = (config.get("noise") or {}).get("rate") or 0
    parts = [os.path.basename(config["source"].rstrip("/")) or config["source"],
             f"{rate:.0%} noise",
             config["aggregator"] + (f" (mean on {', '.join(mean)})" if mean else ""),
             f"lr {config['learning_rate']:g}"]
    return ", ".join(parts)


def plot(folders: list[str], out: str) -> None:
    from cg_tf.measure import report
    plt = report.pyplot()
    runs = [read(f) for f in folders]
    with plt.rc_context(report.FIGURE_STYLE):
        fig, axes = plt.subplots(2, 3, figsize=(10, 5.6), sharex=True, layout="constrained")
        for ax, (title, name, scale) in zip(axes.flat, PANELS):
            for config, series in runs:
                curve = panel_series(series, name)
                if curve:
                    ax.plot(*zip(*curve), label=label(config), linewidth=1.3)
            ax.set_title(title)
            ax.set_yscale(scale)
            ax.grid(alpha=0.3)
        fig.supxlabel("step")
        report.legend(fig, axes.flat, "")
    report.save_figure(fig, out)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.plot:
        if not FLAGS.out:
            raise app.UsageError("--plot needs --out")
        plot(FLAGS.plot, FLAGS.out)
        return
    if not FLAGS.data_dir or not FLAGS.output_dir:
        raise app.UsageError("--data_dir and --output_dir are required")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    train_and_measure(FLAGS.output_dir)


if __name__ == "__main__":
    define_flags()
    common_flags.run(main)
