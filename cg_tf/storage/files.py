"""Whole-file reads and writes for local paths and gs:// alike (tf.io.gfile).

A file is written under a temporary name and renamed into place, so a reader
(or a resumed run) sees the old file or the new one, never half of one.
"""

import errno
import hashlib
import json
import os
import re
from typing import Callable, TextIO

import tensorflow as tf


TMP_SUFFIX = ".tmp"  # of the file write_atomically writes before renaming it

# The ways a filesystem refuses a write: no space, a quota, a file-size limit
# (ulimit -f, FAT's 4 GB), a read-only filesystem, a directory without write
# permission.
REFUSED = tuple(os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS,
                                         errno.EACCES))


def refused_write(e: BaseException) -> str | None:
    """Why the filesystem refused a write (one of REFUSED), from an OSError,
    from TensorFlow's error (a checkpoint, an event file), or from a pipeline
    runner's error that wraps either; None for any other error, which keeps its
    traceback. The caller names what it was writing."""
    text = e.message if isinstance(e, tf.errors.OpError) else str(e)
    if isinstance(e, OSError):
        text = e.strerror or ""
    return next((reason for reason in REFUSED if reason in text), None)


def op_message(e: tf.errors.OpError) -> str:
    """TensorFlow's error message without the op and function names around it."""
    return re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", e.message, flags=re.S).strip()


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
