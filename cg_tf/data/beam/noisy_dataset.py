"""The noisy-label dataset pipeline as composable Beam transforms.

  read tasks -> read (source) -> validate and encode -> group by (split, shard)
    -> per shard: drop duplicate ids, assign noisy labels, write one TFRecord file
    -> combine statistics (with each shard's record count and digest)
    -> _stats.json;  rejected records -> rejected.jsonl

Each shard holds the examples whose stable id hash falls in it, sorted by a
stable hash, so the files are byte-identical whatever the runner, worker count
or retries. Everything else a run writes (shard temp files, Beam's temp
folders, _stats.json and rejected.jsonl) goes to the work folder WORK_DIR
inside the output directory, so no temp file name can collide with a user's.
The driver (cg_tf.data.build) writes dataset_info.json from _stats.json after the
run succeeds; the command line is pipelines/noisy_labels.py.
"""

import json
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import tensorflow as tf

from cg_tf.data import hashing, images, noise, records
from cg_tf.data.beam.progress import Progress
from cg_tf.data.sources import RawExample, ReadTask, Source

REJECTED = "rejected"
STATS_FILE = "_stats.json"
REJECTED_FILE = "rejected.jsonl"
WORK_DIR = "_build_tmp"


class Encoded(NamedTuple):
    """A valid example with its record image bytes and source label."""

    split: str
    example_id: str
    label: int
    origin: str
    image: bytes


def rejection(split: str, example_id: str, origin: str, reason: str) -> dict[str, str]:
    return {"split": split, "example_id": example_id, "origin": origin, "reason": reason}


def reason_kind(reason: str) -> str:
    """The part of a rejection reason before the details, used to count by kind."""
    return reason.split(":", 1)[0]


def validate(raw: RawExample, num_classes: int,
             image_shape: tuple[int | None, ...]) -> Encoded | dict[str, str]:
    """The example ready for writing, or a rejection naming what is wrong."""
    def reject(reason):
        return rejection(raw.split, raw.example_id, raw.origin, reason)

    if raw.error:
        return reject(raw.error)
    if not 0 <= raw.label < num_classes:
        return reject(f"label outside class range: {raw.label} not in [0, {num_classes})")
    try:
        if raw.pixels is not None:
            if None not in image_shape and raw.pixels.shape != tuple(image_shape):
                raise images.DecodeError(f"image shape {raw.pixels.shape}, expected {image_shape}")
            data = images.encode_png(raw.pixels)
        else:
            data = images.normalize_encoded(raw.encoded, image_shape[-1], image_shape)
    except images.DecodeError as e:
        return reject(f"undecodable image: {e}")
    return Encoded(raw.split, raw.example_id, int(raw.label), raw.origin, data)


class ReadFn(beam.DoFn):
    def __init__(self, source: Source):
        self.source = source
        self.read_counter = beam.metrics.Metrics.counter("noisy_labels", "examples_read")

    def setup(self):
        self.progress = Progress("examples read")

    def process(self, task: ReadTask) -> Iterator[RawExample]:
        for raw in self.source.read(task):
            self.read_counter.inc()
            self.progress.add()
            yield raw


class ValidateFn(beam.DoFn):
    def __init__(self, num_classes: int, image_shape: tuple[int | None, ...]):
        self.num_classes = num_classes
        self.image_shape = image_shape
        self.rejected_counter = beam.metrics.Metrics.counter("noisy_labels", "rejected")

    def process(self, raw: RawExample):
        out = validate(raw, self.num_classes, self.image_shape)
        if isinstance(out, dict):
            self.rejected_counter.inc()
            yield beam.pvalue.TaggedOutput(REJECTED, out)
        else:
            yield out


def empty_stats(splits: tuple[str, ...], num_classes: int) -> dict[str, Any]:
    return {"splits": {s: {"num_examples": 0, "num_corrupt": 0} for s in splits},
            "noise_matrix": np.zeros((num_classes, num_classes), np.int64).tolist(),
            "rejected": {"count": 0, "by_reason": {}},
            "shards": {}}  # shard file name -> {"num_records", "records_sha256", "num_bytes",
                          # "ends_sha256"}


class StatsFn(beam.CombineFn):
    """Merges per-shard statistics and rejections into the dataset's totals."""

    def __init__(self, splits: tuple[str, ...], num_classes: int):
        self.splits = splits
        self.num_classes = num_classes

    def create_accumulator(self):
        return empty_stats(self.splits, self.num_classes)

    def add_input(self, acc, item):
        kind, value = item
        if kind == REJECTED:
            acc["rejected"]["count"] += 1
            by = acc["rejected"]["by_reason"]
            k = reason_kind(value["reason"])
            by[k] = by.get(k, 0) + 1
            return acc
        return self.merge_accumulators([acc, value])

    def merge_accumulators(self, accs):
        accs = list(accs)
        out = self.create_accumulator()
        matrix = np.asarray(out["noise_matrix"])
        for a in accs:
            for s, c in a["splits"].items():
                for k in ("num_examples", "num_corrupt"):
                    out["splits"][s][k] += c[k]
            matrix += np.asarray(a["noise_matrix"])
            out["rejected"]["count"] += a["rejected"]["count"]
            out["shards"].update(a["shards"])
            for k, n in a["rejected"]["by_reason"].items():
                out["rejected"]["by_reason"][k] = out["rejected"]["by_reason"].get(k, 0) + n
        out["noise_matrix"] = matrix.tolist()
        return out

    def extract_output(self, acc):
        return acc


class WriteShardFn(beam.DoFn):
    """Writes one shard: dedupes ids, assigns noisy labels, writes atomically
    (a temp file in the work folder, renamed into place)."""

    def __init__(self, output_dir: str, num_shards: int, spec: noise.NoiseSpec,
                 splits: tuple[str, ...], num_classes: int, compression: str | None):
        self.output_dir = output_dir
        self.work_dir = os.path.join(output_dir, WORK_DIR)
        self.num_shards = num_shards
        self.spec = spec
        self.splits = splits
        self.num_classes = num_classes
        self.compression = compression
        self.written = beam.metrics.Metrics.counter("noisy_labels", "examples_written")

    def setup(self):
        self.progress = Progress("examples written")
        tf.io.gfile.makedirs(self.work_dir)

    def training_label(self, ex: Encoded, permuted: dict[str, int]) -> int:
        if ex.split != records.TRAIN_SPLIT:
            return ex.label
        if self.spec.mode == "permute":
            return permuted.get(ex.example_id, ex.label)
        return noise.pointwise_label(self.spec, ex.example_id, ex.label, self.num_classes)

    def process(self, keyed, permuted: dict[str, int]):
        (split, shard), items = keyed
        examples = sorted((e for e in items if e is not None),
                          key=lambda e: (hashing.stable_hash64(0, e.example_id, "order"),
                                         e.example_id, e.origin))
        stats = empty_stats(self.splits, self.num_classes)
        matrix = np.zeros((self.num_classes, self.num_classes), np.int64)
        name = records.shard_name(split, shard, self.num_shards, self.compression)
        tmp = os.path.join(self.work_dir, f"{name}.tmp-{uuid.uuid4().hex}")
        digest = records.RecordDigest()
        kept = None
        with tf.io.TFRecordWriter(tmp, options=self.compression or "") as writer:
            for ex in examples:
                if kept is not None and ex.example_id == kept.example_id:
                    yield beam.pvalue.TaggedOutput(REJECTED, rejection(
                        split, ex.example_id, ex.origin,
                        f"duplicate example_id: kept the copy from {kept.origin}"))
                    continue
                kept = ex
                label = self.training_label(ex, permuted)
                record = records.encode_example(ex.image, label, ex.label, ex.example_id)
                writer.write(record)
                digest.update(record)
                stats["splits"][split]["num_examples"] += 1
                stats["splits"][split]["num_corrupt"] += int(label != ex.label)
                if split == records.TRAIN_SPLIT:
                    matrix[ex.label, label] += 1
                self.written.inc()
                self.progress.add()
        num_bytes = tf.io.gfile.stat(tmp).length
        ends = records.file_ends_sha256(tmp, num_bytes)
        tf.io.gfile.rename(tmp, os.path.join(self.output_dir, name), overwrite=True)
        stats["noise_matrix"] = matrix.tolist()
        stats["shards"][name] = {"num_records": digest.count,
                                 "records_sha256": digest.hexdigest(),
                                 "num_bytes": num_bytes, "ends_sha256": ends}
        yield stats


def first_copy(keyed) -> tuple[str, int]:
    """(id, label) of the copy a shard keeps of an id: the one with the least origin."""
    example_id, copies = keyed
    return example_id, min(copies)[1]


class BuildNoisyDataset(beam.PTransform):
    """Source -> shards of the cg_tf record schema, plus statistics and rejects."""

    def __init__(self, source: Source, output_dir: str, spec: noise.NoiseSpec,
                 num_shards: int, compression: str | None = None,
                 train_examples: int | None = None):
        super().__init__()
        self.train_examples = train_examples
        self.source = source
        self.output_dir = output_dir
        self.spec = spec
        self.num_shards = num_shards
        self.compression = compression

    def _subsample(self, valid):
        """Keeps the `train_examples` training examples whose ids hash lowest
        (exactly that many distinct ids; a stable choice for any runner)."""
        seed, n = self.spec.seed, self.train_examples
        chosen = (valid
                  | "TrainIds" >> beam.FlatMap(
                      lambda e: [e.example_id] if e.split == records.TRAIN_SPLIT else [])
                  | "DistinctIds" >> beam.Distinct()
                  | "RankIds" >> beam.Map(
                      lambda i: (hashing.stable_hash64(seed, i, "subsample"), i))
                  | "LowestHashes" >> beam.combiners.Top.Smallest(n)
                  | "IdSet" >> beam.Map(lambda pairs: frozenset(i for _, i in pairs)))
        return valid | "Subsample" >> beam.Filter(
            lambda e, ids: e.split != records.TRAIN_SPLIT or e.example_id in ids,
            ids=beam.pvalue.AsSingleton(chosen))

    def expand(self, pipeline):
        src = self.source
        work_dir = os.path.join(self.output_dir, WORK_DIR)
        num_shards = self.num_shards
        valid = (pipeline
                 | "Tasks" >> beam.Create(src.read_tasks())
                 | "Spread" >> beam.Reshuffle()
                 | "Read" >> beam.ParDo(ReadFn(src))
                 | "Validate" >> beam.ParDo(ValidateFn(src.num_classes, src.image_shape))
                 .with_outputs(REJECTED, main="valid"))
        good, bad = valid.valid, valid[REJECTED]
        if self.train_examples is not None:
            good = self._subsample(good)

        spec = self.spec
        if spec.mode == "permute" and spec.rate > 0:
            permuted = (good
                        | "Selected" >> beam.Filter(
                            lambda e: e.split == records.TRAIN_SPLIT
                            and noise.is_selected(spec, e.example_id))
                        | "KeyById" >> beam.Map(lambda e: (e.example_id, (e.origin, e.label)))
                        | "GroupIds" >> beam.GroupByKey()
                        | "FirstCopy" >> beam.Map(first_copy)
                        | "AllSelected" >> beam.combiners.ToList()
                        | "Permute" >> beam.Map(lambda pairs: noise.permuted_labels(spec, pairs)))
        else:
            permuted = pipeline | "NoPermutation" >> beam.Create([{}])

        every_shard = pipeline | "EveryShard" >> beam.Create(
            [((s, i), None) for s in src.splits for i in range(num_shards)])
        keyed = good | "KeyByShard" >> beam.Map(
            lambda e: ((e.split, hashing.stable_randint(0, e.example_id, "shard", num_shards)), e))
        written = ((keyed, every_shard)
                   | "AllShards" >> beam.Flatten()
                   | "GroupShards" >> beam.GroupByKey()
                   | "WriteShards" >> beam.ParDo(
                       WriteShardFn(self.output_dir, num_shards, spec, src.splits,
                                    src.num_classes, self.compression),
                       permuted=beam.pvalue.AsSingleton(permuted))
                   .with_outputs(REJECTED, main="stats"))

        rejected = (bad, written[REJECTED]) | "AllRejected" >> beam.Flatten()
        _ = (rejected
             | "RejectedJson" >> beam.Map(lambda r: json.dumps(r, sort_keys=True))
             | "WriteRejected" >> beam.io.WriteToText(
                 os.path.join(work_dir, REJECTED_FILE), num_shards=1,
                 shard_name_template=""))
        _ = (((written.stats | "TagStats" >> beam.Map(lambda s: ("stats", s))),
              (rejected | "TagRejected" >> beam.Map(lambda r: (REJECTED, r))))
             | "StatsInputs" >> beam.Flatten()
             | "Totals" >> beam.CombineGlobally(StatsFn(src.splits, src.num_classes))
             | "StatsJson" >> beam.Map(json.dumps)
             | "WriteStats" >> beam.io.WriteToText(
                 os.path.join(work_dir, STATS_FILE), num_shards=1,
                 shard_name_template=""))
        logging.debug("built the noisy-label pipeline for %s", src.spec)
        return written.stats
