"""Verifies a dataset directory's shards against its dataset_info.json.

  python -m cg_tf.data.verify DIR      # every record (a local build runs it too)

At open a reader checks what costs O(shards), not O(bytes) (`check_files`):
each shard's size and the digest of its two ends (`records.file_ends_sha256`:
128 KiB read a shard), so a truncated, extended or swapped shard is named
before anything is served. Directories built before cg_tf recorded those get
the full check at open instead.

The full check (`verify_dataset`), for every shard of every split: each
record reads (a corrupt one is named by file, record index and byte offset);
the shard holds the number of records and the `records_sha256` the pipeline
recorded for it (`records.ShardInfo`); every label and true label is in [0,
num_classes); where the image shape is fixed, every image header has that
shape; then the shard's size and ends. Each split's shards together hold its
num_examples. (`records.load_info` has already checked that num_classes agrees
with the class names and the noise matrix.)

Cost: one streaming pass over each shard, in batches, without decoding images
(records are hashed, their labels parsed and PNG headers read): about 10
microseconds a record on one core, plus reading the bytes once.

Directories built before the pipeline recorded per-shard digests get the same
pass without the per-shard count and digest comparison: the record checksums
of the TFRecord format, the labels, the image shapes and the split totals are
still checked.
"""

import logging
import os
import re
import sys

import numpy as np
import tensorflow as tf

from cg_tf.data import images, records
from cg_tf.data.records import INFO_FILE, DatasetError

_BATCH = 1024
_FRAMING = 16  # bytes around each record in a TFRecord stream: length, 2 checksums
_FEATURES = {k: records.FEATURE_SPEC[k] for k in ("image", "label", "true_label", "example_id")}
_REBUILD = "rebuild the dataset (the pipeline with --overwrite)"


def verify_dataset(data_dir: str, info: records.DatasetInfo) -> None:
    """Verifies every split, record by record, then every shard's size and
    ends; raises DatasetError naming the file (and the record) and the problem."""
    for split in info.splits:
        verify_split(data_dir, info, split)
    check_files(data_dir, info)


def has_file_digests(info: records.DatasetInfo) -> bool:
    """Whether the build recorded every shard's size and ends digest."""
    return all(s.num_bytes is not None and s.ends_sha256 is not None
               for split in info.splits.values() for s in split.shards.values()) \
        and all(split.shards for split in info.splits.values())


def check_files(data_dir: str, info: records.DatasetInfo) -> None:
    """Each shard's size and ends digest against dataset_info.json (nothing if
    the build did not record them); raises DatasetError naming the file."""
    for split in info.splits.values():
        for name, shard in split.shards.items():
            if shard.num_bytes is None or shard.ends_sha256 is None:
                continue
            path = os.path.join(data_dir, name)
            size = tf.io.gfile.stat(path).length
            if size != shard.num_bytes:
                raise DatasetError(f"{path} has {size} bytes; {INFO_FILE} says "
                                   f"{shard.num_bytes}: the file was cut short, extended or "
                                   f"replaced after the pipeline wrote it; {_REBUILD}")
            if records.file_ends_sha256(path, size) != shard.ends_sha256:
                raise DatasetError(f"{path}: its first and last bytes do not match the "
                                   f"ends_sha256 in {INFO_FILE}: the file was changed or "
                                   f"replaced after the pipeline wrote it; {_REBUILD}")


def verify_on_open(data_dir: str, info: records.DatasetInfo) -> None:
    """What a reader checks before serving: `check_files`, or every record
    (`verify_dataset`) for a directory built before file digests were recorded."""
    if has_file_digests(info):
        check_files(data_dir, info)
    else:
        logging.info("%s records no shard file digests (an older build): verifying every "
                     "record; rebuild it to open it without that pass", data_dir)
        verify_dataset(data_dir, info)


def verify_split(data_dir: str, info: records.DatasetInfo, split: str) -> None:
    expected = info.splits[split]
    total = 0
    for path in info.shard_paths(data_dir, split):
        digest = scan_shard(path, info)
        total += digest.count
        name = os.path.basename(path)
        if not expected.shards:
            continue  # Built before per-shard digests.
        recorded = expected.shards.get(name)
        if recorded is None:
            raise DatasetError(f"{os.path.join(data_dir, INFO_FILE)} records no count and "
                               f"digest for {name}")
        if digest.count != recorded.num_records:
            raise DatasetError(f"{path} holds {digest.count} records; {INFO_FILE} says "
                               f"{recorded.num_records}: the file was changed or replaced "
                               f"after the pipeline wrote it; {_REBUILD}")
        if digest.hexdigest() != recorded.records_sha256:
            raise DatasetError(f"{path}: its records do not match the records_sha256 in "
                               f"{INFO_FILE}: the file was changed or replaced after the "
                               f"pipeline wrote it; {_REBUILD}")
    if total != expected.num_examples:
        raise DatasetError(f"{data_dir!r}: split {split!r} has {total} records in its shards; "
                           f"{INFO_FILE} says num_examples {expected.num_examples}; {_REBUILD}")


def scan_shard(path: str, info: records.DatasetInfo) -> records.RecordDigest:
    """Reads one shard once, checking each batch of records; returns their digest."""
    digest = records.RecordDigest()
    for start, batch in _record_batches(path, info.compression):
        for record in batch:
            digest.update(record)
        _check_examples(path, start, batch, info)
    return digest


def _record_batches(path: str, compression: str | None):
    """(index of the first record, numpy array of serialized records) batches;
    a record that cannot be read raises DatasetError naming it."""
    batches = _dataset(path, compression).batch(_BATCH).as_numpy_iterator()
    index = offset = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            index, offset = _first_unreadable(path, compression, index, offset)
            where = " of the decompressed stream" if compression else ""
            raise DatasetError(f"{path}: cannot read record {index}, which starts at byte "
                               f"{offset}{where}: {op_message(e)}; the file is corrupt: "
                               f"{_REBUILD}") from e
        yield index, batch
        index += len(batch)
        offset += sum(len(r) for r in batch) + _FRAMING * len(batch)


def _dataset(path: str, compression: str | None) -> tf.data.Dataset:
    return tf.data.TFRecordDataset(path, compression_type=compression or "")


def _first_unreadable(path: str, compression: str | None, index: int,
                      offset: int) -> tuple[int, int]:
    """(index, byte offset) of the first record from record `index` (at
    `offset`) on that does not read: rereads them one at a time, which is slow
    but happens only after a batch failed."""
    try:
        for record in _dataset(path, compression).skip(index).as_numpy_iterator():
            index, offset = index + 1, offset + len(record) + _FRAMING
    except tf.errors.OpError:
        pass
    return index, offset


def op_message(e: tf.errors.OpError) -> str:
    """TensorFlow's error message without the op and function names around it."""
    return re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", e.message, flags=re.S).strip()


def first_label_outside(labels: np.ndarray, true_labels: np.ndarray,
                        num_classes: int) -> int | None:
    """Index of the first example whose label or true label is not in [0, num_classes)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes)
                         | (true_labels < 0) | (true_labels >= num_classes))
    return int(bad[0]) if bad.size else None


def _check_examples(path: str, start: int, batch: np.ndarray, info: records.DatasetInfo) -> None:
    """Labels within num_classes and, where it is fixed, the declared image shape."""
    try:
        ex = {k: v.numpy() for k, v in tf.io.parse_example(batch, _FEATURES).items()}
    except tf.errors.OpError as e:
        raise DatasetError(f"{path}: records {start} to {start + len(batch) - 1} are not "
                           f"examples of the cg_tf record schema: {op_message(e)}") from e

    def record(i):
        return f"{path}: record {start + i} ({ex['example_id'][i].decode()})"

    c = info.num_classes
    i = first_label_outside(ex["label"], ex["true_label"], c)
    if i is not None:
        raise DatasetError(f"{record(i)} has label {ex['label'][i]} and true_label "
                           f"{ex['true_label'][i]}; {INFO_FILE} says num_classes {c}, so "
                           f"labels must be in [0, {c})")
    shape = tuple(info.image_shape)
    if None in shape:
        return  # Varying sizes: the reader resizes every image to --image_size.
    for i, data in enumerate(ex["image"]):
        try:
            found = images.header_shape(data)
        except images.DecodeError as e:
            raise DatasetError(f"{record(i)}: {e}") from e
        if found != shape:
            raise DatasetError(f"{record(i)} holds an image of shape {list(found)}; "
                               f"{INFO_FILE} declares image_shape {list(shape)}")


def main(argv: list[str]) -> int:
    """`python -m cg_tf.data.verify DIR...`: the full check of each directory;
    exit status 1 at the first failure, with its message."""
    if not argv:
        print("usage: python -m cg_tf.data.verify DATASET_DIR...", file=sys.stderr)
        return 2
    for data_dir in argv:
        try:
            info = records.load_info(data_dir)
            verify_dataset(data_dir, info)
        except DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        shards = sum(s.num_shards for s in info.splits.values())
        examples = sum(s.num_examples for s in info.splits.values())
        print(f"{data_dir}: {examples:,} records in {shards} shards verified")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
