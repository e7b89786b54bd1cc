"""The flags shared by the pipeline mains (noisy_labels, sweep, easy_hard):
the output directory and the dataset flags; and the split of a command line
between a main and Beam. (Defined once, so the mains can share a process.)"""

import argparse
import sys
from collections.abc import Callable

from absl import app, flags
from apache_beam.options.pipeline_options import PipelineOptions

from cg_tf import common_flags
from cg_tf.data import build
from cg_tf.data.noise import NOISE_MODES, NoiseSpec
from cg_tf.data.sources import SOURCE_KINDS, Source, SourceError, make_source
from cg_tf.experiments import runner

OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory (local or gs://).")
ONLY = flags.DEFINE_string("only", None, "Run only the stages whose names match this glob "
                           "(sweep, easy_hard).")
SOURCE = flags.DEFINE_string("source", "digits", f"One of {', '.join(SOURCE_KINDS)}.")
NOISE_MODE = flags.DEFINE_enum("noise_mode", "uniform", list(NOISE_MODES),
                               "How corrupt labels are drawn.")
# The build's own options: a flag per BuildConfig field with help text.
PROGRAM_OWN = ("output_dir", "noise", "overwrite")
common_flags.define(build.BuildConfig, skip=PROGRAM_OWN)
TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "TFDS data dir for tfds: sources.")
TFDS_MANUAL_DIR = flags.DEFINE_string("tfds_manual_dir", None,
                                      "TFDS manual dir (e.g. the ImageNet tar files).")


def source() -> Source:
    return make_source(SOURCE.value, TFDS_DATA_DIR.value, TFDS_MANUAL_DIR.value)


def build_config(output_dir: str, rate: float, seed: int, overwrite: bool = False
                 ) -> build.BuildConfig:
    """The build these flags ask for, at noise `rate` (raises naming the flag)."""
    return common_flags.from_flags(build.BuildConfig, {
        "output_dir": output_dir, "noise": NoiseSpec(NOISE_MODE.value, rate, seed),
        "overwrite": overwrite})


def unknown_beam_args(args: list[str]) -> list[str]:
    """The arguments that are neither this program's flags nor Beam options."""
    parser = argparse.ArgumentParser(add_help=False)
    seen = set()
    stack = list(PipelineOptions.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.add(cls)
            stack.extend(cls.__subclasses__())
            cls._add_argparse_args(parser)  # How Beam itself builds its parser.
    _, unknown = parser.parse_known_args(args)
    return unknown


def parse_flags(argv: list[str]) -> list[str]:
    """Parses this program's flags; returns the rest, which go to Beam."""
    rest = flags.FLAGS(argv, known_only=True)[1:]
    unknown = unknown_beam_args(rest)
    if unknown:
        raise app.UsageError(f"unknown flag(s): {' '.join(unknown)}")
    return rest


def run_pipeline(make_stages: Callable[[], list[runner.Stage]]) -> dict[str, dict]:
    """Runs the stages a main asks for under --output_dir (required), with
    --overwrite and --only; returns their manifests. A bad flag (a ValueError
    naming it) ends the program with its message, before any work."""
    if not OUTPUT_DIR.value:
        raise app.UsageError("--output_dir is required")
    try:
        return runner.run_stages(OUTPUT_DIR.value, make_stages(), common_flags.OVERWRITE.value,
                                     ONLY.value)
    except (ValueError, SourceError) as e:
        sys.exit(f"error: {e}")
