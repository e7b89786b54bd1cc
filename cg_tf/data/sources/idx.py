"""MNIST / Fashion-MNIST IDX files (gzipped or not).

DIR holds train-images-idx3-ubyte, train-labels-idx1-ubyte,
t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each optionally `.gz`.
Example ids are `<split>-<index>`. A file shorter than its header says yields
rejected ("truncated") records for the missing images; so does a gzipped file
whose stream is cut off (a partial download) or damaged, for the images past
the cut or the damage.
"""

import gzip
import os
import struct
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from cg_tf.data.sources.base import (RawExample, ReadTask, Source, SourceError, files_fingerprint,
                                     ranges, require_dir)

_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_MAGIC = 0x00000803
_LABEL_MAGIC = 0x00000801
_TASK_SIZE = 10_000


def _find(directory: str, name: str, spec: str) -> str:
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if tf.io.gfile.exists(path):
            return path
    raise SourceError(f"--source={spec}: {directory!r} has no {name} or {name}.gz")


def _open(path: str):
    f = tf.io.gfile.GFile(path, "rb")
    return gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f


def _header(path: str, magic: int, spec: str) -> tuple[int, ...]:
    """The dimensions in an IDX header, checking the magic number."""
    ndim = magic & 0xFF
    raw = _read_range(path, 0, 4 + 4 * ndim, 0, 1)
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise SourceError(f"--source={spec}: {path!r} is not an IDX file with magic "
                          f"{magic:#010x}")
    return struct.unpack(f">{ndim}I", raw[4:])


def _read_range(path: str, header_bytes: int, item_bytes: int, start: int, end: int) -> bytes:
    """The bytes of items [start, end), fewer if the file ends early: a gzip
    stream that is cut off ends where it is cut."""
    want = (end - start) * item_bytes
    parts = []
    with _open(path) as f:
        read = getattr(f, "read1", f.read)  # read1: keeps what decompressed before a cut.
        try:
            f.seek(header_bytes + start * item_bytes)
            while want > 0 and (chunk := read(want)):
                parts.append(chunk)
                want -= len(chunk)
        except (EOFError, zlib.error, gzip.BadGzipFile):
            pass  # A cut or damaged gzip stream: the rest is missing.
    return b"".join(parts)


class IdxSource(Source):
    def __init__(self, spec: str, directory: str):
        self.spec = spec
        require_dir(directory, spec)
        self.directory = directory
        self.splits = ("train", "test")
        self.num_classes = 10
        self.class_names = ()
        self.files = {}
        self.counts = {}
        shapes = set()
        for split, prefix in _PREFIX.items():
            images = _find(directory, f"{prefix}-images-idx3-ubyte", spec)
            labels = _find(directory, f"{prefix}-labels-idx1-ubyte", spec)
            n, h, w = _header(images, _IMAGE_MAGIC, spec)
            (n_labels,) = _header(labels, _LABEL_MAGIC, spec)
            self.files[split] = (images, labels)
            self.counts[split] = max(n, n_labels)
            shapes.add((h, w))
        if len(shapes) != 1:
            raise SourceError(f"--source={spec}: train and test images differ in size {shapes}")
        (h, w), = shapes
        self.image_shape = (h, w, 1)

    def fingerprint(self) -> str:
        return files_fingerprint([p for pair in self.files.values() for p in pair],
                                 self.directory)

    def read_tasks(self) -> list[ReadTask]:
        return [ReadTask(split, r) for split in self.splits
                for r in ranges(self.counts[split], _TASK_SIZE)]

    def read(self, task: ReadTask) -> Iterator[RawExample]:
        start, end = task.args
        images_path, labels_path = self.files[task.split]
        h, w, _ = self.image_shape
        size = h * w
        images = _read_range(images_path, 16, size, start, end)
        labels = _read_range(labels_path, 8, 1, start, end)
        for i in range(start, end):
            eid = f"{task.split}-{i:05d}"
            origin = f"{os.path.basename(images_path)}[{i}]"
            k = i - start
            pixels = images[k * size:(k + 1) * size]
            if len(pixels) < size:
                yield RawExample(task.split, eid, -1, origin,
                                 error=f"truncated: image {i} has {len(pixels)} of {size} bytes")
            elif k >= len(labels):
                yield RawExample(task.split, eid, -1, origin,
                                 error=f"truncated: {os.path.basename(labels_path)} has no label {i}")
            else:
                yield RawExample(task.split, eid, labels[k], origin,
                                 pixels=np.frombuffer(pixels, np.uint8).reshape(h, w, 1))
