"""The training loop: strategy, data, model, checkpoints, summaries, summary.json.

`Trainer(config).run()` resumes from the last checkpoint in `config.model_dir` if there
is one (model, optimizer, aggregator state and step), so a killed run rerun
with the same command continues; with `deterministic` it ends with the same
weights as an uninterrupted run.

A run holds its directory's lock (cg_tf.storage.lock) from its first write to its
last, and records at the start, in config.json, what makes its result: the
config without its execution-only fields (`EXECUTION_FIELDS`: where and how
fast it runs; the pipeline's stage fingerprints leave out the same) and what
its dataset is. A resume with another such configuration is refused, naming
every differing field, unless `overwrite`, which starts the run over (deleting
only what a run writes). A finished run (summary.json written) is left exactly
as it is: `run()` returns its summary and sets `complete`.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import signal
import threading
import time

import keras
import tensorflow as tf

from cg_tf import provenance
from cg_tf.data import records
from cg_tf.data.reader import InputConfig, InputOptions, Reader, distribute, output_shape
from cg_tf.measure import monitor
from cg_tf.measure.callback import MonitorCallback
from cg_tf.measure.monitor import Monitor, MonitorConfig
from cg_tf.options import option
from cg_tf.robust import aggregators, layer_filter
from cg_tf.robust.aggregators import Aggregator, Mean
from cg_tf.robust.gradients import BN_MODES, DEFAULT_BN_MODE, check_bn_mode, check_chunk
from cg_tf.storage import events, files, lock, rundir
from cg_tf.training.models import FC_INITS, MODELS, build_model, clamp_kernel_norms, describe
from cg_tf.training.robust_model import (FLAGS, Names, NonFiniteLoss, RobustModel, check_layout,
                                         optimizer_momentum, robust_layers)
from cg_tf.training.strategies import STRATEGIES, get_strategy

LR_SCHEDULES = ("constant", "step", "cosine")
# --optimizer: name -> the Keras optimizer of a learning rate (or schedule) and --momentum.
OPTIMIZERS = {
    "sgd": lambda lr, momentum: keras.optimizers.SGD(lr, momentum=momentum),
    "adam": lambda lr, momentum: keras.optimizers.Adam(lr),
}
# Where and how fast a run goes, not what it computes: these may change on resume.
EXECUTION_FIELDS = ("data_dir", "model_dir", "strategy", "tpu", "checkpoint_every", "log_every",
                    "jit_compile")
CONFIG_FILE = "config.json"
SUMMARY_FILE = monitor.SUMMARY_FILE
CHECKPOINTS = "checkpoints"
KEPT = 2  # checkpoints kept: the newest, and the one before it in case it is damaged


# More steps (or epochs) than any run takes: past it, a typo.
MAX_STEPS = 10 ** 9


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run: every option of `python -m cg_tf.train` (its flags are
    these fields; the monitor's fields are flags too)."""

    data_dir: str = option(help="Dataset made by pipelines.noisy_labels.")
    model_dir: str = option(help="Checkpoints, event files, config.json and summary.json; "
                            "one process at a time.")
    model: str = option("fc", f"One of {', '.join(MODELS)}.")
    fc_widths: tuple[int, ...] = option((2048,), "Hidden layer widths of the fc model.")
    init: str = option("keras", "Kernel initializer of the fc model: keras (Glorot uniform) or "
                       "authors (N(0, 1) x 2 / sqrt(fan_in + fan_out), the Coherent Gradients "
                       "code's); biases start at zero under both.")
    aggregator: Aggregator = option(
        Mean(), "How the batch's gradients are aggregated: name or name:value, one of "
        f"{', '.join(aggregators.REGISTRY)} (winsorized:4 clips 4 values per side, "
        "trimmed:4 drops them, median_of_means:3 is M3).",
        parse=aggregators.parse, show=lambda a: a.spec)
    per_example_chunk: int | None = option(
        None, "Per-example gradients computed this many at a time (memory bound).")
    bn_mode: str = option(DEFAULT_BN_MODE, f"One of {', '.join(BN_MODES)}.")
    weight_decay: float = option(0.0, "L2 weight decay added to the gradient.")
    clamp_norms: bool = option(False, "After every update, rescale each kernel (dense and conv "
                               "weights) to its norm at the start: a control experiment for "
                               "weight growth (biases stay free).")
    batch_size: int = option(100, "Global batch size.")
    epochs: int = option(10, "Training epochs (ignored if --steps is set).")
    steps: int | None = option(None, "Training steps (overrides --epochs).")
    optimizer: str = option("sgd", f"One of {', '.join(OPTIMIZERS)} (Keras' defaults but the "
                            "learning rate and, for sgd, --momentum).")
    learning_rate: float = option(0.1, "Base learning rate (never rescaled).")
    momentum: float = option(0.0, "SGD momentum (--optimizer=sgd).")
    lr_schedule: str = option("constant", f"One of {', '.join(LR_SCHEDULES)}.")
    lr_decay_epochs: tuple[int, ...] = option((), "Epochs at which the step schedule decays.")
    lr_decay_factor: float = option(0.1, "Decay factor of the step schedule.")
    seed: int = option(0, "Seed of the weights and the data order.")
    strategy: str = option("default", f"One of {', '.join(STRATEGIES)}.")
    tpu: str | None = option(None, "TPU name or address for --strategy=tpu.")
    jit_compile: bool = option(False, "XLA-compile the train step.")
    mixed_precision: bool = option(False, "Compute in bfloat16 (variables stay float32).")
    deterministic: bool = option(False, "Seeded op determinism (reproducible resume).")
    checkpoint_every: int = option(200, "Steps between checkpoints.")
    log_every: int = option(50, "Steps between training summaries (and progress lines, at "
                                "most one per 10 s).")
    input: InputOptions = InputOptions()
    monitor: MonitorConfig = MonitorConfig()

    def __post_init__(self):
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be an integer from 0 to 2**32 - 1, got {self.seed}")
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.init not in FC_INITS:
            raise ValueError(f"--init must be one of {', '.join(FC_INITS)}, got {self.init!r}")
        if self.init != "keras" and self.model != "fc":
            raise ValueError(f"--init={self.init} applies to the fc model, not {self.model}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, "
                             f"got {self.strategy!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"--momentum applies to --optimizer=sgd, not {self.optimizer} "
                             "(which has its own)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        if self.lr_schedule == "step" and not self.lr_decay_epochs:
            raise ValueError("--lr_schedule=step needs --lr_decay_epochs")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight_decay must be 0 or positive, got {self.weight_decay}")
        if not (math.isfinite(self.lr_decay_factor) and self.lr_decay_factor > 0):
            raise ValueError(f"--lr_decay_factor must be positive, got {self.lr_decay_factor}")
        for name, most in (("steps", MAX_STEPS), ("epochs", MAX_STEPS)):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= most:
                raise ValueError(f"--{name} must be between 1 and {most:,}, got {value}")
        if self.data_dir and self.model_dir and _within(self.model_dir, self.data_dir):
            raise ValueError(f"--model_dir={self.model_dir} is inside --data_dir="
                             f"{self.data_dir}: a run's files would mix with the dataset's")
        if self.jit_compile and self.deterministic:
            raise ValueError("--jit_compile and --deterministic together: under op determinism "
                             "Keras trains without XLA; choose one")
        check_bn_mode(self.bn_mode)
        check_chunk(self.per_example_chunk)
        for name in ("batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")


def make_optimizer(config: TrainConfig, lr) -> keras.optimizers.Optimizer:
    """The run's optimizer with learning rate (or schedule) `lr`."""
    return OPTIMIZERS[config.optimizer](lr, config.momentum)


def check_layer_filter(config: TrainConfig, image_shape, num_classes: int,
                       flag: str = "--aggregator") -> None:
    """The aggregator's layer filter against the run's model (built for this
    alone, before any work), as the trainer checks it: it must find the
    model's output layer and leave some layer to aggregate robustly."""
    if config.aggregator.layers != layer_filter.ALL:
        shape = output_shape(image_shape, config.input.image_size, "the source")
        net = build_model(config.model, shape, num_classes, config.fc_widths, config.init)
        robust_layers(config.aggregator, net, dataclasses.replace(FLAGS, aggregator=flag))


def flag_names(config: TrainConfig, optimizer, flag: str = "--aggregator") -> Names:
    """What the run's settings are called on the command line, for RobustModel's
    errors: the aggregator's flag, and the optimizer's momentum as --momentum
    (sgd) or as the --optimizer flag's (Adam's beta_1)."""
    attribute = optimizer_momentum(optimizer)[1].split()[-1:]
    momentum = "--momentum" if config.optimizer == "sgd" or not attribute \
        else f"--optimizer={config.optimizer}, whose {attribute[0]}"
    return dataclasses.replace(FLAGS, aggregator=flag, momentum=momentum)


def check_run_layout(config: TrainConfig, replicas: int, flag: str = "--aggregator") -> None:
    """The rule RobustModel.check applies (robust_model.check_layout), before
    there is a model: a sweep's or easy/hard's check of every run it will
    make, before any of them starts."""
    optimizer = make_optimizer(config, config.learning_rate)  # what it is, not built
    check_layout(config.aggregator, config.batch_size, replicas,
                 optimizer_momentum(optimizer)[0], config.per_example_chunk,
                 flag_names(config, optimizer, flag))


def _within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it (local paths resolved, URLs as written)."""
    if "://" not in path + folder:
        path, folder = os.path.realpath(path), os.path.realpath(folder)
    path, folder = path.rstrip("/") + "/", folder.rstrip("/") + "/"
    return path.startswith(folder)


def run_params(config: TrainConfig) -> dict:
    """The parts of a training config that change its result (JSON values)."""
    d = json.loads(json.dumps({**dataclasses.asdict(config),
                               "aggregator": config.aggregator.to_json()}))
    d["monitor"] = {k: v for k, v in d["monitor"].items()
                    if k not in MonitorConfig.EXECUTION_FIELDS}
    return {k: v for k, v in d.items() if k not in EXECUTION_FIELDS}


def dataset_identity(info: records.DatasetInfo) -> dict:
    """What a dataset is, wherever it (or its source) lies, and its shard layout
    (the reader interleaves the shards: the layout decides the training order)."""
    return {"source_fingerprint": info.source_fingerprint, "noise": info.noise,
            "examples": {k: v.num_examples for k, v in info.splits.items()},
            "shards": {k: v.num_shards for k, v in info.splits.items()}}


# A training run's directory: what its monitor writes, its checkpoints and
# config.json (the record a resume is compared with); summary.json marks it
# complete (cg_tf.storage.rundir).
RUN_NAMES = rundir.Names(monitor.RUN_NAMES.exact | {CHECKPOINTS, CONFIG_FILE},
                         monitor.RUN_NAMES.globs)
LAYOUT = rundir.Layout(owns=lambda _directory, _record: RUN_NAMES, record=CONFIG_FILE,
                       done=SUMMARY_FILE)


def learning_rate(config: TrainConfig, steps_per_epoch: int, total_steps: int):
    lr = config.learning_rate
    if config.lr_schedule == "constant":
        return lr
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, total_steps)
    boundaries = [e * steps_per_epoch for e in config.lr_decay_epochs]
    values = [lr * config.lr_decay_factor ** i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def _reader(config: TrainConfig) -> Reader:
    try:
        return Reader(InputConfig(config.data_dir, config.batch_size, config.seed, config.input))
    except records.DatasetError as e:
        raise ValueError(f"--data_dir: {e}") from e


class RunCounters(keras.callbacks.Callback):
    """A run's step and wall-clock counters (checkpointed) and a progress line
    at a multiple of `log_every` steps at most every LOG_SECONDS, and at the end.
    (A non-finite loss stops fit before this sees its step.)"""

    LOG_SECONDS = 10.0  # a line a person can follow, not one per 50 fast steps

    def __init__(self, trainer: "Trainer", start: int):
        super().__init__()
        self.trainer, self.step, self.loss = trainer, start, float("nan")

    def on_train_begin(self, logs=None):
        self.begin = time.monotonic()
        self.last_log = (self.begin - self.LOG_SECONDS, self.step)  # (time, step)
        self.wall0 = float(self.trainer.wall)

    def on_train_batch_end(self, batch, logs=None):
        t, cfg = self.trainer, self.trainer.config
        step = self.step = self.step + 1
        self.loss = float(logs["loss"])
        t.step.assign(step)
        t.wall.assign(self.wall0 + time.monotonic() - self.begin)
        now, (then, then_step) = time.monotonic(), self.last_log
        if then_step == step - 1 and then < self.begin:  # this attempt's first step
            logging.info("step %d done %.1f s after the trainer started (opening the data, "
                         "building the model, restoring, compiling the step)", step,
                         now - t.created)
        if (step % cfg.log_every == 0 and now - then >= self.LOG_SECONDS
                or step == t.total_steps):
            rate = (step - then_step) / max(now - max(then, self.begin), 1e-9)
            self.last_log = (now, step)
            logging.info("step %d/%d: batch loss %.3f, batch accuracy %.3f (against the "
                         "training labels), %.1f steps/s", step, t.total_steps, self.loss,
                         float(logs["accuracy"]), rate)


class Terminated(Exception):
    """The run stopped at a signal, after saving a checkpoint; `exit_code` is
    the shell's for that signal (128 + its number)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class Termination:
    """While active, the signals that ask a run to stop (SIGTERM: a scheduler's
    or a preemptible VM's first notice; SIGINT: Ctrl-C; SIGHUP: the terminal
    closed) are noted, for the run to checkpoint and stop at the next step's end."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.requested: signal.Signals | None = None

    @contextlib.contextmanager
    def active(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers belong to the main thread
            return
        previous = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _note(self, signum, frame):
        self.requested = signal.Signals(signum)


class Checkpoints(keras.callbacks.Callback):
    """A checkpoint every `checkpoint_every` steps and at the last, while the
    run still holds its directory."""

    def __init__(self, trainer: "Trainer", counters: RunCounters, measure: MonitorCallback,
                 held: lock.Lock):
        super().__init__()
        self.trainer, self.counters, self.measure, self.held = trainer, counters, measure, held

    def on_train_batch_end(self, batch, logs=None):
        t, step = self.trainer, self.counters.step
        stop = t.termination.requested
        if step % t.config.checkpoint_every == 0 or step == t.total_steps or stop:
            self.held.check()
            t.check_dataset(step)
            t.keep_clock(self.counters.loss, self.measure.train_seconds)
            t.manager.save(checkpoint_number=step)
        if stop:
            t.writer.flush()
            raise Terminated(f"stopped by {stop.name} at step {step}: its checkpoint is saved; "
                             "rerun the same command to resume", stop)


def name_latest(directory: str, path: str) -> None:
    """Rewrites a checkpoint directory's state to name `path` (a checkpoint in
    it) alone, as the latest, with the timestamp without which TensorFlow's
    CheckpointManager lists nothing."""
    tf.compat.v1.train.update_checkpoint_state(
        os.path.abspath(directory), os.path.basename(path), [os.path.basename(path)],
        all_model_checkpoint_timestamps=[time.time()])


class Trainer:
    """Builds everything a run needs (writing nothing); `run()` trains to the end."""

    def __init__(self, config: TrainConfig, overwrite: bool = False):
        self.config, self.overwrite = config, overwrite
        self.created = time.monotonic()  # the start, for the time to the first step
        self.complete = False  # set by run() if the run had finished before
        self.termination = Termination()
        # First: multi-worker collectives must be configured before any TF op runs.
        self.strategy = get_strategy(config.strategy, config.tpu)
        keras.utils.set_random_seed(config.seed)
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.mixed_precision.set_global_policy(
            "mixed_bfloat16" if config.mixed_precision else "float32")
        replicas = self.strategy.num_replicas_in_sync
        self.reader = _reader(config)
        spe = self.reader.steps_per_epoch
        self.total_steps = config.steps or config.epochs * spe
        self.architecture = describe(config.model, self.reader.image_shape,
                                     self.reader.num_classes, config.fc_widths)
        with self.strategy.scope():
            net = build_model(config.model, self.reader.image_shape, self.reader.num_classes,
                              config.fc_widths, config.init)
            if config.clamp_norms:
                clamp_kernel_norms(net)
            self.optimizer = make_optimizer(config, learning_rate(config, spe, self.total_steps))
            self.model = RobustModel(net, config.aggregator,
                                     per_example_chunk=config.per_example_chunk,
                                     bn_mode=config.bn_mode, weight_decay=config.weight_decay,
                                     names=flag_names(config, self.optimizer))
            self.model.compile(optimizer=self.optimizer, jit_compile=config.jit_compile)
            # The one check of the batch layout and the optimizer (the one fit
            # makes of a tf.data.Dataset), before the run writes anything.
            self.model.check(config.batch_size, replicas)
            self.optimizer.build(net.trainable_variables)
        # Host-side counters, outside the strategy (no replicas to mirror them on).
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.wall = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="wall_seconds")
        self.train_seconds = 0.0  # in train steps, over the run's processes (by _train)
        # What the summary reports of the steps before a resume: the last loss
        # and the seconds spent training, evaluating and probing.
        self.clock = {name: tf.Variable(value, dtype=tf.float64, trainable=False, name=name)
                      for name, value in (("last_loss", float("nan")), ("train_seconds", 0.0),
                                          ("eval_seconds", 0.0), ("probe_seconds", 0.0))}
        self.writer = None  # opened by run(), holding the directory
        self.monitor = Monitor(net, self.reader, config.aggregator, config.batch_size,
                               config.monitor, self.writer, bn_mode=config.bn_mode,
                               chunk=config.per_example_chunk)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              step=self.step, wall_seconds=self.wall,
                                              learning_events=self.monitor.events,
                                              weight_norms_at_start=self.monitor.health.start,
                                              **self.clock)
        self.manager: tf.train.CheckpointManager | None = None  # by restore()

    def keep_clock(self, loss: float, train_seconds: float) -> None:
        """Puts the last loss and the seconds so far in the next checkpoint."""
        for name, value in (("last_loss", loss), ("train_seconds", train_seconds),
                            ("eval_seconds", self.monitor.seconds["eval"]),
                            ("probe_seconds", self.monitor.seconds["probe"])):
            self.clock[name].assign(value)

    def check_dataset(self, step: int) -> None:
        """Raises DatasetError if the dataset is no longer the one the run opened
        (rebuilt, or being rebuilt, under it): what the run read since may be
        either, and its records would describe the old one."""
        data_dir = self.config.data_dir
        try:
            changed = records.load_info(data_dir).to_json() != self.reader.info.to_json()
        except records.DatasetError as e:
            changed, why = True, str(e)
        else:
            why = f"its {records.INFO_FILE} changed"
        if changed:
            raise records.DatasetError(
                f"--data_dir={data_dir} was rebuilt while this run read it ({why}); the run "
                f"stops at step {step} without a checkpoint of it: start it over on the new "
                "data with --overwrite")

    def restore(self) -> int:
        """Restores the directory's last checkpoint, if any; returns its step."""
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self.config.model_dir, CHECKPOINTS), max_to_keep=KEPT)
        # Newest first; a damaged one (a flipped byte, a cut-short index) gives
        # way to the one before it.
        paths = self._checkpoints()
        for path in paths:
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except AssertionError as e:  # e.g. state an older cg_tf did not checkpoint
                raise ValueError(
                    f"{path} does not hold this version's run state ({str(e)[:300]}); "
                    "start the run over with --overwrite") from None
            except (tf.errors.DataLossError, tf.errors.NotFoundError,
                    tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
                logging.warning("checkpoint %s is damaged (%s): trying the one before it",
                                path, str(e).splitlines()[0][:200])
                continue
            if path not in self.manager.checkpoints:
                self._adopt(path)
            logging.info("resumed from %s at step %d", path, int(self.step))
            return int(self.step)
        if paths:
            raise ValueError(f"every checkpoint in {self.manager.directory} is damaged; start "
                             "the run over with --overwrite")
        return int(self.step)

    def _checkpoints(self) -> list[str]:
        """The directory's checkpoints, newest first: every ckpt-<step> it holds,
        not only those its state file lists. TensorFlow's manager lists none
        from a state file without timestamps (as a copy made by hand or by
        another tool may be), and the run would start over beside them."""
        directory = self.manager.directory
        names = [os.path.basename(p) for p in
                 tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index"))
                 + self.manager.checkpoints]
        steps = {int(m.group(1)) for m in (re.fullmatch(r"ckpt-(\d+)(\.index)?", n)
                                           for n in names) if m}
        return [os.path.join(directory, f"ckpt-{step}") for step in sorted(steps, reverse=True)]

    def _adopt(self, path: str) -> None:
        """Makes a checkpoint the manager did not list its own, so that it is
        the latest and is deleted in turn."""
        name_latest(self.manager.directory, path)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.manager.directory,
                                                  max_to_keep=KEPT)

    def run(self) -> dict:
        """Trains to the end holding the run directory; returns the summary (a
        finished run's as it is, with `complete` set)."""
        with lock.hold(self.config.model_dir, "training") as held:
            finished = self._claim_directory()
            if finished is not None:
                self.complete = True
                logging.info("%s is complete; nothing to do", self.config.model_dir)
                return finished
            return self._train(held)

    def _claim_directory(self) -> dict | None:
        """Checks the directory's recorded configuration against this one (and
        records it if new); returns the summary of a finished run."""
        model_dir = self.config.model_dir
        record = {**run_params(self.config), "dataset": dataset_identity(self.reader.info)}
        found = rundir.survey(model_dir, LAYOUT)
        diff = [] if found.record is None else rundir.mismatch(found.record, record)
        if diff and not self.overwrite:
            raise rundir.RunDirError(
                f"{model_dir} holds a run with another configuration ({'; '.join(diff)}); "
                f"use another --model_dir, or --overwrite to start it over")
        if diff:
            logging.warning("--overwrite: starting %s over (%s)", model_dir, "; ".join(diff))
            rundir.clear(found)
            found = rundir.survey(model_dir, LAYOUT)
        if found.complete:
            return files.read_json(os.path.join(model_dir, SUMMARY_FILE))
        if found.record is None:
            files.write_json(os.path.join(model_dir, CONFIG_FILE),
                             {**record, provenance.FIELD: provenance.provenance()})
        return None

    def _train(self, held: lock.Lock) -> dict:
        """Keras' fit from the restored step to the end, with the run's callbacks:
        its counters and log lines, the monitor, the checkpoints (fit's own
        stop at a non-finite loss runs before them, reworded here)."""
        cfg = self.config
        start = self.restore()
        if start:
            # What the interrupted attempt logged past its last checkpoint is
            # logged again from here: one history per curve.
            removed = events.cut_after(cfg.model_dir, start)
            if removed:
                logging.info("removed %d events past step %d from the event files", removed, start)
        self.writer = self.monitor.writer = tf.summary.create_file_writer(cfg.model_dir)
        if start == 0:
            # The dataset's source names it in figures; steps per epoch put
            # runs of other batch sizes on one (epoch) axis.
            self.monitor.write_run_config({"model": cfg.model, "architecture": self.architecture,
                                           "learning_rate": cfg.learning_rate,
                                           "data_dir": cfg.data_dir,
                                           "source": self.reader.info.source,
                                           "steps_per_epoch": self.reader.steps_per_epoch,
                                           "clamp_norms": cfg.clamp_norms},
                                          cfg.model_dir, seed=cfg.seed, steps=self.total_steps)
        logging.info("training %s with %s for %d steps (%d per epoch) on %d replica(s)",
                     cfg.model, cfg.aggregator.spec, self.total_steps,
                     self.reader.steps_per_epoch, self.strategy.num_replicas_in_sync)
        run = RunCounters(self, start)
        run.loss = float(self.clock["last_loss"])
        self.monitor.seconds = {k: float(self.clock[f"{k}_seconds"]) for k in ("eval", "probe")}
        measure = MonitorCallback(self.monitor, self.total_steps, start, cfg.log_every)
        measure.train_seconds = float(self.clock["train_seconds"])
        if start < self.total_steps:
            # Endless: fit takes the steps it is told to.
            data = distribute(lambda part: self.reader.train_dataset(start, part=part),
                              self.strategy, cfg.batch_size)
            with self.termination.active():
                try:
                    self.model.fit(data, epochs=1, steps_per_epoch=self.total_steps - start,
                                   verbose=0, shuffle=False,  # the reader orders the batches
                                   callbacks=[run, measure, Checkpoints(self, run, measure, held)])
                except NonFiniteLoss as e:  # no callback saw that step
                    last = self.manager.latest_checkpoint or "none yet"
                    raise NonFiniteLoss(f"loss is {e.loss} at step {run.step + 1}; stopped. The "
                                        f"last good checkpoint ({last}) is intact.",
                                        e.loss) from None
        self.train_seconds = measure.train_seconds
        self.writer.flush()
        held.check()
        return self.finish(run.loss)

    def finish(self, final_loss: float) -> dict:
        # The last step is scheduled: its evaluation is the monitor's latest.
        return self.monitor.write_summary(
            int(self.step), self.config.model_dir, final_loss=final_loss,
            wall_seconds=float(self.wall), model=self.config.model,
            architecture=self.architecture, data_dir=self.config.data_dir,
            time_shares=self.monitor.cost_shares(self.train_seconds))
