"""How often winsorizing gives a hidden unit, or the pull towards a class, exactly zero.

  python -m tools.zero_updates --data_dir=DATA --runs=RUN_DIR,RUN_DIR,...
      --out=OUT.csv [--cs=1,2,4,8 --batches=50 --label_steps=0 --init]

The winsorized mean of a coordinate over a batch of B (cg_tf.robust.aggregators.
Winsorized: the c largest values set to the (c+1)-th largest, the c smallest to
the (c+1)-th smallest, then the mean; 2c < B) is exactly zero wherever at most
c of the B per-example values are nonzero: then at most c are negative, so the
(c+1)-th smallest is >= 0, and at least B - c >= c + 1 are <= 0, so it is <= 0;
it is 0, and so (likewise) is the (c+1)-th largest, and every value is clipped
to 0, whatever the signs of the nonzero ones. A ReLU unit active (output > 0)
on at most c examples of the batch has per-example gradients that are zero on
every other example for its incoming weights and bias (its ReLU passes no
gradient) and for its outgoing weights (its output is 0): all of them get an
update of exactly zero, while the mean gradient moves them. A dead unit
(active on no example) gets zero from the mean too.

The output layer: with p the softmax, example i's gradient of the logit bias
of class k is p_ik - [y_i = k], negative (a pull towards k) exactly on the m
examples labelled k. If m <= c, the m negative values are among the c
smallest, the (c+1)-th smallest is the (c + 1 - m)-th smallest p_ik of the
other examples, lo >= 0 (> 0 unless the softmax underflows to 0), and every
value is clipped to at least lo: the class's aggregate bias gradient is >= lo,
positive, a push away from k, and no pull towards k is left (each entry of its
kernel column, h_ij (p_ik - [y_i = k]) with h >= 0, likewise gets an aggregate
>= 0). In general (m > c) the c smallest values are those of its c examples
of least p_ik, raised to the (c+1)-th least one's p - 1, and the c largest
(of other examples, when B - m > c) lowered to the (c+1)-th largest: the
aggregate is (1/B) sum_i clip(g_i, lo, hi), of either sign.

For each run directory (a cg_tf run: config.json, checkpoints/) the tool
copies the newest complete checkpoint to a temporary folder, rebuilds the net
(cg_tf.training.models.build_model with the run's config) and restores its
weights (the trainer's tf.train.Checkpoint holds the net as `model`, a
RobustModel); with --init also each seed's initialization (the trainer's
construction: keras.utils.set_random_seed(seed), then build_model), checked
against the starting norms the run's checkpoint keeps. It draws --batches
training batches as the trainer does (Reader.open(data_dir, batch_size,
seed).train_dataset from the checkpoint's step: the batches the run takes
next; from step 0 at initialization) and records, per batch and c in --cs:

  hidden layers  the share of units active on at most c examples (their
                 incoming and outgoing weights and bias get exactly zero from
                 winsorized:c), and on none (dead)
  classes        the share of classes with at most c examples by training
                 label, and with none; the share of batches with such a class

For classes it also counts every batch of each seed's first --label_steps
steps (0: the runs' whole length: every update the runs made), and the
expectations for a uniform random batch: Binomial(B, 1/K) per class (K
classes; the batches of a class are multinomial), and the exact law of the
trainer's draw without replacement (hypergeometric, the dataset's class
sizes). The check: on one batch per weights and c (the one of the most units
active on 1 to c examples; for classes the first batch of the run with a
class of at most c examples) the project's own winsorized:c aggregate
(RobustModel.aggregated_gradient) of every predicted unit's incoming and
outgoing weights and bias is compared with zero, and every predicted class's
bias and kernel column with their sign.

OUT.csv: one row per weights x layer x c (columns: COLUMNS); a table is printed.
"""

import glob
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np
from absl import app, flags

from cg_tf import common_flags

FLAGS = flags.FLAGS

CLASSES = "classes"  # the layer name of the rows about classes
COLUMNS = ["run", "setting", "seed", "step", "layer", "c", "batches",
           "share_at_most_c", "share_none", "share_rare", "per_batch", "batches_with_any",
           "expected_share_binomial", "expected_batches_with_any_binomial",
           "expected_share_hypergeometric", "expected_batches_with_any_hypergeometric",
           "check_step", "check_predicted", "check_rare", "check_max_abs",
           "check_zero_units", "check_mean_nonzero", "check_min_bias", "check_min_kernel",
           "check_mean_negative"]


def define_flags() -> None:
    """The command line's flags (defined when it runs, so that importing the
    module's functions defines none)."""
    flags.DEFINE_string("data_dir", None, "The runs' dataset directory (read only).")
    flags.DEFINE_list("runs", None, "Run directories (config.json, checkpoints/), read only.")
    flags.DEFINE_string("out", None, "The CSV to write.")
    flags.DEFINE_list("cs", ["1", "2", "4", "8"], "Winsorization parameters c.")
    flags.DEFINE_integer("batches", 50, "Training batches per weights.")
    flags.DEFINE_integer("label_steps", 0, "Steps per seed whose batches' class counts are "
                         "recorded (0: the runs' length).")
    flags.DEFINE_bool("init", True, "Also each seed's initialization.")
    flags.mark_flags_as_required(["data_dir", "runs", "out"])


# -- counts and shares ------------------------------------------------------------------


def active_counts(activations: np.ndarray) -> np.ndarray:
    """Per unit (last axis), the examples (first axis) on which it is active (> 0)."""
    return (np.asarray(activations) > 0).sum(axis=0)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[batches, B] labels -> [batches, num_classes] examples of each class per batch."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(row, minlength=num_classes) for row in labels.reshape(
        len(labels), -1)])


def shares(counts: np.ndarray, c: int) -> dict[str, float]:
    """From [batches, n] counts (examples per unit or class and batch): the mean
    share of the n with at most c, with none, and with 1 to c (a unit the mean
    moves and winsorizing does not); the mean number with at most c per batch;
    the share of batches with at least one at most c."""
    counts = np.asarray(counts)
    low = counts <= c
    return {"share_at_most_c": float(low.mean()), "share_none": float((counts == 0).mean()),
            "share_rare": float((low & (counts > 0)).mean()),
            "per_batch": float(low.sum(1).mean()), "batches_with_any": float(low.any(1).mean())}


# -- expectations for a random batch ----------------------------------------------------


def binomial_at_most(n: int, p: float, c: int) -> float:
    """P(X <= c) for X ~ Binomial(n, p)."""
    return float(sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(c + 1)))


def hypergeometric_at_most(n: int, size: int, population: int, c: int) -> float:
    """P(X <= c) for the X of n drawn without replacement from `population`
    that fall in a class of `size`."""
    return sum(math.comb(size, j) * math.comb(population - size, n - j)
               for j in range(c + 1)) / math.comb(population, n)


def none_at_most_multinomial(n: int, k: int, c: int) -> float:
    """P(every one of k equally likely classes has more than c of n draws
    with replacement): sum over the counts j_1..j_k > c of n! / prod j_i! / k^n."""
    ways = [1] + [0] * n  # sequences of each length over the classes so far
    for _ in range(k):
        ways = [sum(ways[m - j] * math.comb(m, j) for j in range(c + 1, m + 1))
                for m in range(n + 1)]
    return ways[n] / k ** n


def none_at_most_hypergeometric(n: int, sizes: list[int], c: int) -> float:
    """P(every class, of the given sizes, has more than c of n draws without
    replacement): sum over j_i > c of prod C(size_i, j_i) / C(sum sizes, n)."""
    ways = [1] + [0] * n
    for size in sizes:
        ways = [sum(ways[m - j] * math.comb(size, j) for j in range(c + 1, m + 1))
                for m in range(n + 1)]
    return ways[n] / math.comb(sum(sizes), n)


def expectations(batch: int, sizes: list[int], c: int) -> dict[str, float]:
    """The share of classes with at most c examples, and of batches with such a
    class, for uniform random batches: Binomial(batch, 1/K) per class (draws
    with replacement), and hypergeometric (without, the classes of `sizes`)."""
    k, population = len(sizes), sum(sizes)
    return {"expected_share_binomial": binomial_at_most(batch, 1 / k, c),
            "expected_batches_with_any_binomial": 1 - none_at_most_multinomial(batch, k, c),
            "expected_share_hypergeometric": float(np.mean(
                [hypergeometric_at_most(batch, s, population, c) for s in sizes])),
            "expected_batches_with_any_hypergeometric":
                1 - none_at_most_hypergeometric(batch, sizes, c)}


# -- the check against the aggregator -----------------------------------------------------


def unit_update_max(kernel: np.ndarray, bias: np.ndarray, next_kernel: np.ndarray,
                    units: np.ndarray) -> float:
    """The largest |update| of the `units` (a mask over the layer's units):
    their incoming weights (kernel columns), biases and outgoing weights (rows
    of the next layer's kernel); 0 for no unit."""
    parts = [kernel[:, units], bias[units], next_kernel[units, :]]
    return max((float(np.abs(p).max()) for p in parts if p.size), default=0.0)


def zero_units(kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The units whose incoming weights and bias are all updated by exactly zero."""
    return (kernel == 0).all(axis=0) & (bias == 0)


def class_check(kernel: np.ndarray, bias: np.ndarray, mean_bias: np.ndarray,
                classes: np.ndarray) -> dict[str, float]:
    """For the `classes` (a mask) of at most c examples: the least winsorized
    bias gradient (> 0: a push away from the class) and kernel column entry
    (>= 0: no pull), and of how many the mean's bias gradient is negative (a
    step raises their bias; it is positive for a class whose examples' pulls,
    m/B in all, are outweighed by the pushes, the mean of p_ik)."""
    if not classes.any():
        return {"check_min_bias": "", "check_min_kernel": "", "check_mean_negative": ""}
    return {"check_min_bias": float(bias[classes].min()),
            "check_min_kernel": float(kernel[:, classes].min()),
            "check_mean_negative": int((mean_bias[classes] < 0).sum())}


# -- runs and checkpoints -------------------------------------------------------------------


def checkpoint_steps(directory: str) -> list[int]:
    """The steps of the checkpoints in `directory` with both an index and a data
    file, newest first."""
    steps = []
    for index in glob.glob(os.path.join(directory, "ckpt-*.index")):
        step = int(re.fullmatch(r"ckpt-(\d+)\.index", os.path.basename(index)).group(1))
        if glob.glob(os.path.join(directory, f"ckpt-{step}.data-*")):
            steps.append(step)
    return sorted(steps, reverse=True)


def copy_checkpoint(directory: str, step: int, into: str) -> str:
    """Copies checkpoint `step` of `directory` into `into`; returns its prefix there."""
    for path in glob.glob(os.path.join(directory, f"ckpt-{step}.*")):
        shutil.copy2(path, into)
    return os.path.join(into, f"ckpt-{step}")


def read_config(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


class Weights:
    """One net of the runs' shape, its hidden activations and its aggregates;
    its weights are set to each run's (or initialization) in turn."""

    def __init__(self, reader, config: dict):
        import keras
        import tensorflow as tf

        from cg_tf.robust.aggregators import Mean
        from cg_tf.training.models import build_model
        from cg_tf.training.robust_model import RobustModel
        self.tf, self.config, self.reader = tf, config, reader
        self.net = build_model(config["model"], reader.image_shape, reader.num_classes,
                               config["fc_widths"], config["init"])
        self.hidden_names = [l.name for l in self.net.layers if l.name.startswith("dense_")]
        self.hidden = keras.Model(self.net.input, [
            self.net.get_layer(n).output for n in self.hidden_names])
        self.mean = tf.function(RobustModel(self.net, Mean()).aggregated_gradient)
        self._winsorized = {}

    def winsorized(self, c: int):
        from cg_tf.robust.aggregators import Winsorized
        from cg_tf.training.robust_model import RobustModel
        if c not in self._winsorized:
            self._winsorized[c] = self.tf.function(
                RobustModel(self.net, Winsorized(c)).aggregated_gradient)
        return self._winsorized[c]

    def set_initial(self, seed: int) -> list[float]:
        """The trainer's initialization of `seed`; returns its layers' norms."""
        import keras

        from cg_tf.measure.health import layer_norms
        from cg_tf.training.models import build_model
        keras.utils.set_random_seed(seed)
        fresh = build_model(self.config["model"], self.reader.image_shape,
                            self.reader.num_classes, self.config["fc_widths"],
                            self.config["init"])
        for v, w in zip(self.net.trainable_variables, fresh.trainable_variables):
            v.assign(w)
        return list(layer_norms(fresh).values())

    def restore(self, prefix: str) -> tuple[int, np.ndarray]:
        """Restores the net from a trainer's checkpoint; returns its step and the
        layers' norms at the run's start."""
        from cg_tf.robust.aggregators import Mean
        from cg_tf.training.robust_model import RobustModel
        tf = self.tf
        model = RobustModel(self.net, Mean())  # the trainer's `model` holds the net
        tf.train.Checkpoint(model=model).restore(prefix).expect_partial() \
            .assert_existing_objects_matched()
        reader = tf.train.load_checkpoint(prefix)
        return (int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")),
                reader.get_tensor("weight_norms_at_start/.ATTRIBUTES/VARIABLE_VALUE"))

    def counts(self, x) -> list[np.ndarray]:
        """Per hidden layer, the examples of batch x each unit is active on."""
        return [active_counts(h.numpy()) for h in self.hidden(x, training=False)]

    def check_units(self, x, y, c: int) -> list[dict]:
        """Per hidden layer, on batch (x, y): the units active on at most c
        examples, and the winsorized:c update of their weights and biases."""
        robust, _ = self.winsorized(c)(x, y)
        mean, _ = self.mean(x, y)
        robust, mean = [g.numpy() for g in robust], [g.numpy() for g in mean]
        out = []
        for i, counts in enumerate(self.counts(x)):
            kernel, bias, next_kernel = robust[2 * i], robust[2 * i + 1], robust[2 * i + 2]
            predicted, rare = counts <= c, (counts >= 1) & (counts <= c)
            moved = ~zero_units(mean[2 * i], mean[2 * i + 1])
            out.append({"check_predicted": int(predicted.sum()), "check_rare": int(rare.sum()),
                        "check_max_abs": unit_update_max(kernel, bias, next_kernel, predicted),
                        "check_zero_units": int(zero_units(kernel, bias).sum()),
                        "check_mean_nonzero": int((rare & moved).sum())})
        return out

    def check_classes(self, x, y, c: int) -> dict:
        """On batch (x, y): the winsorized:c update of the output layer for the
        classes of at most c examples."""
        robust, _ = self.winsorized(c)(x, y)
        mean, _ = self.mean(x, y)
        counts = class_counts(np.asarray(y)[None], self.reader.num_classes)[0]
        classes = counts <= c
        return {"check_predicted": int(classes.sum())} | class_check(
            robust[-2].numpy(), robust[-1].numpy(), mean[-1].numpy(), classes)


def batches_from(reader, step: int, n: int) -> list[tuple]:
    """The n training batches (images, labels) the trainer draws from `step` on."""
    return [(b["image"], b["label"]) for b in reader.train_dataset(step, n)]


def label_counts(reader, steps: int) -> np.ndarray:
    """[steps, K] class counts of the trainer's batches of steps 0 .. steps - 1."""
    labels = [b["label"].numpy() for b in reader.train_dataset(0, steps)]
    return class_counts(np.stack(labels), reader.num_classes)


def measure(study: Weights, label: dict, batches: list[tuple], cs: list[int],
            first_low: dict[int, int]) -> list[dict]:
    """The rows of one weights: per hidden layer and c, then classes and c."""
    reader = study.reader
    counts = [np.stack(layer) for layer in zip(*(study.counts(x) for x, _ in batches))]
    labels = class_counts(np.stack([np.asarray(y) for _, y in batches]), reader.num_classes)
    step = label["step"]
    rows = []
    for c in cs:
        rare = sum(((layer >= 1) & (layer <= c)).sum(1) for layer in counts)
        worst = int(np.argmax(rare if rare.any() else sum((l <= c).sum(1) for l in counts)))
        x, y = batches[worst]
        checks = study.check_units(x, y, c)
        for name, layer, check in zip(study.hidden_names, counts, checks):
            rows.append(label | {"layer": name, "c": c, "batches": len(batches)}
                        | shares(layer, c) | {"check_step": step + worst} | check)
        row = label | {"layer": CLASSES, "c": c, "batches": len(batches)} | shares(labels, c)
        if c in first_low:  # the run's first batch with a class of at most c examples
            (x, y), = batches_from(reader, first_low[c], 1)
            row |= {"check_step": first_low[c]} | study.check_classes(x, y, c)
        rows.append(row)
    return rows


def label_rows(seed: int, counts: np.ndarray, sizes: list[int], batch: int,
               cs: list[int]) -> list[dict]:
    """The class rows of every batch of a seed's first steps, with the expectations."""
    return [{"run": f"labels_seed{seed}", "setting": "labels", "seed": seed, "step": 0,
             "layer": CLASSES, "c": c, "batches": len(counts)} | shares(counts, c)
            | expectations(batch, sizes, c) for c in cs]


def table(rows: list[dict], cs: list[int]) -> str:
    """Per weights and layer: the share of none, and the share at most c and of
    1 to c for each c."""
    head = f"{'run':<34} {'step':>6} {'layer':<8} {'none':>7}" + "".join(
        f" {'<=' + str(c):>7}" for c in cs) + "".join(f" {'1-' + str(c):>7}" for c in cs)
    lines, seen = [head], {}
    for r in rows:
        seen.setdefault((r["run"], r["step"], r["layer"]), {})[r["c"]] = r
    for (run, step, layer), by_c in seen.items():
        first = next(iter(by_c.values()))
        lines.append(f"{run:<34} {step:>6} {layer:<8} {first['share_none']:>7.4f}" + "".join(
            f" {by_c[c][key]:>7.4f}" if c in by_c else f" {'':>7}"
            for key in ("share_at_most_c", "share_rare") for c in cs))
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    from cg_tf.data.reader import Reader
    from cg_tf.measure import report
    from cg_tf.robust import aggregators
    cs = [int(c) for c in FLAGS.cs]
    configs = {run: read_config(run) for run in FLAGS.runs}
    first = next(iter(configs.values()))
    shape = ("model", "fc_widths", "init", "batch_size")
    for run, config in configs.items():
        if any(config[k] != first[k] for k in shape):
            raise app.UsageError(f"{run}: another net or batch than {FLAGS.runs[0]}")
    readers = {}
    study = None
    rows, label_part = [], []
    scratch = tempfile.mkdtemp(prefix="zero_updates_")
    try:
        for seed in sorted({c["seed"] for c in configs.values()}):
            reader = readers[seed] = Reader.open(FLAGS.data_dir, first["batch_size"], seed=seed)
            if reader.info.source_fingerprint != first["dataset"]["source_fingerprint"] or (
                    reader.info.noise != first["dataset"]["noise"]):
                raise app.UsageError(f"--data_dir={FLAGS.data_dir} is not the runs' dataset")
        study = Weights(readers[first["seed"]], first)
        first_low, starts = {}, {}
        for seed, reader in readers.items():
            steps = FLAGS.label_steps or max(c["steps"] for c in configs.values()
                                             if c["seed"] == seed)
            counts = label_counts(reader, max(steps, reader.steps_per_epoch))
            # The training labels' class sizes: an epoch's batches hold every example once.
            sizes = [int(s) for s in counts[:reader.steps_per_epoch].sum(0)]
            counts = counts[:steps]
            label_part += label_rows(seed, counts, sizes, first["batch_size"], cs)
            low = counts.min(1)
            first_low[seed] = {c: int(np.argmax(low <= c)) for c in cs if (low <= c).any()}
            print(f"seed {seed}: class counts of {steps} batches, class sizes {sizes}", flush=True)
        if FLAGS.init:
            for seed, reader in readers.items():
                study.reader = reader
                norms = study.set_initial(seed)
                starts[seed] = norms
                label = {"run": f"init_seed{seed}", "setting": "init", "seed": seed, "step": 0}
                rows += measure(study, label, batches_from(reader, 0, FLAGS.batches), cs,
                                first_low[seed])
                print(f"init seed {seed}: layer norms {np.round(norms, 4).tolist()}", flush=True)
        for run, config in configs.items():
            directory = os.path.join(run, "checkpoints")
            steps = checkpoint_steps(directory)
            if not steps:
                raise app.UsageError(f"{run}: no checkpoint")
            for newest in steps:  # one being written, or damaged, gives way to the one before
                try:
                    step, start = study.restore(copy_checkpoint(
                        directory, newest, tempfile.mkdtemp(dir=scratch)))
                    break
                except (tf.errors.OpError, ValueError, AssertionError) as e:
                    print(f"{run}: checkpoint {newest} unreadable ({str(e)[:200]})")
            else:
                raise ValueError(f"{run}: no readable checkpoint")
            seed = config["seed"]
            if seed in starts and not np.allclose(start, starts[seed], rtol=1e-6):
                raise ValueError(f"{run}: its starting norms {start} are not those of the "
                                 f"rebuilt initialization {starts[seed]}")
            study.reader = readers[seed]
            setting = aggregators.from_json(config["aggregator"]).setting
            label = {"run": os.path.basename(run.rstrip("/")), "setting": setting,
                     "seed": seed, "step": step}
            rows += measure(study, label, batches_from(readers[seed], step, FLAGS.batches), cs,
                            first_low[seed])
            print(f"{label['run']}: step {step} measured", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows += label_part
    report.write_table(FLAGS.out, rows, COLUMNS)
    print(table(rows, cs))
    checked = [r for r in rows if r.get("check_predicted")]
    hidden = [r for r in checked if r["layer"] != CLASSES]
    classes = [r for r in checked if r["layer"] == CLASSES]
    print(f"check: {sum(r['check_predicted'] for r in hidden)} predicted units "
          f"({sum(r['check_rare'] for r in hidden)} active on 1 to c examples, of which "
          f"{sum(r['check_mean_nonzero'] for r in hidden)} moved by the mean) in "
          f"{len(hidden)} (weights, layer, c); largest |winsorized update| of their weights "
          f"and biases {max((r['check_max_abs'] for r in hidden), default=0):.3g}")
    if classes:
        print(f"check: {sum(r['check_predicted'] for r in classes)} classes of at most c "
              f"examples: least winsorized bias gradient "
              f"{min(r['check_min_bias'] for r in classes):.3g}, least kernel column entry "
              f"{min(r['check_min_kernel'] for r in classes):.3g}; the mean's bias gradient "
              f"is negative for {sum(r['check_mean_negative'] for r in classes)} of them")


if __name__ == "__main__":
    define_flags()
    common_flags.run(main)
