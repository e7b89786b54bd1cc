"""A run's event files cut back to the step it resumes from, and read back.

A run killed after its last checkpoint has written events past it; the run
resumed from that checkpoint writes those steps again. TensorBoard would show
both histories on one curve (event files of version 2 are purged only by a
SessionLog, which tf.summary does not write), so before a resumed run writes
anything, every event past its step is removed from the files it wrote.
"""

import os

import tensorflow as tf
from tensorboard.compat.proto import event_pb2

EVENT_FILES = "events.out.tfevents.*"  # tf.summary's names
_PARTIAL = ".cut-events.tmp"  # no "tfevents" in it: TensorBoard never reads it


def _records(path: str) -> list[bytes]:
    """The file's complete records (a kill can leave the last one cut short)."""
    data = tf.data.TFRecordDataset(path).ignore_errors()
    return [r.numpy() for r in data]


def cut_after(log_dir: str, step: int) -> int:
    """Removes every event of a step after `step` from the event files in
    `log_dir`; returns how many. Each changed file is rewritten beside itself
    and renamed over the old one, so an interruption leaves either."""
    removed = 0
    partial = os.path.join(log_dir, _PARTIAL)
    if tf.io.gfile.exists(partial):
        tf.io.gfile.remove(partial)
    for path in sorted(tf.io.gfile.glob(os.path.join(log_dir, EVENT_FILES))):
        records = _records(path)
        kept = [r for r in records if event_pb2.Event.FromString(r).step <= step]
        if len(kept) == len(records):
            continue
        with tf.io.TFRecordWriter(partial) as writer:
            for r in kept:
                writer.write(r)
        tf.io.gfile.rename(partial, path, overwrite=True)
        removed += len(records) - len(kept)
    return removed


def scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every scalar `tag` in the event files of `log_dir`."""
    out = []
    for path in sorted(tf.io.gfile.glob(os.path.join(log_dir, EVENT_FILES))):
        for record in _records(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.tag == tag:
                    number = (tf.make_ndarray(value.tensor) if value.HasField("tensor")
                              else value.simple_value)
                    out.append((event.step, float(number)))
    return out
