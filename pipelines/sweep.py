"""The noise sweep: noisy datasets, a grid of training runs, a report.

  python -m pipelines.sweep --flagfile=configs/sweep_winsorize_fashion_mnist.flags

Builds a noisy dataset per --noise_rates (Beam; the dataset flags of
pipelines.noisy_labels), trains every (--aggregators setting, noise rate,
--seeds seed) as its own run under <output_dir>/runs (one TensorBoard logdir),
and writes summary.csv, summary.md and figure.png to --output_dir. Any trainer
flag (python -m cg_tf.train --helpfull) applies to every run; the grid sets
--aggregator and its parameter, --seed, --data_dir and --model_dir. Flags
neither defines go to Beam (--runner=DataflowRunner ...).

Every stage caches its result: rerunning skips what is complete, resumes an
interrupted training run from its checkpoints, and refuses an output
directory made with other parameters unless --overwrite. --only=GLOB runs
just the matching stages (e.g. --only='runs/winsorized_c4*' on one machine).
"""

import sys

from absl import app, flags, logging

from cg_tf import components, sweep
from cg_tf import train as trainer_flags
from cg_tf.common_flags import SEED
from cg_tf.sources import SourceError
from pipelines import dataset_flags

FLAGS = flags.FLAGS
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the sweep's stages and report go.")
_NOISE_RATES = flags.DEFINE_list("noise_rates", ["0.5"], "Noise rates of the grid.")
_AGGREGATORS = flags.DEFINE_list(
    "aggregators", ["mean", "winsorized:1", "winsorized:2", "winsorized:4", "winsorized:8"],
    "Aggregator settings of the grid: name or name:parameter (winsorized:4, trimmed:2, "
    "median_of_means:3).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds of the grid.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild stages made with other parameters.")
_ONLY = flags.DEFINE_string("only", None, "Run only the stages whose names match this glob.")


def main(beam_args: list[str]) -> None:
    if not _OUTPUT_DIR.value:
        raise app.UsageError("--output_dir is required")
    trainer_flags.setup_devices()
    try:
        base = trainer_flags.config_from_flags()
        base.check()
        settings = [sweep.parse_setting(s, base.aggregator) for s in _AGGREGATORS.value]
        rates = [float(r) for r in _NOISE_RATES.value]
        seeds = [int(s) for s in _SEEDS.value]
        points = sweep.grid(settings, rates, seeds)
        build_config = dataset_flags.build_config(_OUTPUT_DIR.value, rates[0], SEED.value)
        for rate in rates:  # every noise rate is valid before anything runs
            dataset_flags.build_config(_OUTPUT_DIR.value, rate, SEED.value)
        stages = sweep.stages(dataset_flags.source(), build_config, beam_args, base, points,
                              base.batch_size)
        manifests = components.run_stages(_OUTPUT_DIR.value, stages, _OVERWRITE.value,
                                          _ONLY.value, log=_progress)
    except (ValueError, SourceError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    paths = sweep.write_report(_OUTPUT_DIR.value, points, manifests)
    with open(paths["md"]) as f:
        print(f.read())
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    print(f"TensorBoard: tensorboard --logdir {_OUTPUT_DIR.value}/runs")


def _progress(message: str) -> None:
    logging.info("%s", message)
    print(message, flush=True)


if __name__ == "__main__":
    app.run(lambda argv: main(argv), flags_parser=dataset_flags.parse_flags)
