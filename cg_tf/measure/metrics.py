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


def evaluate(net, subset, top5: bool = False) -> dict:
    """Accuracy and loss against the training label, accuracy against the true
    label (and top-5 accuracy) of `net` on a batched evaluation subset, and
    the per-example correctness against the training label (`correct`)."""
    return summarize(example_results(net, subset), top5)


def example_results(net, subset) -> dict[str, np.ndarray]:
    """Per example of a batched subset, in its order: `correct` (classified as
    its training label), `true_correct` (as its true label), `top5` (the
    training label among the top 5 logits), the float32 `loss` and the
    `prediction` (the class of the largest logit); and per
    batch the float32 sum of its losses (`batch_loss`). One traced function
    per network and input shape serves every batch of every call."""
    parts = []
    for batch in subset:
        images = batch["image"]
        parts.append([t.numpy() for t in _eval_fn(net, images)(
            images, tf.cast(batch["label"], tf.int32), tf.cast(batch["true_label"], tf.int32))])
    if not parts:
        return {"correct": np.zeros([0], bool), "true_correct": np.zeros([0], bool),
                "top5": np.zeros([0], bool), "loss": np.zeros([0], np.float32),
                "prediction": np.zeros([0], np.int32), "batch_loss": np.zeros([0], np.float32)}
    correct, true_correct, top5, loss, prediction, batch_loss = (
        np.concatenate(p) if p[0].ndim else np.stack(p) for p in zip(*parts))
    return {"correct": correct, "true_correct": true_correct, "top5": top5, "loss": loss,
            "prediction": prediction, "batch_loss": batch_loss}


def take_examples(parts: list[dict[str, np.ndarray]], index: np.ndarray,
                  batch_sizes: list[int]) -> dict[str, np.ndarray]:
    """The results of the examples at `index` of the `parts` (`example_results`
    of subsets, concatenated) as those of a subset of exactly these examples
    in batches of `batch_sizes`: each batch's loss summed as evaluating that
    subset sums it (float32, one reduction per batch), so `summarize` gives
    what evaluating it would, without a forward pass."""
    out = {k: np.concatenate([p[k] for p in parts])[index]
           for k in ("correct", "true_correct", "top5", "loss", "prediction")}
    bounds = np.cumsum([0, *batch_sizes])
    if bounds[-1] != len(index):
        raise ValueError(f"batches of {batch_sizes} examples hold {bounds[-1]}, not the "
                         f"{len(index)} taken")
    loss = tf.constant(out["loss"])
    out["batch_loss"] = np.array([tf.reduce_sum(loss[a:b]).numpy()
                                  for a, b in zip(bounds[:-1], bounds[1:])], np.float32)
    return out


def summarize(results: dict[str, np.ndarray], top5: bool = False) -> dict:
    """`evaluate`'s metrics from a subset's `example_results`."""
    count = len(results["correct"])
    n = float(max(count, 1))
    loss = 0.0
    for batch_sum in results["batch_loss"]:  # in order, in float64
        loss += float(batch_sum)
    out = {"accuracy": float(np.count_nonzero(results["correct"])) / n,
           "true_label_accuracy": float(np.count_nonzero(results["true_correct"])) / n,
           "loss": loss / n, "count": count, "correct": results["correct"],
           "prediction": results["prediction"]}
    if top5:
        out["top5"] = float(np.count_nonzero(results["top5"])) / n
    return out


# By (id(net), input shape, dtype); each function holds its net, so ids stay unique.
_EVAL_FNS: dict[tuple, object] = {}


def _eval_fn(net, images: tf.Tensor):
    """The evaluation function of `net` for batches like `images`, of any
    length (the last few networks and input shapes): traced once."""
    key = (id(net), tuple(images.shape[1:]), images.dtype)
    if key not in _EVAL_FNS:
        while len(_EVAL_FNS) >= 8:
            _EVAL_FNS.pop(next(iter(_EVAL_FNS)))
        labels = tf.TensorSpec([None], tf.int32)
        _EVAL_FNS[key] = tf.function(
            functools.partial(_eval_batch, net),
            input_signature=[tf.TensorSpec([None, *images.shape[1:]], images.dtype),
                             labels, labels])
    return _EVAL_FNS[key]


def _eval_batch(net, images, labels, true_labels):
    logits = tf.cast(net(images, training=False), tf.float32)
    pred = tf.argmax(logits, -1, output_type=tf.int32)
    k = min(5, logits.shape[-1])
    losses = example_losses(labels, logits)
    return (pred == labels, pred == true_labels, tf.math.in_top_k(labels, logits, k), losses,
            pred, tf.reduce_sum(losses))
