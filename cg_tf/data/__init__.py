"""Datasets: the noisy-label pipeline's records, their reader, and arrays.

`corrupt_labels(labels, rate, mode, seed)` gives noisy labels for arrays with
the pipeline's semantics (cg_tf.data.noise)."""

from cg_tf.data.noise import corrupt_labels

__all__ = ["corrupt_labels"]
