"""Evaluation of the fixed subsets and the schedule of evaluations."""

import numpy as np
import tensorflow as tf

from cg_tf.gradients import example_losses


def eval_schedule(total_steps: int, steps_per_epoch: int) -> list[int]:
    """Log-spaced steps (1, 2, 4, ...) in the first epoch, then every epoch, and the end."""
    steps = {s for s in (2 ** np.arange(0, 40)) if s < min(steps_per_epoch, total_steps)}
    steps |= set(range(steps_per_epoch, total_steps + 1, steps_per_epoch))
    steps.add(total_steps)
    return sorted(int(s) for s in steps)


def evaluate(net, subset: tf.data.Dataset) -> dict[str, float]:
    """Accuracy and loss against the training label, and accuracy against the
    true label, of `net` on a batched evaluation subset."""
    totals = np.zeros(4)
    for batch in subset:
        totals += _eval_batch(net, batch["image"], batch["label"], batch["true_label"]).numpy()
    n = max(totals[3], 1.0)
    return {"accuracy": totals[0] / n, "true_label_accuracy": totals[1] / n,
            "loss": totals[2] / n, "count": int(totals[3])}


@tf.function(reduce_retracing=True)
def _eval_batch(net, images, labels, true_labels):
    logits = net(images, training=False)
    pred = tf.argmax(logits, -1, output_type=tf.int32)
    return tf.stack([tf.reduce_sum(tf.cast(pred == labels, tf.float32)),
                     tf.reduce_sum(tf.cast(pred == true_labels, tf.float32)),
                     tf.reduce_sum(example_losses(labels, logits)),
                     tf.cast(tf.shape(labels)[0], tf.float32)])
