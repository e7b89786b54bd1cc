"""Run directories: what one holds, whether it is what is asked, what --overwrite removes.

One policy for the four writers that own a directory: a training run (its
`--model_dir`), a dataset build (`--output_dir`), a pipeline stage (its artifact
directory) and a `MemorizationCallback` (its `log_dir`). Each describes what it
keeps there with a `Layout`:

  record  the JSON file that says what made the directory (what a later run
          compares with what it is asked: `mismatch`); written first and
          removed last, so a directory cleared halfway still shows whose it is;
  done    the file whose presence says the work is complete; written last and
          removed first, so a directory cleared halfway never looks complete;
  owns    the names the writer made there, given the directory and its record
          (a build's record lists its shards): what `clear` removes. Everything
          else is a user's and is never deleted.

`survey` says what a directory holds (`Contents`: the record, the writer's own
entries, the others). A writer refuses what does not match unless told to
overwrite, and then `clear`s only its own entries. Two processes are kept out
of one directory by its lock (cg_tf.storage.lock).
"""

import dataclasses
import fnmatch
import os
from collections.abc import Callable, Container

import tensorflow as tf

from cg_tf import provenance
from cg_tf.storage import files
from cg_tf.storage.lock import LOCK_FILE


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Names:
    """Entry names: `exact` ones and those matching `globs`."""
    exact: frozenset[str] = frozenset()
    globs: tuple[str, ...] = ()

    def __contains__(self, name: object) -> bool:
        return name in self.exact or any(fnmatch.fnmatchcase(str(name), g) for g in self.globs)


EVERYTHING = Names(globs=("*",))


@dataclasses.dataclass(frozen=True)
class Layout:
    """What one kind of writer keeps in its directory (see the module docstring)."""
    owns: Callable[[str, dict | None], Container[str]]  # (directory, its record) -> names
    record: str | None = None
    done: str | None = None


@dataclasses.dataclass(frozen=True)
class Contents:
    """What a directory holds for one layout: its record (None if absent), the
    writer's own entries and the rest (the lock is neither)."""
    directory: str
    layout: Layout
    record: dict | None
    ours: tuple[str, ...]
    foreign: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return self.layout.done is not None and self.layout.done in self.ours


def entries(directory: str) -> list[str]:
    """The names a directory holds, but its lock, sorted; none if it does not exist."""
    if not tf.io.gfile.isdir(directory):
        return []
    return sorted(e.rstrip("/") for e in tf.io.gfile.listdir(directory)
                  if e.rstrip("/") != LOCK_FILE)


def survey(directory: str, layout: Layout) -> Contents:
    """What `directory` holds, as `layout` sees it; raises ValueError naming a
    damaged record."""
    names = entries(directory)
    record = None
    if layout.record is not None and layout.record in names:
        record = files.read_json(os.path.join(directory, layout.record))
    owned = layout.owns(directory, record)
    return Contents(directory, layout, record, tuple(n for n in names if n in owned),
                    tuple(n for n in names if n not in owned))


def clear(contents: Contents) -> None:
    """Removes the writer's own entries: its done file first, its record last."""
    layout = contents.layout
    for name in sorted(contents.ours, key=lambda n: (n != layout.done, n == layout.record)):
        path = os.path.join(contents.directory, name)
        (tf.io.gfile.rmtree if tf.io.gfile.isdir(path) else tf.io.gfile.remove)(path)


def mismatch(recorded: dict, wanted: dict) -> list[str]:
    """`field: old -> new` for each field of a run's record that differs from
    what is asked, nested fields too. Newer code may continue older work: the
    code that wrote the record (provenance) is not compared, nor a field the
    record lacks that is asked as None (added since, at the default that
    keeps the old behaviour). A stage's fingerprint (experiments.runner) is
    stricter: it covers every field, so a stage made by older code reruns."""
    return [d for d in differences({k: v for k, v in recorded.items() if k != provenance.FIELD},
                                   {k: v for k, v in wanted.items() if k != provenance.FIELD})
            if not d.endswith(f": {ABSENT!r} -> None")]


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`field: old -> new` for each differing (nested) field; a field on one
    side only differs from every value, None included (a field added to the
    code since differs from the record, as the stages' fingerprints say)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, ABSENT), new.get(k, ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a is ABSENT or b is ABSENT or a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def listing(names: tuple[str, ...] | list[str], most: int = 3) -> str:
    """Up to `most` names, quoted, for a message."""
    return ", ".join(map(repr, names[:most])) + (", ..." if len(names) > most else "")
