"""What a run measures besides training: the memorization metrics of
docs/reference.md (the metrics) on the reader's fixed subsets, on the evaluation
schedule, written as tf.summary data with explicit steps (names in
cg_tf.measure.tags); and, at the end, the learning events and learned-example exports.

Evaluation runs at every scheduled step: one traced forward pass per batch of
the pristine, corrupt and test subsets (the mixed subset's examples are among
the first two, so its metrics come from their per-example results), the test
split only at `test_eval_every`'s steps and at the end if that is set; its
cost is those forward passes. The probe (per-example gradients of a fixed
sample: coherence, f_p, aggregator diagnostics) is skipped at a scheduled
step while its time so far exceeds `probe_max_share` of the run's time, so
its cost stays bounded whatever the model; both shares are written as
`cost/*` scalars and into summary.json.
"""

import csv
import dataclasses
import json
import logging
import os
import time
from typing import ClassVar

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from cg_tf import provenance
from cg_tf.data.reader import Reader
from cg_tf.measure import hparams, metrics, tags
from cg_tf.measure.examples import Shown
from cg_tf.measure.health import Health
from cg_tf.measure.probe import Probe
from cg_tf.options import option
from cg_tf.robust.aggregators import Aggregator
from cg_tf.robust.gradients import DEFAULT_BN_MODE, example_losses
from cg_tf.storage import events, files, rundir

LEARNED_IDS = "learned_ids.txt"
NOT_LEARNED_IDS = "not_learned_ids.txt"
LEARNING_EVENTS = "learning_events.csv"
SUMMARY_FILE = "summary.json"  # the final metrics of a run
# What a monitored run writes beside its event files.
RUN_FILES = (SUMMARY_FILE, LEARNING_EVENTS, LEARNED_IDS, NOT_LEARNED_IDS)
HEALTH_SAMPLE = 500  # the first examples of the mixed subset: health's fixed sample


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    # What only changes what a run says, not what it computes: may change on resume.
    EXECUTION_FIELDS: ClassVar[tuple[str, ...]] = ("warn_growth", "examples_shown")

    eval_every: int | None = option(None, "Steps between evaluations (default: every epoch).")
    eval_log_spaced: bool = option(True, "Also evaluate at steps 1, 2, 4, ... before that.")
    test_eval_every: int | None = option(
        None, "Steps between evaluations of the test split (most of an evaluation's cost), "
        "a multiple of the evaluation interval; it is evaluated at the end too, not at the "
        "log-spaced steps, and the training subsets at every evaluation. Default: at every "
        "evaluation.")
    probe_size: int | None = option(
        None, "Examples of the gradient probe (coherence, f_p, aggregator diagnostics); "
        "default: the batch size; 0: no probe.")
    probe_max_share: float = option(0.1, "Skip a probe while probing has taken more than "
                                    "this share of the run's time.")
    export_learned: bool = option(True, "At the end, write the ids of the training examples "
                                  "the model classifies as their training label, and of the "
                                  "others.")
    examples_shown: int = option(
        64, "Tracked examples of each group (pristine, corrupt) the Memorization tab shows "
        "themselves: a thumbnail, the labels, and at each evaluation the prediction and the "
        "steps learned; 0: none.")
    warn_growth: float = option(20.0, "Warn once per layer whose weight norm grows past this "
                                "multiple of its start (a drifting run); 0: never.")

    def __post_init__(self) -> None:
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every must be positive, got {self.eval_every}")
        if self.test_eval_every is not None and self.test_eval_every < 1:
            raise ValueError(f"test_eval_every must be positive, got {self.test_eval_every}")
        if self.probe_size is not None and self.probe_size < 0:
            raise ValueError(f"probe_size must be >= 0, got {self.probe_size}")
        if self.examples_shown < 0:
            raise ValueError(f"examples_shown must be >= 0, got {self.examples_shown}")
        if not 0 < self.probe_max_share <= 1:
            raise ValueError(f"probe_max_share must be in (0, 1], got {self.probe_max_share}")
        if not (self.warn_growth == 0 or self.warn_growth > 1):
            raise ValueError(f"warn_growth must be 0 (never warn) or a factor above 1, got "
                             f"{self.warn_growth}: a norm that grew never stands at or below "
                             "its start")


def write_plugin_tensor(tag: str, value, step: int) -> None:
    """A tensor summary under the plugin's name (readable through TensorBoard's
    data provider), in the default writer."""
    meta = tf.compat.v1.SummaryMetadata()
    meta.plugin_data.plugin_name = tags.PLUGIN_NAME
    meta.data_class = summary_pb2.DATA_CLASS_TENSOR
    tf.summary.write(tag, tf.constant(value), step=step, metadata=meta)


def write_run_config(writer, config: dict) -> None:
    """A run's configuration as JSON text under the plugin's name at step 0; it
    is also what makes TensorBoard show the Memorization tab."""
    with writer.as_default():
        write_plugin_tensor(tags.RUN_CONFIG, json.dumps(config), 0)


class LearningEvents(tf.Module):
    """Per tracked example (the pristine and corrupt subsets): the first step it
    was classified as its training label, and the step since which it has been
    so classified at every evaluation (learned for good, so far).
    Checkpointed with the run, so a resumed run keeps its history."""

    def __init__(self, sizes: dict[str, int]):
        super().__init__(name="learning_events")
        self.first, self.since = _steps(sizes, "first"), _steps(sizes, "since")

    def update(self, group: str, correct: np.ndarray, step: int) -> None:
        first, since = metrics.update_learning_events(
            self.first[group].numpy(), self.since[group].numpy(), correct, step)
        self.first[group].assign(first)
        self.since[group].assign(since)

    def of(self, group: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first learned step, learned-for-good step, stayed learned) per example."""
        first, since = self.first[group].numpy(), self.since[group].numpy()
        return first, since, metrics.stayed_learned(first, since)


def _steps(sizes: dict[str, int], name: str) -> dict[str, tf.Variable]:
    return {g: tf.Variable(tf.fill([n], tf.constant(metrics.NOT_LEARNED, tf.int64)),
                           trainable=False, name=f"{name}_{g}") for g, n in sizes.items()}


# What a monitored run writes to its directory (cg_tf.storage.rundir): a
# training run adds its checkpoints and config.json to it.
RUN_NAMES = rundir.Names(frozenset(RUN_FILES), (events.EVENT_FILES,))
LAYOUT = rundir.Layout(owns=lambda _directory, _record: RUN_NAMES, done=SUMMARY_FILE)


def json_values(record: dict) -> dict:
    """A record with NaN (a metric without data) as None, as JSON has no NaN."""
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in record.items()}


def write_histogram(tag: str, buckets: np.ndarray, step: int, description: str) -> None:
    """Rows (left, right, count) as a histogram summary: TensorBoard's
    Histograms dashboard and the Memorization tab read it (tf.summary.histogram
    only makes equal-width buckets)."""
    from tensorboard.plugins.histogram import metadata
    tf.summary.write(tag, tf.constant(buckets, tf.float64), step=step,
                     metadata=metadata.create_summary_metadata(None, description))


def _columns(ds: tf.data.Dataset) -> tuple[dict[str, np.ndarray], list[int]]:
    """A batched subset's example ids and labels, and its batch sizes."""
    keys = ("example_id", "label", "true_label")
    parts, sizes = {k: [] for k in keys}, []
    for batch in ds:
        for k in keys:
            parts[k].append(batch[k].numpy())
        sizes.append(len(parts["label"][-1]))
    return {k: np.concatenate(v) if v else np.zeros([0]) for k, v in parts.items()}, sizes


def _index_within(part: dict[str, np.ndarray], wholes: list[dict[str, np.ndarray]]
                  ) -> np.ndarray | None:
    """Where each example of `part` is in the `wholes` concatenated (the same
    id and labels), or None if one is not there."""
    whole = {k: np.concatenate([w[k] for w in wholes]) for k in part}
    where = {eid: i for i, eid in enumerate(whole["example_id"])}
    if len(where) < len(whole["example_id"]):
        return None  # an id twice: no telling which
    index = np.array([where.get(eid, -1) for eid in part["example_id"]], np.int64)
    if (index < 0).any():
        return None
    same = all(np.array_equal(whole[k][index], part[k]) for k in ("label", "true_label"))
    return index if same else None


def _head(subset: tf.data.Dataset, size: int) -> dict[str, tf.Tensor] | None:
    """The first `size` examples (or all, if fewer) of a cached evaluation
    subset; None if it is empty. Reads it through: a cached dataset read in
    part throws away what it cached, and TensorFlow warns of it."""
    first = None
    for batch in subset.unbatch().batch(size):
        first = batch if first is None else first
    return first


def _probe_sample(mixed: tf.data.Dataset, size: int) -> dict[str, tf.Tensor] | None:
    """The first `size` examples of the mixed subset, or None if it has fewer."""
    first = _head(mixed, size)
    if first is None or int(first["label"].shape[0]) < size:
        return None
    return first


class Monitor:
    def __init__(self, net, reader: Reader, aggregator: Aggregator, batch_size: int,
                 config: MonitorConfig, writer, bn_mode: str = DEFAULT_BN_MODE,
                 chunk: int | None = None, loss=example_losses):
        self.net, self.reader, self.config, self.writer = net, reader, config, writer
        interval = config.eval_every or reader.steps_per_epoch
        if config.test_eval_every and config.test_eval_every % interval:
            raise ValueError(f"--test_eval_every={config.test_eval_every} is not a multiple of "
                             f"the evaluation interval, {interval} steps (--eval_every, or the "
                             "steps per epoch)")
        subsets = reader.eval_subsets()
        self.top5 = reader.num_classes > 10
        columns = {g: _columns(subsets[g]) for g in (*tags.GROUPS, "mixed") if g in subsets}
        ids = {g: columns[g][0]["example_id"] for g in tags.GROUPS if g in columns}
        self.ids = {g: i for g, i in ids.items() if len(i)}  # a clean dataset has no corrupt
        self.subsets = {k: v for k, v in subsets.items() if k not in ids or k in self.ids}
        # The mixed subset's examples are the tracked ones' (the first n training
        # examples are among the first n clean and the first n corrupt): its
        # results are taken from theirs, without a forward pass of its own.
        self._mixed_index = None
        if "mixed" in columns and self.ids:
            self._mixed_index = _index_within(columns["mixed"][0],
                                              [columns[g][0] for g in self.ids])
        self._mixed_batches = columns["mixed"][1] if "mixed" in columns else []
        self.events = LearningEvents({g: len(ids) for g, ids in self.ids.items()})
        self.shown = Shown({g: _head(self.subsets[g], config.examples_shown) for g in self.ids},
                           config.examples_shown, reader.class_names) \
            if config.examples_shown and self.ids else None
        self.health = Health(net, _head(self.subsets["mixed"], HEALTH_SAMPLE)["image"],
                             config.warn_growth)
        self.probe = None
        size = batch_size if config.probe_size is None else config.probe_size
        sample = _probe_sample(self.subsets["mixed"], size) if size else None
        if sample is not None:
            self.probe = Probe(net, aggregator, sample, batch_size, chunk, bn_mode, loss)
        elif size:
            logging.warning("no probe: the mixed subset has fewer than %d examples", size)
        self.seconds = {"eval": 0.0, "probe": 0.0}
        self._latest: tuple[int, dict] | None = None  # (step, results) of the last observe
        self._probe_traced = False  # the first probe traces the graph: outside the budget
        self._run_config = {"aggregator": aggregator.to_json(),
                            "noise": reader.noise, "labels_changed": reader.labels_changed,
                            "num_classes": reader.num_classes,
                            "batch_size": batch_size,
                            "probe_size": size if sample is not None else 0,
                            "tracked": {g: len(i) for g, i in self.ids.items()}}

    def schedule(self, total_steps: int) -> list[int]:
        return metrics.eval_schedule(total_steps, self.reader.steps_per_epoch,
                                     self.config.eval_every, self.config.eval_log_spaced)

    def is_scheduled(self, step: int, total_steps: int) -> bool:
        return metrics.is_evaluation_step(step, total_steps, self.reader.steps_per_epoch,
                                          self.config.eval_every, self.config.eval_log_spaced)

    def write_run_config(self, extra: dict, directory: str, **known) -> None:
        """The run's configuration for the Memorization tab and its settings
        for the HParams dashboard (a trial named after the run's `directory`;
        `known`: seed, steps, ... the monitor does not know itself), at the
        run's start."""
        config = {**self._run_config, **extra}
        write_run_config(self.writer, config)
        if self.shown:
            with self.writer.as_default():
                write_plugin_tensor(tags.EXAMPLES, self.shown.records(), 0)
        hparams.write_start(self.writer, hparams.values(config, **known),
                            hparams.trial_name(directory))

    # -- evaluations ------------------------------------------------------------

    def evaluate(self, names=None) -> dict[str, dict]:
        """The metrics (metrics.evaluate's) of the subsets `names` (default:
        all), one forward pass per example: the mixed subset's results are
        taken from the tracked subsets', whose examples it holds."""
        names = [n for n in self.subsets if names is None or n in names]
        taken = self._mixed_index is not None and "mixed" in names
        needed = {*names, *self.ids} if taken else set(names)
        per = {name: metrics.example_results(self.net, ds) for name, ds in self.subsets.items()
               if name in needed and not (taken and name == "mixed")}
        if taken:
            per["mixed"] = metrics.take_examples([per[g] for g in self.ids], self._mixed_index,
                                                 self._mixed_batches)
        return {name: metrics.summarize(per[name], self.top5) for name in names}

    def subsets_at(self, step: int) -> list[str]:
        """The subsets a scheduled evaluation at `step` evaluates: all but the
        test split off --test_eval_every's steps."""
        every = self.config.test_eval_every
        return [n for n in self.subsets if not (n == "test" and every and step % every)]

    def results_at(self, step: int) -> dict[str, dict]:
        """The evaluation of the model at `step`: that of the scheduled
        evaluation if it was the last one (completed, and the subsets it
        skipped written, if it skipped any), else a new one."""
        if not (self._latest and self._latest[0] == step):
            return self.evaluate()
        results = self._latest[1]
        missing = [n for n in self.subsets if n not in results]
        if missing:
            start = time.monotonic()
            results = {**results, **self.evaluate(missing)}
            results = {n: results[n] for n in self.subsets}
            self.seconds["eval"] += time.monotonic() - start
            self._latest = (step, results)
            with self.writer.as_default(step=step):
                self._write_eval({n: results[n] for n in missing}, results)
            self.writer.flush()  # the run's writer may have been flushed for the last time
        return results

    def adjusted_overfit(self, results: dict[str, dict]) -> float:
        if "test" not in results:
            return float("nan")
        return metrics.adjusted_overfit(results["mixed"]["accuracy"], results["test"]["accuracy"],
                                        float(self.reader.noise.get("rate", 0.0)),
                                        self.reader.num_classes)

    def write_summary(self, step: int, directory: str, **extra) -> dict:
        """summary.json of a run ended at `step`, in `directory` (the exports
        too): the final metrics, `extra`, and what the run was; returns it."""
        results = self.results_at(step)
        self.writer.flush()
        hparams.write_peak(self.writer, events.scalars(directory, tags.eval_tag("test",
                                                                                "accuracy")))
        self.writer.flush()  # before summary.json says the run is complete
        summary = json_values({
            **self.final_metrics(results), **extra, "steps": step,
            "aggregator": self._run_config["aggregator"], "noise": self.reader.noise,
            "batch_size": self._run_config["batch_size"],
            "steps_per_epoch": self.reader.steps_per_epoch,
            "subset_sizes": {k: v["count"] for k, v in results.items()},
            "learned_examples": self.export(directory),
            "health": self.health.summary(step), provenance.FIELD: provenance.provenance()})
        files.write_json(os.path.join(directory, SUMMARY_FILE), summary)
        return summary

    def final_metrics(self, results: dict[str, dict]) -> dict[str, float]:
        """The memorization metrics of summary.json from an evaluation; a group
        absent from the data (every label corrupt, or none) gives NaN."""
        def get(group, key):
            return results.get(group, {}).get(key, float("nan"))
        return {"pristine_accuracy": get("pristine", "accuracy"),
                "corrupt_accuracy": get("corrupt", "accuracy"),
                "corrupt_true_label_accuracy": get("corrupt", "true_label_accuracy"),
                "mixed_accuracy": get("mixed", "accuracy"),
                "test_accuracy": get("test", "accuracy"),
                "test_top5_accuracy": get("test", "top5"),
                "adjusted_overfit": self.adjusted_overfit(results)}

    def observe(self, step: int, train_seconds: float) -> dict[str, dict]:
        """Evaluates at `step` (the subsets of `subsets_at`), updates the
        learning events, probes if within budget, and writes it all."""
        start = time.monotonic()
        results = self.evaluate(self.subsets_at(step))
        self._latest = (step, results)
        for group in self.ids:
            self.events.update(group, results[group]["correct"], step)
        self.seconds["eval"] += time.monotonic() - start
        probe = {}
        if self.probe and self._probe_share(train_seconds) <= self.config.probe_max_share:
            start = time.monotonic()
            probe = self.probe.measure()
            if self._probe_traced:
                self.seconds["probe"] += time.monotonic() - start
            self._probe_traced = True
        health = self.health.measure(step)
        with self.writer.as_default(step=step):
            self._write_eval(results)
            self._write_learning(step)
            if self.shown:
                write_plugin_tensor(tags.EXAMPLE_STATES, self.shown.states(results, self.events),
                                    step)
            shares = self.cost_shares(train_seconds)
            for tag, value in {**probe, **health, tags.EVAL_SHARE: shares["eval"],
                               tags.PROBE_SHARE: shares["probe"]}.items():
                tf.summary.scalar(tag, value)
        return results

    def _probe_share(self, train_seconds: float) -> float:
        total = train_seconds + self.seconds["eval"] + self.seconds["probe"]
        return self.seconds["probe"] / total if total > 0 else 0.0

    def cost_shares(self, train_seconds: float) -> dict[str, float]:
        """Shares of the run's time spent evaluating and probing."""
        total = max(train_seconds + sum(self.seconds.values()), 1e-9)
        return {"eval": self.seconds["eval"] / total, "probe": self.seconds["probe"] / total}

    def _write_eval(self, results: dict[str, dict], complete: dict | None = None) -> None:
        """Writes the subsets' `results`, and the adjusted overfit of those
        and the `complete` ones (default: the same) if they have the test split."""
        for name, r in results.items():
            for metric in ("accuracy", "true_label_accuracy", "loss", "top5"):
                if metric in r:
                    tf.summary.scalar(tags.eval_tag(name, metric), r[metric])
        overfit = self.adjusted_overfit(complete or results)
        if not np.isnan(overfit):
            tf.summary.scalar(tags.ADJUSTED_OVERFIT, overfit)

    def _write_learning(self, step: int) -> None:
        evaluated = [*self.schedule(step), step]  # the steps learning events can hold
        for group in self.ids:
            first, since, stayed = self.events.of(group)
            tf.summary.scalar(tags.learned_fraction_tag(group),
                              np.mean(first != metrics.NOT_LEARNED))
            tf.summary.scalar(tags.stayed_fraction_tag(group), stayed.mean())
            for tag, steps in ((tags.first_learned_tag(group), first),
                               (tags.learned_for_good_tag(group), since)):
                buckets = metrics.log_histogram(steps[steps != metrics.NOT_LEARNED], evaluated)
                write_histogram(tag, buckets, step,
                                f"{group} tracked examples, on log-spaced steps")

    # -- end of the run ------------------------------------------------------------

    def export(self, model_dir: str) -> dict[str, int]:
        """Writes the tracked examples' learning events, and (if configured) the
        ids of every training example the model classifies as its training label
        (learned) and of the others; returns the counts."""
        rows = [(eid.decode(), group, int(f), int(s), int(k))
                for group in self.ids
                for eid, f, s, k in zip(self.ids[group], *self.events.of(group))]
        files.write_atomically(os.path.join(model_dir, LEARNING_EVENTS), lambda f: (
            csv.writer(f).writerows([("example_id", "group", "first_learned_step",
                                      "learned_for_good_step", "stayed_learned"), *rows])))
        if not self.config.export_learned:
            return {}
        learned, not_learned = [], []
        for batch in self.reader.examples():
            correct = metrics.evaluate(self.net, [batch])["correct"]
            for eid, ok in zip(batch["example_id"].numpy(), correct):
                (learned if ok else not_learned).append(eid.decode())
        for name, ids in ((LEARNED_IDS, learned), (NOT_LEARNED_IDS, not_learned)):
            files.write_atomically(os.path.join(model_dir, name),
                                   lambda f, ids=ids: f.write("".join(i + "\n" for i in ids)))
        return {"learned": len(learned), "not_learned": len(not_learned)}
