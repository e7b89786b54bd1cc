"""A chosen part of an existing cg_tf dataset, as a source: the easy and hard
sets of the easy/hard experiment are examples of a clean training split,
renamed into new splits by a selection file, and built again by the pipeline."""

import hashlib
from collections.abc import Iterator

import tensorflow as tf

from cg_tf.data import records
from cg_tf.data.sources.base import RawExample, ReadTask, Source, SourceError
from cg_tf.storage import files


def write_selection(path: str, chosen: dict[str, str]) -> None:
    """`example_id<TAB>split` lines, sorted by id."""
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(f"{i}\t{s}\n" for i, s in sorted(chosen.items())))


def read_selection(path: str) -> dict[str, str]:
    with tf.io.gfile.GFile(path) as f:
        return dict(line.rstrip("\n").split("\t") for line in f if line.strip())


class RecordsSource(Source):
    """The examples of `data_dir`'s `from_split` named in a selection file, with
    their true labels, in the splits the file gives them."""

    def __init__(self, data_dir: str, selection_path: str, splits: tuple[str, ...],
                 eval_split: str, from_split: str = records.TRAIN_SPLIT):
        try:
            info = records.load_info(data_dir)
        except records.DatasetError as e:
            raise SourceError(str(e)) from e
        if from_split not in info.splits:
            raise SourceError(f"{data_dir} has no split {from_split!r}")
        self.spec = f"records:{data_dir}:{from_split}"
        self.data_dir, self.selection_path, self.from_split = data_dir, selection_path, from_split
        self.num_classes = info.num_classes
        self.image_shape = tuple(info.image_shape)
        self.class_names = tuple(info.class_names)
        self.splits = splits
        self._eval_split = eval_split
        self._paths = info.shard_paths(data_dir, from_split)
        self._compression = info.compression or ""
        self._source_fingerprint = info.source_fingerprint
        self._selection = None

    @property
    def eval_split(self) -> str:
        return self._eval_split

    def fingerprint(self) -> str:
        selection = files.sha256(self.selection_path)
        return hashlib.sha256(f"{self._source_fingerprint}:{selection}".encode()).hexdigest()[:16]

    def read_tasks(self) -> list[ReadTask]:
        return [ReadTask(self.from_split, (p,)) for p in self._paths]

    def read(self, task: ReadTask) -> Iterator[RawExample]:
        if self._selection is None:  # once per worker
            self._selection = read_selection(self.selection_path)
        (path,) = task.args
        for raw in tf.data.TFRecordDataset(path, compression_type=self._compression):
            feature = tf.train.Example.FromString(raw.numpy()).features.feature
            example_id = feature["example_id"].bytes_list.value[0].decode()
            split = self._selection.get(example_id)
            if split is not None:
                yield RawExample(split, example_id, feature["true_label"].int64_list.value[0],
                                 path, encoded=feature["image"].bytes_list.value[0])
