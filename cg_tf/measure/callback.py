"""The memorization metrics as Keras callbacks, for any `fit`.

    reader = Reader.open("data/digits_noisy50", batch_size=100)
    model.fit(reader.train_dataset(), epochs=60, steps_per_epoch=reader.steps_per_epoch,
              callbacks=[MemorizationCallback(reader, "runs/mine")])

or, over arrays (cg_tf.data.arrays):

    noisy, _ = corrupt_labels(y, 0.5)
    model.fit(x, noisy, batch_size=100, epochs=60, callbacks=[MemorizationCallback(
        ArrayData(x, noisy, y, batch_size=100, test=(x_test, y_test)), "runs/mine")])

On the evaluation schedule (log-spaced steps, then every epoch or
`eval_every` steps, and the last step) a Monitor evaluates the reader's fixed
subsets (pristine, corrupt, mixed, test), tracks when each example is
learned, probes the gradients, and writes the summaries the Memorization tab
reads. `MonitorCallback` drives a given Monitor (the CLI trainer's, whose
learning events its checkpoints hold); `MemorizationCallback` builds one for
the model being fit, puts the accuracies into each epoch's logs and, at the
end, writes summary.json, the learning events and the learned-example
exports. Either works with a RobustModel (its net is measured, its aggregator
probed) or any Keras model that outputs logits (measured as plain SGD).
"""

import time

import keras
import tensorflow as tf

from cg_tf.data.arrays import ArrayData
from cg_tf.data.reader import Reader
from cg_tf.measure import tags
from cg_tf.measure.monitor import LAYOUT, Monitor, MonitorConfig
from cg_tf.robust.aggregators import Mean
from cg_tf.robust.gradients import DEFAULT_BN_MODE, example_losses
from cg_tf.storage import rundir



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

    data:       a Reader of the pipeline's records, or ArrayData over arrays
                (cg_tf.data.arrays): the evaluation subsets and batch size
    log_dir:    where the event files, summary.json and the exports go (one
                TensorBoard run); a directory holding an earlier run's is
                refused unless `overwrite`, which deletes only those files
    config:     evaluation schedule and probe (MonitorConfig)
    log_every:  steps between training loss/accuracy summaries

    A later `fit` of the same model with the same callback continues the same
    history (steps go on from where the last fit ended, as Keras' TensorBoard
    callback's do); another model's fit is refused.
    Each epoch's logs (fit's History, the progress bar) get the latest
    evaluation's pristine, corrupt and test accuracy; at the end `summary`
    holds the final metrics, also written to log_dir/summary.json.
    """

    def __init__(self, data: Reader | ArrayData, log_dir: str,
                 config: MonitorConfig = MonitorConfig(), log_every: int = 50,
                 overwrite: bool = False):
        super().__init__(log_every=log_every)
        self.reader, self.log_dir, self.config = data, log_dir, config
        if tf.io.gfile.exists(log_dir) and not tf.io.gfile.isdir(log_dir):
            raise ValueError(f"MemorizationCallback: log_dir={log_dir!r} is a file, not a "
                             "directory")
        self.overwrite = overwrite
        self.summary: dict | None = None
        self.measured = None  # the model of the first fit

    def on_train_begin(self, logs=None):
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if not steps:
            raise ValueError("MemorizationCallback needs the number of steps per epoch: pass "
                             "steps_per_epoch to fit (reader.steps_per_epoch for a reader's "
                             "endless train_dataset())")
        if self.measured is not None:
            if self.model is not self.measured:
                raise ValueError(f"MemorizationCallback: this callback measures the model of "
                                 f"its first fit into {self.log_dir}; give another model's fit "
                                 f"a callback of its own")
            self.total_steps = self.step + epochs * steps  # the same history, continued
            return
        earlier = rundir.survey(self.log_dir, LAYOUT)
        if earlier.ours and not self.overwrite:
            raise ValueError(f"MemorizationCallback: {self.log_dir} holds an earlier run's "
                             f"files ({rundir.listing(earlier.ours)}): use another log_dir, or "
                             "overwrite=True to delete them")
        rundir.clear(earlier)
        net = getattr(self.model, "net", self.model)
        monitor = Monitor(net, self.reader, getattr(self.model, "aggregator", Mean()),
                          self.reader.batch_size, self.config,
                          tf.summary.create_file_writer(self.log_dir),
                          bn_mode=getattr(self.model, "bn_mode", DEFAULT_BN_MODE),
                          chunk=getattr(self.model, "per_example_chunk", None),
                          loss=getattr(getattr(self.model, "source", None), "loss", example_losses))
        monitor.write_run_config({"model": net.name}, self.log_dir, steps=epochs * steps)
        self.attach(monitor, epochs * steps)
        self.measured = self.model

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.results:
            logs.update(epoch_metrics(self.results))

    def on_train_end(self, logs=None):
        # Stopped early (not at a scheduled step): measure the end.
        if self.step and not self.monitor.is_scheduled(self.step, self.total_steps):
            self.results = self.monitor.observe(self.step, self.train_seconds)
        if self.step:
            self.summary = self.monitor.write_summary(self.step, self.log_dir)
        self.monitor.writer.flush()


def epoch_metrics(results: dict[str, dict]) -> dict[str, float]:
    """An evaluation's accuracies as fit's logs name them: pristine_accuracy,
    corrupt_accuracy (against the noisy labels), corrupt_true_label_accuracy,
    test_accuracy (those the data have)."""
    out = {f"{g}_accuracy": r["accuracy"] for g, r in results.items() if g != "mixed"}
    if "corrupt" in results:
        out["corrupt_true_label_accuracy"] = results["corrupt"]["true_label_accuracy"]
    return out
