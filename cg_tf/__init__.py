"""cg_tf: Coherent Gradients experiments in Keras 3 / TensorFlow."""

__version__ = "0.1.0"
