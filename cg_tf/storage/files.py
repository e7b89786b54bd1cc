"""Whole-file reads and writes for local paths and gs:// alike (tf.io.gfile).

A file is written under a temporary name and renamed into place, so a reader
(or a resumed run) sees the old file or the new one, never half of one. A
write the storage refuses (full, read-only, ...) is told from other errors by
`refused_write`, so every program can end on it in one line.
"""

import dataclasses
import errno
import hashlib
import json
import os
from typing import Callable, TextIO

import tensorflow as tf


TMP_SUFFIX = ".tmp"  # of the file write_atomically writes before renaming it


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A write the storage refused: why, in its words, and what lets it through."""
    reason: str
    remedy: str


# What only a write can meet, and what lets it through.
_WRITE_ONLY = {os.strerror(errno.ENOSPC): "free space on its disk",
               os.strerror(errno.EDQUOT): "free space in your quota",
               os.strerror(errno.EFBIG): "raise the file-size limit (ulimit -f)",
               os.strerror(errno.EROFS): "make its filesystem writable"}
PERMISSION = os.strerror(errno.EACCES)


def refused_write(e: BaseException, directory: str) -> Refusal | None:
    """The refusal behind `e`, raised while writing under `directory`: from an
    OSError, from TensorFlow's error (a checkpoint, an event file, gs://), or
    from a pipeline runner's error that wraps either. A full disk, a quota, a
    file-size limit or a read-only filesystem only refuse writes; a permission
    refused counts only where the error names a path under `directory` (a read
    refused elsewhere is not a refused write). None for any other error, which
    keeps its traceback."""
    if isinstance(e, OSError):
        text, where = e.strerror or str(e), str(e.filename or "")
    else:
        text = where = e.message if isinstance(e, tf.errors.OpError) else str(e)
    for reason, remedy in _WRITE_ONLY.items():
        if reason in text:
            return Refusal(reason, remedy)
    denied = PERMISSION in text or isinstance(e, tf.errors.PermissionDeniedError)
    if denied and _names(where, str(directory)):
        return Refusal(PERMISSION, "make it writable for you")
    return None


def _names(text: str, directory: str) -> bool:
    """Whether `text` names `directory` (as given, or made absolute)."""
    given = directory.rstrip("/")
    return given in text or ("://" not in given and os.path.abspath(given) in text)


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
