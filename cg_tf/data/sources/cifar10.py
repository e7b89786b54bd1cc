"""The CIFAR-10 binary version (cifar-10-batches-bin).

DIR (or DIR/cifar-10-batches-bin) holds data_batch_1.bin .. data_batch_5.bin
and test_batch.bin: records of 1 label byte and 3072 pixel bytes (R, G, B
planes of 32x32). Example ids are `<file stem>-<index>`; a trailing partial
record is rejected as truncated.
"""

import os
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from cg_tf.data.sources.base import (RawExample, ReadTask, Source, SourceError, files_fingerprint,
                                     require_dir)

_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
_RECORD = 1 + 32 * 32 * 3
_DEFAULT_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck")


class Cifar10Source(Source):
    def __init__(self, spec: str, directory: str):
        self.spec = spec
        require_dir(directory, spec)
        nested = os.path.join(directory, "cifar-10-batches-bin")
        self.directory = nested if tf.io.gfile.isdir(nested) else directory
        self.splits = ("train", "test")
        self.num_classes = 10
        self.image_shape = (32, 32, 3)
        for names in _FILES.values():
            for name in names:
                if not tf.io.gfile.exists(os.path.join(self.directory, name)):
                    raise SourceError(f"--source={spec}: {self.directory!r} has no {name}")
        meta = os.path.join(self.directory, "batches.meta.txt")
        self.class_names = _DEFAULT_NAMES
        if tf.io.gfile.exists(meta):
            with tf.io.gfile.GFile(meta) as f:
                names = tuple(line.strip() for line in f if line.strip())
            if len(names) == self.num_classes:
                self.class_names = names

    def _paths(self) -> list[str]:
        return [os.path.join(self.directory, n) for names in _FILES.values() for n in names]

    def fingerprint(self) -> str:
        return files_fingerprint(self._paths(), self.directory)

    def read_tasks(self) -> list[ReadTask]:
        return [ReadTask(split, (name,)) for split, names in _FILES.items() for name in names]

    def read(self, task: ReadTask) -> Iterator[RawExample]:
        (name,) = task.args
        with tf.io.gfile.GFile(os.path.join(self.directory, name), "rb") as f:
            data = f.read()
        stem = name.removesuffix(".bin")
        for i in range(0, -(-len(data) // _RECORD)):
            record = data[i * _RECORD:(i + 1) * _RECORD]
            eid, origin = f"{stem}-{i:05d}", f"{name}[{i}]"
            if len(record) < _RECORD:
                yield RawExample(task.split, eid, -1, origin,
                                 error=f"truncated: record {i} has {len(record)} of {_RECORD} bytes")
                continue
            pixels = np.frombuffer(record, np.uint8, offset=1).reshape(3, 32, 32).transpose(1, 2, 0)
            yield RawExample(task.split, eid, record[0], origin, pixels=pixels)
