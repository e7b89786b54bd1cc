"""Which layers an aggregator aggregates robustly; the others get the mean gradient.

  AllLayers()     every layer (the papers' setting)
  HiddenLayers()  every layer but the output layer (the layer that owns the
                  model's last trainable variable)
  OutputLayer()   the output layer only (the complement of HiddenLayers)

At the papers' length, winsorizing the output layer grows its weights without
bound (docs/results/winsorization_fashion_mnist): its expected winsorized
step points outward where the mean gradient's points inward. `hidden` keeps
the robust aggregation where the papers' claim lives and the mean where the
drift starts. A filter reads and prints by its `name` (`parse`); an
aggregator carries one (`winsorized:4@hidden`).
"""

import dataclasses
from typing import ClassVar

REGISTRY: dict[str, "LayerFilter"] = {}


def register(cls: type["LayerFilter"]) -> type["LayerFilter"]:
    """Class decorator: makes an instance of `cls` known by its `name`."""
    REGISTRY[cls.name] = cls()
    return cls


def layer_path(variable) -> str:
    """The path of the layer that owns a Keras variable (its path without the
    variable's own name)."""
    return variable.path.rpartition("/")[0]


@dataclasses.dataclass(frozen=True)
class LayerFilter:
    """Selects, per trainable variable, robust (True) or mean (False) aggregation."""

    name: ClassVar[str]

    def robust(self, variables: list) -> list[bool]:
        raise NotImplementedError


@register
@dataclasses.dataclass(frozen=True)
class AllLayers(LayerFilter):
    name: ClassVar[str] = "all"

    def robust(self, variables):
        return [True] * len(variables)


@register
@dataclasses.dataclass(frozen=True)
class HiddenLayers(LayerFilter):
    name: ClassVar[str] = "hidden"

    def robust(self, variables):
        if not variables:
            return []
        output = layer_path(variables[-1])
        return [layer_path(v) != output for v in variables]


@register
@dataclasses.dataclass(frozen=True)
class OutputLayer(LayerFilter):
    name: ClassVar[str] = "output"

    def robust(self, variables):
        return [not r for r in HiddenLayers().robust(variables)]


ALL = REGISTRY["all"]


def parse(name: str) -> LayerFilter:
    """The filter called `name`; a ValueError listing the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown layers {name!r}; one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def split(items: list, robust: list[bool]) -> tuple[list, list]:
    """The items of the robust variables, and those of the others, in order."""
    return ([x for x, r in zip(items, robust) if r], [x for x, r in zip(items, robust) if not r])


def merge(robust_items: list, mean_items: list, robust: list[bool]) -> list:
    """The inverse of `split`: one list in the variables' order."""
    robust_items, mean_items = iter(robust_items), iter(mean_items)
    return [next(robust_items) if r else next(mean_items) for r in robust]
