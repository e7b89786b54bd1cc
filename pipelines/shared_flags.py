"""The flags shared by the pipeline mains (noisy_labels, sweep, easy_hard):
the output directory and the dataset flags; and the split of a command line
between a main and Beam. (Defined once, so the mains can share a process.)"""

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable

import tensorflow as tf
from absl import app, flags

from cg_tf import common_flags, keras_internals
from cg_tf.data import build
from cg_tf.data.noise import NOISE_MODES, NoiseSpec
from cg_tf.data.sources import SOURCE_KINDS, Source, SourceError, make_source
from cg_tf.experiments import runner
from cg_tf.storage import files
from cg_tf.training.trainer import Terminated

# What a sweep keeps when a stage is cut short, and how it goes on.
KEPT = ("the complete stages are kept and the one it interrupted starts again (a run from its "
        "last checkpoint)")

OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory (local or gs://).")
ONLY = flags.DEFINE_string("only", None, "Run only the stages whose names match this glob "
                           "(sweep, easy_hard).")
SOURCE = flags.DEFINE_string("source", "digits", f"One of {', '.join(SOURCE_KINDS)}.")
NOISE_MODE = flags.DEFINE_enum("noise_mode", "uniform", list(NOISE_MODES),
                               "How corrupt labels are drawn.")
# The build's own options: a flag per BuildConfig field with help text.
PROGRAM_OWN = ("output_dir", "noise", "overwrite")
common_flags.define(build.BuildConfig, skip=PROGRAM_OWN)
REPORT = flags.DEFINE_bool("report", True, "Write the report at the end (sweep, easy_hard; "
                           "the stage tasks of a KFP package leave it to its report task).")
KFP_PACKAGE = flags.DEFINE_string(
    "kfp_package", None, "Instead of running: write a Kubeflow Pipelines package (YAML) to "
    "this path, one task per stage, for Kubeflow Pipelines or Vertex AI Pipelines "
    "(sweep, easy_hard; needs pip install -e \".[kfp]\").")
KFP_IMAGE = flags.DEFINE_string("kfp_image", None, "The image the package's tasks run in (the "
                                "repository's Dockerfile, pushed to a registry).")
KFP_WORKDIR = flags.DEFINE_string("kfp_workdir", "/opt/cg_tf", "The checkout in the image, "
                                  "where the tasks run.")
KFP_CPU = flags.DEFINE_string("kfp_cpu", None, "CPUs a training task asks for (e.g. 8).")
KFP_MEMORY = flags.DEFINE_string("kfp_memory", None, "Memory a training task asks for (e.g. 32G).")
KFP_ACCELERATOR_TYPE = flags.DEFINE_string(
    "kfp_accelerator_type", None, "Accelerator of a training task (Vertex AI: NVIDIA_TESLA_T4, "
    "NVIDIA_L4, ...; Kubeflow on Kubernetes: nvidia.com/gpu).")
KFP_ACCELERATOR_COUNT = flags.DEFINE_integer("kfp_accelerator_count", 1,
                                             "Accelerators per training task.")
# The flags a package's tasks do not repeat: each sets its own --output_dir and --only.
KFP_OWN = ("kfp_package", "kfp_image", "kfp_workdir", "kfp_cpu", "kfp_memory",
           "kfp_accelerator_type", "kfp_accelerator_count", "output_dir", "only", "report")
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
    _, unknown = keras_internals.beam_options_parser().parse_known_args(args)
    return unknown


def parse_flags(argv: list[str]) -> list[str]:
    """Parses this program's flags; returns the rest, which go to Beam. A flag
    that does not parse (or a missing flagfile) ends the program in absl's
    one line, as the trainer's do."""
    try:
        rest = flags.FLAGS(argv, known_only=True)[1:]
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}\n"
                 "Pass --helpshort or --helpfull to see help on flags.")
    unknown = unknown_beam_args(rest)
    if unknown:
        raise app.UsageError(f"unknown flag(s): {' '.join(unknown)}")
    return rest


class Stopped(BaseException):
    """A signal asked the program to stop outside a training stage's steps (a
    BaseException, as KeyboardInterrupt: no library's `except Exception`
    takes it for an error of its own)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signal.Signals(signum)


@contextlib.contextmanager
def stopped_by_signals():
    """SIGTERM, SIGHUP and SIGINT raise Stopped in the main thread, so a
    dataset build, a split or a report ends as an exception: its stage left to
    start again, its locks released. A training
    stage's steps take the signals over (checkpoint, then Terminated). Python
    swallows an exception raised where the handler happened to run inside a
    garbage collector's callback; the signal is also noted, and the function
    this yields raises Stopped for it (call it where stopping is safe)."""
    noted: list[int] = []

    def stop(signum, frame):
        noted.append(signum)
        raise Stopped(signum)

    def check() -> None:
        if noted:
            raise Stopped(noted[0])

    if threading.current_thread() is not threading.main_thread():
        yield check  # signal handlers belong to the main thread
        return
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield check
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def ends_on_signals(what_next: str):
    """A stop signal (SIGTERM, SIGHUP, SIGINT) outside a training stage's steps
    ends the program in one line, `what_next` in it, with the shell's status;
    yields the check to call where stopping is safe (between stages)."""
    try:
        with stopped_by_signals() as check:
            yield check
            check()  # a signal whose exception was swallowed
    except BaseException as e:  # noqa: B036 (Beam re-raises a DoFn's as a RuntimeError)
        stop = _stop_in(e)
        if stop is None:
            raise
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        print(f"{OUTPUT_DIR.value}: stopped by {signum.name}; {what_next}", file=sys.stderr)
        sys.exit(128 + int(signum))


def _stop_in(e: BaseException | None) -> BaseException | None:
    """The Stopped or KeyboardInterrupt that `e` is or was raised from (Beam
    wraps what a running transform raises), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (Stopped, KeyboardInterrupt)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def run_pipeline(make_stages: Callable[[], list[runner.Stage]], program: str,
                 beam_args: list[str] = ()) -> dict[str, dict] | None:
    """Runs the stages a main asks for under --output_dir (required), with
    --overwrite and --only; returns their manifests. With --kfp_package, writes
    the package of those stages (whose tasks repeat `beam_args`) instead and
    returns None. A bad flag (a ValueError naming it) ends the program with its
    message, before any work."""
    if not OUTPUT_DIR.value:
        raise app.UsageError("--output_dir is required")
    try:
        stages = make_stages()
        if KFP_PACKAGE.value:
            write_kfp_package(stages, program, list(beam_args))
            return None
        with ends_on_signals(f"{KEPT}: rerun the same command to go on") as check:
            return runner.run_stages(OUTPUT_DIR.value, stages, common_flags.OVERWRITE.value,
                                     ONLY.value, before_each=check)
    except (ValueError, SourceError) as e:
        sys.exit(f"error: {e}")
    except Terminated as e:  # a training stage stopped by a signal, checkpointed
        print(f"{OUTPUT_DIR.value}: a training stage {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (OSError, tf.errors.OpError) as e:
        if (refusal := files.refused_write(e, OUTPUT_DIR.value)) is None:
            raise
        sys.exit(f"error: cannot write {OUTPUT_DIR.value}: {refusal.reason}. {KEPT.capitalize()}: "
                 f"{refusal.remedy} and rerun the same command to go on")



def write_report(write: Callable[[], object]):
    """`write()`'s result; a write the disk refuses (full, read-only), or a
    stop signal, ends the program in one line that says the runs are kept."""
    try:
        with ends_on_signals("the runs are complete and kept: rerun the same command to "
                             "write the report"):
            return write()
    except (OSError, tf.errors.OpError) as e:
        if (refusal := files.refused_write(e, OUTPUT_DIR.value)) is None:
            raise
        sys.exit(f"error: cannot write the report in {OUTPUT_DIR.value}: {refusal.reason}. The "
                 f"runs are complete and kept: {refusal.remedy} and rerun the same command to "
                 "write it")


def task_args(beam_args: list[str]) -> list[str]:
    """What every task of a package is told: each flag this program was given
    (on its command line or in a flagfile), by its parsed value, but the
    package's own (KFP_OWN; each task sets --output_dir and --only), then the
    Beam arguments. No flagfile is named: the tasks need none of this
    machine's files."""
    given = [flags.FLAGS[name] for name in sorted(flags.FLAGS)
             if flags.FLAGS[name].present and name not in (*KFP_OWN, "flagfile")]
    return [f.serialize() for f in dict.fromkeys(given)] + beam_args


def package_refused(error: OSError, package: str) -> ValueError | None:
    """The one-line error for a package its file system refused to write, or
    None where the error is about another file (not a failure to write it)."""
    if not error.filename or os.path.abspath(error.filename) != os.path.abspath(package):
        return None
    return ValueError(f"--kfp_package={package}: cannot write it: {error.strerror or error}")


def write_kfp_package(stages: list[runner.Stage], program: str, beam_args: list[str]) -> None:
    """--kfp_package: the stages as a Kubeflow Pipelines package (kfp_package),
    its flags checked before anything is written."""
    from cg_tf.experiments import kfp_package
    if not KFP_IMAGE.value:
        raise ValueError("--kfp_package needs --kfp_image (the image built from the "
                         "repository's Dockerfile)")
    output = OUTPUT_DIR.value
    if "://" not in output and not os.path.isabs(output):
        raise ValueError(f"--output_dir={output} is relative: a package's tasks run in their "
                         "own containers; give a gs:// (or other shared, absolute) path")
    folder = os.path.dirname(os.path.abspath(KFP_PACKAGE.value))
    if not os.path.isdir(folder):
        raise ValueError(f"--kfp_package={KFP_PACKAGE.value}: its folder {folder} does not exist")
    training = kfp_package.Resources(KFP_CPU.value, KFP_MEMORY.value,
                                     KFP_ACCELERATOR_TYPE.value, KFP_ACCELERATOR_COUNT.value)
    try:
        kfp_package.compile_package(
            KFP_PACKAGE.value, f"cg-tf-{program.split('.')[-1]}".replace("_", "-"), program,
            task_args(beam_args), stages, KFP_IMAGE.value, KFP_WORKDIR.value, output, training)
    except OSError as e:
        refused = package_refused(e, KFP_PACKAGE.value)
        if refused is None:
            raise
        raise refused from None
    print(f"{KFP_PACKAGE.value}: {len(stages) + 1} tasks (one per stage, then the report) "
          f"writing to {OUTPUT_DIR.value}; run it on Kubeflow Pipelines or Vertex AI Pipelines")
