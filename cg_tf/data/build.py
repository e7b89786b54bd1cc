"""Builds a noisy-label dataset directory: checks, the Beam run, dataset_info.json.

Everything that can be wrong with the request (the source, the noise flags, the
output directory) is checked before the pipeline starts. dataset_info.json is
written last, only after the run succeeded and the rejects are within bounds,
so an interrupted or failed run never looks complete to a reader.

Before the run, build_manifest.json lists every name the build may create in
the directory (its shards, info and rejects files, its work folder and itself);
--overwrite deletes exactly those, and refuses a directory holding anything
else.
"""

import dataclasses
import json
import logging
import os
import time

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from cg_tf.data import records, verify
from cg_tf.data.beam import noisy_dataset
from cg_tf.data.noise import NoiseSpec
from cg_tf.data.sources import Source, make_source
from cg_tf.options import option
from cg_tf.storage import files, lock, rundir

MANIFEST_FILE = "build_manifest.json"


class BuildError(ValueError):
    """A build request that cannot be carried out; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """A dataset build. The pipelines' flags are the fields with help text
    (cg_tf.options); the output directory, the noise and --overwrite are each
    program's own (a sweep builds one dataset per noise rate in its stages)."""

    output_dir: str
    noise: NoiseSpec = NoiseSpec()
    num_shards: int = option(4, "Shard files per split.")
    max_reject_fraction: float = option(
        0.0, "Fail if more than this fraction of records is rejected.")
    gzip: bool = option(False, "Write gzipped TFRecord shards (.gz).")
    overwrite: bool = False
    train_examples: int | None = option(
        None, "Keep only this many training examples (those whose ids hash lowest for --seed: "
        "the same choice on any runner); default: all.")

    @property
    def compression(self) -> str | None:
        """The shards' TFRecord compression type."""
        return "GZIP" if self.gzip else None

    def __post_init__(self):
        if self.num_shards < 1:
            raise BuildError(f"--num_shards must be at least 1, got {self.num_shards}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise BuildError(f"--max_reject_fraction must be in [0, 1], got "
                             f"{self.max_reject_fraction}")
        if self.train_examples is not None and self.train_examples < 1:
            raise BuildError(f"--train_examples must be positive, got {self.train_examples}")


def build_files(splits: tuple[str, ...], num_shards: int, compression: str | None) -> list[str]:
    """Every name a build creates in its output directory (the manifest lists them)."""
    shards = [records.shard_name(s, i, num_shards, compression)
              for s in splits for i in range(num_shards)]
    return [*shards, records.INFO_FILE, records.INFO_FILE + ".tmp", noisy_dataset.REJECTED_FILE,
            noisy_dataset.WORK_DIR, MANIFEST_FILE]


def write_manifest(path: str, names: list[str]) -> None:
    with tf.io.gfile.GFile(os.path.join(path, MANIFEST_FILE), "w") as f:
        json.dump({"files": names}, f, indent=1)


def built_names(path: str, manifest: dict | None) -> set[str]:
    """The names in `path` a build made: those its manifest lists or, in a
    dataset built before manifests, its info file, shards and rejects file."""
    info = os.path.join(path, records.INFO_FILE)
    try:
        if manifest is not None:
            return set(manifest["files"])
        if tf.io.gfile.exists(info):
            with tf.io.gfile.GFile(info) as f:
                old = records.DatasetInfo.from_json(json.load(f))
            return {records.INFO_FILE, noisy_dataset.REJECTED_FILE} | {
                os.path.basename(p) for s in old.splits for p in old.shard_paths(path, s)}
    except (ValueError, KeyError, TypeError) as e:
        raise BuildError(f"--output_dir={path}: cannot tell which files an earlier build "
                         f"made ({e!r}); refusing to --overwrite it") from e
    return set()


# A dataset directory: its manifest (what the build may create) first, its
# dataset_info.json last (cg_tf.storage.rundir).
LAYOUT = rundir.Layout(owns=built_names, record=MANIFEST_FILE, done=records.INFO_FILE)


def prepare_output_dir(path: str, overwrite: bool) -> None:
    """Makes `path` an empty directory, refusing to clobber anything by accident:
    --overwrite deletes only what an earlier build made (`built_names`)."""
    if not tf.io.gfile.exists(path):
        tf.io.gfile.makedirs(path)
        return
    if not tf.io.gfile.isdir(path):
        raise BuildError(f"--output_dir={path} is a file, not a directory")
    if not rundir.entries(path):
        return
    if not overwrite:
        what = ("a dataset" if tf.io.gfile.exists(os.path.join(path, records.INFO_FILE))
                else "files of an interrupted or failed earlier run")
        raise BuildError(f"--output_dir={path} already holds {what}; pass --overwrite to "
                         "replace it")
    try:
        found = rundir.survey(path, LAYOUT)
    except BuildError:
        raise
    except ValueError as e:  # a damaged manifest
        raise BuildError(f"--output_dir={path}: cannot tell which files an earlier build "
                         f"made ({e}); refusing to --overwrite it") from e
    if found.foreign:
        raise BuildError(f"--output_dir={path} holds files that are not part of a dataset "
                         f"(e.g. {found.foreign[0]!r}); refusing to --overwrite it")
    rundir.clear(found)


def beam_options(beam_args: list[str]) -> PipelineOptions:
    """Beam options from pass-through flags; local FnApiRunner unless --runner is given.

    (Beam's default DirectRunner first tries to download the Prism runner binary.)
    """
    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=FnApiRunner")
    opts = PipelineOptions(args)
    direct = opts.get_all_options()
    if (direct.get("direct_num_workers") or 1) > 1 and not any(
            a.startswith("--direct_running_mode") for a in args):
        args.append("--direct_running_mode=multi_processing")
        opts = PipelineOptions(args)
    return opts


# The embedded default: scikit-learn's 8x8 digits with 50% uniform label noise.
DEMO_DATA_DIR = "data/digits_noisy50"


def ensure_demo_dataset(data_dir: str = DEMO_DATA_DIR) -> str:
    """Builds the default noisy digits dataset with the pipeline on first use;
    returns its directory."""
    if os.path.exists(os.path.join(data_dir, records.INFO_FILE)):
        return data_dir
    logging.info("building the demo dataset in %s (first use)", data_dir)
    build_dataset(make_source("digits"), BuildConfig(
        data_dir, NoiseSpec("uniform", 0.5, 0), num_shards=4, overwrite=True))
    return data_dir


def build_dataset(source: Source, config: BuildConfig,
                  options: PipelineOptions | None = None) -> records.DatasetInfo:
    """Runs the noisy-label pipeline and writes dataset_info.json, holding the
    output directory's lock; returns it."""
    out = config.output_dir
    with lock.hold(out, "dataset build"):
        try:
            return _build(source, config, options)
        except BuildError:
            raise
        except Exception as e:  # a runner wraps its workers' errors in its own types
            if (refusal := files.refused_write(e, out)) is None:
                raise
            # No rerun advice: pipelines.noisy_labels asks for --overwrite at its
            # rerun, and a sweep's rerun starts the stage again by itself.
            raise BuildError(f"cannot write {out}: {refusal.reason}. The directory is left "
                             f"incomplete (no {records.INFO_FILE}): {refusal.remedy} and build "
                             "it again") from None


def _build(source: Source, config: BuildConfig,
           options: PipelineOptions | None) -> records.DatasetInfo:
    out = config.output_dir
    prepare_output_dir(out, config.overwrite)
    write_manifest(out, build_files(source.splits, config.num_shards, config.compression))
    work = os.path.join(out, noisy_dataset.WORK_DIR)
    tf.io.gfile.makedirs(work)
    options = options or beam_options([])
    logging.info("building %s from %s (noise %s, rate %.3g, seed %d) with %s", out, source.spec,
                 config.noise.mode, config.noise.rate, config.noise.seed,
                 options.get_all_options().get("runner"))
    start = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | noisy_dataset.BuildNoisyDataset(
        source, out, config.noise, config.num_shards, config.compression,
        config.train_examples)
    pipeline.run().wait_until_finish()
    with tf.io.gfile.GFile(os.path.join(work, noisy_dataset.STATS_FILE)) as f:
        stats = json.load(f)
    tf.io.gfile.rename(os.path.join(work, noisy_dataset.REJECTED_FILE),
                       os.path.join(out, noisy_dataset.REJECTED_FILE), overwrite=True)
    tf.io.gfile.rmtree(work)
    info = make_info(source, config, stats)
    check_rejects(info, config.max_reject_fraction, out)
    for line in size_warnings(info, config):
        logging.warning("%s", line)
    runner = options.get_all_options().get("runner") or ""
    if "Dataflow" in runner:  # the driver would read every byte the workers wrote
        logging.info("check every record of %s with: python -m cg_tf.data.verify %s", out, out)
    else:  # every record, as written, before the info makes the directory a dataset
        verify.verify_dataset(out, info)
    records.write_info(out, info)
    logging.info("built %s in %.1f s", out, time.monotonic() - start)
    return info


def make_info(source: Source, config: BuildConfig, stats: dict) -> records.DatasetInfo:
    def shards(split):
        names = (records.shard_name(split, i, config.num_shards, config.compression)
                 for i in range(config.num_shards))
        return {n: records.ShardInfo(**stats["shards"][n]) for n in names}

    return records.DatasetInfo(
        num_classes=source.num_classes,
        image_shape=tuple(source.image_shape),
        splits={s: records.SplitInfo(num_shards=config.num_shards, shards=shards(s), **c)
                for s, c in stats["splits"].items()},
        noise=dataclasses.asdict(config.noise),
        noise_matrix=stats["noise_matrix"],
        rejected=stats["rejected"],
        source=source.spec,
        source_fingerprint=source.fingerprint(),
        class_names=tuple(source.class_names),
        compression=config.compression,
        eval_split=source.eval_split,
    )


def check_rejects(info: records.DatasetInfo, max_fraction: float, out: str) -> None:
    rejected = info.rejected["count"]
    total = rejected + sum(s.num_examples for s in info.splits.values())
    if rejected and rejected > max_fraction * total:
        reasons = ", ".join(f"{k}: {n}" for k, n in sorted(info.rejected["by_reason"].items()))
        raise BuildError(
            f"{rejected} of {total} records were rejected ({reasons}), more than "
            f"--max_reject_fraction={max_fraction}; see "
            f"{os.path.join(out, noisy_dataset.REJECTED_FILE)}. The directory is left "
            "incomplete (no dataset_info.json).")


def size_warnings(info: records.DatasetInfo, config: BuildConfig) -> list[str]:
    """What the flags asked for that the source could not give (known only
    once it has been read): fewer training examples than --train_examples,
    more shards than examples."""
    out = []
    train = info.splits.get(records.TRAIN_SPLIT)
    if config.train_examples and train and train.num_examples < config.train_examples:
        out.append(f"--train_examples={config.train_examples:,}: the source has "
                   f"{train.num_examples:,} training examples; the dataset keeps all of them")
    for name, split in info.splits.items():
        empty = sum(1 for shard in split.shards.values() if not shard.num_records)
        if empty:
            out.append(f"--num_shards={config.num_shards:,}: {empty:,} of the {name} split's "
                       f"shards are empty ({split.num_examples:,} examples)")
    return out


def format_summary(info: records.DatasetInfo) -> str:
    """Counts per split, realized noise rate and the noise matrix, as text."""
    lines = [f"source {info.source}: {info.num_classes} classes, images {list(info.image_shape)}"]
    for name, s in info.splits.items():
        lines.append(f"  {name:<11} {s.num_examples:>8,} examples  {s.num_corrupt:>7,} corrupt"
                     f"  in {s.num_shards} shards")
    train = info.splits.get(records.TRAIN_SPLIT)
    if train and train.num_examples:
        lines.append(f"noise {info.noise['mode']} at rate {info.noise['rate']:g}: realized "
                     f"{train.num_corrupt / train.num_examples:.4f} of train labels changed")
    lines.append(f"rejected records: {info.rejected['count']} {info.rejected['by_reason'] or ''}")
    m = np.asarray(info.noise_matrix)
    width = max(5, len(str(m.max())) + 1)
    lines.append("noise matrix (rows: true label, columns: training label):")
    lines.append("      " + "".join(f"{j:>{width}}" for j in range(len(m))))
    for i, row in enumerate(m):
        lines.append(f"{i:>5} " + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
