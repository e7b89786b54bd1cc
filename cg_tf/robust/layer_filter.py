"""Which layers an aggregator aggregates robustly; the others get the mean gradient.

  AllLayers()     every layer (the papers' setting)
  HiddenLayers()  every layer but the output layer: the layer that makes the
                  model's output (or, if that one has no weights, as an
                  activation or a reshape, the nearest layer before it that has)
  OutputLayer()   the output layer only (the complement of HiddenLayers)

The filters exist to tell apart what a robust aggregate does in each part of
the net: at the papers' length, winsorizing the output layer alone grows it
without bound and keeps accuracy; winsorizing every layer but it collapses
with the output layer bounded (docs/results/winsorization_fashion_mnist).
A filter reads and prints by its `name` (`parse`); an
aggregator carries one (`winsorized:4@hidden`).

The output layer is read from the model's structure (`output_layer`), never
from the order its variables were made in; a model whose structure does not
name one layer (a subclassed model, several outputs, an output made by
joining branches) is refused by `hidden` and `output`.
"""

import dataclasses
from typing import ClassVar

import keras

REGISTRY: dict[str, "LayerFilter"] = {}


def register(cls: type["LayerFilter"]) -> type["LayerFilter"]:
    """Class decorator: makes an instance of `cls` known by its `name`."""
    REGISTRY[cls.name] = cls()
    return cls


def output_layer(model) -> set[int]:
    """The ids of the variables of the layer that makes `model`'s output: the
    layer whose output is the model's, or, while that layer has no trainable
    variables, the one that feeds it; inside a nested model, its own output
    layer. A ValueError when the structure does not name one such layer."""
    outputs = getattr(model, "outputs", None)
    if not outputs:
        raise ValueError(f"model {model.name!r} does not show which layer makes its output (a "
                         "subclassed model): the layer filters 'hidden' and 'output' need a "
                         "functional or Sequential model")
    if len(outputs) > 1:
        raise ValueError(f"model {model.name!r} has {len(outputs)} outputs, so 'the output "
                         "layer' of the layer filters 'hidden' and 'output' is ambiguous")
    makers = {}
    for layer in model.layers:
        try:
            makers[id(layer.output)] = layer
        except (AttributeError, ValueError):  # no output of its own (not called in the graph)
            continue
    tensor = outputs[0]
    while True:
        layer = makers.get(id(tensor))
        if layer is None or isinstance(layer, keras.layers.InputLayer):
            raise ValueError(f"model {model.name!r}: no layer with weights makes its output (it "
                             "comes from an op or straight from its input), so the layer "
                             "filters 'hidden' and 'output' cannot tell its output layer")
        if isinstance(layer, keras.Model) and layer.trainable_variables:
            return output_layer(layer)  # a nested model: its own output layer
        if layer.trainable_variables:
            return {id(v) for v in layer.trainable_variables}
        if isinstance(layer.input, (list, tuple, dict)):
            raise ValueError(f"model {model.name!r}: its output comes from {layer.name!r}, which "
                             "joins several inputs, so the layer filters 'hidden' and 'output' "
                             "cannot tell its output layer")
        tensor = layer.input


@dataclasses.dataclass(frozen=True)
class LayerFilter:
    """Selects, per trainable variable of a model, robust (True) or mean (False)
    aggregation."""

    name: ClassVar[str]

    def robust(self, model) -> list[bool]:
        raise NotImplementedError


@register
@dataclasses.dataclass(frozen=True)
class AllLayers(LayerFilter):
    name: ClassVar[str] = "all"

    def robust(self, model):
        return [True] * len(model.trainable_variables)


@register
@dataclasses.dataclass(frozen=True)
class HiddenLayers(LayerFilter):
    name: ClassVar[str] = "hidden"

    def robust(self, model):
        output = output_layer(model)
        return [id(v) not in output for v in model.trainable_variables]


@register
@dataclasses.dataclass(frozen=True)
class OutputLayer(LayerFilter):
    name: ClassVar[str] = "output"

    def robust(self, model):
        return [not r for r in HiddenLayers().robust(model)]


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
