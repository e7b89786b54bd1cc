"""Whole-file reads and writes for local paths and gs:// alike (tf.io.gfile).

A file is written under a temporary name and renamed into place, so a reader
(or a resumed run) sees the old file or the new one, never half of one.
"""

import hashlib
import json
from typing import Callable, TextIO

import tensorflow as tf


TMP_SUFFIX = ".tmp"  # of the file write_atomically writes before renaming it


def write_atomically(path: str, write: Callable[[TextIO], object], mode: str = "w") -> None:
    """Calls `write` on a temporary file beside `path` (opened with `mode`, "wb"
    for bytes), then renames it to `path`."""
    tmp = path + TMP_SUFFIX
    with tf.io.gfile.GFile(tmp, mode) as f:
        f.write(b"" if "b" in mode else "")  # GFile makes the file at its first write
        write(f)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def write_json(path: str, obj: dict, sort_keys: bool = False) -> None:
    """Writes `obj` as indented JSON, atomically."""
    write_atomically(path, lambda f: json.dump(obj, f, indent=1, sort_keys=sort_keys))


def write_text(path: str, text: str) -> None:
    write_atomically(path, lambda f: f.write(text))


def read_text(path: str) -> str:
    with tf.io.gfile.GFile(path) as f:
        return f.read()


def read_json(path: str) -> dict | None:
    """The JSON object at `path`, or None if there is no such file."""
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is damaged (not JSON: {e}); it may have been cut "
                             "short") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is damaged: it holds a JSON {type(obj).__name__}, not an "
                         "object")
    return obj


def sha256(path: str) -> str:
    """The hex sha256 of a file's bytes (local or gs://)."""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
