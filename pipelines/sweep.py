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

from absl import flags

from cg_tf import common_flags
from cg_tf import train_flags
from cg_tf.common_flags import SEED
from cg_tf.experiments import noise_grid
from cg_tf.measure import report
from cg_tf.robust import aggregators
from pipelines import shared_flags

_NOISE_RATES = flags.DEFINE_list("noise_rates", ["0.5"], "Noise rates of the grid.")
_AGGREGATORS = flags.DEFINE_list(
    "aggregators", ["mean", "winsorized:1", "winsorized:2", "winsorized:4", "winsorized:8"],
    "Aggregator settings of the grid: name or name:parameter (winsorized:4, trimmed:2, "
    "median_of_means:3).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds of the grid.")

# --help lists the flags this program shares with the others too.
flags.adopt_module_key_flags(common_flags)
flags.adopt_module_key_flags(shared_flags)
flags.adopt_module_key_flags(train_flags)


def _values(flag, parse, kind: str) -> list:
    """The flag's list, each item parsed; a ValueError naming the flag for an
    empty list or an item `parse` refuses."""
    if not flag.value:
        raise ValueError(f"--{flag.name} is empty: give at least {kind}")
    out = []
    for item in flag.value:
        try:
            out.append(parse(item))
        except ValueError as e:
            raise ValueError(f"--{flag.name}={','.join(flag.value)}: {item!r} is not "
                             f"{kind} ({e})") from None
    return out


def grid_from_flags() -> list[noise_grid.Point]:
    """The grid's runs; raises ValueError naming a bad flag."""
    if not _AGGREGATORS.value:
        raise ValueError("--aggregators is empty: give at least one aggregator")
    settings = [aggregators.parse(s, "--aggregators") for s in _AGGREGATORS.value]
    return noise_grid.grid(settings, _values(_NOISE_RATES, float, "a number"),
                           _values(_SEEDS, seed, "a seed"))


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise ValueError("seeds are integers from 0 to 2**32 - 1")
    return value


def make_stages(beam_args: list[str]) -> list:
    """The sweep these flags ask for; raises ValueError naming a bad flag (or
    a report file of the output directory that the sweep did not write)."""
    if not shared_flags.KFP_PACKAGE.value:  # the package's tasks check it where they run
        noise_grid.check_report_files(shared_flags.OUTPUT_DIR.value)
    base = train_flags.config_from_flags()
    points = grid_from_flags()
    # Every noise rate is checked before anything runs.
    builds = [shared_flags.build_config(shared_flags.OUTPUT_DIR.value, r, SEED.value)
              for r in dict.fromkeys(p.noise_rate for p in points)]
    return noise_grid.stages(shared_flags.source(), builds[0], beam_args, base, points)


def main(beam_args: list[str]) -> None:
    train_flags.setup_devices()
    manifests = shared_flags.run_pipeline(lambda: make_stages(beam_args), "pipelines.sweep",
                                           beam_args)
    if manifests is None or not shared_flags.REPORT.value:
        return
    out = shared_flags.OUTPUT_DIR.value
    paths, text = shared_flags.write_report(
        lambda: noise_grid.write_report(out, grid_from_flags(), manifests))
    report.print_outputs(text, paths, f"{out}/runs")


if __name__ == "__main__":
    common_flags.run(lambda argv: main(argv), flags_parser=shared_flags.parse_flags)
