"""Builds a noisy-label TFRecord dataset with Apache Beam.

  python -m pipelines.noisy_labels --source=digits --output_dir=data/digits \
      --noise_mode=uniform --noise_rate=0.5

Flags this program does not define pass through to Beam (--runner,
--direct_num_workers, --project, --region, --temp_location, --setup_file, ...).
"""

import sys

from absl import app, flags, logging

from cg_tf import build
from cg_tf.common_flags import SEED
from cg_tf.sources import SourceError
from pipelines import dataset_flags
from pipelines.dataset_flags import parse_flags

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the dataset (local or gs://).")
_NOISE_RATE = flags.DEFINE_float("noise_rate", 0.0,
                                 "Fraction of training examples relabelled, in [0, 1].")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def main(beam_args: list[str]) -> None:
    if not _OUTPUT_DIR.value:
        raise app.UsageError("--output_dir is required")
    try:
        config = dataset_flags.build_config(_OUTPUT_DIR.value, _NOISE_RATE.value, SEED.value,
                                            _OVERWRITE.value)
        info = build.build_dataset(dataset_flags.source(), config,
                                   build.beam_options(beam_args))
    except (ValueError, SourceError) as e:
        # NoiseSpec, BuildConfig, sources and the build raise ValueErrors naming the flag.
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    print(build.format_summary(info))
    print(f"dataset written to {_OUTPUT_DIR.value}")


if __name__ == "__main__":
    app.run(lambda argv: main(argv), flags_parser=parse_flags)
