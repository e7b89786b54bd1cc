"""Builds a noisy-label TFRecord dataset with Apache Beam.

  python -m pipelines.noisy_labels --source=digits --output_dir=data/digits \
      --noise_mode=uniform --noise_rate=0.5

Flags this program does not define pass through to Beam (--runner,
--direct_num_workers, --project, --region, --temp_location, --setup_file, ...).
"""

import sys

from absl import app, flags

from cg_tf import common_flags
from cg_tf.common_flags import SEED
from cg_tf.data import build
from cg_tf.data.sources import SourceError
from pipelines import shared_flags

_NOISE_RATE = flags.DEFINE_float("noise_rate", 0.0,
                                 "Fraction of training examples relabelled, in [0, 1].")

# --help lists the flags this program shares with the others too.
flags.adopt_module_key_flags(common_flags)
flags.adopt_module_key_flags(shared_flags)


def main(beam_args: list[str]) -> None:
    out = shared_flags.OUTPUT_DIR.value
    if not out:
        raise app.UsageError("--output_dir is required")
    try:
        config = shared_flags.build_config(out, _NOISE_RATE.value, SEED.value,
                                           common_flags.OVERWRITE.value)
        with shared_flags.ends_on_signals("the dataset is not complete; rerun the same "
                                          "command with --overwrite to build it"):
            info = build.build_dataset(shared_flags.source(), config,
                                       build.beam_options(beam_args))
    except (ValueError, SourceError) as e:
        # NoiseSpec, BuildConfig, sources and the build raise ValueErrors naming the flag.
        sys.exit(f"error: {e}")
    print(build.format_summary(info))
    print(f"dataset written to {out}")


if __name__ == "__main__":
    common_flags.run(lambda argv: main(argv), flags_parser=shared_flags.parse_flags)
