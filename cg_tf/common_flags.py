"""Flags shared by several command-line programs (defined once per process)."""

from absl import flags

SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice (label noise; weights and "
                            "data order in training).")
