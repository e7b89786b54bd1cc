"""Any TFDS image-classification dataset (`tfds:NAME`, e.g. mnist, cifar10,
imagenet2012), already prepared in --tfds_data_dir or prepared from
--tfds_manual_dir. Encoded images are taken as TFDS stores them (no decode);
example ids are TFDS's own `tfds_id`s.
"""

from collections.abc import Iterator

from cg_tf.data.sources.base import RawExample, ReadTask, Source, SourceError, ranges

_TASK_SIZE = 50_000


class TfdsSource(Source):
    def __init__(self, spec: str, name: str, data_dir: str | None = None,
                 manual_dir: str | None = None):
        import tensorflow_datasets as tfds

        self.spec = spec
        self.name = name
        self.data_dir = data_dir
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # tfds raises DatasetNotFoundError and friends.
            raise SourceError(f"--source={spec}: no TFDS dataset {name!r}: {e}") from e
        self.image_key, self.label_key = builder.info.supervised_keys or ("image", "label")
        features = builder.info.features
        if self.image_key not in features or not hasattr(features[self.label_key], "num_classes"):
            raise SourceError(f"--source={spec}: {name!r} is not an image-classification dataset")
        if manual_dir:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        self.num_classes = int(features[self.label_key].num_classes)
        self.class_names = tuple(features[self.label_key].names)
        self.image_shape = tuple(features[self.image_key].shape)
        # Mocked or unprepared metadata may list no splits: assume train/test.
        self.counts = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
        self.splits = tuple(self.counts) or ("train", "test")
        self.version = str(builder.info.version)

    def fingerprint(self) -> str:
        counts = ",".join(f"{s}={n}" for s, n in sorted(self.counts.items()))
        return f"{self.name}:{self.version}:{counts}"

    def read_tasks(self) -> list[ReadTask]:
        tasks = []
        for split in self.splits:
            n = self.counts.get(split, 0)
            tasks += ([ReadTask(split, (f"{split}[{a}:{b}]",)) for a, b in ranges(n, _TASK_SIZE)]
                      if n else [ReadTask(split, (split,))])
        return tasks

    def read(self, task: ReadTask) -> Iterator[RawExample]:
        import tensorflow_datasets as tfds

        builder = tfds.builder(self.name, data_dir=self.data_dir)
        ds = builder.as_dataset(split=task.args[0], shuffle_files=False,
                                decoders={self.image_key: tfds.decode.SkipDecoding()},
                                read_config=tfds.ReadConfig(add_tfds_id=True))
        for ex in tfds.as_numpy(ds):
            eid = ex["tfds_id"].decode()
            yield RawExample(task.split, eid, int(ex[self.label_key]), eid,
                             encoded=bytes(ex[self.image_key]))
