"""Memorization metrics (docs/reference.md, "Memorization metrics"): the math as small pure
functions, the evaluation of a fixed subset, and the evaluation schedule."""

import functools

import numpy as np
import tensorflow as tf

from cg_tf.robust.gradients import example_losses

NOT_LEARNED = -1


def eval_schedule(total_steps: int, steps_per_epoch: int, every: int | None = None,
                  log_spaced: bool = True) -> list[int]:
    """Log-spaced steps (1, 2, 4, ...) before the first regular evaluation,
    then every `every` steps (default: every epoch), and the last step."""
    every = every or steps_per_epoch
    steps = set(range(every, total_steps + 1, every)) | {total_steps}
    if log_spaced:
        steps |= {int(s) for s in 2 ** np.arange(0, 40) if s < min(every, total_steps)}
    return sorted(steps)


def is_evaluation_step(step: int, total_steps: int, steps_per_epoch: int,
                       every: int | None = None, log_spaced: bool = True) -> bool:
    """Whether `eval_schedule` holds `step`, without making the schedule (its
    memory would grow with the run's length)."""
    every = every or steps_per_epoch
    if not 1 <= step <= total_steps:
        return False
    if step % every == 0 or step == total_steps:
        return True
    return log_spaced and step < min(every, total_steps) and step & (step - 1) == 0


def adjusted_overfit(train_accuracy: float, test_accuracy: float, noise_rate: float,
                     num_classes: int) -> float:
    """Training accuracy above what a model that only generalizes would reach on
    labels of which a fraction `noise_rate` was redrawn uniformly at random:
    train_acc - (eps / C + (1 - eps) test_acc)."""
    return train_accuracy - (noise_rate / num_classes + (1 - noise_rate) * test_accuracy)


def m_coherence(norm_of_sum_sq: float, sum_of_norms_sq: float) -> float:
    """||sum_i g_i||^2 / sum_i ||g_i||^2: 1 for orthogonal, m for identical gradients
    (NaN when every gradient is zero)."""
    return norm_of_sum_sq / sum_of_norms_sq if sum_of_norms_sq > 0 else float("nan")


def update_share(update: np.ndarray, part: np.ndarray) -> float:
    """<g, g_part> / <g, g>: the share of the update g that comes from `part`, one
    term of an additive decomposition g = sum of parts (shares add up to 1)."""
    g = np.ravel(update)
    gg = float(np.dot(g, g))
    return float(np.dot(g, np.ravel(part))) / gg if gg > 0 else float("nan")


def update_learning_events(first_learned: np.ndarray, since: np.ndarray,
                           correct: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Learning events after an evaluation at `step` with per-example correctness
    `correct`: the first step each example was classified as its training label,
    and the step since which it has been so classified at every evaluation (the
    step it was learned for good, so far); NOT_LEARNED for none. Pure: returns
    new arrays."""
    correct = np.asarray(correct, bool)
    first = np.where((first_learned == NOT_LEARNED) & correct, step, first_learned)
    since = np.where(correct, np.where(since == NOT_LEARNED, step, since), NOT_LEARNED)
    return first, since


def stayed_learned(first_learned: np.ndarray, since: np.ndarray) -> np.ndarray:
    """Whether each example has been classified as its training label at every
    evaluation since it was first so classified (never forgotten)."""
    return (since == first_learned) & (first_learned != NOT_LEARNED)


def log_histogram(steps: np.ndarray, evaluated: list[int], bins: int = 20) -> np.ndarray:
    """Counts of `steps` (evaluation steps, as learning events are) on up to
    `bins` log-spaced buckets from step 1 to the last of the `evaluated` steps:
    rows (left, right, count), the layout of TensorBoard's histogram summaries.
    A bucket no evaluation falls in is merged into the next, so none is empty
    by construction (evaluations are sparse: 1, 2, 4, ..., then every epoch)."""
    evaluated = np.asarray(evaluated)
    edges = np.geomspace(1, max(evaluated.max(initial=1), 2), bins + 1)
    holding = np.unique(np.clip(np.searchsorted(edges, evaluated, side="right") - 1,
                                0, bins - 1))
    edges = np.concatenate([[1.0], edges[holding + 1]])
    counts, _ = np.histogram(np.clip(steps, 1, edges[-1]), edges)
    return np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)


def evaluate(net, subset: tf.data.Dataset, top5: bool = False) -> dict:
    """Accuracy and loss against the training label, accuracy against the true
    label (and top-5 accuracy) of `net` on a batched evaluation subset, and
    the per-example correctness against the training label (`correct`)."""
    totals, correct = np.zeros(5), []
    evaluate_batch = _eval_fn(net)
    for batch in subset:
        sums, ok = evaluate_batch(batch["image"], batch["label"], batch["true_label"])
        totals += sums.numpy()
        correct.append(ok.numpy())
    n = max(totals[4], 1.0)
    out = {"accuracy": totals[0] / n, "true_label_accuracy": totals[1] / n,
           "loss": totals[2] / n, "count": int(totals[4]),
           "correct": np.concatenate(correct) if correct else np.zeros([0], bool)}
    if top5:
        out["top5"] = totals[3] / n
    return out


_EVAL_FNS: dict[int, object] = {}  # by id(net); each function holds its net, so ids stay unique


def _eval_fn(net):
    """One traced evaluation function per network (the last few networks)."""
    if id(net) not in _EVAL_FNS:
        while len(_EVAL_FNS) >= 8:
            _EVAL_FNS.pop(next(iter(_EVAL_FNS)))
        _EVAL_FNS[id(net)] = tf.function(functools.partial(_eval_batch, net),
                                         reduce_retracing=True)
    return _EVAL_FNS[id(net)]


def _eval_batch(net, images, labels, true_labels):
    logits = tf.cast(net(images, training=False), tf.float32)
    pred = tf.argmax(logits, -1, output_type=tf.int32)
    correct = pred == labels
    k = min(5, logits.shape[-1])
    in_top5 = tf.math.in_top_k(labels, logits, k)
    sums = tf.stack([tf.reduce_sum(tf.cast(correct, tf.float32)),
                     tf.reduce_sum(tf.cast(pred == true_labels, tf.float32)),
                     tf.reduce_sum(example_losses(labels, logits)),
                     tf.reduce_sum(tf.cast(in_top5, tf.float32)),
                     tf.cast(tf.shape(labels)[0], tf.float32)])
    return sums, correct
