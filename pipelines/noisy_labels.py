"""Builds a noisy-label TFRecord dataset with Apache Beam.

  python -m pipelines.noisy_labels --source=digits --output_dir=data/digits \
      --noise_mode=uniform --noise_rate=0.5

Flags this program does not define pass through to Beam (--runner,
--direct_num_workers, --project, --region, --temp_location, --setup_file, ...).
"""

import argparse
import sys

from absl import app, flags, logging
from apache_beam.options.pipeline_options import PipelineOptions

from cg_tf import build, noise
from cg_tf.common_flags import SEED
from cg_tf.sources import SOURCE_KINDS, SourceError, make_source

_SOURCE = flags.DEFINE_string("source", "digits", f"One of {', '.join(SOURCE_KINDS)}.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the dataset (local or gs://).")
_NOISE_MODE = flags.DEFINE_enum("noise_mode", "uniform", list(noise.NOISE_MODES),
                                "How corrupt labels are drawn.")
_NOISE_RATE = flags.DEFINE_float("noise_rate", 0.0, "Fraction of training examples relabelled, in [0, 1].")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 4, "Shard files per split.")
_MAX_REJECT = flags.DEFINE_float("max_reject_fraction", 0.0,
                                 "Fail if more than this fraction of records is rejected.")
_COMPRESS = flags.DEFINE_bool("gzip", False, "Write gzipped TFRecord shards (.gz).")
_TRAIN_EXAMPLES = flags.DEFINE_integer(
    "train_examples", None, "Keep only this many training examples (those whose ids hash "
    "lowest for --seed: the same choice on any runner); default: all.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "TFDS data dir for tfds: sources.")
_TFDS_MANUAL_DIR = flags.DEFINE_string("tfds_manual_dir", None,
                                       "TFDS manual dir (e.g. the ImageNet tar files).")


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


def main(beam_args: list[str]) -> None:
    if not _OUTPUT_DIR.value:
        raise app.UsageError("--output_dir is required")
    try:
        spec = noise.NoiseSpec(_NOISE_MODE.value, _NOISE_RATE.value, SEED.value)
        config = build.BuildConfig(
            output_dir=_OUTPUT_DIR.value, noise=spec, num_shards=_NUM_SHARDS.value,
            max_reject_fraction=_MAX_REJECT.value,
            compression="GZIP" if _COMPRESS.value else None, overwrite=_OVERWRITE.value,
            train_examples=_TRAIN_EXAMPLES.value)
        source = make_source(_SOURCE.value, _TFDS_DATA_DIR.value, _TFDS_MANUAL_DIR.value)
        info = build.build_dataset(source, config, build.beam_options(beam_args))
    except (ValueError, SourceError) as e:
        # NoiseSpec, BuildConfig, sources and the build raise ValueErrors naming the flag.
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    print(build.format_summary(info))
    print(f"dataset written to {_OUTPUT_DIR.value}")


if __name__ == "__main__":
    app.run(lambda argv: main(argv), flags_parser=parse_flags)
