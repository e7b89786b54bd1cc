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
        self.x = np.asarray(x)
        self.labels, self.true_labels = (np.asarray(a) for a in (labels, true_labels))
        n = len(self.x)
        for name, a in (("labels", self.labels), ("true_labels", self.true_labels)):
            if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"ArrayData: {name} must be {n} integer class labels (one per "
                                 f"input), got {a.dtype} of shape {a.shape}")
        if not 1 <= batch_size <= n:
            raise ValueError(f"ArrayData: batch_size must be between 1 and the {n} examples, "
                             f"got {batch_size}")
        if eval_sample_size < 1:
            raise ValueError(f"ArrayData: eval_sample_size must be positive, got "
                             f"{eval_sample_size}")
        self.batch_size, self.eval_sample_size = batch_size, eval_sample_size
        self.steps_per_epoch = n // batch_size
        self.is_corrupt = self.labels != self.true_labels
        self.test = None if test is None else tuple(np.asarray(a) for a in test)
        seen = [self.labels, self.true_labels, *([self.test[1]] if self.test else [])]
        self.num_classes = num_classes or int(max(a.max() for a in seen)) + 1
        rate = float(self.is_corrupt.mean()) if noise_rate is None else noise_rate
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
