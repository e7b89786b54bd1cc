"""The record schema and the dataset_info.json contract (docs/reference.md, "Record schema").

One `tf.train.Example` per training example with the features
  image       encoded image bytes (PNG for fixed-size sources, the source's own
              JPEG/PNG bytes for image folders)
  label       int64, the training label (possibly noisy)
  true_label  int64, the source's label
  is_corrupt  int64 0/1, label != true_label
  example_id  bytes, a stable key from the source, unique within its split

A directory is complete only when its dataset_info.json exists: the pipeline
writes it last, and readers refuse a directory without it. It records, per
shard, the number of records and a digest of them (`ShardInfo`), which
`cg_tf.data.verify` checks before training.
"""

import dataclasses
import hashlib
import os
from typing import Any

import tensorflow as tf

from cg_tf.storage import files

INFO_FILE = "dataset_info.json"
FORMAT_VERSION = 1
TRAIN_SPLIT = "train"


def shard_name(split: str, index: int, num_shards: int, compression: str | None = None) -> str:
    """TFDS-style shard file name, e.g. train.tfrecord-00000-of-00004[.gz]."""
    suffix = ".gz" if compression == "GZIP" else ""
    return f"{split}.tfrecord-{index:05d}-of-{num_shards:05d}{suffix}"


def _int_feature(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def encode_example(image: bytes, label: int, true_label: int, example_id: str) -> bytes:
    """A serialized tf.train.Example in the cg_tf schema."""
    return tf.train.Example(features=tf.train.Features(feature={
        "image": _bytes_feature(image),
        "label": _int_feature(label),
        "true_label": _int_feature(true_label),
        "is_corrupt": _int_feature(int(label != true_label)),
        "example_id": _bytes_feature(example_id.encode("utf-8")),
    })).SerializeToString(deterministic=True)  # Sorted map keys: stable bytes.


FEATURE_SPEC = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "true_label": tf.io.FixedLenFeature([], tf.int64),
    "is_corrupt": tf.io.FixedLenFeature([], tf.int64),
    "example_id": tf.io.FixedLenFeature([], tf.string),
}


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one serialized record (inside tf.data) into its raw features."""
    return tf.io.parse_single_example(serialized, FEATURE_SPEC)


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete or not what was expected."""


class RecordDigest:
    """The `records_sha256` of a shard: sha256 over its records in order, each
    as its length (8 bytes, little-endian) and its bytes. It does not depend on
    the compression, and the writer and the reader compute it as they stream."""

    def __init__(self):
        self._sha = hashlib.sha256()
        self.count = 0

    def update(self, record: bytes) -> None:
        self._sha.update(len(record).to_bytes(8, "little"))
        self._sha.update(record)
        self.count += 1

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


# Bytes at each end of a shard file that `file_ends_sha256` hashes.
ENDS_BYTES = 1 << 16


def file_ends_sha256(path: str, size: int | None = None) -> str:
    """sha256 of a file's size (8 bytes, little-endian), its first ENDS_BYTES
    and its last ENDS_BYTES (the whole file if it is shorter than both): what a
    reader checks of a shard at open, reading at most 128 KiB of it. A
    truncated, extended or replaced shard changes it; an edit inside that keeps
    the size and both ends does not (the full check, `verify`, finds that).
    `size`, the file's if the caller has it, saves asking the filesystem again."""
    sha = hashlib.sha256()
    size = tf.io.gfile.stat(path).length if size is None else size
    sha.update(size.to_bytes(8, "little"))
    # Local files unbuffered: GFile would read a whole buffer (all of a small shard).
    with (open(path, "rb", buffering=0) if "://" not in path
          else tf.io.gfile.GFile(path, "rb")) as f:
        if size <= 2 * ENDS_BYTES:
            sha.update(f.read())
        else:
            sha.update(f.read(ENDS_BYTES))
            f.seek(size - ENDS_BYTES)
            sha.update(f.read(ENDS_BYTES))
    return sha.hexdigest()


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    num_records: int
    records_sha256: str
    # The file's size and `file_ends_sha256`: None in directories built before
    # cg_tf recorded them (their readers verify every record at open).
    num_bytes: int | None = None
    ends_sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    num_examples: int
    num_corrupt: int
    num_shards: int
    # Shard file name -> its count and digest; empty in directories built before
    # cg_tf wrote them (their shards get a verified read without digests).
    shards: dict[str, ShardInfo] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SplitInfo":
        shards = {k: ShardInfo(**v) for k, v in d.get("shards", {}).items()}
        return cls(**{**d, "shards": shards})


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """The parsed dataset_info.json of a dataset directory."""

    num_classes: int
    image_shape: tuple[int | None, ...]
    splits: dict[str, SplitInfo]
    noise: dict[str, Any]
    noise_matrix: list[list[int]]
    rejected: dict[str, Any]
    source: str = ""
    source_fingerprint: str = ""
    class_names: tuple[str, ...] = ()
    compression: str | None = None
    eval_split: str = "test"
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        d["class_names"] = list(self.class_names)
        train = self.splits.get(TRAIN_SPLIT)
        d["realized_noise_rate"] = (train.num_corrupt / train.num_examples
                                    if train and train.num_examples else 0.0)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DatasetInfo":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        kwargs["image_shape"] = tuple(d["image_shape"])
        kwargs["class_names"] = tuple(d.get("class_names", ()))
        kwargs["splits"] = {k: SplitInfo.from_json(v) for k, v in d["splits"].items()}
        return cls(**kwargs)

    def shard_paths(self, data_dir: str, split: str) -> list[str]:
        n = self.splits[split].num_shards
        return [os.path.join(data_dir, shard_name(split, i, n, self.compression))
                for i in range(n)]


def write_info(data_dir: str, info: DatasetInfo) -> None:
    """Writes dataset_info.json atomically: the last step."""
    files.write_json(os.path.join(data_dir, INFO_FILE), info.to_json())


def check_consistent(info: DatasetInfo, path: str) -> None:
    """Checks that the fields of dataset_info.json (at `path`) agree: the class
    space and the image shape (no data is read).

    The labels present cannot show that num_classes is too large (a class may be
    missing from a small build), so num_classes must equal the class space the
    pipeline built with, which it also records as the class names (when the
    source names its classes) and as the C x C noise matrix. `cg_tf.data.verify`
    then checks every label against num_classes.
    """
    c = info.num_classes
    rule = "num_classes must be the number of classes the dataset was built with"
    if info.class_names and len(info.class_names) != c:
        raise DatasetError(f"{path}: num_classes is {c}, but it lists "
                           f"{len(info.class_names)} class_names ({rule})")
    m = info.noise_matrix
    if len(m) != c or any(len(row) != c for row in m):
        raise DatasetError(f"{path}: num_classes is {c}, but its noise_matrix is "
                           f"{len(m)}x{len(m[0]) if m else 0} ({rule})")
    shape = tuple(info.image_shape)
    h_w = shape[:2] if len(shape) == 3 else ()
    if not (len(shape) == 3 and shape[2] in (1, 3)
            and (h_w == (None, None) or all(isinstance(x, int) and x > 0 for x in h_w))):
        raise DatasetError(f"{path}: image_shape {list(shape)} is not [height, width, 1 or 3] "
                           "(height and width null for images of varying size)")


def _parse_info(d: dict, path: str) -> DatasetInfo:
    """DatasetInfo from the JSON of `path`; a DatasetError naming a missing
    field or a count that is not an integer."""
    required = [f.name for f in dataclasses.fields(DatasetInfo)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in d]
    if missing:
        raise DatasetError(f"{path} is damaged: it lacks {', '.join(missing)}")
    c = d["num_classes"]
    if isinstance(c, bool) or not isinstance(c, int):
        raise DatasetError(f"{path}: num_classes must be an integer, got {c!r}")
    try:
        return DatasetInfo.from_json(d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"{path} is damaged: {type(e).__name__} {e}") from None


def load_info(data_dir: str) -> DatasetInfo:
    """Reads and checks dataset_info.json and that every shard it names exists
    (cheap: it reads no records; `cg_tf.data.verify` reads them).

    Raises DatasetError with a message naming the problem: a missing directory,
    an incomplete one (no dataset_info.json: an interrupted or failed run), a
    newer format, fields that disagree (`check_consistent`), or missing shards.
    """
    if not tf.io.gfile.isdir(data_dir):
        raise DatasetError(f"dataset directory {data_dir!r} does not exist")
    path = os.path.join(data_dir, INFO_FILE)
    if not tf.io.gfile.exists(path):
        raise DatasetError(
            f"{data_dir!r} has no {INFO_FILE}: it is not a dataset, or the pipeline that "
            "wrote it was interrupted or failed (rerun it with --overwrite)")
    try:
        d = files.read_json(path)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    info = _parse_info(d, path)
    if info.version > FORMAT_VERSION:
        raise DatasetError(f"{path} has format version {info.version}; this cg_tf reads "
                           f"up to {FORMAT_VERSION}")
    check_consistent(info, path)
    for split in info.splits:
        missing = [p for p in info.shard_paths(data_dir, split) if not tf.io.gfile.exists(p)]
        if missing:
            raise DatasetError(f"{data_dir!r} is incomplete: {len(missing)} shard(s) of split "
                               f"{split!r} are missing, e.g. {os.path.basename(missing[0])}")
    return info
