"""The memorization metrics as a Keras callback, for any `fit`.

    reader = Reader(InputConfig("data/digits_noisy50", batch_size=100))
    model.fit(reader.train_dataset(), epochs=60, steps_per_epoch=reader.steps_per_epoch,
              callbacks=[MemorizationCallback(reader, "runs/mine")])

On the evaluation schedule of the CLI trainer (log-spaced steps, then every
epoch or `eval_every` steps, and the last step) it evaluates the reader's
fixed subsets (pristine, corrupt, mixed, test), tracks when each example is
learned, probes the gradients, and writes the same summaries to `log_dir`
(so the Memorization tab shows the run beside the CLI's); at the end it
writes the learning events and the learned-example exports there. Works with
a RobustModel (its net is measured, its aggregator probed) or any Keras model
that outputs logits (measured as plain SGD).
"""

import time

import keras
import tensorflow as tf

from cg_tf.data.reader import Reader
from cg_tf.measure import tags
from cg_tf.measure.monitor import Monitor, MonitorConfig
from cg_tf.robust.aggregators import Mean


class MemorizationCallback(keras.callbacks.Callback):
    """Writes the memorization metrics of the model being fit to `log_dir`.

    reader:     the dataset's reader (its evaluation subsets and batch size)
    log_dir:    where the event files and exports go (one TensorBoard run)
    config:     evaluation schedule and probe (MonitorConfig)
    log_every:  steps between training loss/accuracy summaries
    """

    def __init__(self, reader: Reader, log_dir: str, config: MonitorConfig = MonitorConfig(),
                 log_every: int = 50):
        super().__init__()
        self.reader, self.log_dir, self.config, self.log_every = reader, log_dir, config, log_every
        self.monitor: Monitor | None = None
        self.results: dict[str, dict] = {}  # of the last evaluation

    def on_train_begin(self, logs=None):
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if not steps:
            raise ValueError("MemorizationCallback needs the number of steps per epoch: pass "
                             "steps_per_epoch to fit (reader.steps_per_epoch for a reader's "
                             "endless train_dataset())")
        net = getattr(self.model, "net", self.model)
        aggregator = getattr(self.model, "aggregator", Mean())
        self.writer = tf.summary.create_file_writer(self.log_dir)
        self.monitor = Monitor(net, self.reader, aggregator, self.reader.config.batch_size,
                               self.config, self.writer,
                               chunk=getattr(self.model, "per_example_chunk", None))
        self.total_steps = epochs * steps
        self.schedule = set(self.monitor.schedule(self.total_steps))
        self.monitor.write_run_config({"model": net.name})
        self.step, self.train_seconds = 0, 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        self.train_seconds += time.monotonic() - self._started
        self.step += 1
        logs = logs or {}
        if self.step % self.log_every == 0 and "loss" in logs:
            with self.writer.as_default(step=self.step):
                tf.summary.scalar(tags.TRAIN_LOSS, float(logs["loss"]))
                if "accuracy" in logs:
                    tf.summary.scalar(tags.TRAIN_ACCURACY, float(logs["accuracy"]))
        if self.step in self.schedule:
            self.results = self.monitor.observe(self.step, self.train_seconds)

    def on_train_end(self, logs=None):
        if self.step and self.step not in self.schedule:  # stopped early: measure the end
            self.results = self.monitor.observe(self.step, self.train_seconds)
        if self.step:
            self.monitor.export(self.log_dir)
        self.writer.flush()
