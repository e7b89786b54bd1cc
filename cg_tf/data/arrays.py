"""Training arrays as the memorization metrics read a dataset.

    noisy, is_corrupt = corrupt_labels(y, 0.5, seed=0)
    data = ArrayData(x, noisy, y, batch_size=100, test=(x_test, y_test))
    model.fit(x, noisy, batch_size=100, epochs=60,
              callbacks=[MemorizationCallback(data, "runs/mine")])

ArrayData offers what the Monitor reads of a Reader (cg_tf.data.reader): the
fixed evaluation subsets (pristine, corrupt, mixed: the first n training
examples, in array order, that are clean / corrupt / either; test: the first
10 n test examples), the whole training set for the exports, the class
count, the steps per epoch of the fit it watches and the noise rate. Inputs
are served as given (the net's own input), labels as int32; example i's id is
str(i), as corrupt_labels names it.
"""

import numpy as np
import tensorflow as tf

from cg_tf.data.noise import class_count, class_labels

EVAL_BATCH = 500


class ArrayData:
    """Inputs `x`, the training (noisy) `labels`, the `true_labels`, the
    `batch_size` fit uses, an optional `test` (inputs, labels) pair, and the
    `noise_rate` the labels were corrupted with (default: the corrupt
    fraction; under uniform noise, which may redraw the same label, the
    rate is larger by a factor C / (C - 1))."""

    def __init__(self, x, labels, true_labels, batch_size: int, test: tuple | None = None,
                 eval_sample_size: int = 1000, noise_rate: float | None = None,
                 num_classes: int | None = None):
        where = "ArrayData"
        self.x = np.asarray(x)
        if not self.x.ndim or not len(self.x):
            raise ValueError(f"{where}: x must hold one or more inputs, got shape {self.x.shape}")
        n = len(self.x)
        given = [class_labels(where, "labels", labels, size=n),
                 class_labels(where, "true_labels", true_labels, size=n)]
        self.test = None
        if test is not None:
            if not isinstance(test, (tuple, list)) or len(test) != 2:
                raise ValueError(f"{where}: test must be an (inputs, labels) pair")
            test_x = np.asarray(test[0])
            if not test_x.ndim or test_x.shape[1:] != self.x.shape[1:]:
                raise ValueError(f"{where}: test inputs have shape {test_x.shape}, the training "
                                 f"inputs {self.x.shape} (one input's shape must agree)")
            given.append(class_labels(where, "test labels", test[1], size=len(test_x)))
        self.num_classes = class_count(where, num_classes, *given)
        self.class_names = ()  # arrays carry no class names
        checked = [class_labels(where, name, a, self.num_classes)
                   for name, a in zip(("labels", "true_labels", "test labels"), given)]
        self.labels, self.true_labels = checked[:2]
        if test is not None:
            self.test = (test_x, checked[2])
        if noise_rate is not None and not 0 <= noise_rate <= 1:
            raise ValueError(f"{where}: noise_rate must be in [0, 1], got {noise_rate}")
        if not 1 <= batch_size <= n:
            raise ValueError(f"ArrayData: batch_size must be between 1 and the {n} examples, "
                             f"got {batch_size}")
        if eval_sample_size < 1:
            raise ValueError(f"ArrayData: eval_sample_size must be positive, got "
                             f"{eval_sample_size}")
        self.batch_size, self.eval_sample_size = batch_size, eval_sample_size
        self.steps_per_epoch = n // batch_size
        self.is_corrupt = self.labels != self.true_labels
        self.labels_changed = float(self.is_corrupt.mean())  # as a Reader's
        rate = self.labels_changed if noise_rate is None else noise_rate
        self.noise = {"rate": rate, "mode": "arrays"}

    def _examples(self, index: np.ndarray) -> tf.data.Dataset:
        return _batched(self.x[index], self.labels[index], self.true_labels[index],
                        [str(i) for i in index])

    def examples(self) -> tf.data.Dataset:
        """The whole training set, batched, in array order."""
        return self._examples(np.arange(len(self.x)))

    def eval_subsets(self, sample_size: int | None = None) -> dict[str, tf.data.Dataset]:
        n = sample_size or self.eval_sample_size
        index = np.arange(len(self.x))
        subsets = {"pristine": self._examples(index[~self.is_corrupt][:n]),
                   "corrupt": self._examples(index[self.is_corrupt][:n]),
                   "mixed": self._examples(index[:n])}
        if self.test is not None:
            x, y = self.test[0][:10 * n], np.asarray(self.test[1][:10 * n])
            subsets["test"] = _batched(x, y, y, [f"test/{i}" for i in range(len(y))])
        return subsets


def _batched(x, labels, true_labels, ids: list[str]) -> tf.data.Dataset:
    """Examples as the reader serves its evaluation subsets, in batches."""
    return tf.data.Dataset.from_tensor_slices({
        "image": x, "label": labels.astype(np.int32), "true_label": true_labels.astype(np.int32),
        "is_corrupt": (labels != true_labels).astype(np.int32),
        "example_id": np.array(ids).astype(bytes)}).batch(EVAL_BATCH)
