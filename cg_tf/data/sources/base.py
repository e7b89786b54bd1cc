"""What every data source provides to the noisy-label pipeline.

A source is a small picklable object. The pipeline asks it for `read_tasks()`
(cheap descriptions of disjoint parts of the data, e.g. one file or one range
of records) at construction time and calls `read(task)` on the workers, so
reading scales out on a distributed runner without listing the data in the
driver.
"""

import abc
import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf


class SourceError(ValueError):
    """A --source that names nothing readable (reported before any work)."""


@dataclasses.dataclass(frozen=True)
class RawExample:
    """One example as the source read it, before validation.

    Exactly one of `pixels` (uint8 HxWxC) or `encoded` (image file bytes) is set,
    unless `error` says why the source could not read the example at all.
    """

    split: str
    example_id: str
    label: int
    origin: str
    pixels: np.ndarray | None = None
    encoded: bytes | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ReadTask:
    split: str
    args: tuple[Any, ...] = ()


class Source(abc.ABC):
    """A readable image-classification dataset."""

    spec: str
    num_classes: int
    image_shape: tuple[int | None, ...]
    splits: tuple[str, ...]
    class_names: tuple[str, ...] = ()

    @property
    def eval_split(self) -> str:
        """The clean split to report test accuracy on."""
        for name in ("test", "validation", "val"):
            if name in self.splits:
                return name
        raise SourceError(f"source {self.spec!r} has no test or validation split")

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A short digest that changes when the source data changes."""

    @abc.abstractmethod
    def read_tasks(self) -> list[ReadTask]:
        """Disjoint parts of the source, each read by one `read` call."""

    @abc.abstractmethod
    def read(self, task: ReadTask) -> Iterator[RawExample]:
        """The examples of one task."""


def require_dir(path: str, spec: str) -> None:
    if not tf.io.gfile.isdir(path):
        raise SourceError(f"--source={spec}: directory {path!r} does not exist")


def files_fingerprint(paths: Sequence[str], root: str) -> str:
    """Digest of the relative names and sizes of files (cheap for huge sources)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(f"{os.path.relpath(p, root)}\x00{tf.io.gfile.stat(p).length}\n".encode())
    return h.hexdigest()[:16]


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most `size` covering range(n)."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]
