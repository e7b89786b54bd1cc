"""scikit-learn's bundled 8x8 digits (1,797 real images): the embedded default.

The dataset has no test split, so a fixed, seed-independent 20% of the images
(chosen by a stable hash of the example id) is the test split.
"""

import hashlib
from collections.abc import Iterator

import numpy as np

from cg_tf.data import hashing
from cg_tf.data.sources.base import RawExample, ReadTask, Source

TEST_FRACTION = 0.2


def _load() -> np.ndarray:
    from sklearn.datasets import load_digits
    d = load_digits()
    # Pixel values are 0..16; stretch them to 0..255.
    pixels = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return pixels, d.target.astype(np.int64)


def split_of(example_id: str) -> str:
    return "test" if hashing.stable_uniform(0, example_id, "digits_test") < TEST_FRACTION else "train"


class DigitsSource(Source):
    def __init__(self, spec: str = "digits"):
        self.spec = spec
        self.num_classes = 10
        self.image_shape = (8, 8, 1)
        self.splits = ("train", "test")
        self.class_names = tuple(str(i) for i in range(10))

    def fingerprint(self) -> str:
        pixels, labels = _load()
        return hashlib.sha256(pixels.tobytes() + labels.tobytes()).hexdigest()[:16]

    def read_tasks(self) -> list[ReadTask]:
        return [ReadTask(split) for split in self.splits]

    def read(self, task: ReadTask) -> Iterator[RawExample]:
        pixels, labels = _load()
        for i in range(len(labels)):
            eid = f"digits-{i:04d}"
            if split_of(eid) == task.split:
                yield RawExample(task.split, eid, int(labels[i]), f"sklearn digits[{i}]",
                                 pixels=pixels[i])
