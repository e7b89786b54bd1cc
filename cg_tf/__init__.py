"""cg_tf: Coherent Gradients in Keras 3 / TensorFlow.

The library face (imported on first use, so that `import cg_tf.data...` in a
Beam worker does not load Keras):

    from cg_tf import RobustModel, Winsorized, MemorizationCallback, Reader
    from cg_tf import ArrayData, corrupt_labels   # the metrics over arrays

Aggregators: Mean, Winsorized, Trimmed, Median, MedianOfMeans, RM3, RA3, and
`parse("winsorized:4")`. `cg_tf.quiet()`, called first, silences TensorFlow's
informational lines. The package's layers are listed in docs/DESIGN.md.
"""

import importlib as _importlib

__version__ = "0.1.0"

_FACE = {
    "RobustModel": "cg_tf.training.robust_model",
    "MemorizationCallback": "cg_tf.measure.callback",
    "MonitorConfig": "cg_tf.measure.monitor",
    "Reader": "cg_tf.data.reader",
    "ArrayData": "cg_tf.data.arrays",
    "ensure_demo_dataset": "cg_tf.data.build",
    "side_by_side": "cg_tf.measure.report",
    "corrupt_labels": "cg_tf.data.noise",
    "NonFiniteLoss": "cg_tf.training.robust_model",
    **{name: "cg_tf.robust.aggregators" for name in (
        "Aggregator", "Mean", "Winsorized", "Trimmed", "Median", "MedianOfMeans", "RM3", "RA3",
        "parse", "register")},
}
__all__ = sorted([*_FACE, "quiet"])


def quiet() -> None:
    """Silences TensorFlow's, XLA's and Beam's informational lines in this
    process, as the command lines do unless --verbosity=1 (warnings stay).
    Call it first, before anything imports TensorFlow: TensorFlow reads its
    log level once, as it loads."""
    from cg_tf import console
    console.silence_libraries()
    console.short_python_log_lines()


def __dir__() -> list[str]:
    """The public face too (imported on first use), for tab completion."""
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    if name in _FACE:
        return getattr(_importlib.import_module(_FACE[name]), name)
    raise AttributeError(f"module 'cg_tf' has no attribute {name!r}")
