"""Every private Keras, TensorFlow and Beam API cg_tf calls, in one place.

Each holds for the version it was checked against (CHECKED; setup.py pins
the same minor versions); an upgrade is checked here first
(tests/test_layer_rules.py, tests/test_trainer.py and tests/test_pipeline.py
run every one of them; tests/test_packaging.py fails when an installed version
is not the checked one's minor version):

  Keras 3.15.1
  operation_fn          the functional graph's own call of one of its layers
                        (keras.src.models.functional.operation_fn)
  functional_graph      a Sequential's inner functional model (Sequential._functional);
                        a Functional itself (it has _run_through_graph and _nodes_by_depth)
  run_through_graph     a functional model's forward with our call of each layer
                        (Functional._run_through_graph)
  nodes_by_depth        a functional model's calls of its layers (Functional._nodes_by_depth)
  flatten_layers        every layer of a model, nested ones included (Layer._flatten_layers)
  call_has_training_arg whether a layer's call takes `training` (Layer._call_has_training_arg)

  TensorFlow 2.21.0
  in_multi_worker_mode  whether a MultiWorkerMirroredStrategy spans several workers
                        (strategy.extended._in_multi_worker_mode())

  Beam 2.77.0
  beam_options_parser   a parser of every Beam pipeline option, built as Beam builds
                        its own (each PipelineOptions subclass's _add_argparse_args)

RobustModel also overrides keras.Model._maybe_symbolic_build (Keras 3.15.1;
see cg_tf/training/robust_model.py).
"""

import argparse

import keras
from keras.src.models.functional import operation_fn

__all__ = ["CHECKED", "operation_fn", "functional_graph", "run_through_graph", "nodes_by_depth",
           "flatten_layers", "call_has_training_arg", "in_multi_worker_mode",
           "beam_options_parser"]

# The versions the private APIs below were checked against (module: its __version__).
CHECKED = {"keras": "3.15.1", "tensorflow": "2.21.0", "apache_beam": "2.77.0"}


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


def call_has_training_arg(layer) -> bool:
    """Whether the layer's call takes a `training` argument (Keras passes it then)."""
    return bool(getattr(layer, "_call_has_training_arg", False))


def in_multi_worker_mode(strategy) -> bool:
    return strategy.extended._in_multi_worker_mode()


def beam_options_parser() -> argparse.ArgumentParser:
    """An argparse parser of every Beam pipeline option (of each PipelineOptions
    subclass imported so far), without -h."""
    from apache_beam.options.pipeline_options import PipelineOptions
    parser = argparse.ArgumentParser(add_help=False)
    seen = set()
    stack = list(PipelineOptions.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.add(cls)
            stack.extend(cls.__subclasses__())
            cls._add_argparse_args(parser)  # How Beam itself builds its parser.
    return parser
