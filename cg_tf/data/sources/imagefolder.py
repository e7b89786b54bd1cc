"""ImageNet-style image folders.

  DIR/train/<class>/<image>           training images, one folder per class
  DIR/validation/<class>/<image>      clean validation split, either in class folders
  DIR/validation/<image> + DIR/validation_labels.txt    or flat, with a label map
                                      of `<file name> <class>` lines (space or comma)

`val` is accepted for `validation`. Class indices follow the sorted class
folder names of train (as TFDS and torchvision do). Example ids are paths
relative to DIR. The source's JPEG/PNG bytes are stored as they are; images
that do not decode are rejected.
"""

import os
import re
from collections.abc import Iterator

import tensorflow as tf

from cg_tf.data.sources.base import (RawExample, ReadTask, Source, SourceError, files_fingerprint,
                                     ranges, require_dir)

_TASK_SIZE = 1000


def _subdirs(path: str) -> list[str]:
    return sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path)
                  if tf.io.gfile.isdir(os.path.join(path, d)))


def _files(path: str) -> list[str]:
    return sorted(f for f in tf.io.gfile.listdir(path)
                  if not tf.io.gfile.isdir(os.path.join(path, f)) and not f.startswith("."))


class ImageFolderSource(Source):
    def __init__(self, spec: str, directory: str):
        self.spec = spec
        require_dir(directory, spec)
        self.directory = directory
        train = os.path.join(directory, "train")
        require_dir(train, spec)
        self.class_names = tuple(_subdirs(train))
        if not self.class_names:
            raise SourceError(f"--source={spec}: {train!r} has no class folders")
        self.num_classes = len(self.class_names)
        self.image_shape = (None, None, 3)
        self.val_name = next((n for n in ("validation", "val")
                              if tf.io.gfile.isdir(os.path.join(directory, n))), None)
        if self.val_name is None:
            raise SourceError(f"--source={spec}: {directory!r} has no validation/ (or val/) folder")
        val = os.path.join(directory, self.val_name)
        self.val_label_map = None
        if not _subdirs(val):
            self.val_label_map = next(
                (os.path.join(directory, f"{self.val_name}_labels{ext}") for ext in (".txt", ".csv")
                 if tf.io.gfile.exists(os.path.join(directory, f"{self.val_name}_labels{ext}"))),
                None)
            if self.val_label_map is None:
                raise SourceError(f"--source={spec}: {val!r} has no class folders and there is "
                                  f"no {self.val_name}_labels.txt label map")
        self.splits = ("train", "validation")

    def fingerprint(self) -> str:
        # Names and sizes of the class folders' listings: cheap even for ImageNet.
        paths = [os.path.join(self.directory, "train", c) for c in self.class_names]
        paths.append(self.val_label_map or os.path.join(self.directory, self.val_name))
        return files_fingerprint(paths, self.directory) + f"-{self.num_classes}"

    def _label_map_lines(self) -> list[str]:
        with tf.io.gfile.GFile(self.val_label_map) as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]

    def read_tasks(self) -> list[ReadTask]:
        tasks = [ReadTask("train", ("train", c)) for c in self.class_names]
        if self.val_label_map:
            tasks += [ReadTask("validation", ("map", a, b))
                      for a, b in ranges(len(self._label_map_lines()), _TASK_SIZE)]
        else:
            val = os.path.join(self.directory, self.val_name)
            tasks += [ReadTask("validation", (self.val_name, c)) for c in _subdirs(val)]
        return tasks

    def _example(self, split: str, relpath: str, class_name: str) -> RawExample:
        label = self.class_names.index(class_name) if class_name in self.class_names else -1
        path = os.path.join(self.directory, relpath)
        if label < 0:
            return RawExample(split, relpath, -1, path, error=f"unknown class: {class_name!r}")
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                data = f.read()
        except (tf.errors.OpError, OSError) as e:
            return RawExample(split, relpath, label, path, error=f"unreadable file: {e}")
        return RawExample(split, relpath, label, path, encoded=data)

    def read(self, task: ReadTask) -> Iterator[RawExample]:
        if task.args[0] == "map":
            _, start, end = task.args
            for line in self._label_map_lines()[start:end]:
                name, class_name = re.split(r"[,\s]+", line, maxsplit=1)
                yield self._example(task.split, f"{self.val_name}/{name}", class_name.strip())
        else:
            folder, class_name = task.args
            for name in _files(os.path.join(self.directory, folder, class_name)):
                yield self._example(task.split, f"{folder}/{class_name}/{name}", class_name)
