"""The fields of the configuration dataclasses carry their help text, so the
command lines derive their flags from the dataclasses (common_flags.define)
and every option is defined once: its name, type, default and meaning here,
its validation in the dataclass's __post_init__."""

import dataclasses
from collections.abc import Callable
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           parse: Callable[[str], Any] | None = None,
           show: Callable[[Any], str] | None = None) -> Any:
    """A dataclass field with its flag's help text; `parse` (text -> value) and
    `show` (value -> text) for a type a flag cannot hold directly."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "parse": parse, "show": show})
