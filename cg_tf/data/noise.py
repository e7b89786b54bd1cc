"""Label-noise assignment: pure functions of (seed, example_id, label).

Modes:
  uniform        with probability `rate` the label is redrawn uniformly over all
                 classes (it may come out unchanged; then it is not corrupt);
  uniform_other  with probability `rate` the label is replaced by a uniformly
                 chosen *different* class;
  permute        the labels of the selected examples (probability `rate`) are
                 shuffled among themselves, preserving the class marginal.
"""

import dataclasses
from collections.abc import Iterable

import numpy as np

from cg_tf.data import hashing

NOISE_MODES = ("uniform", "uniform_other", "permute")


@dataclasses.dataclass(frozen=True)
class NoiseSpec:
    """How to corrupt the labels of the training split."""

    mode: str = "uniform"
    rate: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.mode not in NOISE_MODES:
            raise ValueError(
                f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"noise_rate must be in [0, 1], got {self.rate}")


def is_selected(spec: NoiseSpec, example_id: str) -> bool:
    """Whether the example is chosen for relabelling (probability spec.rate)."""
    return spec.rate > 0 and hashing.stable_uniform(spec.seed, example_id, "select") < spec.rate


def pointwise_label(spec: NoiseSpec, example_id: str, label: int, num_classes: int) -> int:
    """The training label under the `uniform` or `uniform_other` modes."""
    if spec.mode == "permute":
        raise ValueError("permute noise needs all selected labels: use permuted_labels")
    if not is_selected(spec, example_id):
        return label
    if spec.mode == "uniform":
        return hashing.stable_randint(spec.seed, example_id, "label", num_classes)
    offset = 1 + hashing.stable_randint(spec.seed, example_id, "label", num_classes - 1)
    return (label + offset) % num_classes


def permuted_labels(spec: NoiseSpec, selected: Iterable[tuple[str, int]]) -> dict[str, int]:
    """New labels for the selected (example_id, label) pairs: a random permutation.

    The labels listed in one hash order are handed out in another hash order, so
    the result is a uniformly random permutation that depends only on the seed
    and the set of selected ids, not on the order they arrive in.
    """
    items = sorted(selected, key=lambda kv: (hashing.stable_hash64(spec.seed, kv[0], "perm_a"), kv[0]))
    labels = [label for _, label in items]
    receivers = sorted((eid for eid, _ in items),
                       key=lambda eid: (hashing.stable_hash64(spec.seed, eid, "perm_b"), eid))
    return dict(zip(receivers, labels))


def class_labels(where: str, name: str, labels, num_classes: int | None = None,
                 size: int | None = None) -> np.ndarray:
    """`labels` as a 1-D integer array (of `size` entries if given), each in
    [0, num_classes) when num_classes is given; else a ValueError that names
    `where` and the argument."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or not labels.size:
        raise ValueError(f"{where}: {name} must be integer class labels, one per example; got "
                         f"{labels.dtype} of shape {labels.shape}")
    if size is not None and len(labels) != size:
        raise ValueError(f"{where}: {name} has {len(labels)} labels for {size} inputs")
    if labels.min() < 0:
        raise ValueError(f"{where}: {name} holds the negative label {labels.min()}")
    if num_classes is not None and labels.max() >= num_classes:
        raise ValueError(f"{where}: {name} holds the label {labels.max()}, outside the "
                         f"num_classes={num_classes} classes 0 to {num_classes - 1}")
    return labels


def class_count(where: str, num_classes: int | None, *labels: np.ndarray) -> int:
    """`num_classes` (2 or more), or one more than the largest label seen (which
    must then be at least 1: labels of class 0 alone tell no class count)."""
    if num_classes is None:
        count = int(max(a.max() for a in labels)) + 1
        if count < 2:
            raise ValueError(f"{where}: every label is 0, so the number of classes is unknown; "
                             "pass num_classes")
        return count
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 2:
        raise ValueError(f"{where}: num_classes must be an integer of 2 or more, got "
                         f"{num_classes!r}")
    return int(num_classes)


def corrupt_labels(labels, rate: float, mode: str = "uniform", seed: int = 0,
                   num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Noisy training labels for an array of integer labels, with the pipeline's
    semantics (example i's id is str(i)): (noisy labels, is_corrupt), where an
    example is corrupt when its noisy label differs from its true one."""
    where = "corrupt_labels"
    num_classes = class_count(where, num_classes, class_labels(where, "labels", labels))
    labels = class_labels(where, "labels", labels, num_classes)
    try:
        spec = NoiseSpec(mode, rate, seed)
    except ValueError as e:
        raise ValueError(f"{where}: {str(e).replace('noise_', '')}") from None
    ids = [str(i) for i in range(len(labels))]
    if mode == "permute":
        new = permuted_labels(spec, [(i, int(y)) for i, y in zip(ids, labels)
                                     if is_selected(spec, i)])
        noisy = [new.get(i, int(y)) for i, y in zip(ids, labels)]
    else:
        noisy = [pointwise_label(spec, i, int(y), num_classes) for i, y in zip(ids, labels)]
    noisy = np.asarray(noisy, labels.dtype)
    return noisy, noisy != labels
