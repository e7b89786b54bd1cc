"""The easy/hard experiment: SGD for a few epochs, then fresh models on the
examples it learned (easy) and on the others (hard), evaluated crosswise.

  python -m pipelines.easy_hard --flagfile=configs/easy_hard_fashion_mnist.flags

Builds the clean dataset (Beam; the dataset flags of pipelines.noisy_labels,
noise rate 0), trains plain SGD for --first_epochs, splits the clean training
set into easy and hard sets of --train_size training and --heldout_size
held-out examples each (Beam), trains a fresh model on each with the trainer's
flags, evaluates each on both held-out sets and the test set, and writes
summary.csv, summary.md and figure.png to --output_dir. Stages cache and
resume as in pipelines.sweep (--overwrite, --only); other flags go to Beam.
"""

from absl import flags

from cg_tf import common_flags
from cg_tf import train_flags
from cg_tf.common_flags import SEED
from cg_tf.experiments import easy_hard_split, runner
from cg_tf.measure import report
from pipelines import shared_flags

_FIRST_EPOCHS = flags.DEFINE_integer("first_epochs", 2, "Epochs of the SGD run that sorts "
                                     "training examples into easy and hard.")
_TRAIN_SIZE = flags.DEFINE_integer("train_size", None, "Training examples per set "
                                   "(default: equal sets, half the smaller one).")
_HELDOUT_SIZE = flags.DEFINE_integer("heldout_size", None, "Held-out examples per set "
                                     "(default: what the smaller set has left).")

# --help lists the flags this program shares with the others too.
flags.adopt_module_key_flags(common_flags)
flags.adopt_module_key_flags(shared_flags)
flags.adopt_module_key_flags(train_flags)


def make_stages(beam_args: list[str]) -> list:
    """The experiment these flags ask for; raises ValueError naming a bad flag
    (or a report file of the output directory that it did not write)."""
    if not shared_flags.KFP_PACKAGE.value:  # the package's tasks check it where they run
        runner.check_report_files(shared_flags.OUTPUT_DIR.value, easy_hard_split.REPORT_FILES)
    train = train_flags.config_from_flags()
    for flag in (_FIRST_EPOCHS, _TRAIN_SIZE, _HELDOUT_SIZE):
        if flag.value is not None and flag.value < 1:
            raise ValueError(f"--{flag.name} must be positive, got {flag.value}")
    return easy_hard_split.pipeline(
        shared_flags.source(),
        shared_flags.build_config(shared_flags.OUTPUT_DIR.value, 0.0, SEED.value), beam_args,
        train, _FIRST_EPOCHS.value,
        easy_hard_split.Sizes(_TRAIN_SIZE.value, _HELDOUT_SIZE.value))


def main(beam_args: list[str]) -> None:
    train_flags.setup_devices()
    manifests = shared_flags.run_pipeline(lambda: make_stages(beam_args),
                                           "pipelines.easy_hard", beam_args)
    if manifests is None or not shared_flags.REPORT.value:
        return
    if (manifests.get("cross_eval") or {}).get("status") != "complete":
        print("cross_eval has not run yet (see --only); no report")
        return
    out = shared_flags.OUTPUT_DIR.value
    paths, text = shared_flags.write_report(
        lambda: easy_hard_split.write_report(out, manifests))
    report.print_outputs(text, paths, f"{out}/runs")


if __name__ == "__main__":
    common_flags.run(lambda argv: main(argv), flags_parser=shared_flags.parse_flags)
