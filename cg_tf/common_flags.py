"""Flags shared by several command-line programs (defined once per process)."""

import dataclasses
import os
import re
import sys
import types
import typing
from collections.abc import Iterable
from typing import Any

from absl import app, flags

from cg_tf import console

SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice (label noise; weights and "
                            "data order in training).")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start over what an earlier run with other "
                              "settings made (a run's --model_dir, a pipeline's --output_dir): "
                              "deletes only what this program writes there.")


HELP = ("--help", "-help", "-?", "--helpshort", "--helpfull", "--helpxml")


def run(main, **kwargs) -> None:
    """absl's app.run, except that asking for help exits 0 (absl's --help exits 1,
    which a script or CI reads as a failure). A main module lists the flags it
    shares with other programs in its --help by adopting their modules
    (`flags.adopt_module_key_flags(common_flags)`)."""
    def configured(argv):
        console.configure()
        return main(argv)

    try:
        app.run(configured, **kwargs)
    except SystemExit as e:
        if e.code == 1 and any(a.split("=")[0] in HELP for a in sys.argv[1:]):
            sys.exit(0)
        raise


def make_output_folder(flag: str, path: str | None) -> None:
    """Makes the local folder of the output file `--flag=path` names, before any
    work is written; exits in one line naming the flag if it cannot."""
    try:
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --{flag}={path}: cannot make its folder: {e.strerror}")


# -- flags derived from a configuration dataclass (cg_tf.options) ------------------


def _is_optional(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _nested(f: dataclasses.Field) -> bool:
    """Whether a field is a configuration dataclass of its own (whose fields are flags)."""
    return dataclasses.is_dataclass(f.type) and "help" not in f.metadata


def _flag_fields(cls, skip: Iterable[str]) -> list[dataclasses.Field]:
    """The fields of `cls` that are flags, those of nested dataclasses inlined."""
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if _nested(f):
            out.extend(_flag_fields(f.type, skip))
        else:
            out.append(f)
    return out


def _chosen(cls, skip: Iterable[str], only: Iterable[str] | None) -> list[dataclasses.Field]:
    """The flag fields of `cls`, or (`only`) just those named; a name that is
    no flag field of `cls` raises ValueError."""
    fields = _flag_fields(cls, skip)
    if only is None:
        return fields
    only = set(only)
    unknown = only - {f.name for f in fields}
    if unknown:
        raise ValueError(f"{cls.__name__} has no option {', '.join(sorted(unknown))}")
    return [f for f in fields if f.name in only]


def define(cls, defaults: dict | None = None, skip: Iterable[str] = (),
           only: Iterable[str] | None = None) -> None:
    """Defines a flag per field of the dataclass `cls` (and of its nested
    dataclasses), named like the field, with its help text and default
    (`defaults` overrides the dataclass's, e.g. a program's demo settings);
    with `only`, just the flags of those fields (a program that takes part of
    `cls`, with `from_flags(..., only=)`)."""
    defaults = defaults or {}
    for f in _chosen(cls, skip, only):
        default = defaults.get(f.name, None if f.default is dataclasses.MISSING else f.default)
        meta = f.metadata
        tp, _ = _is_optional(f.type)
        if meta.get("parse"):
            flags.DEFINE_string(f.name, meta["show"](default), meta["help"])
        elif typing.get_origin(tp) is tuple:
            flags.DEFINE_list(f.name, [str(v) for v in default or ()], meta["help"])
        else:
            define_flag = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                           float: flags.DEFINE_float, str: flags.DEFINE_string}[tp]
            define_flag(f.name, default, meta["help"])


def _value(f: dataclasses.Field, value):
    """A flag's value as the field's type."""
    tp, optional = _is_optional(f.type)
    if f.metadata.get("parse"):
        return f.metadata["parse"](value)
    if typing.get_origin(tp) is tuple:
        kind = typing.get_args(tp)[0]
        try:
            items = tuple(kind(v) for v in value)
        except ValueError:
            raise ValueError(f"--{f.name}: {','.join(value)} is not a list of "
                             f"{kind.__name__}") from None
        return items or (None if optional else ())
    return value


def from_flags(cls, overrides: dict | None = None, only: Iterable[str] | None = None,
               defaults: dict | None = None):
    """An instance of `cls` from the flags `define` made (and `overrides`);
    raises ValueError naming a bad flag. With `only` (as `define` had it),
    the fields without a flag take `defaults`, else the dataclass's own."""
    if only is not None:
        only = {f.name for f in _chosen(cls, (), only)}
    return _from_flags(cls, overrides or {}, only, defaults or {})


def _from_flags(cls, overrides: dict, only: set[str] | None, defaults: dict):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif _nested(f):
            kwargs[f.name] = _from_flags(f.type, overrides, only, defaults)
        elif only is None or f.name in only:
            kwargs[f.name] = _value(f, flags.FLAGS[f.name].value)
        elif f.name in defaults:
            kwargs[f.name] = defaults[f.name]
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(as_flags(str(e), cls)) from None


def as_flags(message: str, cls) -> str:
    """A configuration's message in the command line's terms: one that begins
    with a field's name (as the Python-facing ones, MonitorConfig and
    InputOptions, word theirs) begins with its flag."""
    first = re.match(r"\w+", message)
    names = {f.name for f in dataclasses.fields(cls)}
    return f"--{message}" if first and first.group() in names else message
