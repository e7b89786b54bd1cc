"""The memorization metrics as Keras callbacks, for any `fit`.

    reader = Reader.open("data/digits_noisy50", batch_size=100)
    model.fit(reader.train_dataset(), epochs=60, steps_per_epoch=reader.steps_per_epoch,
              callbacks=[MemorizationCallback(reader, "runs/mine")])

On the evaluation schedule (log-spaced steps, then every epoch or
`eval_every` steps, and the last step) a Monitor evaluates the reader's fixed
subsets (pristine, corrupt, mixed, test), tracks when each example is
learned, probes the gradients, and writes the summaries the Memorization tab
reads. `MonitorCallback` drives a given Monitor (the CLI trainer's, whose
learning events its checkpoints hold); `MemorizationCallback` builds one for
the model being fit and, at the end, writes the learning events and the
learned-example exports. Either works with a RobustModel (its net is measured,
its aggregator probed) or any Keras model that outputs logits (measured as
plain SGD).
"""

import time

import keras
import tensorflow as tf

from cg_tf.data.reader import Reader
from cg_tf.measure import tags
from cg_tf.measure.monitor import Monitor, MonitorConfig
from cg_tf.robust.aggregators import Mean
from cg_tf.robust.gradients import DEFAULT_BN_MODE, example_losses


class MonitorCallback(keras.callbacks.Callback):
    """Drives `monitor` from fit, for a run of `total_steps` global steps that
    starts at `start_step` (a resumed run): the training loss, accuracy and
    learning rate every `log_every` steps, the monitor's observations at its
    scheduled steps. `train_seconds` is the time fit spent in train steps."""

    def __init__(self, monitor: Monitor | None = None, total_steps: int | None = None,
                 start_step: int = 0, log_every: int = 50):
        super().__init__()
        self.log_every = log_every
        if monitor is not None:
            self.attach(monitor, total_steps, start_step)

    def attach(self, monitor: Monitor, total_steps: int, start_step: int = 0) -> None:
        self.monitor, self.total_steps = monitor, total_steps
        self.step, self.train_seconds = start_step, 0.0
        self.results: dict[str, dict] = {}  # of the last evaluation

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        self.train_seconds += time.monotonic() - self._started
        self.step += 1
        logs = logs or {}
        if self.step % self.log_every == 0 or self.step == self.total_steps:
            with self.monitor.writer.as_default(step=self.step):
                for tag, key in ((tags.TRAIN_LOSS, "loss"), (tags.TRAIN_ACCURACY, "accuracy")):
                    if key in logs:
                        tf.summary.scalar(tag, float(logs[key]))
                tf.summary.scalar(tags.LEARNING_RATE, float(
                    tf.convert_to_tensor(self.model.optimizer.learning_rate)))
        if self.monitor.is_scheduled(self.step, self.total_steps):
            self.results = self.monitor.observe(self.step, self.train_seconds)


class MemorizationCallback(MonitorCallback):
    """Writes the memorization metrics of the model being fit to `log_dir`.

    reader:     the dataset's reader (its evaluation subsets and batch size)
    log_dir:    where the event files and exports go (one TensorBoard run)
    config:     evaluation schedule and probe (MonitorConfig)
    log_every:  steps between training loss/accuracy summaries
    """

    def __init__(self, reader: Reader, log_dir: str, config: MonitorConfig = MonitorConfig(),
                 log_every: int = 50):
        super().__init__(log_every=log_every)
        self.reader, self.log_dir, self.config = reader, log_dir, config

    def on_train_begin(self, logs=None):
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if not steps:
            raise ValueError("MemorizationCallback needs the number of steps per epoch: pass "
                             "steps_per_epoch to fit (reader.steps_per_epoch for a reader's "
                             "endless train_dataset())")
        net = getattr(self.model, "net", self.model)
        monitor = Monitor(net, self.reader, getattr(self.model, "aggregator", Mean()),
                          self.reader.config.batch_size, self.config,
                          tf.summary.create_file_writer(self.log_dir),
                          bn_mode=getattr(self.model, "bn_mode", DEFAULT_BN_MODE),
                          chunk=getattr(self.model, "per_example_chunk", None),
                          loss=getattr(getattr(self.model, "source", None), "loss", example_losses))
        monitor.write_run_config({"model": net.name})
        self.attach(monitor, epochs * steps)

    def on_train_end(self, logs=None):
        # Stopped early (not at a scheduled step): measure the end.
        if self.step and not self.monitor.is_scheduled(self.step, self.total_steps):
            self.results = self.monitor.observe(self.step, self.train_seconds)
        if self.step:
            self.monitor.export(self.log_dir)
        self.monitor.writer.flush()
