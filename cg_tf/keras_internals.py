"""Every private Keras API cg_tf calls, in one place.

They hold for the pinned Keras (setup.py: keras==3.15.*); a Keras upgrade is
checked here first (tests/test_layer_rules.py and tests/test_trainer.py run
every one of them):

  operation_fn          the functional graph's own call of one of its layers
  functional_graph      a Sequential's inner functional model; a Functional itself
  run_through_graph     a functional model's forward with our call of each layer
  nodes_by_depth        a functional model's calls of its layers
  flatten_layers        every layer of a model, nested ones included
  in_multi_worker_mode  whether a MultiWorkerMirroredStrategy spans several workers

RobustModel also overrides keras.Model._maybe_symbolic_build (see there).
"""

import keras
from keras.src.models.functional import operation_fn

__all__ = ["operation_fn", "functional_graph", "run_through_graph", "nodes_by_depth",
           "flatten_layers", "in_multi_worker_mode"]


def functional_graph(layer):
    """The functional model that runs `layer` (a Sequential's inner one), or None."""
    if isinstance(layer, keras.Sequential):
        layer = layer._functional
    return layer if hasattr(layer, "_run_through_graph") and hasattr(layer, "_nodes_by_depth") \
        else None


def run_through_graph(functional, inputs, call):
    return functional._run_through_graph(inputs, operation_fn=call)


def nodes_by_depth(functional) -> dict:
    return functional._nodes_by_depth


def flatten_layers(model) -> list:
    return list(model._flatten_layers())


def in_multi_worker_mode(strategy) -> bool:
    return strategy.extended._in_multi_worker_mode()
